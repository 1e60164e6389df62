"""Shared pieces of the data package: the error type, image loading and labelled image-file datasets."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


_WORKER_TRACE = re.compile(r"^Caught \w+ (in .+?)\.\nOriginal Traceback \(most recent call last\):\n")
_QUALIFIED_TYPE = re.compile(r"^[A-Za-z_][\w.]*: ")  # "petl_vision.data.common.DataError: "


def worker_message(text: str) -> str:
    """A DataLoader worker's re-raised message ("Caught X in DataLoader worker process 0. Original
    Traceback ...") as its original last line plus "(in DataLoader worker process 0)"; other text unchanged."""
    match = _WORKER_TRACE.match(text)
    if not match:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return f"{_QUALIFIED_TYPE.sub('', last.strip())} ({match.group(1)})"


class DataError(ValueError):
    """A dataset input is missing or malformed; the message names the file and what is expected.

    Re-raised from a DataLoader worker, the message is the worker's one line (not its traceback).
    """

    def __init__(self, message="", *args):
        super().__init__(worker_message(message) if isinstance(message, str) else message, *args)


def is_hidden(path: Path, root: Path | None = None) -> bool:
    """True when `path` (or, with `root`, any folder between `root` and it) starts with "." (.DS_Store, .ipynb_checkpoints/)."""
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    return any(part.startswith(".") for part in parts)


def is_image_file(path: Path, root: Path | None = None) -> bool:
    """An image by its extension, and not hidden (see is_hidden; `root`: also not inside a hidden folder under it)."""
    return path.suffix.lower() in IMG_EXTENSIONS and not is_hidden(path, root)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as an RGB PIL image; DataError naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to open safely ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
                        f"(now {Image.MAX_IMAGE_PIXELS}) if you trust it") from e
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
