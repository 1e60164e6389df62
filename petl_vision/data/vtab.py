"""VTAB-1k list-file datasets, in the layout used by the SSF / VPT / NOAH code.

Layout: `<root>/<task>/{train800,val200,train800val200,test}.txt`, one `relative/path label` per
line, paths relative to `<root>/<task>/`.
"""
from __future__ import annotations

from pathlib import Path

from .common import DataError, LabelledImageFiles, require_dir

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


def read_list_file(list_file: Path) -> list[tuple[str, int, int]]:
    """Parse a list file into `(relative path, label, line number)`; blank lines are skipped."""
    entries = []
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{list_file}: not a text file (byte {e.start} is not UTF-8); expected 'relative/path label' lines") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{list_file}:{lineno}: malformed line {line!r} (expected 'relative/path label')")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(
                f"{list_file}:{lineno}: label {label_text!r} is not an integer (expected 'relative/path label')"
            ) from None
        if label < 0:
            raise DataError(f"{list_file}:{lineno}: negative label {label} (expected 0 <= label)")
        entries.append((rel, label, lineno))
    return entries


class VTABList(LabelledImageFiles):
    """One split of one VTAB-1k task. Items are `(transform(PIL RGB image), int label)`.

    `num_classes` checks every label is in `[0, num_classes)`; when None it is inferred as
    max label + 1 of this split. `.samples` is a list of `(path, label)`.
    """

    def __init__(self, root: str | Path, task: str, split: str, transform=None, num_classes: int | None = None):
        if split not in VTAB_SPLITS:
            raise DataError(f"unknown VTAB split {split!r} (expected one of {', '.join(VTAB_SPLITS)})")
        self.task_dir = require_dir(Path(root) / task, f"VTAB task folder for task {task!r}")
        self.list_file = self.task_dir / f"{split}.txt"
        if not self.list_file.is_file():
            raise DataError(f"VTAB list file not found: {self.list_file} (expected '{split}.txt' in {self.task_dir})")
        self.transform = transform
        entries = read_list_file(self.list_file)
        if not entries:
            raise DataError(f"VTAB list file {self.list_file} has no entries")
        if num_classes is not None:
            for rel, label, lineno in entries:
                if not 0 <= label < num_classes:
                    raise DataError(
                        f"{self.list_file}:{lineno}: label {label} out of range (expected 0 <= label < {num_classes})"
                    )
        missing = [(rel, lineno) for rel, _, lineno in entries if not (self.task_dir / rel).is_file()]
        if missing:
            shown = ", ".join(f"{self.task_dir / rel} (line {n})" for rel, n in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(f"{self.list_file}: missing image file(s): {shown}{more}")
        self.samples = [(self.task_dir / rel, label) for rel, label, _ in entries]
        self.targets = [label for _, label in self.samples]
        self.num_classes = num_classes if num_classes is not None else max(self.targets) + 1
        self.classes = [str(i) for i in range(self.num_classes)]
