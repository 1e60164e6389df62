"""SPM: concept-semipermeable membranes (Lyu et al., CVPR 2024) on a diffusers UNet2DConditionModel.

A membrane is a rank-r LoRA (official: r = 1, alpha = 1) on every nn.Linear and nn.Conv2d inside the
UNet's transformer blocks (each `Transformer2DModel`: proj_in / proj_out, attn1 and attn2 to_q /
to_k / to_v / to_out.0, ff.net.0.proj, ff.net.2), matched with isinstance; no ResNet block, no text
encoder. For a target layer with output y (B, ..., out) and input x, membrane m adds

    faithful (default):  y += c_m[b] * (alpha_m / r) * U_m D_m x          (each membrane once)
    official_transport:  y += (sum_m c_m[b] (alpha_m / r) U_m) (sum_m c_m[b] D_m) x

where D_m = lora_down (r x in; a Conv2d with the layer's kernel, stride and padding for convs),
U_m = lora_up (out x r; 1x1 for convs), and c_m[b] = weight_m * g_m[b] is the membrane's strength
for sample b (weight: set by the user, 1 by default; g: Facilitated Transport, see
`petl_vision.diffusers.transport`, 1 when transport is off). The official inference multiplies every
tensor of each membrane by c_m and sums membranes key by key, so one membrane acts with c^2 and
several produce cross terms; `official_transport` reproduces it.

Init as the official code: lora_down Kaiming-uniform (a = sqrt(5)), lora_up zero. The membranes
live in ``model.petl.spm.membranes.<membrane name>.<official key>`` (official key:
``lora_unet_<module path with "." -> "_">``) and act through forward hooks on the host layers, so the
UNet's own modules and state_dict keys are untouched; `merge` folds the static membranes (c = weight)
into the weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..core.api import forget_method
from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state, host_modules
from ._autocast import autocast_dtype
from ._membrane import membrane_delta, merged_delta
from ._wrap import runs_fused_qkv

KEY_PREFIX = "lora_unet_"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_PEFT_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout")
# Layers inside a Transformer2DModel that are not the UNet's own: attention processors' layers (IP-Adapter's
# to_k_ip / to_v_ip) and the fused copies `fuse_qkv_projections` adds next to to_q / to_k / to_v.
_FOREIGN_PARTS = ("processor", "to_qkv", "to_kv", "to_added_qkv")
SUPPORTED = ("diffusers UNet2DConditionModel whose cross-attention sits in Transformer2DModel blocks (CrossAttnDownBlock2D, "
             "UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D: Stable Diffusion 1.x / 2.x / XL layouts)")


@dataclasses.dataclass
class SPMConfig(MethodConfig):
    """Config of SPM membranes.

    rank: rank r of each membrane (official: 1).
    alpha: LoRA alpha; the update is scaled by alpha / rank (official: 1.0).
    membranes: names of the membranes to create, one per erased concept (training: one). Letters,
        digits, "_" and "-".
    prompts: the erased-concept prompt of each membrane (empty: unknown), as the official file's
        metadata "prompts" (several prompts of one membrane separated by ","); Facilitated Transport
        compares the user's prompt against them.
    official_transport: apply each membrane's strength c to both lora_down and lora_up and sum the
        membranes key by key, as the official inference code does (c^2, cross terms between
        membranes); default: each membrane's strength applied once (the paper).
    """

    name = "spm"
    rank: int = 1
    alpha: float = 1.0
    membranes: tuple[str, ...] = ("default",)
    prompts: tuple[str, ...] = ()
    official_transport: bool = False

    def __post_init__(self):
        self.membranes, self.prompts = tuple(self.membranes), tuple(self.prompts)
        if self.rank < 1:
            raise ValueError(f"SPMConfig.rank must be >= 1, got {self.rank}")
        if not self.membranes or len(set(self.membranes)) != len(self.membranes):
            raise ValueError(f"SPMConfig.membranes must be non-empty and unique, got {self.membranes}")
        bad = [n for n in self.membranes if not isinstance(n, str) or not _NAME.match(n)]
        if bad:
            raise ValueError(f"SPMConfig.membranes: invalid names {bad} (letters, digits, '_' and '-' only)")
        if self.prompts and len(self.prompts) != len(self.membranes):
            raise ValueError(f"SPMConfig.prompts: {len(self.prompts)} prompts for {len(self.membranes)} membranes {self.membranes}")

    def prompt_of(self, membrane: str) -> str:
        return self.prompts[self.membranes.index(membrane)] if self.prompts else ""


def official_key(path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return KEY_PREFIX + path.replace(".", "_")


def target_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Official key -> nn.Linear / nn.Conv2d inside the UNet's Transformer2DModel blocks.

    Layers of a peft LoRA injected by diffusers (lora_A, lora_B, ...) are skipped; the layer a peft
    wrapper holds as ``base_layer`` keeps the key of the path it wraps. Layers of attention processors
    (IP-Adapter's to_k_ip / to_v_ip) and fused projections (to_qkv, to_kv) are not the UNet's own: skipped.
    """
    diffusers = sys.modules.get("diffusers")
    if diffusers is None:
        return {}
    transformer_cls = diffusers.Transformer2DModel
    out: dict[str, nn.Module] = {}
    for name, module in host_modules(model):
        if not isinstance(module, transformer_cls):
            continue
        for child_name, child in module.named_modules():
            parts = child_name.split(".")
            if not isinstance(child, (nn.Linear, nn.Conv2d)) or any(p in _PEFT_PARTS or p in _FOREIGN_PARTS for p in parts):
                continue
            path = ".".join(p for p in f"{name}.{child_name}".split(".") if p != "base_layer")
            out[official_key(path)] = child
    return out


