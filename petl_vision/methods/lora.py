"""LoRA baseline through the peft library (not re-implemented here).

peft's LoRA layers are injected into the host's linears (every nn.Linear outside the classifier
head by default: on a ViT, attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and, on CNNs, its convolutions
(peft's Conv2d LoRA: `lora_A` a conv with the base's kernel, stride and padding down to r
channels, `lora_B` a 1x1 conv up to the output channels), so the comparison with SSF and VPT runs
through the same `apply` / `save_adapter` / `merge` API. `merge` uses peft's own layer merge and
puts the base layers back, leaving a plain host model. The `qkv` of timm's Beit, Eva and Swin V2
attentions, which they read as ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``, is adapted
by switching those attentions to their ``qkv_bias_separate`` path (call qkv, then add the bias) until
the merge.

Under autocast each LoRA layer's input is cast once to the autocast dtype before the layer
(`_input_in_autocast_dtype`) and peft's own cast of it to the LoRA weights' dtype (fp32) is off, so
the base layer and `lora_A` read one bf16 tensor: autocast would otherwise cast the input for each,
and peft's fp32 copy made `lora_A` keep a bf16 copy of its own for backward.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import unfreeze_head
from ._autocast import autocast_dtype
from ._wrap import linears_read_directly, select_targets, split_bias_attentions


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    """Config of the LoRA baseline (peft).

    r: rank. alpha: scaling numerator (update scaled by alpha / r). dropout: on the LoRA input.
    target_modules: regular expression searched in module names to restrict the adapted layers
        (default: every nn.Linear outside the classifier head, except those whose weight the parent
        reads directly, such as nn.MultiheadAttention's out_proj).
    include_conv: also adapt nn.Conv2d layers, r * (in * kh * kw + out) parameters each. None
        (default): only when the model has no nn.Linear to adapt (ResNets, convnext_atto's 1x1-conv
        MLP), so ViTs, Swin and UNets keep the linear-only placement. Grouped (depthwise), dilated
        and non-zero-padded convs are always skipped: peft's lora_A ignores groups, dilation and
        padding mode (and cannot merge grouped convs).
    train_head: train the classifier head too.
    """

    name = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | None = None
    include_conv: bool | None = None
    train_head: bool = True


def _lora_layer_class():
    """peft's LoraLayer, imported on first use: importing peft costs seconds."""
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, _lora_layer_class())


def _is_plain_conv(module: nn.Module) -> bool:
    """An nn.Conv2d whose LoRA update peft computes and merges exactly."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.dilation == (1, 1)
            and module.padding_mode == "zeros")


# Set on an attention module of `split_bias_attentions` whose qkv LoRA adapts: it is switched to
# `qkv_bias_separate=True` (call qkv, then add the bias: the same result) while LoRA is applied.
_SWITCHED = "_petl_lora_qkv_bias_separate"


def _switchable(model: nn.Module) -> dict[int, nn.Module]:
    """id(qkv) -> attention module, for the split-bias attentions that can be made to call their qkv."""
    return {id(m.qkv): m for m in split_bias_attentions(model) if hasattr(m, "qkv_bias_separate")}


def _targets(model: nn.Module, include_conv: bool | None = None, pattern: str | None = None) -> list[str]:
    """Names of the layers LoRA adapts (see LoRAConfig.include_conv for when convs are included)."""
    direct = set(linears_read_directly(model)) - set(_switchable(model))

    def linear(m: nn.Module) -> bool:
        return _is_linear(m) and id(m) not in direct

    if include_conv is None:
        include_conv = not select_targets(model, linear)
    accept = (lambda m: linear(m) or _is_plain_conv(m)) if include_conv else linear
    return [name for name, _ in select_targets(model, accept, pattern)]


def _input_in_autocast_dtype(module: nn.Module, args: tuple):
    """Forward pre-hook of a LoRA layer: under autocast, its input (B, ..., C) in the autocast dtype.

    Autocast casts a linear's or conv's input anyway; done once here, the base layer and lora_A
    share that tensor (lora_A keeps it for backward; full fine-tuning keeps the same one).
    """
    x = args[0] if args else None
    if not (torch.is_tensor(x) and x.is_floating_point()):
        return None
    dtype = autocast_dtype(x.device.type)  # None on meta tensors: autocast is not available there
    if dtype is not None and x.dtype != dtype:
        return (x.to(dtype),) + args[1:]
    return None


@register_method
class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    mergeable = True

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        state = get_state(model)
        if state is not None and "mask_tuning" in state.method_names:
            raise UnsupportedHostError("apply 'lora' before 'mask_tuning': LoRA's merge would write into the masked weight's copy")
        if not _targets(model):
            raise UnsupportedHostError(f"method 'lora' found no nn.Linear or ungrouped nn.Conv2d outside the head of {type(model).__name__}")

    @classmethod
    def attach(cls, model: nn.Module, config: LoRAConfig) -> None:
        names = _targets(model, config.include_conv, config.target_modules)
        if not names:
            kinds = "nn.Linear" if config.include_conv is False else "nn.Linear or nn.Conv2d"
            raise UnsupportedHostError(
                f"lora: target_modules={config.target_modules!r}, include_conv={config.include_conv!r} matches no {kinds} of {type(model).__name__}"
            )
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        trainable = [p for p in model.parameters() if p.requires_grad]
        adapted = {id(model.get_submodule(n)) for n in names}
        switch = [attn for qkv_id, attn in _switchable(model).items() if qkv_id in adapted]
        exact = "^(" + "|".join(map(re.escape, names)) + ")$"  # a list would also match name suffixes
        peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=exact)
        inject_adapter_in_model(peft_config, model)
        for name in names:
            layer = model.get_submodule(name)
            layer.cast_input_dtype_enabled = False  # peft's cast of the input to the fp32 LoRA weights' dtype
            layer.register_forward_pre_hook(_input_in_autocast_dtype)
        for attn in switch:  # the LoRA layer must be called: F.linear(x, qkv.weight, ...) would skip it
            attn.qkv_bias_separate = True
            setattr(attn, _SWITCHED, True)
        for param in trainable:  # peft freezes everything but LoRA; keep earlier methods trainable
            param.requires_grad_(True)
        if config.train_head:
            unfreeze_head(model, cls.name)

    @classmethod
    def merge(cls, model: nn.Module, config: LoRAConfig) -> None:
        lora_layer = _lora_layer_class()
        for name, module in list(model.named_modules()):
            if isinstance(module, lora_layer):
                module.merge()
                model.set_submodule(name, module.get_base_layer())
            if getattr(module, _SWITCHED, False):
                module.qkv_bias_separate = False
                delattr(module, _SWITCHED)
