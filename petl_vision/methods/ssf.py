"""SSF: Scaling and Shifting your Features (Lian et al., NeurIPS 2022).

A per-channel affine `y = x * scale + shift` after every linear, convolution and normalisation
layer of the host (outside the head). On a timm ViT that is exactly the official placement: after
the patch-embedding conv, norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2 and the final norm.
Bias-free convolutions are skipped: in CNNs each is followed by a BatchNorm whose SSF spans the
same per-channel affine, and folding a shift into them would need a new bias tensor. Exception:
the bias-free patch conv (`conv1`) of open_clip ViT towers, whose shift folds into the positional
embedding added right after it.

Layers that are called get a wrapper (`SSFLayer`). Tensors their parent reads directly cannot be
reached by a wrapper: the fused attention in-projection (`in_proj_weight`/`in_proj_bias` of
nn.MultiheadAttention and open_clip's Attention), nn.MultiheadAttention's `out_proj` and the
projections of open_clip's ResNet attention pool. There SSF is a `torch.nn.utils.parametrize`
parametrization, using that scaling a linear map's output channels scales the rows of W:
``gamma * (W x + b) + beta = (diag(gamma) W) x + (gamma * b + beta)``. Norm layers with a built-in
activation (timm's BatchNormAct2d in EfficientNet, MobileNetV3, RegNet, ...) get the same
parametrization of their affine weight and bias: SSF after the norm, before its activation.

`merge` folds every scale/shift into the layer it follows, giving back a plain model.

`SSFConfig(official=True)` places SSF as the official code does on Swin and ConvNeXt (on ViT it
changes nothing): none in Swin's PatchMerging (norm, reduction) nor in ConvNeXt's downsample
layers, the last ConvNeXt SSF on the features before pooling (`norm_pre`'s output) instead of after
`head.norm`, and `head.norm` trained. Swin-B: 267,264 SSF parameters (default 278,016); ConvNeXt-B:
255,232 (default 260,608).
"""
from __future__ import annotations

import dataclasses
import functools
import re

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerNorm2d
from timm.layers.fast_norm import fast_layer_norm
from timm.models.convnext import ConvNeXt, ConvNeXtStage
from timm.models.swin_transformer import PatchMerging
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import MergeError, UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import unfreeze_head
from ..hosts.open_clip import fold_patch_shift, vision_towers
from ._wrap import WrapperLayer, bake_parametrizations, linears_read_directly, select_targets


@dataclasses.dataclass
class SSFConfig(MethodConfig):
    """Config of SSF.

    init_std: std of the init, scale ~ N(1, init_std), shift ~ N(0, init_std) (paper: 0.02).
    save_output: the lean form (see `SSFLayer`): SSF folded into the affine of the norms and the
        weights of the widening linears it follows, elsewhere keeping its output for backward where
        the next op keeps it anyway. False: the official form, ``y * scale + shift`` after every
        layer keeping y (autograd's gradients exactly, also for a scale of exactly 0; more memory).
        Off on its own for layers whose output is modified in place after them.
    target_modules: regular expression searched in module names to restrict the placement
        (default: every eligible layer). A fused attention in-projection is named
        `<attention module>.in_proj` (e.g. "transformer.resblocks.0.attn.in_proj").
    train_head: train the classifier head too (paper: yes).
    official: the official placement on timm Swin (V1) and ConvNeXt: no SSF in Swin's PatchMerging
        nor in ConvNeXt's downsample layers; on ConvNeXt the last SSF acts on the features before
        pooling (not after `head.norm`, which trains instead). Other hosts (ViT, ...): no change.
        A ConvNeXt so adapted cannot be merged (the features before pooling feed the head's
        LayerNorm, into which a per-channel affine does not fold).
    """

    name = "ssf"
    init_std: float = 0.02
    target_modules: str | None = None
    train_head: bool = True
    save_output: bool = True
    official: bool = False