def unsupported_layout(model: nn.Module) -> str | None:
    """Why SPM cannot cover this UNet (None when it can): cross-attention outside the Transformer2DModel
    blocks (SimpleCrossAttn blocks: the membranes would leave that text path open), or fused attention
    projections in use (the membranes on to_q / to_k / to_v would never run)."""
    transformer_cls = sys.modules["diffusers"].Transformer2DModel
    inside = {id(m) for _, t in host_modules(model) if isinstance(t, transformer_cls) for m in t.modules()}
    outside, fused = [], []
    for name, module in host_modules(model):
        if getattr(module, "is_cross_attention", False) is True and id(module) not in inside and not any(p in _PEFT_PARTS for p in name.split(".")):
            outside.append(name)
        if id(module) in inside and runs_fused_qkv(module):
            fused.append(name)
    if outside:
        return (f"cross-attention layers outside Transformer2DModel blocks ({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}: "
                "SimpleCrossAttn blocks) would stay without membranes")
    if fused:
        return f"its attention projections are fused ({fused[0]}, ...: unet.fuse_qkv_projections()); call unet.unfuse_qkv_projections() first"
    return None


def is_unet(model: nn.Module) -> bool:
    diffusers = sys.modules.get("diffusers")  # a model can only be a diffusers UNet if diffusers is loaded
    return diffusers is not None and isinstance(model, diffusers.UNet2DConditionModel)


class Membrane(nn.Module):
    """One membrane on one layer: lora_down (in -> r), lora_up (r -> out), alpha (a 0-dim buffer)."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        kw = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        if isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False, **kw)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False, **kw)
        else:
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False, **kw)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha), **kw))
        self.scale = float(alpha) / rank  # alpha / r as a Python float (no device sync in the forward)
        self.register_load_state_dict_post_hook(_refresh_scale)

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    def refresh(self) -> None:
        """Recompute `scale` after `alpha` was written (load_state_dict calls it)."""
        if not self.alpha.is_meta:
            self.scale = float(self.alpha) / self.rank


def _refresh_scale(module: Membrane, incompatible_keys) -> None:
    module.refresh()


class _LayerHook:
    """Forward hook of one host layer (number `index` of `spm.layers`): adds the membranes' update."""

    def __init__(self, spm: "SPMModule", key: str, index: int):
        self.spm, self.key, self.index = spm, key, index

    def __call__(self, layer, args, output):
        spm = self.spm
        run = spm.run
        if run is None or run[0] is not spm.token:
            if spm.pending is None:  # a layer called outside a UNet forward, or the state changed since
                return spm.layer_output(layer, self.key, args[0], output)
            spm.begin(*spm.pending)  # the first layer of a UNet forward builds what all layers read
            run = spm.run
            if run is None:
                return spm.layer_output(layer, self.key, args[0], output)
        if not run[1]:
            return output
        x = args[0]
        tensors = run[1][self.index]
        if x.dtype != tensors[1].dtype:  # an fp32 input under autocast (text states, norm outputs): cast once, reuse
            if torch.compiler.is_compiling():
                x = x.to(tensors[1].dtype)
            else:
                cast = spm.cast
                if cast is None or cast[0] is not x or cast[2] != _version(x):
                    cast = spm.cast = (x, x.to(tensors[1].dtype), _version(x))
                x = cast[1]
        out = _fast_update(layer, x, output, tensors, run[2])
        return spm.layer_output(layer, self.key, args[0], output) if out is None else out


