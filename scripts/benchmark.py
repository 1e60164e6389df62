"""Benchmark PETL methods on one backbone: trainable parameters, peak training memory, training
step time, inference time before and after `pv.merge`. Each method runs in a process of its own.

    python scripts/benchmark.py --model vit_base_patch16_224 --methods linear,full,lora,ssf,vpt --batch-size 8 --steps 3
    python scripts/benchmark.py --model vit_base_patch16_224 --mixed-precision bf16     # every method that fits, on GPU
    python scripts/benchmark.py --model vit_tiny_patch16_224 --model-kwargs '{"img_size": 32}' --method-arg lora.rank=4

Writes benchmark.json, benchmark.md and benchmark.png into --out-dir (default runs/benchmark/<model>)
and prints the markdown table. Exits with status 1 when a method failed (the others are reported).
"""
from __future__ import annotations

import argparse
import json
import sys

from petl_vision.bench import BenchOptions, list_workloads, parse_method_arg, run_benchmark


def parse_args(argv=None) -> BenchOptions:
    defaults = BenchOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults.model, help="model name for the workload (default: %(default)s)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="method names, comma- or space-separated (default: every registered method that fits the model)")
    p.add_argument("--workload", default=defaults.workload, help=f"one of {list_workloads()} (default: %(default)s)")
    p.add_argument("--model-kwargs", default="{}", help='JSON keyword arguments to build the model, e.g. \'{"img_size": 32}\'')
    p.add_argument("--num-classes", type=int, default=defaults.num_classes)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--steps", type=int, default=defaults.steps, help="timed steps; medians are reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed steps first (default: %(default)s)")
    p.add_argument("--device", default=defaults.device, help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast: fp16 on CUDA, bf16 on CUDA or CPU")
    p.add_argument("--method-arg", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="config override passed to pv.apply, e.g. lora.rank=4 (repeatable; values as YAML)")
    p.add_argument("--out-dir", help="output folder (default: runs/benchmark/<model>)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first, in every process (registers extra methods or workloads)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    args = p.parse_args(argv)
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        p.error(f"--model-kwargs is not valid JSON ({err}): {args.model_kwargs!r}")
    if not isinstance(model_kwargs, dict):
        p.error(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    try:
        method_args = parse_method_arg(args.method_arg)
    except ValueError as err:
        p.error(str(err))
    methods = [m.strip() for item in args.methods for m in item.split(",") if m.strip()] if args.methods else None
    return BenchOptions(
        model=args.model, methods=methods, workload=args.workload, model_kwargs=model_kwargs,
        num_classes=args.num_classes, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
        device=args.device, mixed_precision=args.mixed_precision, method_args=method_args,
        out_dir=args.out_dir, imports=args.imports, seed=args.seed,
    )


def main(argv=None) -> int:
    report = run_benchmark(parse_args(argv))
    print()
    print(report["markdown"])
    print(f"written: {', '.join(report['files'].values())}")
    return 1 if any(r.get("error") for r in report["methods"]) else 0


if __name__ == "__main__":
    sys.exit(main())