# Layer types whose output channels SSF scales, and where those channels are: -1 = last dim
# (..., C), 1 = (N, C, ...). Exact types only: subclasses such as timm's BatchNormAct2d (norm +
# activation) or StdConv2d (weight standardisation) cannot have an affine folded into them.
_CHANNEL_DIM = {
    nn.Linear: -1,
    nn.LayerNorm: -1,
    LayerNorm: -1,
    LayerNorm2d: 1,
    nn.Conv1d: 1,
    nn.Conv2d: 1,
    nn.Conv3d: 1,
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 1,
    nn.BatchNorm3d: 1,
    nn.GroupNorm: 1,
}


def _open_clip_norm(cls: type) -> str | None:
    """"LayerNorm" / "LayerNormFp32" for open_clip's norm classes (channels last, like nn.LayerNorm), else
    None. By name: open_clip is not imported for this (a model built of its classes has imported it)."""
    if cls.__module__ == "open_clip.transformer" and cls.__name__ in ("LayerNorm", "LayerNormFp32"):
        return cls.__name__
    return None


def _channel_dim(cls: type) -> int | None:
    """Where an eligible layer type's output channels are (`_CHANNEL_DIM`), None for other types."""
    return _CHANNEL_DIM.get(cls, -1 if _open_clip_norm(cls) else None)


def _num_channels(module: nn.Module) -> int | None:
    """Output channels of an eligible layer, or None when SSF cannot follow it."""
    if _channel_dim(type(module)) is None:
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


def _channel_view(ndim: int, dim: int) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector along channel dim `dim` of an ndim-d tensor."""
    dim = dim % ndim
    return (1,) * dim + (-1,) + (1,) * (ndim - dim - 1)


class ScaleShift(torch.autograd.Function):
    """z = y * scale + shift per channel, computed and returned in y's dtype.

    y: (..., C) for dim=-1, (N, C, ...) for dim=1; scale, shift: (C,) master parameters (fp32 under
    autocast), cast to y's dtype at use as autocast casts a matmul's weight; their gradients come
    back in their own dtype, reduced in fp32.

    keep_output=True saves z only, for layers whose next op keeps z itself (attention keeps q, k, v;
    the MLP's activation keeps its input), so SSF then adds no activation memory of its own; the
    scale's gradient is recovered from z: sum(g * y) = (sum(g * z) - shift * sum(g)) / scale. A
    channel whose scale is exactly 0 has lost y: its scale gets a zero gradient there (autograd's
    with SSFConfig.save_output=False). keep_output=False saves y (exact; needed where the next op
    may overwrite z in place).
    """

    @staticmethod
    def forward(ctx, y, scale, shift, dim: int = -1, keep_output: bool = True):
        view = _channel_view(y.ndim, dim)
        z = torch.addcmul(shift.to(y.dtype).view(view), y, scale.to(y.dtype).view(view))
        ctx.dim, ctx.keep_output = dim, keep_output
        ctx.save_for_backward(z if keep_output else y, scale, shift)
        return z

    @staticmethod
    def backward(ctx, grad):
        saved, scale, shift = ctx.saved_tensors
        view = _channel_view(grad.ndim, ctx.dim)
        reduce = tuple(d for d in range(grad.ndim) if d != ctx.dim % grad.ndim)
        grad_y = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0]:
            grad_y = grad * scale.to(grad.dtype).view(view)
        if ctx.needs_input_grad[1]:
            grad_scale = torch.sum(grad * saved, reduce, dtype=torch.float32)
        if ctx.needs_input_grad[2] or (ctx.needs_input_grad[1] and ctx.keep_output):
            grad_shift = torch.sum(grad, reduce, dtype=torch.float32)
        if grad_scale is not None and ctx.keep_output:
            grad_scale = torch.where(scale != 0, (grad_scale - shift * grad_shift) / scale, 0.0)
        if grad_scale is not None:
            grad_scale = grad_scale.to(scale.dtype)
        if grad_shift is not None:
            grad_shift = grad_shift.to(shift.dtype) if ctx.needs_input_grad[2] else None
        return grad_y, grad_scale, grad_shift, None, None


def _norm_with_affine(norm: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`norm(x)` with `weight` and `bias` in place of the norm's own affine (the norm types of `_CHANNEL_DIM`)."""
    kind = type(norm)
    if kind is nn.GroupNorm:
        return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)
    if isinstance(norm, nn.modules.batchnorm._NormBase):
        momentum = norm.momentum if norm.momentum is not None else 0.0
        if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(norm.num_batches_tracked)
        batch_stats = norm.training or norm.running_mean is None
        stats = (norm.running_mean, norm.running_var) if not norm.training or norm.track_running_stats else (None, None)
        return F.batch_norm(x, *stats, weight, bias, batch_stats, momentum, norm.eps)
    layer_norm = fast_layer_norm if getattr(norm, "_fast_norm", False) else F.layer_norm
    if kind is LayerNorm2d:
        return layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, weight, bias, norm.eps).permute(0, 3, 1, 2)
    if _open_clip_norm(kind) == "LayerNormFp32":
        return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)
    out = layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return out.to(x.dtype) if _open_clip_norm(kind) == "LayerNorm" else out