def _version(t: torch.Tensor):
    """The in-place version counter of t, the stamp of cached values derived from it. Tensors made under
    torch.inference_mode have none: a fresh object, equal to nothing, so nothing derived from them is reused."""
    return object() if t.is_inference() else t._version


class _BatchHook:
    """Forward pre-hook of the UNet: the batch of this forward. The first membrane layer then builds, once,
    what all layers read (`SPMModule.begin`): inside the UNet's forward, so torch.compile traces it
    into the UNet's graph (this hook runs no op: it is no graph of its own)."""

    def __init__(self, spm: "SPMModule", model: nn.Module):
        self.spm = spm
        hooked = {id(layer) for layer in spm.layers.values()}  # diffusers Attention modules whose projections carry membranes
        self.attentions = [m for m in model.modules() if hasattr(m, "processor") and any(id(c) in hooked for c in m.children())]

    def __call__(self, model, args, kwargs):
        if any(runs_fused_qkv(a) for a in self.attentions):  # to_qkv / to_kv copies would run instead of the membranes
            raise RuntimeError("spm: the UNet's attention projections were fused after the membranes were loaded "
                               "(unet.fuse_qkv_projections()): the membranes on to_q / to_k / to_v would not act; call "
                               "unet.unfuse_qkv_projections(), or pv.merge the membranes into the UNet before fusing")
        sample = args[0] if args else kwargs.get("sample")
        self.spm.pending = (sample.shape[0], sample.device)
        self.spm.run = None


# The per-forward state the layer hooks read (`SPMModule.begin`), a tuple (token, layers, per_sample):
# layers: per host layer (in `spm.layers` order) (down (R, in[, kh, kw]), up), or () when no membrane is
# active; up is (Bc, R, out) with the strengths and alpha / r folded in when per_sample (Bc = the batch),
# else (out, R) (static strengths folded in, or the plain membrane: strength 1, alpha = rank).
_Run = tuple


def _fast_update(layer: nn.Module, x: torch.Tensor, output: torch.Tensor, tensors: tuple, per_sample: bool) -> torch.Tensor | None:
    """`output` plus the update (two matmuls: down, then up with the strengths folded in); None where
    the shapes call for the general path (`membrane_delta`)."""
    down, up = tensors
    if up.dtype != output.dtype or up.device != output.device or not output.is_contiguous() or (per_sample and up.shape[0] != output.shape[0]):
        return None
    grad = torch.is_grad_enabled()
    if isinstance(layer, nn.Conv2d):
        h = F.conv2d(x, down.to(x.dtype), None, layer.stride, layer.padding)  # (B, R, H, W)
        b, c = output.shape[:2]
        out3, h3 = output.view(b, c, -1), h.view(b, h.shape[1], -1)
        if per_sample:  # (B, out, HW) += (B, out, R) @ (B, R, HW)
            up = up.transpose(1, 2)
            return (out3.baddbmm_(up, h3) if not grad else torch.baddbmm(out3, up, h3)).view_as(output)
        up = up.expand(b, *up.shape)
        return (out3.baddbmm_(up, h3) if not grad else torch.baddbmm(out3, up, h3)).view_as(output)
    if x.dim() != 3:
        return None
    h = F.linear(x, down.to(x.dtype))  # (B, N, R)
    if per_sample:  # (B, N, out) += (B, N, R) @ (B, R, out)
        return output.baddbmm_(h, up) if not grad else torch.baddbmm(output, h, up)
    out2, h2 = output.view(-1, output.shape[-1]), h.view(-1, h.shape[-1])
    up = up.T
    return (out2.addmm_(h2, up) if not grad else torch.addmm(out2, h2, up)).view_as(output)


class _Weights(dict):
    """Membrane name -> user weight; every change replaces the owner's token (the per-forward state is rebuilt)."""

    def __init__(self, owner: "SPMModule"):
        super().__init__()
        self._owner = owner

    def _changed(self):
        self._owner.changed()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args):
        out = super().pop(*args)
        self._changed()
        return out

    def __reduce__(self):  # deepcopy / pickle: a plain dict of the values, re-wrapped by the owner
        return dict, (dict(self),)


