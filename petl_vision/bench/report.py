"""Benchmark outputs: ratios to `full` and to the `floor`, the markdown table, the chart and the JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.io import atomic_write

# Result keys given as ratios to `full` ("ratio_to_full").
FIGURES = [
    "trainable_params", "peak_train_memory_mib", "memory_before_train_mib", "train_increment_mib", "train_step_ms",
    "train_images_per_s", "infer_ms", "infer_merged_ms", "infer_images_per_s", "saved_for_backward_mib", "aten_ops_per_step",
]
# Result keys given as ratios to the `floor` row, the frozen model's forward ("ratio_to_floor").
FLOOR_FIGURES = ["train_step_ms", "peak_train_memory_mib", "aten_ops_per_step"]
# Table columns: (result key, header, value format, show the min-max spread, ratio shown: "full" / "floor" / None).
COLUMNS = [
    ("trainable_params", "Trainable params", "{:,.0f}", False, "full"),
    ("peak_train_memory_mib", "Peak train memory (MiB)", "{:,.0f}", False, "full"),
    ("train_increment_mib", "Training increment (MiB)", "{:,.0f}", False, "full"),
    ("train_step_ms", "Train step (ms) [min–max]", "{:,.1f}", True, "full"),
    ("train_step_ms", "Step / floor", None, False, "floor"),
    ("train_images_per_s", "Train images/s", "{:,.0f}", False, None),
    ("infer_ms", "Inference (ms) [min–max]", "{:,.1f}", True, "full"),
    ("infer_merged_ms", "Merged inference (ms)", "{:,.1f}", True, "full"),
    ("saved_for_backward_mib", "Saved for backward (MiB)", "{:,.1f}", False, "full"),
    ("aten_ops_per_step", "aten ops / step", "{:,.0f}", False, "full"),
]
REFERENCE = "full"
FLOOR = "floor"


def _ratios(result: dict, reference: dict | None, keys: list[str]) -> dict | None:
    if reference is None or result.get("error"):
        return None
    out = {}
    for key in keys:
        value, ref = result.get(key), reference.get(key)
        out[key] = value / ref if value is not None and ref else None
    return out


def add_ratios(results: list[dict]) -> list[dict]:
    """Set each result's "ratio_to_full" {figure: value / full's} and "ratio_to_floor" {figure:
    value / floor's} (None without a successful `full` / `floor`)."""
    full = next((r for r in results if r["method"] == REFERENCE and not r.get("error")), None)
    floor = next((r for r in results if r["method"] == FLOOR and not r.get("error")), None)
    for result in results:
        result["ratio_to_full"] = _ratios(result, full, FIGURES)
        result["ratio_to_floor"] = _ratios(result, floor, FLOOR_FIGURES)
    return results


def _ratio(r: float) -> str:
    return f"{r:.2f}×" if r == 0 or r >= 0.01 else f"{r:.1e}×"


def _load(machine: dict) -> str:
    start, end = machine.get("load_average_1m"), machine.get("load_average_1m_end")
    return "" if start is None or end is None else f"; load average {start:.1f} at start, {end:.1f} at end"


def _cell(result: dict, key: str, header: str, fmt: str | None, spread: bool, ratio_to: str | None) -> str:
    ratio = (result.get(f"ratio_to_{ratio_to}") or {}).get(key) if ratio_to else None
    if fmt is None:  # a ratio column
        return "—" if ratio is None else _ratio(ratio)
    value = result.get(key)
    if value is None:
        return "—"
    text = fmt.format(value)
    limits = result.get(f"{key}_spread") if spread else None
    if limits and len(result.get(f"{key}_all") or ()) > 1:
        text += f" [{fmt.format(limits['min'])}–{fmt.format(limits['max'])}]"
    return text + (f" ({_ratio(ratio)})" if ratio is not None and ratio_to == REFERENCE else "")


def _warmup_note(report: dict) -> str:
    steps = [r["train_warmup"]["steps"] for r in report["methods"] if not r.get("error") and r.get("train_warmup")]
    unsteady = [r["method"] for r in report["methods"] if not r.get("error") and (r.get("train_warmup") or {}).get("steady") is False]
    if not steps:
        return f"after {report['args']['warmup']} warm-up"
    note = f"after {min(steps)}–{max(steps)} warm-up" if min(steps) != max(steps) else f"after {steps[0]} warm-up"
    return note + (f" (not steady within the cap: {', '.join(unsteady)})" if unsteady else "")


def markdown_table(report: dict) -> str:
    """The results as a markdown section: a context line, the table, and how to read it."""
    args, machine = report["args"], report["machine"]
    device = machine["gpu"] or machine["cpu"]
    precision = "fp32" if args["mixed_precision"] == "no" else f"{args['mixed_precision']} autocast"
    mode = f"torch.compile (backend {args.get('compile_backend', 'inductor')})" if args.get("compile") else "eager"
    timer = "CUDA events" if machine.get("gpu") else "perf_counter"
    lines = [
        f"Benchmark of `{args['model']}` ({args['workload']}) on {args['device']} ({device}, "
        f"{machine['cpu_cores_usable']} usable CPU cores, torch {machine['torch']}); batch {args['batch_size']}, "
        f"{precision}, {mode}; median of {args['steps']} steps ({timer}) {_warmup_note(report)}{_load(machine)}.",
        "",
        "| Method | " + " | ".join(header for _, header, *_ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for result in report["methods"]:
        if result.get("error"):
            last = result["error"].strip().splitlines()[-1]
            lines.append(f"| {result['method']} | failed: {last.replace('|', '/')} |" + " |" * (len(COLUMNS) - 1))
        else:
            lines.append(f"| {result['method']} | " + " | ".join(_cell(result, *column) for column in COLUMNS) + " |")
    source = next((r["memory_source"] for r in report["methods"] if not r.get("error")), "n/a")
    lines += [
        "",
        f"In parentheses: ratio to `{REFERENCE}`. `{FLOOR}` is no method: the frozen model's forward without an "
        "autograd graph, the least a training step can cost; 'Step / floor' is each step's time over it. "
        f"Memory: {source}; the increment is what training added to the memory with the model built, adapted "
        "and on the device. Merged inference is after `pv.merge` (— where the method cannot be merged). "
        "Saved for backward (distinct storages autograd keeps, weights excluded) and aten ops per step "
        "(forward, backward, optimizer step) come from one more, untimed, eager step and do not depend on "
        "the machine.",
    ]
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, path: Path) -> None:
    """A 3x2 PNG: trainable params (log), peak training memory, train step time (min-max bars,
    the floor as a line), inference time, bytes saved for backward, aten ops per step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ok = [r for r in report["methods"] if not r.get("error")]
    names = [r["method"] for r in ok]
    x = list(range(len(ok)))

    def values(key):
        return [math.nan if r.get(key) is None else r[key] for r in ok]

    def spread(key):
        """Error bars from the median down to min and up to max."""
        lows, highs = [], []
        for r in ok:
            s = r.get(f"{key}_spread")
            lows.append(0.0 if not s else s["median"] - s["min"])
            highs.append(0.0 if not s else s["max"] - s["median"])
        return [lows, highs]

    fig, axes = plt.subplots(3, 2, figsize=(max(8.0, 1.4 * len(ok) + 4), 11))
    ax = axes[0][0]
    ax.bar(x, [v if v > 0 else math.nan for v in values("trainable_params")], color="tab:blue")  # floor: none
    ax.set_yscale("log")
    ax.set_title("Trainable parameters")
    ax = axes[0][1]
    before = [0.0 if math.isnan(v) else v for v in values("memory_before_train_mib")]
    ax.bar(x, before, color="tab:gray", label="before training")
    ax.bar(x, values("train_increment_mib"), bottom=before, color="tab:orange", label="training increment")
    ax.set_title("Peak training memory (MiB)")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.bar(x, values("train_step_ms"), yerr=spread("train_step_ms"), capsize=3, color="tab:green")
    floor = next((r for r in ok if r["method"] == FLOOR and r.get("train_step_ms")), None)
    if floor is not None:
        ax.axhline(floor["train_step_ms"], color="black", linestyle="--", linewidth=1, label="floor (forward only)")
        ax.legend(fontsize=8)
    ax.set_title("Training step (ms, median, min–max)")
    ax = axes[1][1]
    ax.bar([i - 0.2 for i in x], values("infer_ms"), width=0.4, yerr=spread("infer_ms"), capsize=3, color="tab:purple", label="as trained")
    ax.bar([i + 0.2 for i in x], values("infer_merged_ms"), width=0.4, yerr=spread("infer_merged_ms"), capsize=3,
           color="tab:olive", label="after pv.merge")
    ax.set_title("Inference (ms, median, min–max)")
    ax.legend(fontsize=8)
    ax = axes[2][0]
    ax.bar(x, values("saved_for_backward_mib"), color="tab:red")
    ax.set_title("Saved for backward (MiB, one step)")
    ax = axes[2][1]
    ax.bar(x, values("aten_ops_per_step"), color="tab:brown")
    ax.set_title("aten ops per training step")
    for ax in axes.flat:
        ax.set_xticks(x, names, rotation=30, ha="right")
    args = report["args"]
    mode = ", torch.compile" if args.get("compile") else ""
    fig.suptitle(f"{args['model']} on {args['device']}, batch {args['batch_size']}{mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path, chart: bool = True) -> dict:
    """Write benchmark.json, benchmark.md (and benchmark.png when `chart`) into `out_dir`; add
    "markdown" and "files" to the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "benchmark.json", "markdown": out_dir / "benchmark.md", "chart": out_dir / "benchmark.png"}
    report["markdown"] = markdown_table(report)
    report["files"] = {k: str(v) for k, v in files.items() if chart or k != "chart"}
    _write_text(files["markdown"], report["markdown"])
    if chart:
        bar_chart(report, files["chart"])
    _write_text(files["json"], json.dumps(report, indent=2) + "\n")
    return report


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file, so a run stopped mid-write keeps the previous complete file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
