"""The arithmetic of SPM membranes (rank-r LoRA updates with per-sample strengths), free of diffusers.

`membrane_delta` adds the update of one or several membranes to a layer's output in the forward;
`merged_delta` is the equal weight update for `pv.merge`. See `petl_vision.methods.spm`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def membrane_delta(layer: nn.Module, x: torch.Tensor, output: torch.Tensor, mems: list[nn.Module], coef: torch.Tensor | None,
                   official: bool) -> torch.Tensor:
    """`output` plus the membranes' update of `layer` for input x.

    mems: M `spm.Membrane` modules of this layer (lora_down, lora_up, rank, scale).
    coef: (M, B or 1) strength per membrane and sample, or None for all ones. The update is added by
    one fused addmm / baddbmm (in place when no gradient is recorded), so a membrane costs one extra
    read of x and one of the output.
    """
    conv = isinstance(layer, nn.Conv2d)
    ranks = [m.rank for m in mems]
    down = torch.cat([m.lora_down.weight for m in mems]) if len(mems) > 1 else mems[0].lora_down.weight
    up = torch.cat([m.lora_up.weight for m in mems], dim=1) if len(mems) > 1 else mems[0].lora_up.weight
    # Membranes may be kept in fp32 on a half-precision layer (trainable parameters upcast, as diffusers'
    # `cast_training_params` does): compute in the activations' dtype, the gradient flows back through the cast.
    down = down.to(x.dtype)
    scales = [m.scale for m in mems]
    h = F.conv2d(x, down, None, layer.stride, layer.padding) if conv else F.linear(x, down)  # (B, R, ...) / (B, ..., R)
    channel = 1 if conv else h.dim() - 1

    def per_rank(c: torch.Tensor, reps) -> torch.Tensor:  # (M, B') -> broadcastable to h along the rank dim
        if len(set(reps)) == 1:
            c = c.repeat_interleave(reps[0], dim=0) if reps[0] > 1 else c
        else:
            c = c.repeat_interleave(torch.tensor(reps, device=c.device), dim=0)
        shape = [c.shape[1]] + [1] * (h.dim() - 1)
        shape[channel] = c.shape[0]
        return c.T.reshape(shape)

    def scaled(c: torch.Tensor | None) -> torch.Tensor | float | None:  # c * alpha / r
        if all(v == 1.0 for v in scales):
            return c
        if len(mems) == 1:
            return scales[0] if c is None else c * scales[0]
        factors = torch.tensor(scales, device=h.device, dtype=h.dtype)[:, None]
        return factors if c is None else c * factors

    if not official:
        c = scaled(coef)
        if c is not None:
            h = h * (c if isinstance(c, float) else per_rank(c, ranks))
    else:  # (sum_m c_m D_m x), fed to every c_m (alpha_m / r) U_m
        r = ranks[0]
        if coef is not None:
            h = sum(h.narrow(channel, i * r, r) * per_rank(coef[i:i + 1], [r]) for i in range(len(mems)))
        elif len(mems) > 1:
            h = sum(h.narrow(channel, i * r, r) for i in range(len(mems)))
        h = torch.cat([h] * len(mems), dim=channel) if len(mems) > 1 else h
        c = scaled(coef)
        if c is not None:
            h = h * (c if isinstance(c, float) else per_rank(c, ranks))
    return _add_up(output, h, up, conv)


def _add_up(output: torch.Tensor, h: torch.Tensor, up: torch.Tensor, conv: bool) -> torch.Tensor:
    """output + up(h): Linear up (out, R) on (..., R); 1x1 Conv up (out, R, 1, 1) on (B, R, H, W)."""
    inplace = not torch.is_grad_enabled()
    if conv and not (up.shape[2:] == (1, 1) and output.is_contiguous() and h.is_contiguous()):
        return output + F.conv2d(h, up.to(h.dtype))
    up2 = up.flatten(1).to(output.dtype)
    if conv:
        b, c = output.shape[:2]
        out3, h3 = output.view(b, c, -1), h.reshape(b, h.shape[1], -1).to(output.dtype)
        if inplace:
            out3.baddbmm_(up2.expand(b, *up2.shape), h3)
            return output
        return torch.baddbmm(out3, up2.expand(b, *up2.shape), h3).view_as(output)
    out2, h2 = output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]).to(output.dtype)
    if inplace and out2.data_ptr() == output.data_ptr() and output.is_contiguous():
        out2.addmm_(h2, up2.T)
        return output
    return torch.addmm(out2, h2, up2.T).view_as(output)


def merged_delta(layer: nn.Module, mems: list[nn.Module], coef: torch.Tensor, official: bool) -> torch.Tensor:
    """The weight update (layer.weight's shape) equal to the static membranes (strengths coef (M, 1))."""
    downs = [m.lora_down.weight.flatten(1) for m in mems]  # (r, in * kh * kw)
    ups = [m.lora_up.weight.flatten(1) * (m.alpha / m.rank) for m in mems]  # (out, r)
    if official:
        delta = sum(c * u for c, u in zip(coef[:, 0], ups)) @ sum(c * d for c, d in zip(coef[:, 0], downs))
    else:
        delta = sum(c * u @ d for c, u, d in zip(coef[:, 0], ups, downs))
    return delta.reshape(layer.weight.shape)
