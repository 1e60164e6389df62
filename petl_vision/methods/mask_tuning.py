"""Regularized Mask Tuning (R-AMT; Zheng et al., ICCV 2023).

A binary mask on selected weights, learned through real-valued scores:
``W_eff = W * (score > threshold)``, scores initialised to 1e-2 (so every mask starts at 1) with a
threshold of 5e-3, and a straight-through gradient (d mask / d score = 1). Only the scores train.

Targets (the official CLIP ViT-B/16 setup): the attention in-projection (open_clip's fused raw
`nn.MultiheadAttention.in_proj_weight`, timm's `attn.qkv`), the attention out-projection
(`attn.out_proj`, `attn.proj`) and the convolutions (on a ViT, the patch conv; on CNNs every conv,
as the official CLIP ResNet setup masks). `mask_mlp=True` adds the MLP linears. On a CLIP model
(anything with a `.visual` tower) only the image tower is searched. `target_params` (a regular
expression over parameter names) selects any Linear/Conv weight or raw weight instead.

The mask is a `torch.nn.utils.parametrize` parametrization of the weight, so it works the same on
Linear/Conv weights and on raw parameters that modules read directly (the fused in-projection,
`out_proj.weight` that nn.MultiheadAttention reads without calling the Linear). Tensors SSF already
parametrizes (its row scaling of those same raw weights) get the mask stacked on top: an elementwise
mask commutes with scaling rows. `merge` bakes ``W * mask`` into the weight and removes the
parametrization: a plain model with the same keys (under SSF: into the raw weight, SSF's merge follows).

Training (the `MaskTuning` training hooks, used by every loop of `petl_vision.train`): loss = CE +
`regularization_loss(model)` (1e-4 x the L2 norm of each score tensor, summed, as the official
code); `gradient_dropout_backward` combines the CE gradient `a` with the gradient `b` of
`kl_to_teacher` (KL to the frozen model before mask tuning: the zero-shot classifier on CLIP).
`rank_by_gradient` / `select_by_gradient` choose the weight matrices by accumulated squared
gradients, optionally (the paper's "identify important parameters" step).
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..core.distributed import is_dtensor
from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import unfreeze_head
from ._autocast import autocast_dtype
from ._wrap import bake_parametrizations, select_targets
from .ssf import RowScale


@dataclasses.dataclass
class MaskTuningConfig(MethodConfig):
    """Config of Regularized Mask Tuning.

    score_init: initial value of every score (official: 1e-2, every mask starts at 1).
    threshold: a weight is kept where its score > threshold (official: 5e-3).
    mask_mlp: also mask the MLP linears (official CLIP ViT-B/16 setup: False).
    target_params: regular expression searched in parameter names ("visual.conv1.weight",
        "blocks.0.attn.qkv.weight", ...); when set it replaces the default targets with every
        matching weight of 2+ dims (Linear/Conv weights or raw parameters). `select_by_gradient`
        returns such a pattern.
    reg_weight: weight of the L2 penalty on the scores in `regularization_loss` (official: 1e-4).
    grad_dropout: gradient dropout against the KL to the frozen zero-shot model (official: on).
    grad_dropout_lambda: its lambda (paper: 0.3; 1.0 for ImageNet, SUN397, Food101).
    kl_temperature: temperature T of that KL (official: 1).
    train_head: train the classifier head too (official: no, the zero-shot text head stays fixed).
    """

    name = "mask_tuning"
    score_init: float = 1e-2
    threshold: float = 5e-3
    mask_mlp: bool = False
    target_params: str | None = None
    reg_weight: float = 1e-4
    grad_dropout: bool = True
    grad_dropout_lambda: float = 0.3
    kl_temperature: float = 1.0
    train_head: bool = False

    def __post_init__(self):
        if not 0.0 <= self.grad_dropout_lambda <= 1.0:
            raise ValueError(f"MaskTuningConfig.grad_dropout_lambda must be in [0, 1], got {self.grad_dropout_lambda}")
        if self.kl_temperature <= 0:
            raise ValueError(f"MaskTuningConfig.kl_temperature must be > 0, got {self.kl_temperature}")


class _Binarize(torch.autograd.Function):
    """(score > threshold) as 0/1 in the forward; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _MaskWeight(torch.autograd.Function):
    """W * (score > threshold) in one step, in `dtype`, with the straight-through gradient:
    d score = grad * W (d mask / d score = 1), and d W = grad * mask when W requires grad (under SSF).

    Saves no activation: W is the stored weight (or SSF's scaled weight), the mask is recomputed."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, score: torch.Tensor, threshold: float, dtype: torch.dtype) -> torch.Tensor:
        ctx.threshold = threshold
        ctx.save_for_backward(weight, score)
        return torch.where(score > threshold, weight.to(dtype), 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, score = ctx.saved_tensors
        grad_weight = grad_score = None
        if ctx.needs_input_grad[0]:
            grad_weight = torch.where(score > ctx.threshold, grad, 0).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            grad_score = (grad * weight).to(score.dtype)  # in the weight's precision (fp32 under autocast)
        return grad_weight, grad_score, None, None


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the weight's device (matmuls and convs would cast
    the masked weight to it anyway), else the weight's dtype."""
    dtype = autocast_dtype(weight.device.type) if weight.is_floating_point() else None
    return weight.dtype if dtype is None else dtype


