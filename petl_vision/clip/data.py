"""Few-shot data for CLIP tuning: k shots per class, class names, CLIP's image transforms."""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import DataError


def few_shot_indices(targets: Sequence[int], shots: int, seed: int) -> list[int]:
    """Indices of `shots` samples per class drawn with `seed` (sorted); all of a class with fewer.

    targets: the label of every sample. shots <= 0 keeps every sample.
    """
    if shots <= 0:
        return list(range(len(targets)))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(int(y), []).append(i)
    picked = []
    for label in sorted(by_class):
        items = by_class[label]
        picked += items if len(items) <= shots else rng.sample(items, shots)
    return sorted(picked)


def few_shot(dataset: Dataset, shots: int, seed: int) -> Subset:
    """A Subset with `shots` samples per class of a dataset with `.targets`."""
    return Subset(dataset, few_shot_indices(dataset.targets, shots, seed))


def class_names_from_folders(folders: Sequence[str]) -> list[str]:
    """Folder names as class names: underscores become spaces ("golden_retriever" -> "golden retriever")."""
    return [f.replace("_", " ") for f in folders]


def read_class_names(path: str | Path, folders: Sequence[str]) -> list[str]:
    """Class names from a text file: one name per line, in the sorted order of the class folders.

    Blank lines are skipped. The number of names must equal the number of class folders.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class names file not found: {path} (expected one class name per line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(folders):
        raise DataError(
            f"{path}: {len(names)} class names for {len(folders)} class folders ({', '.join(list(folders)[:5])}"
            f"{' ...' if len(folders) > 5 else ''}); expected one name per line, in sorted folder order"
        )
    return names


def clip_transforms(visual: nn.Module, augment: bool = True, crop_scale: Sequence[float] = (0.5, 1.0)):
    """(train, eval) transforms PIL -> (3, H, W) for an open_clip image tower.

    Size, mean, std and interpolation come from the tower's `preprocess_cfg` (set by
    `open_clip.create_model`), else its `image_size` and CLIP's mean/std. Eval: open_clip's
    `image_transform` (resize the shorter side, centre crop). Train with `augment` (the R-AMT
    recipe): random resized crop with `crop_scale`, horizontal flip; without: the eval transform.
    """
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform
    from torchvision import transforms as T

    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    mean, std = tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))
    interpolation = cfg.get("interpolation", "bicubic")
    eval_tf = image_transform(size, is_train=False, mean=mean, std=std, interpolation=interpolation,
                              resize_mode=cfg.get("resize_mode", "shortest"))
    if not augment:
        return eval_tf, eval_tf
    mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    train_tf = T.Compose([
        T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=mode),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    return train_tf, eval_tf

