"""Build (train, eval) datasets from a data config: image folders, VTAB-1k lists or digits."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch.nn as nn

from .common import DataError
from .digits import load_digits_splits
from .folder import ImageFolder
from .transforms import build_transform
from .vtab import VTABList

DATA_KINDS = ("imagefolder", "vtab", "digits")


def build_datasets(data_cfg, model: nn.Module, num_classes: int | None = None):
    """Return `(train_ds, eval_ds, num_classes)` with transforms for `model` already set.

    `data_cfg` is a `DataConfig` (petl_vision.train.config) or a dict with the same keys:
      kind: "imagefolder" | "vtab" | "digits"
      imagefolder: `root` holding `<train_split>/` and `<eval_split>/` (default train/ and val/),
                   or `train_root` and `eval_root`
      vtab: `root`, `task`, `train_split` (default train800val200), `eval_split` (default test)
      digits: `test_fraction`, `seed`
      augment (bool), input_size (int | None)
    `num_classes`, when given, is checked against the labels (VTAB) or class folders.
    """
    cfg = SimpleNamespace(**data_cfg) if isinstance(data_cfg, Mapping) else data_cfg
    kind = getattr(cfg, "kind", None)
    augment = getattr(cfg, "augment", False)
    input_size = getattr(cfg, "input_size", None)
    if kind == "imagefolder":
        train_ds, eval_ds, n = image_folders(cfg)
    elif kind == "vtab":
        train_ds, eval_ds, n = _vtab(cfg, num_classes)
    elif kind == "digits":
        train_ds, eval_ds = load_digits_splits(getattr(cfg, "test_fraction", 0.3), getattr(cfg, "seed", 0))
        n = 10
    else:
        raise DataError(f"unknown data kind {kind!r} (expected one of {', '.join(DATA_KINDS)})")
    if num_classes is not None and n > num_classes:
        raise DataError(f"the data has {n} classes but num_classes is {num_classes}")
    train_ds.transform = build_transform(model, train=True, augment=augment, input_size=input_size)
    eval_ds.transform = build_transform(model, train=False, input_size=input_size)
    return train_ds, eval_ds, num_classes if num_classes is not None else n


def image_folders(cfg):
    """`(train ImageFolder, eval ImageFolder, num_classes)` of an imagefolder config, no transforms.

    `cfg` has `root` (holding `<train_split>/` and `<eval_split>/`, default train/ and val/) or
    `train_root` and `eval_root`; both folders must hold the same class names.
    """
    root = getattr(cfg, "root", None)
    train_root, eval_root = getattr(cfg, "train_root", None), getattr(cfg, "eval_root", None)
    if train_root is None or eval_root is None:
        if root is None:
            raise DataError("imagefolder data needs `root` (with train/ and val/ inside) or `train_root` and `eval_root`")
        train_root = train_root or Path(root) / (getattr(cfg, "train_split", None) or "train")
        eval_root = eval_root or Path(root) / (getattr(cfg, "eval_split", None) or "val")
    train_ds, eval_ds = ImageFolder(train_root), ImageFolder(eval_root)
    if train_ds.classes != eval_ds.classes:
        only_train = sorted(set(train_ds.classes) - set(eval_ds.classes))
        only_eval = sorted(set(eval_ds.classes) - set(train_ds.classes))
        raise DataError(
            f"class folders differ between {train_root} ({len(train_ds.classes)} classes) and {eval_root} "
            f"({len(eval_ds.classes)} classes): only in {Path(train_root).name}/: {_names(only_train)}; "
            f"only in {Path(eval_root).name}/: {_names(only_eval)}; expected the same class names in both"
        )
    return train_ds, eval_ds, len(train_ds.classes)


def _names(names: list[str], limit: int = 10) -> str:
    """`['a', 'b']`, at most `limit` of them ("... and N more"); "none" for an empty list."""
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _vtab(cfg, num_classes):
    root, task = getattr(cfg, "root", None), getattr(cfg, "task", None)
    if root is None or task is None:
        raise DataError(f"vtab data needs `root` and `task` (got root={root!r}, task={task!r})")
    train_split = getattr(cfg, "train_split", None) or "train800val200"
    eval_split = getattr(cfg, "eval_split", None) or "test"
    train_ds = VTABList(root, task, train_split, num_classes=num_classes)
    eval_ds = VTABList(root, task, eval_split, num_classes=num_classes)
    return train_ds, eval_ds, max(train_ds.num_classes, eval_ds.num_classes)
