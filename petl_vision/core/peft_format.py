"""peft's on-disk LoRA format: write it beside a pv adapter, read folders that peft wrote.

peft's folder is ``adapter_config.json`` (a ``LoraConfig`` with ``"peft_type": "LORA"``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight`` (no adapter name) and, for ``modules_to_save`` (a trained head),
``base_model.model.<module>.<param>``. ``peft.PeftModel.from_pretrained(host, folder)`` loads it.

When peft can represent an adapter (the rule of `to_peft`): the applied methods are ``lora``,
optionally with ``linear`` (head only); every adapter tensor is either a LoRA A/B weight or part of
a module whose whole state_dict is saved (peft's ``modules_to_save``, e.g. the head); and no
attention was switched to call its qkv (timm's Beit / Eva / Swin V2 ``qkv_bias_separate``: peft would
not switch it, so its LoRA on qkv would be skipped). Otherwise no peft files are written.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterFileError

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_OURS = re.compile(r"^(.+)\.lora_([AB])\.default\.weight$")  # pv (peft injected, adapter "default")
_THEIRS = re.compile(r"^(.+)\.lora_([AB])\.weight$")  # peft's file
_PEFT_METHODS = {"lora", "linear"}
_SWITCHED = "_petl_lora_qkv_bias_separate"  # set by methods/lora.py on attentions it switched


def _module_of(model: nn.Module, key: str) -> str:
    """The name of the module owning state_dict `key`."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def to_peft(model: nn.Module, tensors: dict[str, torch.Tensor], base_model: str | None = None):
    """(peft adapter_config dict, peft-keyed tensors), or None when peft cannot represent the adapter."""
    from .state import get_state

    state = get_state(model)
    names = state.method_names
    if "lora" not in names or not set(names) <= _PEFT_METHODS:
        return None
    if any(getattr(m, _SWITCHED, False) for m in model.modules()):
        return None
    lora_config = next(a.config for a in state.applied if a.name == "lora")
    lora_modules, out, rest = set(), {}, {}
    for key, tensor in tensors.items():
        match = _OURS.match(key)
        if match:
            lora_modules.add(match.group(1))
            out[f"{_PREFIX}{match.group(1)}.lora_{match.group(2)}.weight"] = tensor
        elif ".lora_" in key:
            return None  # a LoRA tensor of a kind we do not write (DoRA magnitude, embeddings)
        else:
            rest[key] = tensor
    save_modules = sorted({_module_of(model, k) for k in rest})
    for module_name in save_modules:
        if not module_name or module_name in lora_modules:
            return None
        prefix = module_name + "."
        whole = {prefix + k for k in model.get_submodule(module_name).state_dict()}
        if not whole <= set(rest) or any(k.startswith(prefix) and k not in whole for k in rest):
            return None  # peft saves whole modules only
    for key, tensor in rest.items():
        out[_PREFIX + key] = tensor
    # nested names (head.fc inside head) would be saved twice by peft; keep the outermost only
    save_modules = [m for m in save_modules if not any(m.startswith(o + ".") for o in save_modules)]
    from peft import LoraConfig

    config = LoraConfig(
        r=lora_config.r, lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
        target_modules="^(" + "|".join(map(re.escape, sorted(lora_modules))) + ")$",
        modules_to_save=save_modules or None, base_model_name_or_path=base_model,
    ).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return config, out


# peft LoraConfig fields petl_vision's LoRA cannot follow, with the value it can.
_UNSUPPORTED = {
    "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
}


def from_peft(config: dict, tensors: dict[str, torch.Tensor], config_path: Path, weights_path: Path):
    """([LoRAConfig], pv-keyed tensors) of a folder peft wrote; AdapterFileError naming the field."""
    from .registry import make_config

    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{config_path}: field 'peft_type' is {config.get('peft_type')!r}; petl_vision reads peft adapters of type 'LORA'")
    for field, accepted in _UNSUPPORTED.items():
        value = config.get(field, accepted)
        if value not in (accepted, None) and not (accepted is None and value in ([], {})):
            raise AdapterFileError(f"{config_path}: field {field!r} is {value!r}; petl_vision's LoRA reads only {accepted!r} here")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise AdapterFileError(f"{config_path}: missing field {field!r}")
    targets, renamed, others = set(), {}, []
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX):
            raise AdapterFileError(f"{weights_path}: tensor {key!r} does not start with {_PREFIX!r} (peft's key layout)")
        key = key[len(_PREFIX):]
        match = _THEIRS.match(key)
        if match:
            targets.add(match.group(1))
            renamed[f"{match.group(1)}.lora_{match.group(2)}.default.weight"] = tensor
        elif ".lora_" in key:
            raise AdapterFileError(f"{weights_path}: tensor {key!r} is a LoRA tensor petl_vision's LoRA does not have")
        else:
            others.append(key)
            renamed[key] = tensor
    if not targets:
        raise AdapterFileError(f"{weights_path}: holds no lora_A / lora_B weights")
    try:
        lora = make_config(
            "lora", r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
            target_modules="^(" + "|".join(map(re.escape, sorted(targets))) + ")$", include_conv=True,
            train_head=bool(others),
        )
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{config_path}: {e}") from None
    return [lora], renamed
