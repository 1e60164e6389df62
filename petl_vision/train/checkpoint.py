"""Run folders and resumable checkpoints, without pickle.

A run folder (`output_dir`) holds one run: ``run.json`` ({"run_id", "config_hash"}), ``config.yaml``,
``metrics.jsonl``, ``checkpoints/<prefix>_<n>/`` and the exports (adapter, merged model, ...).
`start_run` refuses a folder that holds another run unless it is resumed or `overwrite` is set, and
writes nothing; `Run.commit` writes the run's files once the data and model are built.

A checkpoint folder holds only what training changes:

    run.json                 {"run_id"}: the run that writes it (written first)
    state.safetensors        trainable parameters and buffers of the model (not the frozen backbone),
                             and the tensors of the optimizer / scheduler / scaler states
    state.json               the rest of those states, the step counters, the accelerator's step
    state_<process>.*        instead of state.*, on a model sharded by FSDP2: each process's shards
                             (local pieces of the DTensors); resumed with the same number of processes
                             (DeepSpeed ZeRO: the whole fp32 trainable tensors, the scheduler and counters)
    zero_<process>.*         DeepSpeed ZeRO: each process's fp32 master partitions, base optimizer state
                             and engine counters; resumed with the same stage and number of processes
    rng_<process>.json/.safetensors  python, numpy, torch (and CUDA) RNG states of each process
    complete.json            written last: run_id, config hash and config, sha256 of every file

Only folders with a valid ``complete.json`` are resumed; loading reads safetensors and JSON only, so
no file of a checkpoint folder is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..core.distributed import is_dtensor, sharding
from ..core.io import atomic_write, file_sha256
from . import deepspeed_support

COMPLETE = "complete.json"
# Files and folders a run writes into its output_dir (globs); a folder holding any of them holds a run.
RUN_ARTIFACTS = ("run.json", "config.yaml", "metrics.jsonl", "checkpoints", "adapter", "merged.safetensors", "tensorboard", "logs")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (incomplete, corrupt, written by another configuration)."""


# ---------------------------------------------------------------- run configuration


def config_hash(record: dict) -> str:
    """sha256 (16 hex digits) of a JSON-able config record."""
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_record(record: dict, ignore: tuple[str, ...]) -> dict:
    """The config record without the keys that do not change the training (output_dir, progress, ...)."""
    return {k: v for k, v in record.items() if k not in ignore}


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differences(x, y, f"{prefix}{key}.")
        elif json.dumps(x, sort_keys=True, default=str) != json.dumps(y, sort_keys=True, default=str):
            keys.append(f"{prefix}{key}")
    return keys


# ---------------------------------------------------------------- run folders


