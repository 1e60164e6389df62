"""LoRA baseline through the peft library (not re-implemented here).

peft's LoRA layers are injected into the host's linears (every nn.Linear outside the classifier
head by default: on a ViT, attn.qkv, attn.proj, mlp.fc1, mlp.fc2), so the comparison with SSF and
VPT runs through the same `apply` / `save_adapter` / `merge` API. `merge` uses peft's own layer
merge and puts the base linears back, leaving a plain host model.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import unfreeze_head
from ._wrap import select_targets


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    """Config of the LoRA baseline (peft).

    r: rank. alpha: scaling numerator (update scaled by alpha / r). dropout: on the LoRA input.
    target_modules: regular expression searched in module names to restrict the nn.Linear layers
        (default: every nn.Linear outside the classifier head, except nn.MultiheadAttention's
        out_proj, whose weight MHA reads directly).
    train_head: train the classifier head too.
    """

    name = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | None = None
    train_head: bool = True


def _lora_layer_class():
    """peft's LoraLayer, imported on first use: importing peft costs seconds."""
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, _lora_layer_class())


def _mha_out_projections(model: nn.Module) -> set[int]:
    """ids of nn.MultiheadAttention.out_proj layers: MHA reads their weight without calling them."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _targets(model: nn.Module, pattern: str | None = None) -> list[str]:
    skip = _mha_out_projections(model)
    return [name for name, m in select_targets(model, _is_linear, pattern) if id(m) not in skip]


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
            raise UnsupportedHostError(f"method 'lora' found no nn.Linear outside the head of {type(model).__name__}")

    @classmethod
    def attach(cls, model: nn.Module, config: LoRAConfig) -> None:
        names = _targets(model, config.target_modules)
        if not names:
            raise UnsupportedHostError(f"lora: target_modules={config.target_modules!r} matches no nn.Linear of {type(model).__name__}")
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        trainable = [p for p in model.parameters() if p.requires_grad]
        peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names)
        inject_adapter_in_model(peft_config, model)
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
