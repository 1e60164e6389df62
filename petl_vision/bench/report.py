"""Benchmark outputs: ratios to `full`, the markdown table, the bar chart and the JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path

# (result key, column header, value format). Every figure is also shown as a ratio to `full`.
FIGURES = [
    ("trainable_params", "Trainable params", "{:,.0f}"),
    ("peak_train_memory_mib", "Peak train memory (MiB)", "{:,.0f}"),
    ("memory_before_train_mib", "Before training (MiB)", "{:,.0f}"),
    ("train_increment_mib", "Training increment (MiB)", "{:,.0f}"),
    ("train_step_ms", "Train step (ms)", "{:,.1f}"),
    ("infer_ms", "Inference (ms)", "{:,.1f}"),
    ("infer_merged_ms", "Merged inference (ms)", "{:,.1f}"),
]
REFERENCE = "full"


def add_ratios(results: list[dict]) -> list[dict]:
    """Set each result's "ratio_to_full" {figure: value / full's value} (None without `full`)."""
    full = next((r for r in results if r["method"] == REFERENCE and not r.get("error")), None)
    for result in results:
        if full is None or result.get("error"):
            result["ratio_to_full"] = None
            continue
        ratios = {}
        for key, _, _ in FIGURES:
            value, ref = result.get(key), full.get(key)
            ratios[key] = value / ref if value is not None and ref else None
        result["ratio_to_full"] = ratios
    return results


def _ratio(r: float) -> str:
    return f"{r:.2f}×" if r >= 0.01 else f"{r:.1e}×"


def _load(machine: dict) -> str:
    start, end = machine.get("load_average_1m"), machine.get("load_average_1m_end")
    return "" if start is None or end is None else f"; load average {start:.1f} at start, {end:.1f} at end"


def _cell(result: dict, key: str, fmt: str) -> str:
    value = result.get(key)
    if value is None:
        return "—"
    ratio = (result.get("ratio_to_full") or {}).get(key)
    return fmt.format(value) + (f" ({_ratio(ratio)})" if ratio is not None else "")


def markdown_table(report: dict) -> str:
    """The results as a markdown section: a context line, the table, and how to read it."""
    args, machine = report["args"], report["machine"]
    device = machine["gpu"] or machine["cpu"]
    precision = "fp32" if args["mixed_precision"] == "no" else f"{args['mixed_precision']} autocast"
    lines = [
        f"Benchmark of `{args['model']}` ({args['workload']}) on {args['device']} ({device}, "
        f"{machine['cpu_cores_usable']} usable CPU cores, torch {machine['torch']}); batch {args['batch_size']}, "
        f"{precision}, median of {args['steps']} steps after {args['warmup']} warm-up{_load(machine)}.",
        "",
        "| Method | " + " | ".join(header for _, header, _ in FIGURES) + " |",
        "|---" * (len(FIGURES) + 1) + "|",
    ]
    for result in report["methods"]:
        if result.get("error"):
            last = result["error"].strip().splitlines()[-1]
            lines.append(f"| {result['method']} | failed: {last.replace('|', '/')} |" + " |" * (len(FIGURES) - 1))
        else:
            lines.append(f"| {result['method']} | " + " | ".join(_cell(result, k, f) for k, _, f in FIGURES) + " |")
    source = next((r["memory_source"] for r in report["methods"] if not r.get("error")), "n/a")
    lines += [
        "",
        f"In parentheses: ratio to `{REFERENCE}`. Memory: {source}; 'before training' is the memory with the "
        "model built, adapted and on the device; the increment is what training added. Merged inference is "
        "after `pv.merge` (— where the method cannot be merged).",
    ]
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, path: Path) -> None:
    """A 2x2 PNG: trainable params (log), peak training memory, train step time, inference time."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ok = [r for r in report["methods"] if not r.get("error")]
    names = [r["method"] for r in ok]
    x = list(range(len(ok)))

    def values(key):
        return [math.nan if r.get(key) is None else r[key] for r in ok]

    fig, axes = plt.subplots(2, 2, figsize=(max(8.0, 1.4 * len(ok) + 4), 7.5))
    ax = axes[0][0]
    ax.bar(x, values("trainable_params"), color="tab:blue")
    ax.set_yscale("log")
    ax.set_title("Trainable parameters")
    ax = axes[0][1]
    before = [0.0 if math.isnan(v) else v for v in values("memory_before_train_mib")]
    ax.bar(x, before, color="tab:gray", label="before training")
    ax.bar(x, values("train_increment_mib"), bottom=before, color="tab:orange", label="training increment")
    ax.set_title("Peak training memory (MiB)")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.bar(x, values("train_step_ms"), color="tab:green")
    ax.set_title("Training step (ms, median)")
    ax = axes[1][1]
    ax.bar([i - 0.2 for i in x], values("infer_ms"), width=0.4, color="tab:purple", label="as trained")
    ax.bar([i + 0.2 for i in x], values("infer_merged_ms"), width=0.4, color="tab:olive", label="after pv.merge")
    ax.set_title("Inference (ms, median)")
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xticks(x, names, rotation=30, ha="right")
    args = report["args"]
    fig.suptitle(f"{args['model']} on {args['device']}, batch {args['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path) -> dict:
    """Write benchmark.json, benchmark.md and benchmark.png into `out_dir`; add "markdown" and "files"."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "benchmark.json", "markdown": out_dir / "benchmark.md", "chart": out_dir / "benchmark.png"}
    report["markdown"] = markdown_table(report)
    report["files"] = {k: str(v) for k, v in files.items()}
    files["markdown"].write_text(report["markdown"])
    bar_chart(report, files["chart"])
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    return report
