"""Measure one method on one workload. Runs in a process of its own, so memory peaks don't mix.

The harness calls `child_main` in a fresh process; `python -m petl_vision.bench.worker SPEC.json
[OUT.json]` runs the same measurement from the command line (for debugging one method).

A spec is a JSON-able dict: workload, model, model_kwargs, num_classes, method, method_args
(config overrides), batch_size, steps, warmup, device, mixed_precision, seed, imports.
"""
from __future__ import annotations

import copy
import gc
import importlib
import json
import os
import statistics
import sys
import time
import traceback

import torch

import petl_vision as pv

from ..core.registry import config_from_dict
from . import workloads  # noqa: F401  (registers the built-in workloads)
from .workload import get_workload

MIB = 2**20
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def current_rss() -> int | None:
    """Resident memory of this process now, in bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss() -> int | None:
    """Peak resident memory of this process so far, in bytes (getrusage ru_maxrss)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, warmup: int, repeats: int, device: torch.device) -> tuple[list[float], object]:
    """Run `fn` warmup + repeats times; seconds of the timed runs and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def _timed_alternately(fn_a, fn_b, warmup: int, repeats: int, device: torch.device):
    """`_timed` for two functions run in turns (a, b, a, b, ...), so a change of machine load
    during the measurement hits both alike; ((times_a, last_a), (times_b, last_b))."""
    times_a, times_b, out_a, out_b = [], [], None, None
    for _ in range(warmup + repeats):
        ta, out_a = _timed(fn_a, 0, 1, device)
        tb, out_b = _timed(fn_b, 0, 1, device)
        times_a += ta
        times_b += tb
    return (times_a[warmup:], out_a), (times_b[warmup:], out_b)


def _merged_copy(model):
    """A merged deep copy of `model` (for timing merged against unmerged), or None if it can't be copied."""
    try:
        merged = copy.deepcopy(model)
    except Exception:  # noqa: BLE001  (e.g. a host holding a non-copyable handle: fall back to merging in place)
        return None
    return pv.merge(merged)


def _ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def measure(spec: dict) -> dict:
    """Build, adapt, train and time one method; the figures as a dict (see module docstring)."""
    for module in spec.get("imports", []):
        importlib.import_module(module)
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    workload = get_workload(spec["workload"])(spec["model"], spec["model_kwargs"], spec["num_classes"])
    config = config_from_dict(spec["method"], spec["method_args"])

    model = workload.build_model()
    pv.apply(model, config)
    counts = pv.summary(model)
    model.to(device).train()
    batch = workload.make_batch(model, spec["batch_size"], device, torch.Generator().manual_seed(spec["seed"]))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {config.name!r} leaves no parameter trainable; nothing to benchmark")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    mp = spec["mixed_precision"]
    autocast = dict(device_type=device.type, dtype=AUTOCAST_DTYPES.get(mp), enabled=mp != "no")
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = workload.loss(model, batch)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    def infer(m):
        with torch.inference_mode(), torch.autocast(**autocast):
            return workload.infer(m, batch)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before, source = torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        before, source = current_rss(), "process peak RSS (getrusage ru_maxrss)"
    step_times, _ = _timed(train_step, spec["warmup"], spec["steps"], device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()

    model.eval()
    mergeable = pv.can_merge(model)
    merged = _merged_copy(model) if mergeable else None
    if merged is None:
        infer_times, out = _timed(lambda: infer(model), spec["warmup"], spec["steps"], device)
        merged_times, merged_out = None, None
        if mergeable:  # no copy possible: merge in place and time after
            pv.merge(model)
            merged_times, merged_out = _timed(lambda: infer(model), spec["warmup"], spec["steps"], device)
    else:
        (infer_times, out), (merged_times, merged_out) = _timed_alternately(
            lambda: infer(model), lambda: infer(merged), spec["warmup"], spec["steps"], device)
    diff = None
    if isinstance(out, torch.Tensor) and isinstance(merged_out, torch.Tensor):
        diff = (out.float() - merged_out.float()).abs().max().item()

    return {
        "method": config.name,
        "config": config.to_dict(),
        "error": None,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_percent": counts.trainable_percent,
        "memory_source": source,
        "memory_before_train_mib": _mib(before),
        "peak_train_memory_mib": _mib(peak),
        "train_increment_mib": None if before is None or peak is None else _mib(peak - before),
        "train_step_ms": _ms(step_times),
        "train_step_ms_all": [1000.0 * t for t in step_times],
        "mergeable": mergeable,
        "infer_ms": _ms(infer_times),
        "infer_merged_ms": None if merged_times is None else _ms(merged_times),
        "infer_ms_all": [1000.0 * t for t in infer_times],
        "infer_merged_ms_all": None if merged_times is None else [1000.0 * t for t in merged_times],
        "merge_max_abs_diff": diff,
    }


def failure(spec: dict, message: str) -> dict:
    """The result of a method whose measurement failed: every figure None, the error kept."""
    return {"method": spec["method"], "error": message}


def child_main(spec: dict, conn) -> None:
    """Process target: measure and send the result (or the traceback) through `conn`."""
    try:
        result = measure(spec)
    except BaseException:  # noqa: BLE001  (reported to the parent, which carries on)
        result = failure(spec, traceback.format_exc())
    conn.send(result)
    conn.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        raise SystemExit("usage: python -m petl_vision.bench.worker SPEC.json [OUT.json]")
    with open(argv[0]) as f:
        result = measure(json.load(f))
    text = json.dumps(result, indent=2)
    if len(argv) == 2:
        with open(argv[1], "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
