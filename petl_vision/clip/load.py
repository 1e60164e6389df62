"""Loading CLIP models the usual open_clip way: an architecture name plus `pretrained`.

    model, tokenizer = load_clip("ViT-B-16", pretrained="openai")          # a tag: downloads
    model, tokenizer = load_clip("ViT-B-16", pretrained="/ckpt/vit_b16.pt")  # a local file
    model, tokenizer = load_clip(model_config="configs/my_clip.json")       # your own architecture
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or Path(value).suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz")


def load_clip(model_name: str | None = None, pretrained: str | None = None, model_config: str | os.PathLike | None = None,
              device: str | torch.device = "cpu", precision: str = "fp32") -> tuple[nn.Module, object]:
    """`(model, tokenizer)` from `open_clip.create_model` and `open_clip.get_tokenizer`.

    model_name: an open_clip architecture ("ViT-B-16", ...; see `open_clip.list_models()`), or a
        "local-dir:" / "hf-hub:" identifier. Default: the stem of `model_config`.
    pretrained: an open_clip pretrained tag ("openai", "laion2b_s34b_b88k", ...; downloaded by
        open_clip), a local checkpoint file (.pt/.bin/.safetensors, loaded with weights_only), or
        None for random weights.
    model_config: a JSON architecture file ({"embed_dim", "vision_cfg", "text_cfg"}) registered with
        `open_clip.add_model_config` under its file stem, for architectures open_clip does not ship.
    Returns the model in eval mode and its tokenizer (`texts -> (N, context_length)` ids).
    """
    import open_clip

    if model_config is not None:
        path = Path(model_config)
        if not path.is_file():
            raise FileNotFoundError(f"model_config: no such file {path} (expected an open_clip JSON config with embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(path)
        model_name = model_name or path.stem
    if not model_name:
        raise ValueError("load_clip: pass model_name (an open_clip architecture such as 'ViT-B-16') or model_config")
    if isinstance(pretrained, os.PathLike):
        pretrained = str(pretrained)
    if pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained: no such checkpoint file {pretrained} (expected a local .pt/.bin/.safetensors file or an open_clip tag)")
    model = open_clip.create_model(model_name, pretrained=pretrained or None, device=device, precision=precision)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model.eval(), tokenizer
