"""Helpers shared by module-level methods: wrapper base class, target selection, parametrizations."""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.state import host_modules
from ..hosts import classifier_modules
from ..hosts.open_clip import attention_pool_linears


class WrapperLayer(nn.Module):
    """A layer wrapping `base`. Attributes it lacks (``weight``, ``in_features``, ...) come from `base`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base" or name.startswith("__"):  # dunders (__deepcopy__, ...) are the wrapper's own
                raise
            return getattr(self.base, name)


def select_targets(model: nn.Module, accept, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of host modules outside the classifier head for which `accept(module)` holds.

    pattern: optional regular expression searched in the module name to narrow the selection.
    Wrappers placed by a method are never selected themselves; the layers they wrap can be (LoRA
    on a linear that SSF wraps).
    """
    regex = re.compile(pattern) if pattern else None
    return [
        (name, module)
        for name, module in host_modules(model, exclude=classifier_modules(model))
        if not isinstance(module, WrapperLayer) and accept(module) and (regex is None or regex.search(name))
    ]


def linears_read_directly(model: nn.Module) -> set[int]:
    """ids of the nn.Linear layers whose parent reads `weight` and `bias` without calling them.

    nn.MultiheadAttention's `out_proj`, the q/k/v/c projections of open_clip's ResNet attention
    pool and the `qkv` of `split_bias_attentions`: a wrapper placed on them would never run, so
    methods must reach their tensors directly.
    """
    ids = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    ids |= {id(m.qkv) for m in split_bias_attentions(model)}
    return ids | {id(m) for m in attention_pool_linears(model)}


def split_bias_attentions(model: nn.Module) -> list[nn.Module]:
    """Attention modules that read their `qkv` Linear's weight without calling it.

    timm's Beit, Eva (EVA-02, the `vit_*_rope_*` models) and Swin V2 attentions with qkv bias keep
    it as `q_bias`, `k_bias` (a zero buffer), `v_bias` and compute
    ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))`` unless `qkv_bias_separate` is set,
    in which case they call ``self.qkv(x)`` and add the bias after it.
    """
    return [
        m for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "q_bias", None), torch.Tensor)
        and not getattr(m, "qkv_bias_separate", False)
    ]


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    torch's parametrized class (e.g. "ParametrizedMultiheadAttention") is shared by deep copies of
    the module, and removing a parametrization deletes the tensor's property from that class: done
    on the shared class, merging a deep copy would break the original.
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


@torch.no_grad()
def bake_parametrizations(module: nn.Module, attrs, order: tuple[str, ...]) -> None:
    """Write the parametrized tensors `attrs` of `module` into plain parameters; drop their parametrizations.

    order: the module's parameter names before it was parametrized. Removal re-registers each
    tensor last; the original order is restored so state_dict keys keep their order.
    """
    _own_class(module)
    for attr in attrs:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    for key in order:
        if key in module._parameters:
            module._parameters[key] = module._parameters.pop(key)


def runs_fused_qkv(module: nn.Module) -> bool:
    """Whether `module` is a diffusers Attention running a fused-projection processor
    (`unet.fuse_qkv_projections()`): it calls to_qkv / to_kv copies, not to_q / to_k / to_v."""
    return "Fused" in type(getattr(module, "processor", None)).__name__
