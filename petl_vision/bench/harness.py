"""The benchmark harness: every method on one backbone, each in a fresh process of its own.

    from petl_vision.bench import BenchOptions, run_benchmark
    report = run_benchmark(BenchOptions(model="vit_base_patch16_224", methods=["full", "ssf"], steps=3))

Methods come from the registry (`pv.list_methods()`), workloads from `bench.workload`'s registry:
neither is named here. Processes start from a fork server that has already imported torch, timm
and petl_vision (spawn where there is no fork server), so each method pays no import time yet has
its own address space and memory peak.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import multiprocessing
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable

import timm
import torch
import yaml

import petl_vision as pv

from ..core.errors import UnsupportedHostError
from ..core.registry import config_from_dict
from . import worker
from .report import add_ratios, write_outputs
from .workload import Workload, get_workload

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclasses.dataclass
class BenchOptions:
    """What to benchmark and how.

    model: model name for the workload (a timm name for "timm-classifier").
    methods: method names; None = every registered method the workload accepts on this model.
    workload: a registered workload name (see `list_workloads()`).
    model_kwargs: extra keyword arguments to build the model (e.g. {"img_size": 32}).
    num_classes: classes of the classifier head.
    batch_size: samples per step.
    steps: timed training steps (and timed inference passes); medians are reported.
    warmup: untimed steps (and passes) before them.
    device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    mixed_precision: "no", "fp16" (CUDA only) or "bf16" (CUDA or CPU) autocast.
    method_args: per method, config overrides passed to `pv.apply`, e.g. {"lora": {"rank": 4}}.
    out_dir: where the JSON, markdown and PNG go; None = runs/benchmark/<model>.
    imports: modules to import first (in every process): extra methods or workloads.
    seed: seed of the model's initialisation and of the random batch.
    """

    model: str = "vit_base_patch16_224"
    methods: list[str] | None = None
    workload: str = "timm-classifier"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    num_classes: int = 100
    batch_size: int = 32
    steps: int = 10
    warmup: int = 3
    device: str = "auto"
    mixed_precision: str = "no"
    method_args: dict[str, dict] = dataclasses.field(default_factory=dict)
    out_dir: str | None = None
    imports: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0


def parse_method_arg(items: list[str]) -> dict[str, dict]:
    """["lora.rank=4", "vpt.deep=false"] -> {"lora": {"rank": 4}, "vpt": {"deep": False}} (values as YAML)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, field = key.strip().partition(".")
        if not sep or not dot or not method or not field:
            raise ValueError(f"--method-arg {item!r}: expected METHOD.FIELD=VALUE, e.g. lora.rank=4")
        out.setdefault(method, {})[field] = yaml.safe_load(value) if value.strip() else None
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine (use cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def check_options(opts: BenchOptions, device: torch.device) -> None:
    for field in ("batch_size", "steps", "num_classes"):
        if getattr(opts, field) < 1:
            raise ValueError(f"{field} must be >= 1, got {getattr(opts, field)}")
    if opts.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {opts.warmup}")
    if opts.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision {opts.mixed_precision!r}: expected one of {MIXED_PRECISION}")
    if opts.mixed_precision == "fp16" and device.type != "cuda":  # bf16 autocast also runs on CPU
        raise ValueError(f"mixed_precision {opts.mixed_precision!r} needs a CUDA device; the device is {device} (bf16 runs on CPU)")


def resolve_methods(workload: Workload, requested: list[str] | None) -> list[str]:
    """The methods to run: `requested` checked against the registry and the model, or the default.

    Unknown names raise UnknownMethodError listing the registered methods; a named method that does
    not fit the model raises its own UnsupportedHostError (or one naming the input kinds).
    """
    model = workload.build_meta_model()
    if requested is None:
        names = [n for n in pv.list_methods() if workload.accepts(pv.get_method(n), model)]
        if not names:
            raise ValueError(f"no registered method fits workload {workload.name!r} on {workload.model!r}")
        return names
    if not requested:
        raise ValueError(f"no method given; registered methods: {', '.join(pv.list_methods())}")
    duplicates = sorted({n for n in requested if requested.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {duplicates}")
    for name in requested:
        method = pv.get_method(name)
        if not workload.feeds(method):
            raise UnsupportedHostError(
                f"method {name!r} takes {method.input_kind!r} inputs; workload {workload.name!r} feeds {workload.input_kind!r}"
            )
        method.check_host(model)
    return list(requested)


def check_method_args(method_args: dict[str, dict], methods: list[str]) -> None:
    """Every override names a benchmarked method and one of its config fields."""
    for name, overrides in method_args.items():
        if name not in methods:
            raise ValueError(f"--method-arg names method {name!r}, which is not benchmarked (methods: {', '.join(methods)})")
        try:
            config_from_dict(name, overrides)
        except TypeError as err:
            raise ValueError(f"--method-arg {name}: {err}") from None


def describe_machine(device: torch.device) -> dict:
    """CPU model and cores, memory, library versions and the device (GPU name on CUDA)."""
    cpu = platform.processor() or platform.machine()
    memory_gib = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            memory_gib = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "petl_vision": pv.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


def _context(imports: list[str]):
    """A fork-server context preloading the heavy imports (spawn where fork servers don't exist)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "petl_vision", "petl_vision.bench.worker", *imports])
    return ctx


def run_isolated(spec: dict) -> dict:
    """Run `worker.measure(spec)` in a new process; its result, or a failure naming the cause."""
    ctx = _context(spec["imports"])
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=worker.child_main, args=(spec, sender), name=f"bench-{spec['method']}")
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:  # killed (out of memory, a signal) before it could answer
        result = None
    process.join()
    receiver.close()
    if result is None:
        result = worker.failure(spec, f"worker process exited with code {process.exitcode} before reporting")
    return result


def default_out_dir(model: str) -> Path:
    return Path("runs") / "benchmark" / re.sub(r"[^A-Za-z0-9._-]+", "_", model)


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Measure every method, write benchmark.{json,md,png} into the out dir, return the report.

    The report: {"machine", "args", "created", "methods": [per-method figures and "ratio_to_full"],
    "markdown", "files"}. A method that fails has "error" set and no figures; the others still run.
    """
    for module in opts.imports:
        importlib.import_module(module)
    device = resolve_device(opts.device)
    check_options(opts, device)
    workload = get_workload(opts.workload)(opts.model, opts.model_kwargs, opts.num_classes)
    methods = resolve_methods(workload, opts.methods)
    check_method_args(opts.method_args, methods)
    out_dir = Path(opts.out_dir) if opts.out_dir else default_out_dir(opts.model)
    machine = describe_machine(device)

    results = []
    for i, name in enumerate(methods, 1):
        spec = {
            "workload": opts.workload, "model": opts.model, "model_kwargs": opts.model_kwargs,
            "num_classes": opts.num_classes, "method": name, "method_args": opts.method_args.get(name, {}),
            "batch_size": opts.batch_size, "steps": opts.steps, "warmup": opts.warmup, "device": str(device),
            "mixed_precision": opts.mixed_precision, "seed": opts.seed, "imports": list(opts.imports),
        }
        start = time.perf_counter()
        result = run_isolated(spec)
        status = "failed" if result["error"] else "done"
        log(f"[{i}/{len(methods)}] {name}: {status} in {time.perf_counter() - start:.1f} s")
        if result["error"]:
            log(result["error"].rstrip())
        results.append(result)

    if hasattr(os, "getloadavg"):  # other processes' load during the run skews timings, not memory
        machine["load_average_1m_end"] = os.getloadavg()[0]
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "args": {**dataclasses.asdict(opts), "methods": methods, "device": str(device), "out_dir": str(out_dir)},
        "methods": add_ratios(results),
    }
    return write_outputs(report, out_dir)
