"""SSF: Scaling and Shifting your Features (Lian et al., NeurIPS 2022).

A per-channel affine `y = x * scale + shift` after every linear, convolution and normalisation
layer of the host (outside the head). On a timm ViT that is exactly the official placement: after
the patch-embedding conv, norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2 and the final norm.
Bias-free convolutions are skipped: in CNNs each is followed by a BatchNorm whose SSF spans the
same per-channel affine, and folding a shift into them would need a new bias tensor.

`merge` folds every scale/shift into the layer it follows, giving back a plain model.
"""
from __future__ import annotations

import dataclasses

import open_clip.transformer as open_clip_layers
import torch
from timm.layers import LayerNorm, LayerNorm2d
from torch import nn

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import unfreeze_head
from ._wrap import WrapperLayer, select_targets


@dataclasses.dataclass
class SSFConfig(MethodConfig):
    """Config of SSF.

    init_std: std of the init, scale ~ N(1, init_std), shift ~ N(0, init_std) (paper: 0.02).
    save_output: on channels-last outputs (linears, LayerNorm), keep only the SSF output for the
        backward pass and recover the input as (y - shift) / scale. The next layer keeps y anyway,
        so SSF then adds no activation memory of its own (the official code keeps both). Off for
        (N, C, ...) outputs, where in-place activations (ReLU(inplace=True)) may overwrite y.
    target_modules: regular expression searched in module names to restrict the placement
        (default: every eligible layer).
    train_head: train the classifier head too (paper: yes).
    """

    name = "ssf"
    init_std: float = 0.02
    target_modules: str | None = None
    train_head: bool = True
    save_output: bool = True


# Layer types whose output channels SSF scales, and where those channels are: -1 = last dim
# (..., C), 1 = (N, C, ...). Exact types only: subclasses such as timm's BatchNormAct2d (norm +
# activation) or StdConv2d (weight standardisation) cannot have an affine folded into them.
_CHANNEL_DIM = {
    nn.Linear: -1,
    nn.LayerNorm: -1,
    LayerNorm: -1,
    LayerNorm2d: 1,
    open_clip_layers.LayerNorm: -1,
    open_clip_layers.LayerNormFp32: -1,
    nn.Conv1d: 1,
    nn.Conv2d: 1,
    nn.Conv3d: 1,
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 1,
    nn.BatchNorm3d: 1,
    nn.GroupNorm: 1,
}


def _num_channels(module: nn.Module) -> int | None:
    """Output channels of an eligible layer, or None when SSF cannot follow it."""
    if type(module) not in _CHANNEL_DIM:
        return None
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if module.bias is not None else None
    if isinstance(module, nn.LayerNorm):
        affine = module.elementwise_affine and len(module.normalized_shape) == 1
        return module.normalized_shape[0] if affine else None
    if isinstance(module, nn.GroupNorm):
        return module.num_channels if module.affine else None
    return module.num_features if module.affine else None


class ScaleShift(torch.autograd.Function):
    """y = x * scale + shift that saves y, not x, for backward: x = (y - shift) / scale.

    x: (..., C); scale, shift: (C,). Scales are N(1, 0.02) at init and never near zero in practice.
    """

    @staticmethod
    def forward(ctx, x, scale, shift):
        y = torch.addcmul(shift, x, scale)
        ctx.save_for_backward(y, scale, shift)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, scale, shift = ctx.saved_tensors
        x = (y - shift) / scale
        reduce = tuple(range(grad.ndim - 1))
        return grad * scale, (grad * x).sum(reduce), grad.sum(reduce)


class SSFLayer(WrapperLayer):
    """`base` followed by a per-channel scale and shift.

    Output of base: (..., C) when channel_dim is -1, (N, C, ...) when it is 1.
    """

    def __init__(self, base: nn.Module, num_channels: int, channel_dim: int, init_std: float = 0.02, save_output: bool = True):
        super().__init__(base)
        ref = next(base.parameters())
        self.channel_dim = channel_dim
        self.save_output = save_output and channel_dim == -1
        self.scale = nn.Parameter(torch.empty(num_channels, device=ref.device, dtype=ref.dtype).normal_(1.0, init_std))
        self.shift = nn.Parameter(torch.empty(num_channels, device=ref.device, dtype=ref.dtype).normal_(0.0, init_std))

    def forward(self, *args, **kwargs):
        y = self.base(*args, **kwargs)
        if self.channel_dim == 1 and y.ndim > 2:
            shape = (1, -1) + (1,) * (y.ndim - 2)
            return y * self.scale.view(shape) + self.shift.view(shape)
        if self.save_output and torch.is_grad_enabled() and y.dtype == self.scale.dtype:
            return ScaleShift.apply(y, self.scale, self.shift)
        return y * self.scale + self.shift

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """`base` with the scale and shift folded in: W' = diag(s) W, b' = s * b + t."""
        base, scale, shift = self.base, self.scale, self.shift
        base.weight.mul_(scale.view((-1,) + (1,) * (base.weight.ndim - 1)))
        if base.bias is None:
            base.bias = nn.Parameter(shift.detach().clone())
        else:
            base.bias.mul_(scale).add_(shift)
        return base

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, channel_dim={self.channel_dim}"


@register_method
class SSF(Method):
    name = "ssf"
    config_class = SSFConfig
    mergeable = True

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        state = get_state(model)
        for later in ("lora", "mask_tuning"):
            if state is not None and later in state.method_names:
                raise UnsupportedHostError(f"apply 'ssf' before {later!r}: it changes the layers SSF follows")
        if not select_targets(model, _num_channels):
            raise UnsupportedHostError(f"method 'ssf' found no linear, convolution or norm layer to follow in {type(model).__name__}")

    @classmethod
    def attach(cls, model: nn.Module, config: SSFConfig) -> None:
        targets = select_targets(model, _num_channels, config.target_modules)
        if not targets:
            raise UnsupportedHostError(f"ssf: target_modules={config.target_modules!r} matches no eligible layer of {type(model).__name__}")
        for name, module in targets:
            layer = SSFLayer(module, _num_channels(module), _CHANNEL_DIM[type(module)], config.init_std, config.save_output)
            model.set_submodule(name, layer)
        if config.train_head:
            unfreeze_head(model, cls.name)

    @classmethod
    def merge(cls, model: nn.Module, config: SSFConfig) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, SSFLayer):
                model.set_submodule(name, module.merged())
