"""Measure one method on one workload. Runs in a process of its own, so memory peaks don't mix.

The harness calls `child_main` in a fresh process; `python -m petl_vision.bench.worker SPEC.json
[OUT.json]` runs the same measurement from the command line (for debugging one method).

A spec is a JSON-able dict: workload, model, model_kwargs, num_classes, method ("floor" for the
frozen model's forward alone), method_args (config overrides), batch_size, steps, warmup,
max_warmup, steady_tolerance, device, mixed_precision, compile, compile_backend, infer_only, seed,
imports.

Timing. On CUDA every call is bracketed by CUDA events (torch.cuda.Event) after a
torch.cuda.synchronize; the timed calls are queued back to back as a training loop queues them and
read after one synchronize. Warm-up runs at least `warmup` calls and goes on until the last
STEADY_WINDOW call times lie within `steady_tolerance` of their median (at most `max_warmup`).
On CPU: time.perf_counter per call and exactly `warmup` warm-up calls. Memory: peak of
torch.cuda.max_memory_allocated after reset_peak_memory_stats on CUDA, peak RSS on CPU.
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
from typing import Callable

import torch

import petl_vision as pv

from ..core.registry import config_from_dict
from . import footprint
from . import workloads  # noqa: F401  (registers the built-in workloads)
from .workload import get_workload

MIB = 2**20
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = "floor"  # not a method: the frozen model's forward alone, without an autograd graph
STEADY_WINDOW = 3


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


def _time_turns(fns: list[Callable], turns: int, device: torch.device) -> tuple[list[list[float]], list]:
    """Call `fns` in turns (a, b, a, b, ...) `turns` times: (seconds of each call per fn, last outputs).

    CUDA: events around each call, read after one synchronize at the end. CPU: perf_counter.
    """
    outs: list = [None] * len(fns)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in fns] for _ in range(turns)]
        for turn in events:
            for i, (fn, (start, end)) in enumerate(zip(fns, turn)):
                start.record()
                outs[i] = fn()
                end.record()
        torch.cuda.synchronize(device)
        return [[turn[i][0].elapsed_time(turn[i][1]) / 1000.0 for turn in events] for i in range(len(fns))], outs
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(turns):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return times, outs


def is_steady(times: list[float], tolerance: float, window: int = STEADY_WINDOW) -> bool:
    """Whether the last `window` times lie within `tolerance` (relative) of their median."""
    if len(times) < window:
        return False
    last = times[-window:]
    median = statistics.median(last)
    return median > 0 and (max(last) - min(last)) <= tolerance * median


def warm_up(fns: list[Callable], device: torch.device, minimum: int, maximum: int, tolerance: float) -> tuple[int, bool | None]:
    """Untimed turns of `fns`: (turns run, steady). CPU: exactly `minimum` turns (steady None).

    CUDA: at least `minimum` turns, then until every fn's last STEADY_WINDOW times are steady or
    `maximum` turns have run.
    """
    if device.type != "cuda":
        _time_turns(fns, minimum, device)
        return minimum, None
    history: list[list[float]] = [[] for _ in fns]
    turns = 0
    while turns < max(minimum, maximum):
        if turns >= minimum and all(is_steady(h, tolerance) for h in history):
            break
        times, _ = _time_turns(fns, 1, device)
        for h, t in zip(history, times):
            h += t
        turns += 1
    return turns, all(is_steady(h, tolerance) for h in history)


def _timed_alternately(fn_a, fn_b, warmup: int, repeats: int, device: torch.device):
    """Two functions run in turns (a, b, a, b, ...), so a change of machine load during the
    measurement hits both alike; ((times_a, last_a), (times_b, last_b)) of the timed turns."""
    _time_turns([fn_a, fn_b], warmup, device)
    (times_a, times_b), (out_a, out_b) = _time_turns([fn_a, fn_b], repeats, device)
    return (times_a, out_a), (times_b, out_b)


def _merged_copy(model):
    """A merged deep copy of `model` (for timing merged against unmerged), or None if it can't be copied."""
    try:
        merged = copy.deepcopy(model)
    except Exception:  # noqa: BLE001  (e.g. a host holding a non-copyable handle: fall back to merging in place)
        return None
    return pv.merge(merged)


def spread_ms(seconds: list[float] | None) -> dict | None:
    """{"min", "median", "max"} of call times, in milliseconds."""
    if not seconds:
        return None
    ms = [1000.0 * t for t in seconds]
    return {"min": min(ms), "median": statistics.median(ms), "max": max(ms)}