class SPMModule(nn.Module):
    """``model.petl.spm``: the membranes, per-membrane weights, and the per-sample strengths.

    Per UNet forward its first membrane layer (`begin`) builds one `_Run`: the strengths of every membrane
    and sample (cached on the device while the strengths, weights and membranes stay the same, so a
    denoising loop computes them once) and every layer's up-projection scaled by them, all layers in
    one op; each layer's hook then runs two matmuls, with no Python walk over membranes and no host sync.
    """

    def __init__(self, config: SPMConfig, layers: dict[str, nn.Module]):
        super().__init__()
        self.config = config
        self.layers = layers  # official key -> host layer (a plain dict: not submodules)
        self.membranes = nn.ModuleDict()
        self.token = object()  # replaced on every change of the state below (see `changed`)
        self.weights: dict[str, float] = _Weights(self)
        self._enabled, self._inactive, self._strengths = True, frozenset(), None
        self._coef: tuple | None = None  # (token, names, strengths (M, B or 1) or None) of the general path
        self._cache: dict[str, tuple] = {}
        self.run: tuple | None = None  # (token, layers, per_sample) of the current forward (see `_Run`)
        self.pending: tuple | None = None  # (batch, device) of a UNet forward whose `_Run` is still to build
        self.cast: tuple | None = None  # (input, input in the compute dtype, version): the text states feed every to_k / to_v
        self.handles = [layer.register_forward_hook(_LayerHook(self, key, i)) for i, (key, layer) in enumerate(layers.items())]

    def changed(self) -> None:
        """Invalidate the per-forward state (called on every change of membranes, weights, strengths)."""
        self.token = object()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self.changed()

    @property
    def inactive(self) -> frozenset:
        """Names of the membranes switched off (assign a new set: ``spm.inactive |= {"a"}``)."""
        return self._inactive

    @inactive.setter
    def inactive(self, value) -> None:
        self._inactive = frozenset(value)
        self.changed()

    @property
    def strengths(self) -> dict[str, torch.Tensor] | None:
        """Name -> (K,) per-image strengths from transport (None: static). Assign a new dict to change them."""
        return self._strengths

    @strengths.setter
    def strengths(self, value) -> None:
        self._strengths = value
        self.changed()

    def __getstate__(self):
        """Copies and pickles leave the per-forward state and the caches behind: they hold the last
        forward's tensors (graph outputs after a training step, FSDP's gathered weights)."""
        return {**self.__dict__, "_cache": {}, "run": None, "pending": None, "cast": None, "_coef": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        if not isinstance(self.weights, _Weights):
            weights, self.weights = self.weights, _Weights(self)
            dict.update(self.weights, weights)

    def add(self, name: str, rank: int, alpha: float) -> None:
        if name in self.membranes:
            raise ValueError(f"spm: a membrane named {name!r} is already loaded (loaded: {list(self.membranes)})")
        self.membranes[name] = nn.ModuleDict({key: Membrane(layer, rank, alpha) for key, layer in self.layers.items()})
        self.weights[name] = 1.0

    def remove(self, name: str) -> None:
        """Drop membrane `name` (its weight and inactive flag too)."""
        del self.membranes[name]
        self.weights.pop(name)
        self.inactive = self.inactive - {name}

    def active(self) -> tuple[str, ...]:
        return tuple(n for n in self.membranes if n not in self._inactive) if self._enabled else ()

    def begin(self, batch: int, device) -> None:
        """Build the `_Run` of the next UNet forward of `batch` samples on `device`."""
        self.pending, self.cast = None, None
        names = self.active()
        token = self.token
        if not names:
            self.run = (token, (), False)
            return
        dtype = self._compute_dtype(device)
        if self.config.official_transport:  # the official composition takes the general path, per layer
            self.run = None
            self.prepare(batch, device, dtype)
            return
        coef = self._strength_matrix(names, batch, device, dtype)  # (M, Bc) or None
        self.run = (token, self._layer_tensors(names, coef, dtype), coef is not None and coef.shape[1] > 1)

    def _compute_dtype(self, device) -> torch.dtype:
        """The layers' activation dtype: autocast's, else the host weights'."""
        return autocast_dtype(torch.device(device).type) or next(iter(self.layers.values())).weight.dtype

    def _cached(self, slot: str, key_fn, build):
        """build(), reused while key_fn() (Python values: ids, versions) stays the same; not when compiling
        (a traced graph recomputes it: its ops are fused and captured there)."""
        if torch.compiler.is_compiling():
            return build()
        key = key_fn()
        hit = self._cache.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._cache[slot] = (key, value)
        return value

    def _strength_matrix(self, names, batch, device, dtype) -> torch.Tensor | None:
        """c (M, Bc) of the active membranes for this forward (Bc = batch, or 1 for static strengths);
        None when all are 1. Cached on the device: one small op when strengths or weights change, none otherwise."""
        static = tuple(self.weights[n] for n in names)
        strengths = self.strengths
        if strengths is None and all(w == 1.0 for w in static):
            return None
        rows = None if strengths is None else tuple(strengths.get(n) for n in names)

        def key():
            return names, static, self.token, batch, str(device), dtype, rows and tuple((id(g), _version(g)) for g in rows if g is not None)

        def build():
            if rows is None:
                return torch.tensor(static, dtype=torch.float32)[:, None].to(device, dtype)
            out = []
            for w, g in zip(static, rows):
                if g is None:
                    out.append(torch.full((batch,), w, device=device))
                    continue
                if batch % g.numel():
                    raise ValueError(
                        f"spm transport: the UNet got a batch of {batch} samples, but the prompts gave {g.numel()} per-image "
                        "strengths (expected a multiple: classifier-free guidance doubles it)"
                    )
                out.append(g.to(device, torch.float32).repeat(batch // g.numel()) * w)  # CFG batches are [uncond, cond]
            return torch.stack(out).to(dtype)

        return self._cached("coef", key, build)

    def _layer_tensors(self, names, coef: torch.Tensor | None, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (down, up) with the strengths and alpha / r folded into up; the up-projections
        of all layers are scaled in one op (see `_Run`)."""
        layers = list(self.layers)
        groups = [self.membranes[n] for n in names]
        params = [(g[k].lora_down.weight, g[k].lora_up.weight, g[k].scale) for k in layers for g in groups]
        m = len(names)
        frozen = not any(d.requires_grad or u.requires_grad for d, u, _ in params) or not torch.is_grad_enabled()
        if not frozen and coef is None and m == 1 and all(sc == 1.0 for _, _, sc in params):
            # training one membrane of strength 1, alpha = rank: its own parameters, nothing to compute
            return [(d, u.flatten(1)) for d, u, _ in params]

        def key():
            return names, dtype, self.token, tuple((id(d), _version(d), d.data_ptr(), id(u), _version(u), u.data_ptr(), sc) for d, u, sc in params)

        def build():
            downs = [torch.cat([params[i * m + j][0] for j in range(m)]) if m > 1 else params[i][0] for i in range(len(layers))]
            ups = [torch.cat([params[i * m + j][1].flatten(1) * params[i * m + j][2] for j in range(m)], dim=1) for i in range(len(layers))]
            flat = torch.cat(ups).to(dtype)  # (sum_out, R)
            sizes = [u.shape[0] for u in ups]
            return [d.to(dtype) for d in downs], flat, sizes

        downs, flat, sizes = self._cached("layers", key, build) if frozen else build()
        rank = flat.shape[1] // m
        if coef is None:
            scaled = flat[None]
        else:  # (Bc, sum_out, R): c of membrane j on its r columns
            c = coef.repeat_interleave(rank, dim=0).T.to(flat.dtype)  # (Bc, R)
            scaled = flat[None] * c[:, None, :]
        per_sample = coef is not None and coef.shape[1] > 1
        ups = scaled.transpose(1, 2).split(sizes, dim=2)  # (Bc, R, out) each
        return [(d, u if per_sample else u[0].T) for d, u in zip(downs, ups)]

    def prepare(self, batch: int, device, dtype) -> None:
        """Strengths c (M, B or 1) of the active membranes for the next forward of `batch` samples."""
        names = self.active()
        static = [self.weights[n] for n in names]
        if (self.strengths is None or not names) and all(w == 1.0 for w in static):
            self._coef = self.token, names, None
            return
        weights = torch.tensor(static, device=device, dtype=dtype)[:, None]
        if self.strengths is None:
            self._coef = self.token, names, weights
            return
        rows = []
        for name in names:
            g = self.strengths.get(name)
            if g is None:
                rows.append(torch.ones(batch, device=device, dtype=dtype))
                continue
            if batch % g.numel():
                raise ValueError(
                    f"spm transport: the UNet got a batch of {batch} samples, but the prompts gave {g.numel()} per-image "
                    "strengths (expected a multiple: classifier-free guidance doubles it)"
                )
            rows.append(g.to(device, dtype).repeat(batch // g.numel()))  # CFG batches are [uncond, cond]
        self._coef = self.token, names, weights * torch.stack(rows)

    def coefficients(self, batch: int, device, dtype) -> tuple[tuple[str, ...], torch.Tensor | None]:
        """(names, strengths (M, B or 1) or None for all ones) of the current forward."""
        if self._coef is None or self._coef[0] is not self.token or (self._coef[2] is not None and self._coef[2].shape[1] not in (1, batch)):
            self.prepare(batch, device, dtype)
        _, names, coef = self._coef
        return names, None if coef is None else coef.to(device, dtype)

    def layer_output(self, layer: nn.Module, key: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The general path (any shape, the official composition): the membranes of `key` looked up by name."""
        names = self.active()
        if not names:
            return output
        names, coef = self.coefficients(x.shape[0], x.device, x.dtype)
        mems = [self.membranes[n][key] for n in names]
        return membrane_delta(layer, x, output, mems, coef, self.config.official_transport)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def spm_module(model: nn.Module) -> SPMModule:
    """The SPMModule of `model` (also through a DDP / accelerate wrapper); ValueError when none."""
    state = get_state(model)
    if state is None and isinstance(getattr(model, "module", None), nn.Module):
        state = get_state(model.module)
    module = getattr(state, "spm", None)
    if not isinstance(module, SPMModule):
        raise ValueError(f"no SPM membrane is on this {type(model).__name__}; call pv.apply(unet, 'spm') or pv.diffusers.load_spm first")
    return module


def has_spm(model: nn.Module) -> bool:
    state = get_state(model)
    return state is not None and isinstance(getattr(state, "spm", None), SPMModule)


@contextlib.contextmanager
def membranes_disabled(model: nn.Module, names=None):
    """Within the block the UNet runs without membranes (or without those named); restored after."""
    spm = spm_module(model)
    if names is None:
        before, spm.enabled = spm.enabled, False
        try:
            yield model
        finally:
            spm.enabled = before
        return
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in spm.membranes]
    if unknown:
        raise KeyError(f"spm: no membrane named {unknown}; loaded: {list(spm.membranes)}")
    added = set(names) - spm.inactive
    spm.inactive = spm.inactive | added
    try:
        yield model
    finally:
        spm.inactive = spm.inactive - added


@register_method
class SPM(Method):
    name = "spm"
    config_class = SPMConfig
    mergeable = True
    input_kind = "latents"

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        if not is_unet(model):
            raise UnsupportedHostError(
                f"method 'spm' needs a diffusers UNet2DConditionModel (Stable Diffusion 1.x / 2.x / XL); got {type(model).__name__}"
            )
        if not target_layers(model):
            raise UnsupportedHostError(f"method 'spm' found no nn.Linear / nn.Conv2d inside a Transformer2DModel of this UNet; it supports a {SUPPORTED}")
        reason = unsupported_layout(model)
        if reason:
            raise UnsupportedHostError(f"method 'spm' cannot cover this UNet: {reason}; it supports a {SUPPORTED}")

    @classmethod
    def attach(cls, model: nn.Module, config: SPMConfig) -> None:
        spm = SPMModule(config, target_layers(model))
        for name in config.membranes:
            spm.add(name, config.rank, config.alpha)
        get_state(model).add_module("spm", spm)
        spm.handles.append(model.register_forward_pre_hook(_BatchHook(spm, model), with_kwargs=True))

    @classmethod
    @torch.no_grad()
    def merge(cls, model: nn.Module, config: SPMConfig) -> None:
        spm = spm_module(model)
        names = tuple(spm.membranes)
        coef = torch.tensor([spm.weights[n] for n in names])[:, None]
        for key, layer in spm.layers.items():
            mems = [spm.membranes[n][key] for n in names]
            layer.weight += merged_delta(layer, mems, coef.to(layer.weight), config.official_transport)
        _remove(model)


def _remove(model: nn.Module) -> None:
    spm = spm_module(model)
    spm.remove_hooks()
    delattr(get_state(model), "spm")


def unload(model: nn.Module) -> nn.Module:
    """Remove SPM from `model` (hooks, membranes); the host runs exactly as before. Other methods stay."""
    _remove(model)
    return forget_method(model, "spm")
