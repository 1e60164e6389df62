"""Issue #14's GPU targets checked against benchmark JSON files (scripts/gpu_benchmark.sh writes them).

    python -m petl_vision.bench.targets vit.json unet.json unet_compile.json    # prints a markdown list

A target is (method, figure, bound, reference): the method's figure over the reference's is at most
the bound. Reference "full" is the `full` row of the same report; "merged" is the method's own
merged inference (`infer_merged_ms`). Each report is matched by its workload and compile flag.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# (workload, compiled) -> [(method, figure, bound, reference)]
TARGETS = {
    ("timm-classifier", False): [
        ("ssf", "peak_train_memory_mib", 0.90, "full"), ("ssf", "train_step_ms", 0.85, "full"),
        ("vpt", "train_step_ms", 0.80, "full"), ("bitfit", "train_step_ms", 0.80, "full"),
        ("lora", "peak_train_memory_mib", 0.95, "full"), ("lora", "train_step_ms", 1.0, "full"),
        ("mask_tuning", "train_step_ms", 1.0, "full"), ("hst", "train_step_ms", 1.0, "full"),
        ("sara", "train_step_ms", 1.0, "full"),
        ("lst", "train_step_ms", 0.45, "full"), ("lst", "peak_train_memory_mib", 0.30, "full"),
    ],
    ("diffusers-unet", False): [
        ("lora", "train_step_ms", 1.0, "full"), ("sara", "train_step_ms", 1.0, "full"),
        ("spm", "infer_ms", 1.10, "merged"), ("sara", "infer_ms", 1.2, "merged"),
    ],
    ("diffusers-unet", True): [("spm", "infer_ms", 1.05, "merged")],
}


def ratio(report: dict, method: str, figure: str, reference: str) -> float | None:
    """The method's figure over the reference's in `report`; None when either is missing."""
    rows = {r["method"]: r for r in report["methods"] if not r.get("error")}
    row = rows.get(method)
    if row is None or row.get(figure) is None:
        return None
    ref = row.get("infer_merged_ms") if reference == "merged" else (rows.get(reference) or {}).get(figure)
    return row[figure] / ref if ref else None


def check(report: dict) -> list[dict]:
    """One entry per target of this report's workload and compile flag: method, figure, bound,
    reference, ratio (None: not measured) and ok (None: not measured)."""
    args = report["args"]
    out = []
    for method, figure, bound, reference in TARGETS.get((args["workload"], bool(args.get("compile"))), []):
        value = ratio(report, method, figure, reference)
        out.append({"method": method, "figure": figure, "bound": bound, "reference": reference,
                    "ratio": value, "ok": None if value is None else value <= bound})
    return out


def markdown(paths: list[str]) -> str:
    """A markdown list of every target of the given reports: measured ratio, bound, met or not."""
    lines = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        args = report["args"]
        mode = "torch.compile" if args.get("compile") else "eager"
        lines.append(f"- `{Path(path).name}`: {args['model']}, batch {args['batch_size']}, {args['mixed_precision']}, {mode}")
        for t in check(report):
            value = "not measured" if t["ratio"] is None else f"{t['ratio']:.2f}"
            verdict = {True: "met", False: "MISSED", None: "—"}[t["ok"]]
            lines.append(f"  - {t['method']} {t['figure']} / {t['reference']}: {value} (target <= {t['bound']:.2f}) {verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m petl_vision.bench.targets REPORT.json [REPORT.json ...]")
    print(markdown(sys.argv[1:]), end="")
