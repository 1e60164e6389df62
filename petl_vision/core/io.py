"""save_adapter / load_adapter / push_to_hub: safetensors for tensors, every interruption survivable.

An adapter folder holds:
- ``adapter.safetensors``: the adapter. Its tensors are what the methods train (trainable
  parameters, and the buffers of modules that run in training mode, such as BatchNorm statistics
  under full fine-tuning); its safetensors header holds the metadata: the methods and their
  configs, the host's class and state_dict shapes (with a fingerprint), the base model, and a
  sha256 of the tensors. This one file is all `load_adapter` needs (the file alone loads too);
- ``petl_adapter.json``: the same metadata, readable (not read back by `load_adapter`);
- ``README.md``: a model card (methods, base model, trainable count, metrics, how to load it);
- for a LoRA peft can represent (see `peft_format`): peft's ``adapter_config.json`` and
  ``adapter_model.safetensors``, so ``peft.PeftModel.from_pretrained(host, folder)`` loads it.

Atomic saves: each file is written to a temporary name unique to the writer (process id, thread
id, random suffix), flushed and fsynced, then moved over the old one with ``os.replace`` (atomic
on POSIX and Windows). Since the adapter is one self-describing file, its rename is the single
commit point: an interruption anywhere (exception, KeyboardInterrupt, kill -9, full disk) leaves
``adapter.safetensors`` as exactly the old or exactly the new adapter, and concurrent saves never
fail (the last rename wins). The files written after it (JSON copy, card, peft files) may then lag
by one save until the next save completes; `load_adapter` never reads them when
``adapter.safetensors`` carries its metadata.

`load_adapter` also reads folders of older versions (our ``adapter_config.json`` + a plain
``adapter.safetensors``) and folders peft wrote (``PeftModel.save_pretrained`` of a LoRA), and takes
a Hub repo id (``"user/repo"``, resolved through huggingface_hub; a local path always wins).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from . import peft_format
from .adapter_schema import check_meta, method_configs
from .api import _apply, summary
from .distributed import clean_name, full_tensor, refuse_sharded, run_on_rank0, sharding, unwrap
from .errors import AdapterFileError, AdapterMismatchError
from .hub import is_repo_id, resolve_dir, upload_folder
from .model_card import base_model_id, base_model_info, model_card
from .state import fingerprint, get_state, host_class_name, host_shapes

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "petl_adapter.json"  # readable copy of the metadata in WEIGHTS_NAME's header
LEGACY_CONFIG_NAME = "adapter_config.json"  # format 1; peft's config has this name too
CARD_NAME = "README.md"
FORMAT_VERSION = 2
HEADER_KEY = "petl_vision"
_HUB_FILES = [WEIGHTS_NAME, LEGACY_CONFIG_NAME, peft_format.PEFT_WEIGHTS_NAME]  # what load_adapter reads
_STALE_TMP_SECONDS = 3600
_HUB_KWARGS = {"revision", "private", "token", "commit_message", "create_pr"}


def adapter_state_dict(model: nn.Module, *, named: bool = False) -> dict[str, torch.Tensor]:
    """The tensors an adapter holds: trainable parameters and buffers of non-frozen modules.

    On an FSDP2 model the values are DTensors (shards); `named=True` reads them from the modules
    instead of `state_dict` (inside FSDP1's `summon_full_params`, where only those are whole).
    """
    state = get_state(model)
    if state is None:
        raise ValueError("no petl_vision method is applied to this model; call pv.apply first")
    frozen = state.frozen_module_ids()
    keep: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                keep[prefix + name] = param
        if id(module) not in frozen:
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and name not in module._non_persistent_buffers_set:
                    keep[prefix + name] = buf
    if named:
        return keep
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k in keep}


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, metrics: dict | None = None,
                 base_model: dict | str | None = None, push_to_hub: str | None = None, **hub_kwargs) -> Path:
    """Write the adapter of `model` to `directory` (created if needed). Returns the directory.

    On a model sharded by FSDP (FSDP2 `fully_shard` or FSDP1 with `use_orig_params=True`), call it
    on every process: the trainable tensors are gathered, rank 0 writes the same files an unsharded
    save writes, and every rank returns once they exist (see `petl_vision.core.distributed`).

    Args:
        metrics: numbers for the model card (e.g. {"val_acc": 0.91}).
        base_model: what the host was built from; default: read from the model (timm
            `pretrained_cfg`, diffusers `config._name_or_path`). A string is a Hub id or name.
        push_to_hub: a Hub repo id to upload the folder to afterwards (see `push_to_hub`);
            `hub_kwargs` (revision, private, token, commit_message, create_pr) go with it.
    """
    unknown = sorted(set(hub_kwargs) - _HUB_KWARGS)
    if unknown or (hub_kwargs and not push_to_hub):
        raise TypeError(f"save_adapter: unexpected argument(s) {unknown or sorted(hub_kwargs)}; "
                        f"with push_to_hub='namespace/name' it takes {sorted(_HUB_KWARGS)}")
    directory = Path(directory)
    model = unwrap(model)
    kind = sharding(model)
    tensors = _gathered_adapter_tensors(model, kind)
    counts = summary(model)  # on every rank: a method's note may read sharded tensors (a collective)
    if kind is None:
        return _write_adapter(model, directory, tensors, counts, metrics, base_model, push_to_hub, hub_kwargs)
    # sharded: every rank gathered (collectives); rank 0 writes, the others wait for the file
    return run_on_rank0(lambda: _write_adapter(model, directory, tensors, counts, metrics, base_model, push_to_hub, hub_kwargs))


def _gathered_adapter_tensors(model: nn.Module, kind: str | None) -> dict[str, torch.Tensor]:
    """adapter_state_dict's tensors, whole and on the CPU. On a sharded model every rank must call it."""
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model, writeback=False):
            return {clean_name(k): v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model, named=True).items()}
    # FSDP2: keys are the unsharded ones; a DTensor is gathered in key order (the same on every rank)
    return {k: full_tensor(v.detach()).to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}


