"""Benchmark harness behind scripts/benchmark.py: parameters, memory and speed of every method.

    from petl_vision.bench import BenchOptions, run_benchmark
    report = run_benchmark(BenchOptions(model="vit_base_patch16_224", methods=["full", "ssf"]))
    print(report["markdown"])

Workloads (what is built, fed and trained) register with `@register_workload`; methods come from
`pv.list_methods()`. Neither needs an edit here.
"""
from . import workloads  # noqa: F401  (registers the built-in workloads)
from .harness import BenchOptions, describe_machine, parse_method_arg, resolve_methods, run_benchmark
from .workload import Workload, get_workload, list_workloads, register_workload

__all__ = [
    "BenchOptions", "Workload", "describe_machine", "get_workload", "list_workloads", "parse_method_arg",
    "register_workload", "resolve_methods", "run_benchmark",
]