class BinaryMask(nn.Module):
    """Parametrization W -> W * (score > threshold); `score` has W's shape.

    Under autocast the masked weight comes out in the autocast dtype directly (one kernel; the
    cast a matmul would do anyway), and nothing is kept for backward but W and the scores."""

    def __init__(self, weight: torch.Tensor, score_init: float, threshold: float, param_order: tuple[str, ...] = ()):
        super().__init__()
        self.threshold = threshold
        self.score = nn.Parameter(torch.full_like(weight, score_init))
        self.param_order = param_order  # the host module's parameter order, restored by merge

    def mask(self) -> torch.Tensor:
        return _Binarize.apply(self.score, self.threshold)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _MaskWeight.apply(weight, self.score, self.threshold, _compute_dtype(weight))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.score.shape)}, threshold={self.threshold}"


# --------------------------------------------------------------------------- targets

# Linears of attention blocks, by module name (wrapper segments such as SSF's `.base` removed).
_ATTN_LINEAR = re.compile(r"(^|\.)(attn|attnpool)\.(qkv|q|k|v|kv|q_proj|k_proj|v_proj|proj|out_proj|c_proj)$")
_MLP_LINEAR = re.compile(r"(^|\.)mlp\.(c_fc|c_proj|fc1|fc2|fc1_g|fc1_x)$")
_FUSED = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_WRAPPER_SEGMENT = re.compile(r"\.(base|base_layer)(?=\.|$)")


def _maskable(module: nn.Module):
    """(attribute, raw tensor) of a module's plain parameters and of its tensors parametrized only by
    SSF's RowScale (the mask commutes with it); tensors under other parametrizations are left out."""
    yield from module.named_parameters(recurse=False)
    for attr, plist in _parametrizations(module).items():
        if all(isinstance(p, RowScale) for p in plist):
            yield attr, plist.original


def _weights(model: nn.Module):
    """(parameter name, module, attribute) of every 2+-dim weight outside the head (see `_maskable`)."""
    for module_name, module in select_targets(model, lambda m: True):
        if "parametrizations" in module_name.split("."):  # parametrizations' own modules
            continue
        prefix = f"{module_name}." if module_name else ""
        for attr, param in _maskable(module):
            if param.ndim >= 2 and param.is_floating_point():
                yield prefix + attr, module, attr


def _raw(module: nn.Module, attr: str) -> torch.Tensor:
    """The stored tensor `attr` of `module`: the parameter, or a parametrization's `original`."""
    return module.parametrizations[attr].original if parametrize.is_parametrized(module, attr) else getattr(module, attr)


def _is_default_target(module: nn.Module, module_name: str, attr: str, mask_mlp: bool) -> bool:
    name = _WRAPPER_SEGMENT.sub("", module_name)
    if attr in _FUSED:
        return True
    if attr != "weight":
        return False
    if isinstance(module, nn.modules.conv._ConvNd):
        return True
    if isinstance(module, nn.Linear):
        return bool(_ATTN_LINEAR.search(name)) or (mask_mlp and bool(_MLP_LINEAR.search(name)))
    return False