def _write_adapter(model, directory: Path, tensors, counts, metrics, base_model, push_to_hub, hub_kwargs) -> Path:
    """save_adapter's writing part (rank 0 of a sharded model): `tensors` whole, `counts` its summary."""
    state = get_state(model)
    if isinstance(base_model, str):
        base_model = {"name": base_model, **({"hf_hub_id": base_model} if is_repo_id(base_model) else {})}
    meta = {
        "format_version": FORMAT_VERSION,
        "methods": [{"name": a.name, "config": a.config.to_dict()} for a in state.applied],
        "host": {"class": state.host_class, "fingerprint": fingerprint(state.host_shapes), "shapes": state.host_shapes},
        "base_model": base_model if base_model is not None else base_model_info(model),
        "tensors_sha256": tensors_sha256(tensors),
    }
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(directory)
    header = {"format": "pt", HEADER_KEY: json.dumps(meta, separators=(",", ":"))}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=header))
    # ---- committed: what follows only mirrors adapter.safetensors for people and other tools
    readable = {**meta, "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(readable, indent=1)))
    peft = peft_format.to_peft(model, tensors, base_model_id(meta["base_model"])) if "lora" in state.method_names else None
    if peft is not None:
        peft_config, peft_tensors = peft
        atomic_write(directory / peft_format.PEFT_WEIGHTS_NAME,
                     lambda tmp: safetensors.torch.save_file(peft_tensors, str(tmp), metadata={"format": "pt"}))
        atomic_write(directory / peft_format.PEFT_CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(peft_config, indent=2, sort_keys=True)))
    else:  # an older save's peft files or format-1 config would describe another adapter
        for name in (peft_format.PEFT_CONFIG_NAME, peft_format.PEFT_WEIGHTS_NAME):
            with contextlib.suppress(FileNotFoundError):
                os.remove(directory / name)
    card = model_card(meta, counts.trainable, counts.total, metrics, push_to_hub, peft_files=peft is not None)
    atomic_write(directory / CARD_NAME, lambda tmp: tmp.write_text(card))
    if push_to_hub:
        upload_folder(directory, push_to_hub, ignore_patterns=[".*"], **hub_kwargs)
    return directory