class SSFLayer(WrapperLayer):
    """`base` followed by a per-channel scale and shift.

    Output of base: (..., C) when channel_dim is -1, (N, C, ...) when it is 1.

    How the affine runs (`mode`) is chosen per layer by what autograd must keep for backward and
    the work added (measured under bf16 autocast on a ViT-B/16-shaped ViT with
    `petl_vision.bench.footprint`; ratios of bytes kept to full fine-tuning's: 0.78 with every
    linear elementwise, 0.82 as below, 1.53 for the official form in fp32):

    - "norm", after a norm: folded into its affine, ``norm(x; w * s, b * s + t)``. The norm keeps its
      input and statistics anyway and its backward computes the affine's gradient: nothing is kept
      and only a few C-sized ops are added.
    - "linear", after an nn.Linear with in_features <= out_features (a ViT's qkv, attn.proj, fc1):
      folded into it, ``F.linear(x, diag(s) W, s * b + t)``, so the layer's output is already SSF's.
      The frozen layer then keeps its input x (in) and runs a weight-gradient matmul (2 in x out
      flops per token) to reduce the scale's gradient; the elementwise form instead runs about 9
      memory-bound passes over its output (out wide) per step. On a GPU (~150 bf16 flops per byte
      of memory bandwidth) the matmul is cheaper while in is below ~1,000, and with in <= out the
      input kept is at most the output the elementwise form would keep where its consumer does not.
    - "output" / "input", elsewhere (narrowing linears such as fc2, convolutions, a base replaced by
      LoRA): elementwise `ScaleShift` in the activation dtype, keeping z on channels-last outputs of
      widening layers (their consumer keeps z: attention's q/k/v, the MLP activation's input) and y
      on the rest (a residual sum keeps neither; (N, C, ...) outputs may be overwritten in place).

    save_output=False: "input" everywhere, the official form.
    A parameter-free base (the Identity `norm_pre` of a ConvNeXt under `SSFConfig.official`) takes
    the device and dtype of `like` and cannot be merged.
    """

    def __init__(self, base: nn.Module, num_channels: int, channel_dim: int, init_std: float = 0.02, save_output: bool = True,
                 like: torch.Tensor | None = None):
        super().__init__(base)
        ref = like if like is not None else next(base.parameters())  # like: device and dtype for a parameter-free base
        self.channel_dim = channel_dim
        self.save_output = save_output and channel_dim == -1
        widening = not isinstance(base, nn.Linear) or base.in_features <= base.out_features
        if not save_output:
            self.mode = "input"
        elif isinstance(base, _NORMS):
            self.mode = "norm"
        elif isinstance(base, nn.Linear) and widening:
            self.mode = "linear"
        else:
            self.mode = "output" if channel_dim == -1 and widening else "input"
        self.scale = nn.Parameter(torch.empty(num_channels, device=ref.device, dtype=ref.dtype).normal_(1.0, init_std))
        self.shift = nn.Parameter(torch.empty(num_channels, device=ref.device, dtype=ref.dtype).normal_(0.0, init_std))

    def forward(self, *args, **kwargs):
        base, scale, shift = self.base, self.scale, self.shift
        if self.mode == "norm":
            bias = shift if base.bias is None else torch.addcmul(shift, base.bias, scale)
            return _norm_with_affine(base, args[0], base.weight * scale, bias)
        if self.mode == "linear" and isinstance(base, nn.Linear):  # not when LoRA has replaced the base
            bias = shift if base.bias is None else torch.addcmul(shift, base.bias, scale)
            return F.linear(args[0], base.weight * scale.unsqueeze(1), bias)
        y = base(*args, **kwargs)
        if torch.is_grad_enabled() and (y.requires_grad or scale.requires_grad or shift.requires_grad):
            return ScaleShift.apply(y, scale, shift, self.channel_dim, self.mode != "input")
        view = _channel_view(y.ndim, self.channel_dim)
        return torch.addcmul(shift.to(y.dtype).view(view), y, scale.to(y.dtype).view(view))

    @torch.no_grad()
    def merged(self, fold_shift=None) -> nn.Module:
        """`base` with the scale and shift folded in: W' = diag(s) W, b' = s * b + t.

        fold_shift: for a bias-free base, a callable taking the shift (C,) that folds it into the
        layer that follows (open_clip's positional embedding); without it the base gains a bias.
        """
        base, scale, shift = self.base, self.scale, self.shift
        base.weight.mul_(scale.view((-1,) + (1,) * (base.weight.ndim - 1)))
        if base.bias is not None:
            base.bias.mul_(scale).add_(shift)
        elif fold_shift is not None:
            fold_shift(shift.detach())
        else:
            base.bias = nn.Parameter(shift.detach().clone())
        return base

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, channel_dim={self.channel_dim}, mode={self.mode}"


