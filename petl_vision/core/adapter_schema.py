"""Checks of the adapter metadata: every field, with an AdapterFileError naming the file and the field.

Format 2 (written by this version) lives in the safetensors header of ``adapter.safetensors``:

    {"format_version": 2, "methods": [{"name": str, "config": {...}}, ...],
     "host": {"class": str, "fingerprint": sha256 hex, "shapes": {name: [int, ...]}},
     "tensors_sha256": sha256 hex of the tensors (names, dtypes, shapes, bytes),
     "base_model": null or {"library": str, "name": str, ...}}

Format 1 (older versions) is ``adapter_config.json`` beside the weights: the same without
``tensors_sha256`` and ``base_model``, plus ``tensors`` ({name: shape}) and ``sha256`` (of the file).
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import AdapterFileError, ConfigError, UnknownMethodError
from .registry import MethodConfig, config_from_dict

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _fail(path: Path, field: str, expected: str, value) -> AdapterFileError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return AdapterFileError(f"{path}: field {field!r} must be {expected}, got {shown} ({type(value).__name__})")


def _require(meta: dict, key: str, path: Path, prefix: str = ""):
    if key not in meta:
        raise AdapterFileError(f"{path}: missing field {prefix + key!r}")
    return meta[key]


def _shape_map(value, path: Path, field: str) -> dict[str, list[int]]:
    if not isinstance(value, dict):
        raise _fail(path, field, "a mapping of tensor name -> shape", value)
    for name, shape in value.items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _fail(path, f"{field}.{name}", "a list of non-negative integers", shape)
    return value


def _hex64(value, path: Path, field: str) -> str:
    if not (isinstance(value, str) and _HEX64.match(value)):
        raise _fail(path, field, "a sha256 hex digest (64 characters 0-9a-f)", value)
    return value


def check_meta(meta, path: Path, versions: tuple[int, ...]) -> dict:
    """Check every field of an adapter's metadata (`versions`: the format versions accepted here)."""
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{path}: not a petl_vision adapter config (a JSON object was expected, got {type(meta).__name__})")
    missing = sorted({"format_version", "methods", "host"} - set(meta))
    if missing:
        raise AdapterFileError(f"{path}: not a petl_vision adapter config (missing fields {missing})")
    version = meta["format_version"]
    if version not in versions or isinstance(version, bool):
        raise AdapterFileError(f"{path}: field 'format_version' is {version!r}; this petl_vision reads {' or '.join(map(str, versions))} here")
    methods = meta["methods"]
    if not isinstance(methods, list) or not methods:
        raise _fail(path, "methods", "a non-empty list of {\"name\": ..., \"config\": {...}}", methods)
    seen = set()
    for i, entry in enumerate(methods):
        if not isinstance(entry, dict):
            raise _fail(path, f"methods[{i}]", "an object {\"name\": ..., \"config\": {...}}", entry)
        name = _require(entry, "name", path, f"methods[{i}].")
        if not isinstance(name, str):
            raise _fail(path, f"methods[{i}].name", "a method name (string)", name)
        if not isinstance(_require(entry, "config", path, f"methods[{i}]."), dict):
            raise _fail(path, f"methods[{i}].config", "an object of config fields", entry["config"])
        if name in seen:
            raise AdapterFileError(f"{path}: field 'methods[{i}].name': method {name!r} is listed twice (a method is applied once)")
        seen.add(name)
    host = meta["host"]
    if not isinstance(host, dict):
        raise _fail(path, "host", "an object {\"class\", \"fingerprint\", \"shapes\"}", host)
    if not isinstance(_require(host, "class", path, "host."), str):
        raise _fail(path, "host.class", "a class name (string)", host["class"])
    _hex64(_require(host, "fingerprint", path, "host."), path, "host.fingerprint")
    _shape_map(_require(host, "shapes", path, "host."), path, "host.shapes")
    if version == 1:
        _shape_map(_require(meta, "tensors", path), path, "tensors")
        _hex64(_require(meta, "sha256", path), path, "sha256")
    else:
        _hex64(_require(meta, "tensors_sha256", path), path, "tensors_sha256")
        base = meta.get("base_model")
        if base is not None and not (isinstance(base, dict) and all(isinstance(k, str) for k in base)):
            raise _fail(path, "base_model", "null or an object", base)
    return meta


def method_configs(meta: dict, path: Path) -> list[MethodConfig]:
    """The configs of a checked `meta`; a bad field raises AdapterFileError naming it."""
    configs = []
    for i, entry in enumerate(meta["methods"]):
        try:
            configs.append(config_from_dict(entry["name"], entry["config"]))
        except UnknownMethodError as e:
            raise AdapterFileError(f"{path}: field 'methods[{i}].name': {e}") from None
        except (ConfigError, TypeError, ValueError) as e:  # ConfigError, or the config's own range checks
            raise AdapterFileError(f"{path}: field 'methods[{i}].config' ({entry['name']}): {e}") from None
    return configs