def find_targets(model: nn.Module, mask_mlp: bool = False, target_params: str | None = None) -> list[tuple[str, nn.Module, str]]:
    """(parameter name, module, attribute) of the weights mask tuning masks on `model`.

    Default: attention in/out projections and convolutions (+ MLP linears with mask_mlp), inside
    `model.visual` when the model has one. With `target_params`: every 2+-dim parameter whose
    name matches that regular expression.
    """
    if target_params is not None:
        regex = re.compile(target_params)
        return [t for t in _weights(model) if regex.search(t[0])]
    scope = "visual." if isinstance(getattr(model, "visual", None), nn.Module) else ""
    targets = []
    for name, module, attr in _weights(model):
        module_name = name[: -len(attr)].rstrip(".")
        if name.startswith(scope) and _is_default_target(module, module_name, attr, mask_mlp):
            targets.append((name, module, attr))
    return targets


def _parametrizations(module: nn.Module) -> dict:
    """The parametrizations registered on `module` itself (not those a wrapper forwards from `base`)."""
    plists = module._modules.get("parametrizations")
    return dict(plists.items()) if plists is not None else {}


def masks(model: nn.Module) -> list[tuple[str, BinaryMask]]:
    """(masked parameter name, its BinaryMask) of every mask on `model`."""
    found = []
    for module_name, module in model.named_modules():
        for attr, plist in _parametrizations(module).items():
            for p in plist:
                if isinstance(p, BinaryMask):
                    found.append((f"{module_name}.{attr}" if module_name else attr, p))
    return found


def masked_fraction(model: nn.Module) -> float:
    """Share of the masked weights that are masked off (score <= threshold); 0 without masks."""
    off, total = mask_counts(model)
    return off / total if total else 0.0


def mask_counts(model: nn.Module) -> tuple[int, int]:
    """(weights masked off, weights under a mask), global numbers.

    Under FSDP2 a score is a DTensor (its numel is the global one): the count of its local shard is
    summed over the ranks (`full_tensor`, a collective: every rank calls this, e.g. through pv.summary).
    """
    from ..core.distributed import full_tensor

    off = total = 0
    for _, m in masks(model):
        off += int(full_tensor((m.score <= m.threshold).sum())) if m.score.device.type != "meta" else 0
        total += m.score.numel()
    return off, total


# --------------------------------------------------------------------------- training terms


def applied_config(model: nn.Module) -> MaskTuningConfig | None:
    """The MaskTuningConfig applied to `model`, or None."""
    state = get_state(model)
    for applied in state.applied if state is not None else []:
        if applied.name == MaskTuningConfig.name:
            return applied.config
    return None