class BiasScaleShift(nn.Module):
    """Parametrization b -> scale * b + shift of a bias (C,) read directly by the layer's parent.

    Owns the SSF site's scale and shift; the weights feeding this bias get a `RowScale` reading the
    same scale. param_order: the module's parameter names before parametrizing (restored by merge).
    """

    def __init__(self, bias: torch.Tensor, init_std: float, param_order: tuple[str, ...]):
        super().__init__()
        self.scale = nn.Parameter(torch.empty_like(bias).normal_(1.0, init_std))
        self.shift = nn.Parameter(torch.empty_like(bias).normal_(0.0, init_std))
        self.param_order = param_order

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, bias, self.scale)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


class RowScale(nn.Module):
    """Parametrization W -> diag(scale[rows]) W of a weight (C_out, ...) feeding a BiasScaleShift.

    rows: the slice of the site's channels this weight produces (q, k or v of a split in-projection).
    """

    def __init__(self, owner: BiasScaleShift, rows: slice):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # a reference, not a submodule: the scale is stored once
        self.rows = rows

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.owner.scale[self.rows]
        return weight * scale.view((-1,) + (1,) * (weight.ndim - 1))

    def extra_repr(self) -> str:
        return f"rows={self.rows.start}:{self.rows.stop}"


def _output_overwritten(model: nn.Module, name: str) -> bool:
    """True when the output of layer `name` may be modified in place after it, so `ScaleShift`
    (which keeps only that output for backward) cannot be used on it.

    Detected: a sibling module running in place (the ReLU(inplace=True) after the first Linear of
    Swin V2's position-bias MLP, an Mlp built with an in-place activation), and the `qkv` of an
    attention with `qkv_bias_separate` set (timm Beit/Eva/Swin V2: ``qkv = self.qkv(x); qkv += bias``).
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if child == "qkv" and getattr(parent, "qkv_bias_separate", False) and getattr(parent, "q_bias", None) is not None:
        return True
    return any(getattr(m, "inplace", False) is True for key, m in parent.named_children() if key != child)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _is_norm_site(module: nn.Module) -> bool:
    """A norm layer that SSF cannot wrap but can enter as a parametrization of its affine.

    Subclasses of the norms in `_CHANNEL_DIM` such as timm's BatchNormAct2d, GroupNormAct and
    LayerNormAct (the norm layers of EfficientNet, MobileNetV3, RegNet, ...) run an activation after
    their affine ``w * x_hat + b``; SSF right after the affine is ``(s * w) * x_hat + (s * b + t)``.
    Needs a per-channel (1-d) weight and bias.
    """
    if _channel_dim(type(module)) is not None or not isinstance(module, _NORMS):
        return False
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    return isinstance(weight, nn.Parameter) and isinstance(bias, nn.Parameter) and weight.ndim == 1 and weight.shape == bias.shape


def _wrapper_targets(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module, int]]:
    """(name, layer, output channels) of the called layers SSF wraps."""
    direct = linears_read_directly(model)
    patch_convs = {id(t.conv1) for t in vision_towers(model) if type(t.conv1) is nn.Conv2d}

    def channels(m: nn.Module) -> int | None:
        if id(m) in direct:
            return None
        return m.out_channels if id(m) in patch_convs else _num_channels(m)

    return [(name, m, channels(m)) for name, m in select_targets(model, lambda m: channels(m) is not None, pattern)]


def _tensor_sites(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module, str, list[tuple[str, slice]]]]:
    """SSF sites on tensors read directly: (site name, module, bias attribute, [(weight attribute, rows)]).

    A fused attention in-projection (`in_proj_bias` with `in_proj_weight`, or with separate
    q/k/v_proj_weight) is the site `<module>.in_proj`; a linear of `linears_read_directly` is a
    site of its own. Without a bias there is no tensor to carry the shift: such layers are skipped
    (among them the `qkv` of timm's Beit, Eva and Swin V2 attentions, whose bias is split into
    q_bias, a fixed zero k_bias buffer and v_bias). A norm layer of `_is_norm_site` is a site of its own.
    """
    direct = linears_read_directly(model)
    sites = []
    for name, module in select_targets(model, lambda m: True):
        params = module._parameters
        if isinstance(params.get("in_proj_bias"), nn.Parameter):
            if isinstance(params.get("in_proj_weight"), nn.Parameter):
                weights = [("in_proj_weight", slice(0, params["in_proj_bias"].numel()))]
            elif all(isinstance(params.get(f"{k}_proj_weight"), nn.Parameter) for k in "qkv"):
                dim = params["q_proj_weight"].shape[0]
                weights = [(f"{k}_proj_weight", slice(i * dim, (i + 1) * dim)) for i, k in enumerate("qkv")]
            else:
                weights = []
            if weights:
                sites.append((f"{name}.in_proj" if name else "in_proj", module, "in_proj_bias", weights))
        if id(module) in direct and module.bias is not None:
            sites.append((name, module, "bias", [("weight", slice(0, module.out_features))]))
        if _is_norm_site(module):
            sites.append((name, module, "bias", [("weight", slice(0, module.weight.shape[0]))]))
    regex = re.compile(pattern) if pattern else None
    return [site for site in sites if regex is None or regex.search(site[0])]


def _official_exclusions(model: nn.Module) -> set[int]:
    """ids of the modules the official code gives no SSF (`SSFConfig.official`): everything inside
    timm Swin's PatchMerging and ConvNeXt's stage downsample layers, and ConvNeXt's head (its norm)."""
    skipped = [m for m in model.modules() if isinstance(m, PatchMerging)]
    skipped += [m.downsample for m in model.modules() if isinstance(m, ConvNeXtStage)]
    if isinstance(model, ConvNeXt):
        skipped.append(model.head)
    return {id(sub) for m in skipped for sub in m.modules()}