def per_second(batch_size: int, seconds: list[float] | None) -> float | None:
    """Samples per second over the timed calls: batch_size * calls / total time."""
    return None if not seconds or sum(seconds) <= 0 else batch_size * len(seconds) / sum(seconds)


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def _aten_ops(fn: Callable) -> int:
    """aten operator calls the profiler records while `fn` runs (as footprint.op_counts counts them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def step_footprint(model, loss_fn: Callable, autocast: dict, optimizer) -> tuple[int, int]:
    """(bytes saved for backward, aten ops) of one more training step of the eager `model`, untimed.

    optimizer None: the floor, a forward without autograd graph (nothing saved; its forward's ops).
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop lines are noise here

    def autocast_loss(m):
        with torch.autocast(**autocast):
            return loss_fn(m)

    if optimizer is None:
        with torch.no_grad():
            return 0, _aten_ops(lambda: autocast_loss(model))
    saved = footprint.saved_bytes(model, autocast_loss)
    optimizer.zero_grad(set_to_none=True)
    return saved, sum(footprint.op_counts(model, autocast_loss, None, optimizer).values())


class Timing:
    """Warm-up and timed calls as a spec asks (warmup, max_warmup, steady_tolerance, steps, compile)."""

    def __init__(self, spec: dict, device: torch.device):
        self.device, self.steps = device, spec["steps"]
        # A compiled model compiles on its first call: never time that one.
        self.minimum = max(spec["warmup"], 1 if spec.get("compile") else 0)
        self.maximum = max(self.minimum, spec.get("max_warmup", self.minimum))
        self.tolerance = spec.get("steady_tolerance", 0.05)

    def run(self, *fns: Callable) -> tuple[list[list[float]], list, dict]:
        """Warm `fns` up in turns, then time `steps` turns: (seconds per fn, last outputs, warm-up record)."""
        turns, steady = warm_up(list(fns), self.device, self.minimum, self.maximum, self.tolerance)
        times, outs = _time_turns(list(fns), self.steps, self.device)
        return times, outs, {"steps": turns, "steady": steady}


def measure(spec: dict) -> dict:
    """Build, adapt, train and time one method; the figures as a dict (see module docstring)."""
    for module in spec.get("imports", []):
        importlib.import_module(module)
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    workload = get_workload(spec["workload"])(spec["model"], spec["model_kwargs"], spec["num_classes"])
    floor = spec["method"] == FLOOR
    config = None if floor else config_from_dict(spec["method"], spec["method_args"])
    timing = Timing(spec, device)
    batch_size = spec["batch_size"]

    model = workload.build_model()
    if floor:
        model.requires_grad_(False)
    else:
        pv.apply(model, config)
    counts = pv.summary(model)
    model.to(device).train()
    batch = workload.make_batch(model, batch_size, device, torch.Generator().manual_seed(spec["seed"]))
    params = [p for p in model.parameters() if p.requires_grad]
    if not floor and not params:
        raise ValueError(f"method {config.name!r} leaves no parameter trainable; nothing to benchmark")
    compile_on = bool(spec.get("compile"))

    def compiled(m):
        return torch.compile(m, backend=spec.get("compile_backend", "inductor")) if compile_on else m

    runner = compiled(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    mp = spec["mixed_precision"]
    autocast = dict(device_type=device.type, dtype=AUTOCAST_DTYPES.get(mp), enabled=mp != "no")
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = workload.loss(runner, batch)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    def forward_no_grad(m):  # the floor: the frozen model's forward, no autograd graph, nothing to update
        with torch.no_grad(), torch.autocast(**autocast):
            return workload.loss(m, batch)

    def infer(m):
        with torch.inference_mode(), torch.autocast(**autocast):
            return workload.infer(m, batch)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before, source = torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        before, source = current_rss(), "process peak RSS (getrusage ru_maxrss)"
    step_times, train_warmup, peak, saved, ops = None, None, None, None, None
    if not spec.get("infer_only"):
        (step_times,), _, train_warmup = timing.run((lambda: forward_no_grad(runner)) if floor else train_step)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
        saved, ops = step_footprint(model, lambda m: workload.loss(m, batch), autocast, None if floor else optimizer)

    model.eval()
    mergeable = pv.can_merge(model)
    merged = _merged_copy(model) if mergeable else None
    merged_times, merged_out, merged_warmup = None, None, None
    if merged is None:
        (infer_times,), (out,), infer_warmup = timing.run(lambda: infer(runner))
        if mergeable:  # no copy possible: merge in place and time after
            pv.merge(model)
            runner = compiled(model)
            (merged_times,), (merged_out,), merged_warmup = timing.run(lambda: infer(runner))
    else:
        merged_runner = compiled(merged)
        (infer_times, merged_times), (out, merged_out), infer_warmup = timing.run(lambda: infer(runner), lambda: infer(merged_runner))
        merged_warmup = infer_warmup
    diff = None
    if isinstance(out, torch.Tensor) and isinstance(merged_out, torch.Tensor):
        diff = (out.float() - merged_out.float()).abs().max().item()

    step, inference, merged_spread = spread_ms(step_times), spread_ms(infer_times), spread_ms(merged_times)
    return {
        "method": FLOOR if floor else config.name,
        "config": {} if floor else config.to_dict(),
        "error": None,
        "compiled": compile_on,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_percent": counts.trainable_percent,
        "memory_source": source,
        "memory_before_train_mib": _mib(before),
        "peak_train_memory_mib": _mib(peak),
        "train_increment_mib": None if before is None or peak is None else _mib(peak - before),
        "train_step_ms": step and step["median"],
        "train_step_ms_spread": step,
        "train_step_ms_all": None if step_times is None else [1000.0 * t for t in step_times],
        "train_images_per_s": per_second(batch_size, step_times),
        "train_warmup": train_warmup,
        "saved_for_backward_mib": _mib(saved),
        "aten_ops_per_step": ops,
        "mergeable": mergeable,
        "infer_ms": inference["median"],
        "infer_ms_spread": inference,
        "infer_ms_all": [1000.0 * t for t in infer_times],
        "infer_images_per_s": per_second(batch_size, infer_times),
        "infer_warmup": infer_warmup,
        "infer_merged_ms": merged_spread and merged_spread["median"],
        "infer_merged_ms_spread": merged_spread,
        "infer_merged_ms_all": None if merged_times is None else [1000.0 * t for t in merged_times],
        "infer_merged_warmup": merged_warmup,
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
