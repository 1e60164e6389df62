"""Shared pieces of the data package: the error type, image loading and labelled image-file datasets."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A dataset input is missing or malformed; the message names the file and what is expected."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as an RGB PIL image; DataError naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e} (expected a readable image file)") from e


def require_dir(path: str | Path, what: str) -> Path:
    """Return `path` as a Path; DataError naming it if it is missing or not a directory."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p} (expected an existing directory)")
    if not p.is_dir():
        raise DataError(f"{what} is not a directory: {p}")
    return p


class LabelledImageFiles(Dataset):
    """Items are `(transform(PIL RGB image), int label)` of `.samples`, a list of `(path, label)`
    that the subclass fills; `.transform` may be None (the PIL image itself)."""

    samples: list[tuple[Path, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = load_rgb(path)
        return (self.transform(img) if self.transform is not None else img), label