def holds_run(out: Path, artifacts: tuple[str, ...] = RUN_ARTIFACTS) -> list[str]:
    """Names of the run files in `out` (empty when it holds no run)."""
    if not out.is_dir():
        return []
    return sorted({p.name for pattern in artifacts for p in out.glob(pattern)})


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Run:
    """One training run in `out`: its id, config hash and record, and the checkpoint it resumes from."""

    out: Path
    run_id: str
    config_hash: str
    record: dict
    prefix: str
    artifacts: tuple[str, ...]
    resume_from: Path | None = None
    clear: bool = False  # overwrite: remove the previous run's files on commit

    def commit(self, accelerator, config_yaml: str) -> None:
        """Write run.json and config.yaml (the main process; the others wait). With `overwrite`, the
        previous run's files go first."""
        if accelerator.is_main_process:
            if self.clear:
                for name in holds_run(self.out, self.artifacts):
                    path = self.out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(config_yaml)
            _write_json(self.out / "run.json", {"run_id": self.run_id, "config_hash": self.config_hash})
        accelerator.wait_for_everyone()

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def start_run(out: str | Path, record: dict, *, resume=None, overwrite: bool = False, prefix: str = "epoch",
              artifacts: tuple[str, ...] = RUN_ARTIFACTS) -> Run:
    """Check `out` and the checkpoint to resume; writes nothing.

    record: the run configuration (keys that do not change training already removed).
    resume: None / False (a fresh run), True (the latest complete checkpoint in `out`), or a checkpoint
        folder or output folder. The checkpoint must be complete and written by the same configuration.
    FileExistsError when `out` is a file or holds another run (not resumed, no `overwrite`);
    FileNotFoundError / CheckpointError for a checkpoint that cannot be resumed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file; pass a folder (new or holding this run)")
    digest = config_hash(record)
    ckpt = None
    run_id = uuid.uuid4().hex
    if resume:
        ckpt = find_checkpoint(out if resume is True else resume, prefix)
        marker = read_marker(ckpt)
        if marker["config_hash"] != digest:
            changed = _differences(marker.get("config", {}), record)
            raise CheckpointError(
                f"resume: checkpoint {ckpt} was written by another run configuration (differs in: "
                f"{', '.join(changed) or 'unknown keys'}); resume with the same config, or start a fresh run in a new output_dir")
        run_id = marker["run_id"]
    existing = holds_run(out, artifacts)
    if existing:
        previous = (_read_json(out / "run.json") or {}).get("run_id")
        if previous != run_id and not overwrite:
            raise FileExistsError(
                f"output_dir {out} already holds another run ({', '.join(existing)}); pass --overwrite (overwrite=true) "
                f"to replace it, --resume to continue it, or choose a new output_dir")
    clear = bool(existing) and overwrite and (_read_json(out / "run.json") or {}).get("run_id") != run_id
    return Run(out, run_id, digest, record, prefix, artifacts, ckpt, clear)


# ---------------------------------------------------------------- finding checkpoints


def _number(path: Path, prefix: str) -> int:
    match = re.fullmatch(rf"{prefix}_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def read_marker(ckpt: Path) -> dict:
    """The checked completion marker of `ckpt`: CheckpointError unless every listed file is there, whole."""
    marker = _read_json(ckpt / COMPLETE)
    if marker is None or not {"run_id", "config_hash", "files"} <= set(marker):
        raise CheckpointError(
            f"resume: {ckpt} is not a complete checkpoint (no valid {COMPLETE}: its save was interrupted, or an older "
            "petl_vision wrote it with pickle files, which are not loaded)")
    for name, digest in marker["files"].items():
        path = ckpt / name
        if Path(name).name != name or not path.is_file() or file_sha256(path) != digest:
            raise CheckpointError(f"resume: {path} is missing or differs from when checkpoint {ckpt} was written")
    return marker


def complete_checkpoints(root: Path, prefix: str) -> list[Path]:
    """The folders `root/<prefix>_<n>` with a completion marker, oldest first."""
    folders = sorted((p for p in root.glob(f"{prefix}_*") if _number(p, prefix) >= 0), key=lambda p: _number(p, prefix))
    return [p for p in folders if (p / COMPLETE).is_file()]


def find_checkpoint(path: str | Path, prefix: str = "epoch") -> Path:
    """`path` itself when it is a checkpoint folder, else the latest complete `path/checkpoints/<prefix>_<n>`."""
    path = Path(path)
    if (path / COMPLETE).is_file() or (path / "run.json").is_file() and path.parent.name == "checkpoints":
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"resume: {path} does not exist (expected an output_dir or a checkpoint folder)")
    if any(path.glob("*.pkl")) or any(path.glob("*.bin")):
        raise CheckpointError(f"resume: {path} is not a complete checkpoint (no {COMPLETE}); pickle files are not loaded")
    found = complete_checkpoints(path / "checkpoints", prefix)
    if not found:
        partial = [p.name for p in (path / "checkpoints").glob(f"{prefix}_*")]
        why = (f"; {', '.join(sorted(partial))} lack {COMPLETE} (interrupted saves, or an older petl_vision's pickle checkpoints, "
               "which are not loaded)") if partial else ""
        raise FileNotFoundError(f"resume: no complete checkpoint in {path} (expected {path}/checkpoints/{prefix}_<n>/{COMPLETE}){why}")
    return found[-1]


def prune_checkpoints(run: Run, keep: int) -> None:
    """Remove this run's checkpoint folders but the newest `keep` complete ones; other runs' stay."""
    root = run.checkpoints
    mine = [p for p in root.glob(f"{run.prefix}_*")
            if _number(p, run.prefix) >= 0 and (_read_json(p / "run.json") or {}).get("run_id") == run.run_id]
    mine.sort(key=lambda p: _number(p, run.prefix))
    complete = [p for p in mine if (p / COMPLETE).is_file()]
    kept = set(complete[-keep:]) if keep > 0 else set()
    for path in mine:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- (de)serialising states


class _Shard:
    """A DTensor's local piece as read back from a checkpoint (made a DTensor again by `load_checkpoint`)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _split(obj, tensors: dict, key: str):
    """`obj` as JSON, its tensors moved to `tensors` (by key); of a DTensor, this process's local piece."""
    if is_dtensor(obj):
        tensors[key] = obj.to_local().detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key, "shard": True}
    if torch.is_tensor(obj):
        if obj.numel() == 0:
            return {"__empty__": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch.")}
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_split(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {key}")


def _join(obj, tensors: dict):
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return _Shard(tensors[obj["__tensor__"]]) if obj.get("shard") else tensors[obj["__tensor__"]]
    if "__empty__" in obj:
        return torch.empty(obj["__empty__"], dtype=getattr(torch, obj["dtype"]))
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__dict__" in obj:
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    if "__tuple__" in obj:
        return tuple(_join(v, tensors) for v in obj["__tuple__"])
    raise CheckpointError(f"checkpoint: unknown entry {sorted(obj)}")


def _write_json(path: Path, value) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value)))


