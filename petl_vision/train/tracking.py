"""Metric logging: metrics.jsonl always; Accelerate trackers (TensorBoard, W&B, ...) when `log_with` names them."""
from __future__ import annotations

import json
import math
from pathlib import Path

TRACKER_DIR = "logs"  # <output_dir>/logs/ holds the local trackers' files (TensorBoard events, ...)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim", "mlflow": "mlflow",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def json_safe(record: dict) -> dict:
    """`record` with NaN / inf floats replaced by None, so every line is valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def check_trackers(log_with) -> list | None:
    """`log_with` as Accelerate takes it, checked: None / "" (no tracker), a name ("tensorboard"), names
    separated by commas, or a list of names and `accelerate.tracking.GeneralTracker` objects.

    ValueError for an unknown name; ImportError naming the package when a tracker is not installed.
    """
    if log_with is None or log_with == "" or log_with == []:
        return None
    from accelerate.tracking import GeneralTracker, get_available_trackers
    from accelerate.utils import LoggerType

    items = [s.strip() for s in log_with.split(",") if s.strip()] if isinstance(log_with, str) else list(log_with)
    available = {str(t.value if isinstance(t, LoggerType) else t) for t in get_available_trackers()}
    for item in items:
        if isinstance(item, GeneralTracker):
            continue
        if item not in LoggerType.list():
            raise ValueError(f"log_with: unknown tracker {item!r}; accepted: {', '.join(LoggerType.list())}")
        if item != "all" and item not in available:
            raise ImportError(f"log_with={item}: the {item} tracker is not installed (pip install {PACKAGES.get(item, item)}); "
                              "or leave log_with unset (metrics.jsonl is always written)")
    return items


def flat_config(record: dict, prefix: str = "") -> dict:
    """A nested config record as {dotted key: int / float / str / bool} (what trackers store as hyper-parameters)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def start_trackers(accelerator, record: dict) -> bool:
    """`accelerator.init_trackers` (files under <project_dir>/logs) with the flattened config; False without trackers."""
    if not accelerator.log_with:
        return False
    accelerator.init_trackers(TRACKER_DIR, config=flat_config(record))
    return True


def finish_trackers(accelerator) -> None:
    """Close the trackers (not `accelerator.end_training`, which also ends the process group)."""
    for tracker in accelerator.trackers:
        tracker.finish()


class MetricsLog:
    """Appends one JSON line per record (epoch or step) to `<output_dir>/metrics.jsonl`; NaN / inf become null."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, epoch: int, key: str = "epoch") -> None:
        """Drop lines whose `key` is after `epoch` (written by a run that stopped before checkpointing);
        0 empties the file (a fresh run)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if (json.loads(line).get(key) or 0) <= epoch] if epoch > 0 else []
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

    def close(self) -> None:
        pass
