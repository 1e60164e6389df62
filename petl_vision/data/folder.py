"""ImageFolder: one sub-folder per class, labels from the sorted folder names."""
from __future__ import annotations

from pathlib import Path

from .common import DataError, LabelledImageFiles, is_image_file, require_dir


class ImageFolder(LabelledImageFiles):
    """`root/<class>/<image>` layout. Items are `(transform(PIL RGB image), int label)`.

    `.classes` are the sorted class-folder names (label i = classes[i]); `.samples` is a list of
    `(path, label)`. Hidden files and folders (`.DS_Store`, `.ipynb_checkpoints/`) and non-image files are ignored.
    """

    def __init__(self, root: str | Path, transform=None):
        self.root = require_dir(root, "image folder root")
        self.transform = transform
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"no class folders in {self.root} (expected one sub-folder of images per class)")
        self.classes = [d.name for d in class_dirs]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for label, d in enumerate(class_dirs):
            files = sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p, d))
            if not files:
                raise DataError(f"class folder {d} has no image files (expected files ending in .png, .jpg, ...)")
            self.samples += [(p, label) for p in files]
        self.targets = [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)