def _attach_official_convnext(model: nn.Module, config: SSFConfig) -> None:
    """The official ConvNeXt's last SSF, on the features before pooling (N, C, H, W), and `head.norm` trained.

    With timm's default head (pool -> norm -> fc) `norm_pre` is an Identity: it gets an SSFLayer of
    its own. A `norm_pre` norm (head_norm_first models) is already an ordinary SSF target.
    """
    if isinstance(model.norm_pre, nn.Identity):
        like = next(model.stages.parameters())
        model.norm_pre = SSFLayer(model.norm_pre, model.num_features, 1, config.init_std, config.save_output, like=like)
    norm = getattr(model.head, "norm", None)
    if isinstance(norm, nn.Module):
        norm.requires_grad_(True)


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
        if not _wrapper_targets(model) and not _tensor_sites(model):
            raise UnsupportedHostError(f"method 'ssf' found no linear, convolution or norm layer to follow in {type(model).__name__}")

    @classmethod
    def attach(cls, model: nn.Module, config: SSFConfig) -> None:
        targets = _wrapper_targets(model, config.target_modules)
        sites = _tensor_sites(model, config.target_modules)
        if config.official:
            skip = _official_exclusions(model)
            targets = [t for t in targets if id(t[1]) not in skip]
            sites = [s for s in sites if id(s[1]) not in skip]
        if not targets and not sites:
            raise UnsupportedHostError(f"ssf: target_modules={config.target_modules!r} matches no eligible layer of {type(model).__name__}")
        for name, module, channels in targets:
            save_output = config.save_output and not _output_overwritten(model, name)
            layer = SSFLayer(module, channels, _channel_dim(type(module)), config.init_std, save_output)
            model.set_submodule(name, layer)
        for _, module, bias_attr, weights in sites:
            owner = BiasScaleShift(getattr(module, bias_attr).detach(), config.init_std, tuple(module._parameters))
            parametrize.register_parametrization(module, bias_attr, owner)
            for attr, rows in weights:
                parametrize.register_parametrization(module, attr, RowScale(owner, rows))
        if config.official and isinstance(model, ConvNeXt):
            _attach_official_convnext(model, config)
        if config.train_head:
            unfreeze_head(model, cls.name)

    @classmethod
    def merge_blocker(cls, model: nn.Module, config: SSFConfig) -> str | None:
        unfoldable = [name for name, m in model.named_modules() if isinstance(m, SSFLayer) and isinstance(m.base, nn.Identity)]
        if unfoldable:
            return (f"no layer to fold the SSF on {unfoldable} into (SSFConfig.official=True on ConvNeXt: it acts on the "
                    "features before pooling, which feed the head's LayerNorm); apply SSF with official=False to merge")
        return None

    @classmethod
    def merge(cls, model: nn.Module, config: SSFConfig) -> None:
        blocker = cls.merge_blocker(model, config)
        if blocker:
            raise MergeError(f"merge: ssf: {blocker}")
        towers = {id(t.conv1): t for t in vision_towers(model)}
        for name, module in list(model.named_modules()):
            if isinstance(module, SSFLayer):
                tower = towers.get(id(module))
                model.set_submodule(name, module.merged(functools.partial(fold_patch_shift, tower) if tower is not None else None))
            plists = dict(module._modules["parametrizations"].items()) if "parametrizations" in module._modules else {}
            ours = {attr: plist for attr, plist in plists.items() if any(isinstance(p, (BiasScaleShift, RowScale)) for p in plist)}
            owners = [p for plist in ours.values() for p in plist if isinstance(p, BiasScaleShift)]
            if owners:
                bake_parametrizations(module, list(ours), owners[0].param_order)