def regularization_loss(model: nn.Module, weight: float | None = None) -> torch.Tensor:
    """`weight` (default: the applied config's reg_weight) x sum over score tensors of ||score||_2.

    The official penalty: the (unsquared) L2 norm of each flattened score tensor, summed.
    """
    found = masks(model)
    if not found:
        raise ValueError("regularization_loss: no mask tuning is applied to this model")
    if weight is None:
        config = applied_config(model)  # None on a wrapper (DistributedDataParallel): the default
        weight = config.reg_weight if config is not None else MaskTuningConfig.reg_weight
    return weight * sum(m.score.flatten().norm(2) for _, m in found)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened class distributions, x T^2, mean over the batch.

    student_logits, teacher_logits: (B, C). Its gradient w.r.t. the student equals that of the
    official soft cross-entropy `-(softmax(t/T) * log_softmax(s/T)).sum(1).mean() * T^2`.
    """
    t = temperature
    log_p = F.log_softmax(student_logits / t, dim=-1)
    log_q = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * t * t


def gradient_dropout(a: torch.Tensor, b: torch.Tensor, lam: float, u: torch.Tensor | None = None,
                     eps: float = 1e-8, generator: torch.Generator | None = None) -> torch.Tensor:
    """The gradient-dropout combination of R-AMT.

    a: gradient of the task loss (CE + penalty); b: gradient of the KL to the zero-shot model;
    u: uniform(0, 1) draws of a's shape (drawn with `generator` when None).
    P = (sign(a) (a + b) / (|a| + |b| + eps) + 1) / 2 is the chance that a and b agree, and
    grad = ((1 - lam) + lam * (P > u)) * a: lam = 0 keeps a, lam = 1 keeps or drops each element.
    """
    if u is None:
        u = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        if is_dtensor(a):  # FSDP2: every process draws the whole tensor alike and keeps its shard (no communication)
            from torch.distributed.tensor import distribute_tensor
            u = distribute_tensor(u, a.device_mesh, a.placements, src_data_rank=None)
    p = (torch.sign(a) * (a + b) / (a.abs() + b.abs() + eps) + 1) / 2
    return ((1.0 - lam) + lam * (p > u).to(a.dtype)) * a


def gradient_dropout_backward(params, loss: torch.Tensor, kl_loss: torch.Tensor, lam: float,
                              backward=None, generator: torch.Generator | None = None, eps: float = 1e-8) -> None:
    """Backward `kl_loss` and `loss`, and set each parameter's .grad to `gradient_dropout(a, b)`.

    params: the trainable parameters. backward: `backward(loss, **kwargs)` (e.g.
    `accelerator.backward`; default `loss.backward`). Gradients already in .grad are kept and the
    combined gradient is added to them. A parameter the KL does not reach keeps a.
    """
    backward = backward or (lambda value, **kwargs: value.backward(**kwargs))
    params = [p for p in params if p.requires_grad]
    previous = [p.grad for p in params]
    for p in params:
        p.grad = None
    backward(kl_loss, retain_graph=True)
    kl_grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    backward(loss)
    for p, prev, b in zip(params, previous, kl_grads):
        a = p.grad
        if a is None:
            p.grad = prev
            continue
        g = a if b is None else gradient_dropout(a, b, lam, eps=eps, generator=generator)
        p.grad = g if prev is None else prev + g


# --------------------------------------------------------------------------- data-driven targets


def rank_by_gradient(model: nn.Module, batches, loss_fn=None, target_params: str | None = None,
                     reduce: str = "sum") -> list[tuple[str, float]]:
    """Candidate weights of a host model ranked by accumulated squared gradients, largest first.

    batches: iterable of (inputs, targets); loss_fn(outputs, targets) (default cross-entropy).
    Candidates: the default targets with the MLP (`find_targets(model, mask_mlp=True)`), or the
    parameters matching `target_params`. reduce: "sum" (accumulated sum of squared gradients over
    batches and elements) or "mean" (per element, so matrix size does not count).
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"rank_by_gradient: reduce must be 'sum' or 'mean', got {reduce!r}")
    loss_fn = loss_fn or F.cross_entropy
    candidates = find_targets(model, mask_mlp=True, target_params=target_params)
    if not candidates:
        raise ValueError(f"rank_by_gradient: no candidate weights in {type(model).__name__} (target_params={target_params!r})")
    names = [name for name, _, _ in candidates]
    params = [_raw(module, attr) for _, module, attr in candidates]
    flags = [p.requires_grad for p in params]
    totals = [0.0] * len(params)
    try:
        for p in params:
            p.requires_grad_(True)
        for inputs, targets in batches:
            grads = torch.autograd.grad(loss_fn(model(inputs), targets), params, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    sq = g.detach().float().pow(2)
                    totals[i] += float(sq.sum() if reduce == "sum" else sq.mean())
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return sorted(zip(names, totals), key=lambda item: -item[1])


def select_by_gradient(model: nn.Module, batches, fraction: float, loss_fn=None, target_params: str | None = None,
                       reduce: str = "sum") -> str:
    """A `target_params` pattern naming the top `fraction` of `rank_by_gradient` (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"select_by_gradient: fraction must be in (0, 1], got {fraction}")
    ranked = rank_by_gradient(model, batches, loss_fn, target_params, reduce)
    keep = [name for name, _ in ranked[: max(1, math.ceil(fraction * len(ranked)))]]
    return "^(" + "|".join(re.escape(name) for name in sorted(keep)) + ")$"


# --------------------------------------------------------------------------- the method


def noise_seed(model: nn.Module, seed: int, step: int) -> int:
    """Seed of the gradient-dropout draws of one backward: seed * 1_000_003 + step for the first
    backward with optimizer step `step`, plus micro * 0x9E3779B1 for the micro-th backward after it
    at the same step (gradient accumulation; an odd 32-bit constant, as the CPU generator keeps only
    a seed's low 32 bits: distinct from every other step's seed for any reachable step). The count lives on the model's first mask, so every
    process counts alike and a resumed run (which restarts at a step boundary) draws as an
    uninterrupted one."""
    found = masks(model)
    holder = found[0][1] if found else model
    last_step, micro = getattr(holder, "_noise_draw", (None, -1))
    micro = micro + 1 if last_step == step else 0
    holder._noise_draw = (step, micro)
    return (seed * 1_000_003 + step + micro * 0x9E3779B1) % 2**64


@register_method
class MaskTuning(Method):
    name = "mask_tuning"
    config_class = MaskTuningConfig
    mergeable = True

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        if not find_targets(model):
            raise UnsupportedHostError(
                f"method 'mask_tuning' found no attention projection or convolution to mask in {type(model).__name__} "
                "(supported: open_clip and timm ViTs, Swin, CNNs)"
            )

    @classmethod
    def attach(cls, model: nn.Module, config: MaskTuningConfig) -> None:
        targets = find_targets(model, config.mask_mlp, config.target_params)
        if not targets:
            raise UnsupportedHostError(f"mask_tuning: target_params={config.target_params!r} matches no weight of {type(model).__name__}")
        for _, module, attr in targets:
            mask = BinaryMask(_raw(module, attr).detach(), config.score_init, config.threshold, tuple(module._parameters))
            parametrize.register_parametrization(module, attr, mask)
        if config.train_head:
            unfreeze_head(model, cls.name)

    @classmethod
    @torch.no_grad()
    def merge(cls, model: nn.Module, config: MaskTuningConfig) -> None:
        for module in list(model.modules()):
            alone = {}  # attribute -> its mask, for tensors the mask is the only parametrization of
            for attr, plist in _parametrizations(module).items():
                if not isinstance(plist[-1], BinaryMask):
                    continue
                if len(plist) == 1:
                    alone[attr] = plist[0]
                else:  # on top of SSF's RowScale, which commutes with it: mask the raw weight
                    plist.original.mul_(plist[-1].mask().to(plist.original.dtype))
                    del plist[-1]
            if alone:
                bake_parametrizations(module, list(alone), next(iter(alone.values())).param_order)

    # ---- training hooks (see petl_vision.core.registry.Method)

    @classmethod
    def extra_loss(cls, model: nn.Module, config: MaskTuningConfig) -> torch.Tensor:
        """The L2 penalty on the scores, `regularization_loss` with the config's reg_weight."""
        return regularization_loss(model, config.reg_weight)

    @classmethod
    def owns_backward(cls, config: MaskTuningConfig) -> bool:
        return config.grad_dropout

    @classmethod
    def backward(cls, model: nn.Module, config: MaskTuningConfig, loss: torch.Tensor, step) -> None:
        """R-AMT's gradient dropout: the task-loss gradient against the gradient of the KL to the
        frozen model before mask tuning (`step.reference`); uniform draws seeded by (seed, step,
        micro-batch), so each micro-batch of a gradient-accumulation step draws fresh noise (see
        `noise_seed`; the first micro-batch's seed is seed * 1_000_003 + step)."""
        if step.reference is None:
            raise ValueError("mask_tuning: grad_dropout needs the frozen model from before the method was applied "
                             "(let the trainer apply the method, or set grad_dropout=False)")
        with torch.no_grad():
            teacher_logits = step.reference(step.inputs)
        kl = kl_to_teacher(step.outputs.float(), teacher_logits.float(), config.kl_temperature)
        generator = torch.Generator(device=loss.device)
        generator.manual_seed(noise_seed(model, step.seed, step.step))
        params = [p for p in model.parameters() if p.requires_grad]
        gradient_dropout_backward(params, loss, kl, config.grad_dropout_lambda, step.backward, generator)

    @classmethod
    def epoch_metrics(cls, model: nn.Module, config: MaskTuningConfig) -> dict[str, float]:
        return {"masked_fraction": masked_fraction(model)}

    @classmethod
    def summary_note(cls, model: nn.Module, config: MaskTuningConfig) -> str:
        """One line for `pv.summary`: weights under a mask and the share masked off."""
        off, total = mask_counts(model)
        return f"masks {len(masks(model))} weight tensors, {total:,} weights; masked off {off:,} ({100.0 * off / max(total, 1):.2f}%)"
