"""Captioned image folders for text-to-image fine-tuning.

Two layouts, as diffusers' training scripts and the SaRA code read them:
- ``metadata.jsonl`` (the Hugging Face imagefolder layout): one JSON object per line with the image
  path relative to that file's folder under ``file_name`` and the caption under ``text`` (a string,
  or a list of strings of which training picks one at random). Sub-folders may hold their own.
- a caption file per image: ``cat.png`` + ``cat.txt`` (UTF-8 text, stripped).

An image listed in a metadata.jsonl takes that caption; every other image needs its .txt file.
Hidden files and folders (`.DS_Store`, `.ipynb_checkpoints/`) are skipped.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .common import DataError, is_hidden, is_image_file, load_rgb, require_dir

METADATA_NAME = "metadata.jsonl"


def read_captions(root: str | Path, caption_column: str = "text") -> list[tuple[Path, list[str]]]:
    """(image path, captions) of every image under `root`, sorted by path."""
    root = require_dir(root, "captioned image folder")
    captions: dict[Path, list[str]] = {}
    for meta in sorted(m for m in root.rglob(METADATA_NAME) if not is_hidden(m, root)):
        for line_no, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{meta}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or "file_name" not in record or caption_column not in record:
                raise DataError(f"{where}: expected an object with 'file_name' and {caption_column!r}, got {line.strip()[:80]!r}")
            text = record[caption_column]
            texts = [text] if isinstance(text, str) else list(text) if isinstance(text, list) else []
            if not texts or not all(isinstance(t, str) for t in texts):
                raise DataError(f"{where}: {caption_column!r} must be a string or a non-empty list of strings")
            path = (meta.parent / record["file_name"]).resolve()
            if not path.is_file():
                raise DataError(f"{where}: image {record['file_name']!r} not found (looked for {path})")
            captions[path] = texts
    samples, missing = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p, root)):
        texts = captions.get(path.resolve())
        if texts is None and path.with_suffix(".txt").is_file():
            texts = [path.with_suffix(".txt").read_text(encoding="utf-8").strip()]
        if texts is None:
            missing.append(path.name)
        else:
            samples.append((path, texts))
    if missing:
        raise DataError(f"{root}: no caption for {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} images); "
                        f"add them to {METADATA_NAME} or write a same-name .txt file per image")
    if not samples:
        raise DataError(f"{root}: no images (expected image files with captions in {METADATA_NAME} or same-name .txt files)")
    return samples


def image_transform(resolution: int, center_crop: bool = False, random_flip: bool = False):
    """PIL RGB -> (3, resolution, resolution) float in [-1, 1]: resize the short side, crop, flip."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


class CaptionedImageFolder(Dataset):
    """Items are ``(transform(image), caption)``; `caption_prefix` is prepended to every caption
    (the SaRA recipe's style trigger, e.g. "Barbie style, "). With several captions per image, a
    random one is drawn (python's `random`, seeded by accelerate's set_seed)."""

    def __init__(self, root: str | Path, transform=None, caption_prefix: str = "", caption_column: str = "text"):
        self.root = Path(root)
        self.samples = read_captions(root, caption_column)
        self.transform = transform
        self.caption_prefix = caption_prefix

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, texts = self.samples[index]
        image = load_rgb(path)
        caption = texts[0] if len(texts) == 1 else random.choice(texts)
        return (self.transform(image) if self.transform is not None else image), self.caption_prefix + caption


def sdxl_image_transform(resolution: int, center_crop: bool = False, random_flip: bool = False):
    """PIL RGB -> ((3, resolution, resolution) in [-1, 1], original (h, w), crop top-left (top, left)), as
    diffusers' SDXL text-to-image script: resize the short side, flip, crop (the crop in resized pixels)."""
    from torchvision import transforms
    from torchvision.transforms import functional as TF

    resize = transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def transform(image):
        original = (image.height, image.width)
        image = resize(image)
        if random_flip and random.random() < 0.5:
            image = TF.hflip(image)
        if center_crop:
            top, left = max(0, int(round((image.height - resolution) / 2.0))), max(0, int(round((image.width - resolution) / 2.0)))
        else:
            top, left, _, _ = transforms.RandomCrop.get_params(image, (resolution, resolution))
        image = TF.crop(image, top, left, resolution, resolution)
        return to_tensor(image), original, (top, left)

    return transform
