"""Per-epoch metric logging: metrics.jsonl always, TensorBoard when it is installed."""
from __future__ import annotations

import json
import math
from pathlib import Path


def json_safe(record: dict) -> dict:
    """`record` with NaN / inf floats replaced by None, so every line is valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLog:
    """Appends one JSON line per epoch to `<output_dir>/metrics.jsonl` (and TensorBoard scalars)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled or not tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        except ImportError:  # tensorboard not installed: jsonl only
            self.writer = None

    def truncate_after(self, epoch: int, key: str = "epoch") -> None:
        """Drop lines whose `key` is after `epoch` (written by a run that stopped before checkpointing);
        0 empties the file (a fresh run)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get(key, 0) <= epoch] if epoch > 0 else []
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
