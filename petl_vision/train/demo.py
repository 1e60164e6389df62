"""The no-argument demo: what transfer buys on scikit-learn's digits with the tiny demo ViT.

Three runs of the recipe in configs/demo_digits.yaml, on CPU, no network:
  SSF on the pretrained demo backbone, a linear probe on the same backbone, and the same ViT
  trained from scratch (pretrained=False, every parameter trained).
"""
from __future__ import annotations

import time
from pathlib import Path


from .cli import report
from .config import load_config
from .trainer import start_classifier_run, train

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_digits.yaml"

# (output sub-directory, recipe overrides, identity overrides). Recipe overrides come before the
# user's overrides (which may change them); identity overrides come last (what the row *is*).
VARIANTS = [
    ("ssf", [], []),
    ("linear", ["optim.lr=1.0e-2", "optim.weight_decay=0.0"], ["method.name=linear"]),
    ("scratch", ["optim.lr=1.0e-3", "optim.weight_decay=0.05"], ["pretrained=false", "checkpoint=null", "method.name=full"]),
]


def run_demo(output_dir: str | Path = "runs/demo", overrides: list[str] | tuple[str, ...] = (), config=DEMO_CONFIG,
             resume=None, overwrite: bool = False) -> list[dict]:
    """Run the three variants; print and return rows (name, method, trainable, total, top1, seconds).

    `overrides` (key=value) apply to every variant, e.g. `epochs=1`; they cannot turn the scratch
    run into a pretrained one or change the linear / scratch runs' method.
    resume: refused (ValueError): the demo always trains from the start; resume a run of a config.
    overwrite: replace the runs of an earlier demo in `output_dir` (else FileExistsError, before training).
    """
    if resume:
        raise ValueError("--resume needs --config: the demo (no --config) always trains its three runs from the start; "
                         "pass --overwrite to run it again into the same folder")
    if not Path(config).is_file():
        raise FileNotFoundError(f"demo config not found: {config} (expected configs/demo_digits.yaml in the repository)")
    rows, say = [], report  # prints on the main process only
    configs = [load_config(config, [*recipe, f"output_dir={Path(output_dir) / sub}", *overrides, *identity])
               for sub, recipe, identity in VARIANTS]
    for cfg in configs:  # refuse a folder holding other runs before the first variant trains
        start_classifier_run(cfg, overwrite=overwrite)
    for cfg in configs:
        label = f"{cfg.method.name}, {'pretrained' if cfg.pretrained else 'from scratch'}"
        say(f"\n== {label}: {cfg.epochs} epochs, lr {cfg.optim.lr:g} ==")
        start = time.perf_counter()
        result = train(cfg, overwrite=overwrite)
        rows.append(
            {
                "name": label,
                "method": cfg.method.name,
                "trainable": result["trainable_params"],
                "total": result["total_params"],
                "top1": result["metrics"].get("top1", float("nan")),
                "seconds": time.perf_counter() - start,
            }
        )
    say("\n" + format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of the demo rows."""
    head = f"{'run':<26} {'trainable params':>17} {'of total':>9} {'test top-1':>11} {'time':>7}"
    lines = ["digits (scikit-learn), demo ViT 32x32 patch 4", head, "-" * len(head)]
    for r in rows:
        share = 100.0 * r["trainable"] / max(r["total"], 1)
        lines.append(
            f"{r['name']:<26} {r['trainable']:>17,} {share:>8.2f}% {r['top1']:>10.2f}% {r['seconds']:>6.0f}s"
        )
    return "\n".join(lines)