def _save(folder: Path, name: str, value) -> None:
    tensors: dict = {}
    structure = _split(value, tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    _write_json(folder / f"{name}.json", structure)


def _load(folder: Path, name: str):
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _join(json.loads((folder / f"{name}.json").read_text()), tensors)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters and its buffers (state_dict keys): what training changes."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------- save / load


def save_checkpoint(accelerator, run: Run, number: int, model, optimizer, scheduler, counters: dict, keep: int) -> Path:
    """Write `run.checkpoints/<prefix>_<number>` (see the module docstring) and prune this run's older ones.

    model / optimizer: as prepared by the accelerator; scheduler: a torch LR scheduler (or None).
    counters: JSON-able step counters (epoch, step) returned by `load_checkpoint`.
    """
    folder = run.checkpoints / f"{run.prefix}_{number}"
    main = accelerator.is_main_process
    plain = accelerator.unwrap_model(model)
    sharded = sharding(plain) == "fsdp2"  # every process writes its shards
    stage = deepspeed_support.zero_stage(accelerator)  # DeepSpeed: whole fp32 trainable tensors (gathered on every process)
    model_state = (trainable_state(plain) if stage is None
                   else {**deepspeed_support.trainable_tensors(plain), **dict(plain.named_buffers())})
    if main:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _write_json(folder / "run.json", {"run_id": run.run_id})
    accelerator.wait_for_everyone()
    _save(folder, f"rng_{accelerator.process_index}", _rng_state())
    if stage is not None:  # each process's ZeRO partitions of the fp32 masters and optimizer states
        _save(folder, f"zero_{accelerator.process_index}", deepspeed_support.optimizer_state(optimizer, model))
    if main or sharded:
        scaler = getattr(accelerator, "scaler", None)
        _save(folder, f"state_{accelerator.process_index}" if sharded else "state", {
            "model": model_state,
            "optimizer": optimizer.state_dict() if stage is None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "counters": dict(counters),
            "accelerator_step": int(getattr(accelerator, "step", 0)),
        })
    accelerator.wait_for_everyone()
    if main:
        files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
        _write_json(folder / COMPLETE, {"run_id": run.run_id, "config_hash": run.config_hash, "config": run.record,
                                        "num_processes": accelerator.num_processes, "sharded": sharded,
                                        **({"deepspeed_zero_stage": stage} if stage is not None else {}),
                                        "counters": dict(counters), "files": files})
        prune_checkpoints(run, keep)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(accelerator, folder: Path, model, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote into the prepared model, optimizer and scheduler, the RNG states
    and the accelerator's step; returns the counters. Reads safetensors and JSON only."""
    marker = read_marker(folder)
    stage = deepspeed_support.zero_stage(accelerator)
    if marker.get("deepspeed_zero_stage") != stage:
        written = f"DeepSpeed ZeRO-{marker['deepspeed_zero_stage']}" if "deepspeed_zero_stage" in marker else "no DeepSpeed"
        now = f"DeepSpeed ZeRO-{stage}" if stage is not None else "no DeepSpeed"
        raise CheckpointError(f"resume: {folder} was written by a run with {written}; resume it the same way (now: {now}; "
                              "configs/accelerate/deepspeed_zero<stage>.yaml)")
    if marker.get("num_processes", 1) != accelerator.num_processes:
        raise CheckpointError(f"resume: {folder} was written by {marker.get('num_processes')} processes; "
                              f"resume with the same number (now {accelerator.num_processes})")
    plain = accelerator.unwrap_model(model)
    sharded = sharding(plain) == "fsdp2"
    if bool(marker.get("sharded", False)) != sharded:
        raise CheckpointError(f"resume: {folder} was written by a run {'with' if marker.get('sharded') else 'without'} "
                              f"FSDP; resume it {'under FSDP (accelerate launch --config_file configs/accelerate/fsdp.yaml)' if marker.get('sharded') else 'without FSDP'}")
    state = _load(folder, f"state_{accelerator.process_index}" if sharded else "state")
    if stage is not None:
        _load_deepspeed(folder, accelerator, model, optimizer, state["model"])
    else:
        _load_model_state(plain, state["model"], folder)
        optimizer.load_state_dict(_as_dtensors(state["optimizer"], optimizer))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(_load(folder, f"rng_{accelerator.process_index}"))
    accelerator.step = state["accelerator_step"]
    return state["counters"]


def _load_deepspeed(folder: Path, accelerator, model, optimizer, saved: dict) -> None:
    """A DeepSpeed run's state: this process's ZeRO partitions, the model's trainable tensors and buffers."""
    plain = accelerator.unwrap_model(model)
    trainable = {k for k, v in plain.named_parameters() if v.requires_grad}
    buffers = dict(plain.named_buffers())
    missing, unexpected = sorted(trainable - set(saved)), sorted(set(saved) - trainable - set(buffers))
    if missing or unexpected:
        raise _misfit(folder, f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    try:
        deepspeed_support.load_optimizer_state(optimizer, model, _load(folder, f"zero_{accelerator.process_index}"), saved)
    except ValueError as e:
        raise CheckpointError(f"resume: {folder}: {e}") from e
    with torch.no_grad():
        for name, buffer in buffers.items():
            if name in saved:
                buffer.copy_(saved[name])


def _load_model_state(model: nn.Module, saved: dict, folder: Path) -> None:
    """Copy the saved trainable tensors (whole, or this process's shards) into `model`; the frozen backbone
    is not in the checkpoint. CheckpointError, before anything is copied, when the names do not fit."""
    if sharding(model) is None:
        return _load_whole(model, saved, folder)
    current = trainable_state(model)
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    missing = sorted(k for k in current if k in trainable and k not in saved)
    unexpected = sorted(k for k in saved if k not in current)
    shapes = [k for k in saved if k in current and _local(current[k]).shape != _value(saved[k]).shape]
    if missing or unexpected or shapes:
        raise _misfit(folder, f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}")
    with torch.no_grad():
        for key, value in saved.items():
            _local(current[key]).copy_(_value(value))


def _load_whole(model: nn.Module, saved: dict, folder: Path) -> None:
    """An unsharded model: through `load_state_dict`, so the modules' load hooks run (SaRA gives its tensors
    the saved sizes, which change at a progressive re-selection: tests/test_diffusion_script.py)."""
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    try:
        result = model.load_state_dict(saved, strict=False)  # the frozen backbone is not in the checkpoint
    except RuntimeError as e:  # size mismatches
        raise _misfit(folder, str(e)[:300]) from e
    missing = [k for k in result.missing_keys if k in trainable]
    if missing or result.unexpected_keys:
        raise _misfit(folder, f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def _misfit(folder: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"resume: {folder} does not fit this model ({detail}); it was written for another model or method")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _value(value) -> torch.Tensor:
    return value.tensor if isinstance(value, _Shard) else value


def _as_dtensors(state: dict, optimizer) -> dict:
    """The optimizer state dict with each saved shard made a DTensor like its parameter's."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state.get("state", {}).items():
        for key, value in entries.items():
            if isinstance(value, _Shard):
                p = params[int(index)]
                entries[key] = DTensor.from_local(value.tensor.to(p.device), p.device_mesh, p.placements,
                                                  shape=p.shape, stride=p.stride())
    return state


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` is True on any process (a collective: every process calls it); `flag` on one process."""
    if accelerator is None or accelerator.num_processes == 1:
        return bool(flag)
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0


def check_finite(loss: torch.Tensor, step: int, where: str, hint: str, accelerator=None) -> None:
    """FloatingPointError when `loss` is NaN or infinite (on any process): "loss is nan at step 3 (epoch 1); <hint>".

    step: the 1-based optimizer step being computed; where: extra position text ("epoch 1") or "".
    """
    if any_process(accelerator, not bool(torch.isfinite(loss.detach()).all())):
        value = loss.detach().float().item() if loss.numel() == 1 else float("nan")
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else "non-finite"
        place = f" ({where})" if where else ""
        raise FloatingPointError(f"loss is {text} at step {step}{place}; {hint}; training stopped, no adapter was saved")
