"""Image transforms derived from a timm model's data config."""
from __future__ import annotations

import torch.nn as nn
from timm.data import create_transform, resolve_data_config


def build_transform(model: nn.Module, train: bool, augment: bool = False, input_size=None):
    """PIL image -> normalised float tensor (3, H, W) for `model`.

    Size, interpolation, mean and std come from `timm.data.resolve_data_config({}, model=model)`;
    `input_size` (int or (H, W)) overrides the size; when not given and the model was built for a
    fixed size other than its pretrained_cfg's (e.g. `img_size=32` on a ViT), the model's size wins. By default the image is resized directly to
    the input size with no crop (the SSF VTAB recipe), for training and evaluation alike. With
    `train=True, augment=True` it is timm's training pipeline (random-resized crop, flip, colour
    jitter).
    """
    cfg = resolve_data_config({}, model=model)
    size = tuple(cfg["input_size"])  # (3, H, W)
    model_size = _fixed_input_size(model)
    if input_size is None and model_size is not None and model_size != size[1:]:
        input_size = model_size  # built with img_size=... but pretrained_cfg still names the default
    if input_size is not None:
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        size = (size[0], h, w)
    common = dict(input_size=size, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])
    if train and augment:
        return create_transform(is_training=True, **common)
    # crop_pct=1 with 'squash' is a plain resize to (H, W) followed by a no-op centre crop.
    return create_transform(is_training=False, crop_pct=1.0, crop_mode="squash", **common)


def _fixed_input_size(model: nn.Module):
    """(H, W) a patch-embedding model was built for, or None when unknown or dynamic."""
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    if img_size is None or getattr(pe, "dynamic_img_size", False):
        return None
    return tuple(int(v) for v in img_size)