def push_to_hub(model: nn.Module, repo_id: str, *, metrics: dict | None = None, base_model: dict | str | None = None,
                revision: str | None = None, private: bool | None = None, token: str | bool | None = None,
                commit_message: str | None = None, create_pr: bool = False) -> str:
    """Save the adapter of `model` to a temporary folder and upload it to the Hub repo `repo_id`
    (created if needed) with huggingface_hub. Returns the commit url.

    On a sharded (FSDP) model, call it on every process: the tensors are gathered everywhere, rank 0
    writes and uploads, and every rank returns the url."""
    model = unwrap(model)
    kind = sharding(model)
    tensors, counts = _gathered_adapter_tensors(model, kind), summary(model)

    def push() -> str:
        with tempfile.TemporaryDirectory(prefix="petl_adapter_") as tmp:
            _write_adapter(model, Path(tmp), tensors, counts, metrics, base_model, None, {})
            card = Path(tmp) / CARD_NAME
            card.write_text(card.read_text().replace("path/to/this/folder", repo_id))
            return upload_folder(tmp, repo_id, revision=revision, private=private, token=token,
                                 commit_message=commit_message, create_pr=create_pr, ignore_patterns=[".*"])

    return push() if kind is None else run_on_rank0(push)


def load_adapter(model: nn.Module, path: str | os.PathLike, *, revision: str | None = None) -> nn.Module:
    """Re-apply the saved methods to `model` (a fresh host) and load the saved tensors.

    `path`: an adapter folder, its ``adapter.safetensors``, a folder peft wrote, or a Hub repo id
    (`revision`: branch, tag or commit). Every check runs before the model is touched: the files
    exist and are intact, every field of the metadata has the right type, every method is
    registered, the host matches the one the adapter was trained on, and the tensors are exactly
    those the methods create. Any failure raises an error naming the file and what is wrong.
    """
    path = Path(path)
    refuse_sharded(model, f"load_adapter({path})", "load the adapter onto the model before sharding it "
                   "(fully_shard / FullyShardedDataParallel / accelerator.prepare), then shard")
    if not path.exists() and is_repo_id(str(path)):
        path = resolve_dir(str(path), revision=revision, allow_patterns=_HUB_FILES)
    configs, host, tensors, source = read_adapter(path)
    if get_state(model) is not None:
        raise ValueError(f"load_adapter({path}): the model already has methods {get_state(model).method_names}; load onto a model without adapters")
    if host is not None:
        _check_host(model, host, source)
    saved = {k: list(v.shape) for k, v in tensors.items()}
    try:
        expected = _dry_run(model, configs, tensors)
    except (TypeError, ValueError) as e:  # UnsupportedHostError and the methods' own checks
        raise AdapterMismatchError(f"{source}: the saved methods do not fit this model: {e}") from None
    if expected != saved:
        raise AdapterMismatchError(f"{source}: tensors do not fit the methods applied to this model: {_diff(expected, saved)}")
    for config in configs:
        _apply(model, config, tensors)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    return model


