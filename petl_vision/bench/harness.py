"""The benchmark harness: every method on one backbone, each in a fresh process of its own.

    from petl_vision.bench import BenchOptions, run_benchmark
    report = run_benchmark(BenchOptions(model="vit_base_patch16_224", methods=["full", "ssf"], steps=3))

Methods come from the registry (`pv.list_methods()`), workloads from `bench.workload`'s registry:
neither is named here. "floor" is no method: it times the frozen model's forward without an autograd
graph, the lower bound of every method's training step. Processes start from a fork server that has already imported torch, timm
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
import traceback
import types
import typing
from pathlib import Path
from typing import Callable

import timm
import torch
import yaml

import petl_vision as pv

from ..core.errors import UnknownMethodError, UnsupportedHostError
from ..core.registry import config_from_dict
from . import worker
from .report import add_ratios, write_outputs
from .workload import Workload, get_workload

MIXED_PRECISION = ("no", "fp16", "bf16")
FLOOR = worker.FLOOR


@dataclasses.dataclass
class BenchOptions:
    """What to benchmark and how.

    model: model name for the workload (a timm name for "timm-classifier").
    methods: method names; None = every registered method the workload accepts on this model.
    workload: a registered workload name (see `list_workloads()`).
    model_kwargs: extra keyword arguments to build the model (e.g. {"img_size": 32}).
    num_classes: classes of the classifier head.
    batch_size: samples per step.
    steps: timed training steps (and timed inference passes); medians and min/max are reported.
    warmup: untimed steps (and passes) before them; on CUDA the minimum: warm-up goes on until the
        last 3 step times lie within `steady_tolerance` of their median, at most `max_warmup` steps.
    max_warmup, steady_tolerance: see warmup (CUDA only; CPU runs exactly `warmup` steps).
    device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    mixed_precision: "no", "fp16" (CUDA only) or "bf16" (CUDA or CPU) autocast.
    compile: time `torch.compile(model, backend=compile_backend)` (training and inference; the
        first call, which compiles, is never timed). Saved bytes and op counts stay eager.
    infer_only: time inference alone (no training step, memory or footprint figures).
    method_args: per method, config overrides passed to `pv.apply`, e.g. {"lora": {"r": 4}}.
    method_timeout: seconds one method may take (None: no limit); a method past it is stopped and
        reported as failed.
    out_dir: where the JSON, markdown and PNG go; None = runs/benchmark/<model>.
    imports: modules to import first (in every process): extra methods or workloads.
    seed: seed of the model's initialisation and of the random batch.
    isolate: each method in a process of its own (default); False measures them one after another
        in this process: faster to start, but memory peaks mix and method_timeout is not applied
        (for debugging and tests).
    """

    model: str = "vit_base_patch16_224"
    methods: list[str] | None = None
    workload: str = "timm-classifier"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    num_classes: int = 100
    batch_size: int = 32
    steps: int = 10
    warmup: int = 3
    max_warmup: int = 30
    steady_tolerance: float = 0.05
    device: str = "auto"
    mixed_precision: str = "no"
    compile: bool = False
    compile_backend: str = "inductor"
    infer_only: bool = False
    method_args: dict[str, dict] = dataclasses.field(default_factory=dict)
    method_timeout: float | None = None
    out_dir: str | None = None
    imports: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    isolate: bool = True


def parse_method_arg(items: list[str]) -> dict[str, dict]:
    """["lora.r=4", "vpt.deep=false"] -> {"lora": {"r": 4}, "vpt": {"deep": False}} (values as YAML)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, field = key.strip().partition(".")
        if not sep or not dot or not method or not field:
            raise ValueError(f"--method-arg {item!r}: expected METHOD.FIELD=VALUE, e.g. lora.r=4")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"--method-arg {item!r}: the value is not valid YAML") from None
        out.setdefault(method, {})[field] = parsed
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
        value = getattr(opts, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{field.replace('_', '-')} must be an integer >= 1, got {value!r}")
    for field in ("warmup", "max_warmup"):
        value = getattr(opts, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"--{field.replace('_', '-')} must be an integer >= 0, got {value!r}")
    if not 0 <= opts.steady_tolerance < 1:
        raise ValueError(f"--steady-tolerance must be in [0, 1), got {opts.steady_tolerance!r}")
    if opts.method_timeout is not None and not opts.method_timeout > 0:
        raise ValueError(f"--method-timeout must be > 0 seconds, got {opts.method_timeout!r}")
    if opts.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed-precision {opts.mixed_precision!r}: expected one of {MIXED_PRECISION}")
    if opts.mixed_precision == "fp16" and device.type != "cuda":  # bf16 autocast also runs on CPU
        raise ValueError(f"--mixed-precision {opts.mixed_precision!r} needs a CUDA device; the device is {device} (bf16 runs on CPU)")
    if opts.compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if opts.compile_backend not in backends:
            raise ValueError(f"--compile-backend {opts.compile_backend!r}: expected one of {', '.join(sorted(backends))}")
    if opts.out_dir is not None and Path(opts.out_dir).exists() and not Path(opts.out_dir).is_dir():
        raise ValueError(f"--out-dir {opts.out_dir!r} is an existing file, not a folder")


def build_meta_model(workload: Workload):
    """The workload's model on the meta device; ValueError naming the model when it cannot be built."""
    try:
        return workload.build_meta_model()
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001  (e.g. timm's TypeError for a keyword the model does not take)
        kwargs = f" with --model-kwargs {workload.model_kwargs}" if workload.model_kwargs else ""
        raise ValueError(f"--model {workload.model!r} (workload {workload.name!r}){kwargs} cannot be built: {err}") from None


def _meta_apply_error(name: str, model, overrides: dict) -> Exception | None:
    """The user-facing error of `pv.apply` on a meta-device model, or None (also when meta cannot run it)."""
    try:
        pv.apply(model, config_from_dict(name, overrides))
    except (UnsupportedHostError, UnknownMethodError) as err:
        return err
    except Exception:  # noqa: BLE001  (a method that cannot run on meta tensors: the worker will tell)
        return None
    return None


def resolve_methods(workload: Workload, requested: list[str] | None, method_args: dict[str, dict] | None = None) -> list[str]:
    """The methods to run: `requested` checked against the registry and the model, or the default.

    Default: "floor" and every registered method that fits the model (its `check_host`, and
    `pv.apply` on a meta-device build where that runs). Unknown names raise UnknownMethodError
    listing the registered methods; a named method that does not fit the model raises its own
    UnsupportedHostError (or one naming the input kinds).
    """
    method_args = method_args or {}
    if requested is None:
        model = build_meta_model(workload)
        names = [n for n in pv.list_methods() if workload.accepts(pv.get_method(n), model)]
        names = [n for n in names if _meta_apply_error(n, build_meta_model(workload), method_args.get(n, {})) is None]
        if not names:
            raise ValueError(f"no registered method fits workload {workload.name!r} on {workload.model!r}")
        return [FLOOR, *names]
    if not requested:
        raise ValueError(f"no method given; registered methods: {', '.join(pv.list_methods())} (and {FLOOR!r})")
    duplicates = sorted({n for n in requested if requested.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {duplicates}")
    for name in requested:
        if name == FLOOR:
            continue
        try:
            method = pv.get_method(name)
        except UnknownMethodError as err:
            raise UnknownMethodError(f"{err} (or {FLOOR!r}, the frozen model's forward)") from None
        if not workload.feeds(method):
            raise UnsupportedHostError(
                f"method {name!r} takes {method.input_kind!r} inputs; workload {workload.name!r} feeds {workload.input_kind!r}"
            )
        model = build_meta_model(workload)
        method.check_host(model)
        error = _meta_apply_error(name, model, method_args.get(name, {}))
        if error is not None:
            raise error
    return list(requested)


def _type_name(kind) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(kind)))
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


def check_value(kind, value):
    """`value` as the annotated `kind` accepts it (an int for a float, "1e-3" for a float, a list for
    a tuple), or TypeError saying what is expected. Unknown annotations accept anything."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return check_value(option, value)
            except TypeError:
                pass
        raise TypeError(f"expected {_type_name(kind)}, got {value!r}")
    if kind is type(None):
        if value is None:
            return None
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin in (tuple, list) or kind in (tuple, list):
        if isinstance(value, (list, tuple)):
            item = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else None
            items = [check_value(item, v) for v in value] if item is not None else list(value)
            return tuple(items) if (origin or kind) is tuple else items
    else:
        return value
    raise TypeError(f"expected {_type_name(kind)}, got {value!r}")


def check_method_args(method_args: dict[str, dict], methods: list[str]) -> dict[str, dict]:
    """Every override names a benchmarked method and one of its config fields, with a value of the
    field's type; the overrides with values converted (1e-3 as a float). ValueError otherwise."""
    checked = {}
    for name, overrides in method_args.items():
        if name == FLOOR:
            raise ValueError(f"--method-arg names {FLOOR!r}, which takes no arguments (the frozen model's forward)")
        if name not in methods:
            raise ValueError(f"--method-arg names method {name!r}, which is not benchmarked (methods: {', '.join(methods)})")
        config_class = pv.get_method(name).config_class
        hints = typing.get_type_hints(config_class)
        fields = {f.name for f in dataclasses.fields(config_class)}
        values = {}
        for field, value in overrides.items():
            if field not in fields:
                raise ValueError(f"--method-arg {name}.{field}: {config_class.__name__} has no field {field!r}; fields: {', '.join(sorted(fields))}")
            try:
                values[field] = check_value(hints.get(field, typing.Any), value)
            except TypeError as err:
                raise ValueError(f"--method-arg {name}.{field}={value!r}: {err}") from None
        try:
            config_from_dict(name, values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--method-arg {name}: {err}") from None
        checked[name] = values
    return checked


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


def run_isolated(spec: dict, timeout: float | None = None) -> dict:
    """Run `worker.measure(spec)` in a new process; its result, or a failure naming the cause.

    timeout: seconds to wait for the result; past it the process is killed and the method fails.
    """
    ctx = _context(spec["imports"])
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=worker.child_main, args=(spec, sender), name=f"bench-{spec['method']}")
    process.start()
    sender.close()
    result, reason = None, None
    try:
        if receiver.poll(timeout):
            result = receiver.recv()
        else:
            reason = f"stopped after --method-timeout {timeout:g} s"
            process.kill()
    except EOFError:  # killed (out of memory, a signal) before it could answer
        pass
    process.join()
    receiver.close()
    if result is None:
        result = worker.failure(spec, reason or f"worker process exited with code {process.exitcode} before reporting")
    return result


def run_in_process(spec: dict) -> dict:
    """`worker.measure(spec)` here; a failure with the traceback if it raises."""
    try:
        return worker.measure(spec)
    except Exception:  # noqa: BLE001  (reported like a worker's failure; the others still run)
        return worker.failure(spec, traceback.format_exc())


def default_out_dir(model: str) -> Path:
    return Path("runs") / "benchmark" / re.sub(r"[^A-Za-z0-9._-]+", "_", model)


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Measure every method, write benchmark.{json,md,png} into the out dir, return the report.

    The report: {"machine", "args", "created", "methods": [per-method figures, "ratio_to_full" and
    "ratio_to_floor"], "markdown", "files"}. A method that fails has "error" set and no figures; the
    others still run. The JSON and markdown are rewritten after each method (the PNG at the end), so
    a run that is stopped keeps what it measured. Every mistake in `opts` raises ValueError (or
    UnsupportedHostError for a method that does not fit the model) before anything runs or is written.
    """
    for module in opts.imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--import {module!r}: {err}") from None
    device = resolve_device(opts.device)
    check_options(opts, device)
    workload = get_workload(opts.workload)(opts.model, opts.model_kwargs, opts.num_classes)
    if not isinstance(opts.method_args, dict):
        raise ValueError(f"method_args must be a dict of dicts, got {opts.method_args!r}")
    unknown = sorted(set(opts.method_args) - set(pv.list_methods()) - {FLOOR})
    if unknown:
        pv.get_method(unknown[0])  # UnknownMethodError listing the registered methods
    methods = resolve_methods(workload, opts.methods, opts.method_args)
    method_args = check_method_args(opts.method_args, methods)
    out_dir = Path(opts.out_dir) if opts.out_dir else default_out_dir(opts.model)
    machine = describe_machine(device)
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "args": {**dataclasses.asdict(opts), "methods": methods, "method_args": method_args, "device": str(device), "out_dir": str(out_dir)},
        "methods": [],
    }

    results = []
    for i, name in enumerate(methods, 1):
        spec = {
            "workload": opts.workload, "model": opts.model, "model_kwargs": opts.model_kwargs,
            "num_classes": opts.num_classes, "method": name, "method_args": method_args.get(name, {}),
            "batch_size": opts.batch_size, "steps": opts.steps, "warmup": opts.warmup, "max_warmup": opts.max_warmup,
            "steady_tolerance": opts.steady_tolerance, "device": str(device), "mixed_precision": opts.mixed_precision,
            "compile": opts.compile, "compile_backend": opts.compile_backend, "infer_only": opts.infer_only,
            "seed": opts.seed, "imports": list(opts.imports),
        }
        start = time.perf_counter()
        result = run_isolated(spec, opts.method_timeout) if opts.isolate else run_in_process(spec)
        status = "failed" if result["error"] else "done"
        log(f"[{i}/{len(methods)}] {name}: {status} in {time.perf_counter() - start:.1f} s")
        if result["error"]:
            log(result["error"].rstrip())
        results.append(result)
        report["methods"] = add_ratios(results)
        write_outputs(report, out_dir, chart=False)  # what is measured so far survives a stopped run

    if hasattr(os, "getloadavg"):  # other processes' load during the run skews timings, not memory
        machine["load_average_1m_end"] = os.getloadavg()[0]
    return write_outputs(report, out_dir)
