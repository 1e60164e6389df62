"""Build the host model named by a TrainConfig (timm name or the demo ViT)."""
from __future__ import annotations

import difflib
import pickle
from pathlib import Path

import timm
from safetensors import SafetensorError, safe_open
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
    if checkpoint is not None and str(checkpoint).endswith(".safetensors"):
        try:  # read the header here: timm's loaders word a bad file differently from release to release
            with safe_open(str(checkpoint), "pt") as f:
                f.keys()
        except SafetensorError as e:
            raise _unreadable(checkpoint, e) from e
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
    if ":" not in cfg.model and not timm.is_model(cfg.model):  # hf-hub:... and local-dir:... go to timm
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ConfigError(f"model {cfg.model!r} is not a timm model name nor 'demo_vit'{hint}")
    try:
        if checkpoint is not None:
            return timm.create_model(cfg.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)), **kwargs)
        return timm.create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    except (TypeError, AssertionError) as e:  # a keyword the model does not take, or a value it cannot use
        if not cfg.model_kwargs:
            raise
        raise ConfigError(f"model {cfg.model!r} with model_kwargs {cfg.model_kwargs}: {e}") from e
    except (SafetensorError, pickle.UnpicklingError, EOFError) as e:
        raise _unreadable(checkpoint, e) from e


def _unreadable(checkpoint, e: Exception) -> ConfigError:
    return ConfigError(f"checkpoint {checkpoint}: not a readable weights file ({type(e).__name__}: {e}); "
                       "expected a .safetensors file or a .pth/.bin state dict")