def read_adapter(path: Path):
    """(method configs, host record or None, tensors, file to name in errors) of an adapter file or
    folder, every field checked; nothing is applied."""
    if path.is_file():
        if path.suffix == ".json":
            path = path.parent  # petl_adapter.json / adapter_config.json: their folder
        elif path.suffix != ".safetensors":
            raise AdapterFileError(f"{path}: not an adapter file (expected {WEIGHTS_NAME} or the folder holding it)")
        else:
            meta, tensors = _read_safetensors(path)
            if meta is not None:
                return _from_header(meta, tensors, path)
            path = path.parent  # a plain weights file of a format-1 or peft folder
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such adapter folder or file (nor a Hub repo id 'namespace/name')")
    weights, config_path = path / WEIGHTS_NAME, path / LEGACY_CONFIG_NAME
    if weights.is_file():
        try:
            meta, tensors = _read_safetensors(weights)
        except AdapterFileError:
            if not config_path.is_file():
                raise
            meta = None  # format 1: its config's sha256 tells truncation apart
        if meta is not None:
            return _from_header(meta, tensors, weights)
    if not config_path.is_file():
        missing = WEIGHTS_NAME if not weights.is_file() else LEGACY_CONFIG_NAME
        raise FileNotFoundError(f"{path / missing}: no such file (an adapter folder holds {WEIGHTS_NAME}, written by pv.save_adapter, "
                                f"or peft's {LEGACY_CONFIG_NAME} + {peft_format.PEFT_WEIGHTS_NAME})")
    config = _read_json(config_path)
    if isinstance(config, dict) and "peft_type" in config:
        peft_weights = path / peft_format.PEFT_WEIGHTS_NAME
        if not peft_weights.is_file():
            other = " (pickled adapter_model.bin is not read: save with safe_serialization=True)" if (path / "adapter_model.bin").exists() else ""
            raise FileNotFoundError(f"{peft_weights}: no such file{other}")
        _, tensors = _read_safetensors(peft_weights)
        configs, tensors = peft_format.from_peft(config, tensors, config_path, peft_weights)
        return configs, None, tensors, peft_weights
    return _from_format1(config, config_path, weights)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to a temporary file unique to this writer, fsync it, then move it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename durable (not possible on every OS / filesystem)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_tmp(directory: Path) -> None:
    """Temporary files of writers killed more than an hour ago."""
    now = time.time()
    for tmp in directory.glob(".*.*-*-*.tmp"):  # atomic_write's names
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink()


def _read_safetensors(path: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(petl_vision metadata from the header, or None when it has none; tensors)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({e})") from None
    if HEADER_KEY not in header:
        return None, tensors
    try:
        return json.loads(header[HEADER_KEY]), tensors
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: the petl_vision metadata in its header is not valid JSON ({e})") from None


def _from_header(meta, tensors: dict, path: Path):
    meta = check_meta(meta, path, versions=(FORMAT_VERSION,))
    configs = method_configs(meta, path)
    if tensors_sha256(tensors) != meta["tensors_sha256"]:
        raise AdapterFileError(f"{path}: tensors do not match the sha256 in its header (changed after saving)")
    return configs, meta["host"], tensors, path


def _from_format1(meta, config_path: Path, weights: Path):
    meta = check_meta(meta, config_path, versions=(1,))
    configs = method_configs(meta, config_path)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file (an adapter folder of format 1 holds {LEGACY_CONFIG_NAME} and {WEIGHTS_NAME})")
    if file_sha256(weights) != meta["sha256"]:
        raise AdapterFileError(f"{weights}: contents do not match the sha256 in {config_path} (truncated, or changed after saving)")
    _, tensors = _read_safetensors(weights)
    saved = {k: list(v.shape) for k, v in tensors.items()}
    if saved != meta["tensors"]:
        raise AdapterFileError(f"{weights}: tensors differ from those listed in {config_path}: {_diff(meta['tensors'], saved)}")
    return configs, meta["host"], tensors, weights


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_host(model: nn.Module, host: dict, path: Path) -> None:
    shapes = host_shapes(model)
    if fingerprint(shapes) == host["fingerprint"] and host_class_name(model) == host["class"]:
        return
    problems = []
    if host_class_name(model) != host["class"]:
        problems.append(f"class {host_class_name(model)} (adapter: {host['class']})")
    diff = _diff(host["shapes"], shapes)
    if diff:
        problems.append(diff + " (shapes: this model's vs the adapter's)")
    if not problems:
        problems.append("the same names and shapes as recorded, but the recorded fingerprint differs (the file was edited)")
    raise AdapterMismatchError(f"{path}: adapter was trained on a different backbone; this model differs: {'; '.join(problems)}")


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
        parts.append("shape " + ", ".join(f"{k}: {list(actual[k])} vs {list(expected[k])}" for k in shape[:limit])
                     + (f" ... ({len(shape)})" if len(shape) > limit else ""))
    return "; ".join(parts)
