"""Build the host model named by a TrainConfig (timm name or the demo ViT)."""
from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn

from .config import ConfigError, TrainConfig


def build_model(cfg: TrainConfig, num_classes: int | None = None) -> nn.Module:
    """A host model before any method is applied.

    `cfg.model == "demo_vit"` builds `create_demo_vit` (backbone from assets/ when pretrained);
    any other name goes to `timm.create_model(name, pretrained=..., num_classes=..., **model_kwargs)`.
    `cfg.checkpoint` loads a local weights file through timm's pretrained loader (the classifier is
    dropped when its shape differs), so nothing is downloaded.
    """
    num_classes = num_classes if num_classes is not None else cfg.num_classes
    checkpoint = cfg.checkpoint
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {checkpoint} (expected a local .safetensors/.pth file)")
    if cfg.model == "demo_vit":
        from petl_vision.models.demo_vit import create_demo_vit

        if cfg.model_kwargs:
            raise ConfigError(f"model_kwargs {sorted(cfg.model_kwargs)} are not accepted by model 'demo_vit'")
        return create_demo_vit(
            num_classes=num_classes or 10, pretrained=cfg.pretrained or checkpoint is not None, checkpoint=checkpoint
        )
    kwargs = dict(cfg.model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if checkpoint is not None:
        return timm.create_model(cfg.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)), **kwargs)
    return timm.create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
