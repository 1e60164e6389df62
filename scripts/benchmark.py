"""Benchmark PETL methods on one backbone: trainable parameters, peak training memory, training
step time and images/s (min/median/max), inference time before and after `pv.merge`, bytes saved
for backward and aten ops per step. Each method runs in a process of its own; `floor` (no method)
times the frozen model's forward without an autograd graph, the least a training step can cost.

    python scripts/benchmark.py --methods floor,full,linear,lora,ssf,vpt --batch-size 8 --steps 3
    python scripts/benchmark.py --mixed-precision bf16 --batch-size 256          # every method that fits, on a GPU
    python scripts/benchmark.py --methods floor,full,ssf --mixed-precision bf16 --compile      # torch.compile'd, on a GPU
    python scripts/benchmark.py --model vit_tiny_patch16_224 --model-kwargs '{"img_size": 32}' --methods full,lora --method-arg lora.r=4
    python scripts/benchmark.py --import petl_vision.bench.unet_workload --workload diffusers-unet --model sd15-unet --methods full,lora,spm --method-arg lora.train_head=false --batch-size 4 --mixed-precision bf16

On CUDA, times come from CUDA events and warm-up runs until the step time is steady (see
--warmup); on CPU from perf_counter after exactly --warmup steps. Writes benchmark.json,
benchmark.md and benchmark.png into --out-dir (default runs/benchmark/<model>; the JSON and
markdown are updated after each method) and prints the markdown table. Exits with status 1 when a
method failed (the others are reported), 2 with one `error:` line for a mistake in the command line
(--debug or PETL_VISION_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys

from petl_vision.bench import BenchOptions, list_workloads, parse_method_arg, run_benchmark
from petl_vision.train.cli import ArgumentParser, add_debug_argument, run_cli


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchOptions()
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults.model, help="model name for the workload (default: %(default)s)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="method names, comma- or space-separated, and/or floor (default: floor and every registered method that fits the model)")
    p.add_argument("--workload", default=defaults.workload, help=f"one of {list_workloads()} (default: %(default)s)")
    p.add_argument("--model-kwargs", default="{}", help='JSON keyword arguments to build the model, e.g. \'{"img_size": 32}\'')
    p.add_argument("--num-classes", type=int, default=defaults.num_classes)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--steps", type=int, default=defaults.steps, help="timed steps; median, min and max are reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=defaults.warmup,
                   help="untimed steps first; on CUDA the minimum, then until the last 3 step times agree within "
                        "--steady-tolerance (default: %(default)s)")
    p.add_argument("--max-warmup", type=int, default=defaults.max_warmup, help="CUDA: at most this many warm-up steps (default: %(default)s)")
    p.add_argument("--steady-tolerance", type=float, default=defaults.steady_tolerance,
                   help="CUDA: relative spread of the last 3 warm-up steps that counts as steady (default: %(default)s)")
    p.add_argument("--device", default=defaults.device, help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast: fp16 on CUDA, bf16 on CUDA or CPU")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model), training and inference")
    p.add_argument("--compile-backend", default=defaults.compile_backend,
                   help="torch.compile backend with --compile (default: %(default)s; aot_eager or eager compile fast)")
    p.add_argument("--infer-only", action="store_true", help="time inference only (no training step)")
    p.add_argument("--method-arg", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="config override passed to pv.apply, e.g. lora.r=4 (repeatable; values as YAML)")
    p.add_argument("--method-timeout", type=float, help="seconds one method may take; past them it is stopped and reported as failed")
    p.add_argument("--out-dir", help="output folder (default: runs/benchmark/<model>)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first, in every process (registers extra methods or workloads)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--in-process", action="store_true",
                   help="measure every method in this process, one after another (faster start; memory peaks mix)")
    add_debug_argument(p)
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from parsed arguments; ValueError for a malformed --model-kwargs or --method-arg."""
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs is not valid JSON ({err}): {args.model_kwargs!r}") from None
    if not isinstance(model_kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    methods = [m.strip() for item in args.methods for m in item.split(",") if m.strip()] if args.methods else None
    return BenchOptions(
        model=args.model, methods=methods, workload=args.workload, model_kwargs=model_kwargs,
        num_classes=args.num_classes, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
        max_warmup=args.max_warmup, steady_tolerance=args.steady_tolerance, device=args.device,
        mixed_precision=args.mixed_precision, compile=args.compile, compile_backend=args.compile_backend,
        infer_only=args.infer_only, method_args=parse_method_arg(args.method_arg), method_timeout=args.method_timeout,
        out_dir=args.out_dir, imports=args.imports, seed=args.seed, isolate=not args.in_process,
    )


def parse_args(argv=None) -> BenchOptions:
    return options_from_args(build_parser().parse_args(argv))


def benchmark(argv: list[str]) -> int:
    """Run the benchmark and print its table; 0 when every method ran, 1 when one failed."""
    report = run_benchmark(parse_args(argv))
    print()
    print(report["markdown"])
    print(f"written: {', '.join(report['files'].values())}")
    return 1 if any(r.get("error") for r in report["methods"]) else 0


def main(argv=None) -> int:
    """benchmark() under run_cli: a mistake in the command line is one `error:` line and status 2."""
    return run_cli(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
