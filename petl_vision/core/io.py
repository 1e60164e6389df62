"""save_adapter / load_adapter: safetensors for tensors, JSON for configs, atomic writes.

An adapter directory holds:
- ``adapter.safetensors``: what the methods train (trainable parameters, and the buffers of modules
  that run in training mode, such as BatchNorm statistics under full fine-tuning);
- ``adapter_config.json``: the methods and their configs, the host's class and the shapes of its
  state_dict (with a fingerprint), the tensor names and shapes, and the sha256 of the tensor file.

The config is written last, so it is the commit point: a save interrupted before it leaves the
previous adapter intact, and one interrupted between the two files is caught by the sha256.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from .api import _apply
from .errors import AdapterFileError, AdapterMismatchError, UnknownMethodError
from .registry import config_from_dict
from .state import fingerprint, get_state, host_class_name, host_shapes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter holds: trainable parameters and buffers of non-frozen modules."""
    state = get_state(model)
    if state is None:
        raise ValueError("no petl_vision method is applied to this model; call pv.apply first")
    frozen = state.frozen_module_ids()
    keep: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                keep.add(prefix + name)
        if id(module) not in frozen:
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and name not in module._non_persistent_buffers_set:
                    keep.add(prefix + name)
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k in keep}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of `model` to `directory` (created if needed). Returns the directory."""
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    state = get_state(model)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_NAME
    _atomic_write(weights_path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"}))
    meta = {
        "format_version": FORMAT_VERSION,
        "methods": [{"name": a.name, "config": a.config.to_dict()} for a in state.applied],
        "host": {"class": state.host_class, "fingerprint": fingerprint(state.host_shapes), "shapes": state.host_shapes},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "sha256": _sha256(weights_path),
    }
    _atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Re-apply the saved methods to `model` (a fresh host) and load the saved tensors.

    Every check runs before the model is touched: the files exist and are intact, every method is
    registered, the host matches the one the adapter was trained on, and the tensors are exactly
    those the methods create. Any failure raises an error naming the file and what is wrong.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}, written by pv.save_adapter)")
    meta = _read_config(config_path)
    configs = _read_method_configs(meta, config_path)
    if get_state(model) is not None:
        raise ValueError(f"load_adapter({directory}): the model already has methods {get_state(model).method_names}; load onto a model without adapters")
    _check_host(model, meta["host"], config_path)
    if _sha256(weights_path) != meta["sha256"]:
        raise AdapterFileError(f"{weights_path}: contents do not match the sha256 in {config_path} (truncated, or changed after saving)")
    tensors = _read_tensors(weights_path)
    saved = {k: list(v.shape) for k, v in tensors.items()}
    if saved != meta["tensors"]:
        raise AdapterFileError(f"{weights_path}: tensors differ from those listed in {config_path}: {_diff(meta['tensors'], saved)}")
    expected = _dry_run(model, configs, tensors)
    if expected != saved:
        raise AdapterMismatchError(f"{weights_path}: tensors do not fit the methods applied to this model: {_diff(expected, saved)}")

    for config in configs:
        _apply(model, config, tensors)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    return model


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_config(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    required = {"format_version", "methods", "host", "tensors", "sha256"}
    if not isinstance(meta, dict) or not required <= set(meta):
        missing = sorted(required - set(meta)) if isinstance(meta, dict) else sorted(required)
        raise AdapterFileError(f"{path}: not a petl_vision adapter config (missing keys {missing})")
    if meta["format_version"] != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format_version {meta['format_version']!r}; this petl_vision reads version {FORMAT_VERSION}")
    return meta


def _read_method_configs(meta: dict, path: Path) -> list:
    configs = []
    for entry in meta["methods"]:
        try:
            configs.append(config_from_dict(entry["name"], entry["config"]))
        except UnknownMethodError as e:
            raise AdapterFileError(f"{path}: {e}") from None
        except (TypeError, KeyError) as e:
            raise AdapterFileError(f"{path}: bad method entry {entry!r}: {e}") from None
    if not configs:
        raise AdapterFileError(f"{path}: lists no methods")
    return configs


def _check_host(model: nn.Module, host: dict, path: Path) -> None:
    shapes = host_shapes(model)
    if fingerprint(shapes) == host["fingerprint"] and host_class_name(model) == host["class"]:
        return
    problems = []
    if host_class_name(model) != host["class"]:
        problems.append(f"class {host_class_name(model)} (adapter: {host['class']})")
    diff = _diff(host["shapes"], shapes)
    if diff:
        problems.append(diff)
    raise AdapterMismatchError(f"{path}: adapter was trained on a different backbone; this model differs: {'; '.join(problems)}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({e})") from None


def _dry_run(model: nn.Module, configs: list, saved: dict) -> dict[str, list[int]]:
    """Names and shapes of the adapter tensors the configs create, computed on a meta-device copy."""
    memo = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        for name, buf in module.named_buffers(recurse=False):
            memo[id(buf)] = torch.empty_like(buf, device="meta")
    shadow = copy.deepcopy(model, memo)
    for config in configs:
        _apply(shadow, config, saved)
    return {k: list(v.shape) for k, v in adapter_state_dict(shadow).items()}


def _diff(expected: dict, actual: dict, limit: int = 5) -> str:
    """Human-readable difference of two name -> shape maps."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    shape = sorted(k for k in set(expected) & set(actual) if list(expected[k]) != list(actual[k]))
    parts = []
    if missing:
        parts.append(f"missing {missing[:limit]}{' ...' if len(missing) > limit else ''} ({len(missing)})")
    if unexpected:
        parts.append(f"unexpected {unexpected[:limit]}{' ...' if len(unexpected) > limit else ''} ({len(unexpected)})")
    if shape:
        parts.append("shape " + ", ".join(f"{k}: {list(actual[k])} vs {list(expected[k])}" for k in shape[:limit]))
    return "; ".join(parts)
