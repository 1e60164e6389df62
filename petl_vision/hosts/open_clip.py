"""open_clip's ViT image tower as a token host.

`open_clip.transformer.VisionTransformer` (the `visual` of open_clip CLIP models):
conv1 (patch conv, no bias) -> class embedding + positional embedding -> ln_pre ->
transformer.resblocks (nn.MultiheadAttention with a fused `in_proj_weight`, MLP c_fc/c_proj) ->
ln_post -> pool (class token) -> proj. One prefix token: the class embedding.

Recognised as the model itself, or as `model.visual` (an open_clip `CLIP` / `CustomTextCLIP`, or
petl_vision's `CLIPClassifier`), so host-level methods can be applied to either.

Layout: open_clip runs its blocks on (N, L, D) when `transformer.batch_first` is True (the default
of open_clip >= 2.23) and on (L, N, D) otherwise. Host-level methods see (B, N, D) tokens, so a
tower built with batch_first=False is switched to batch-first in place when it is described
(`transformer.batch_first` and every block's `attn.batch_first` set to True): the computation is
the same, only where the transposes happen changes.
"""
from __future__ import annotations

import torch
from torch import nn

from .tokens import TokenHost, register_token_host


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The open_clip VisionTransformer of `model` (the model itself or `model.visual`), or None."""
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # open_clip not installed: no open_clip models to describe
        return None
    if isinstance(model, VisionTransformer):
        return model
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, VisionTransformer) else None


def vision_towers(model: nn.Module) -> list[nn.Module]:
    """Every open_clip VisionTransformer inside `model` (the model itself included)."""
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, VisionTransformer)]


@torch.no_grad()
def fold_patch_shift(tower: nn.Module, shift: torch.Tensor) -> None:
    """Fold a per-channel shift (C,) of `conv1`'s output into the tower's positional embedding.

    open_clip adds `positional_embedding` (1 + gh*gw, C) right after conv1 (row 0 to the class
    token): adding `shift` to rows 1: gives the same tokens with no bias on conv1.
    """
    tower.positional_embedding[1:] += shift.to(tower.positional_embedding.dtype)


def attention_pool_linears(model: nn.Module) -> list[nn.Linear]:
    """q/k/v/c projections of open_clip's ResNet attention pools in `model`.

    `AttentionPool2d.forward` passes their `weight` and `bias` to F.multi_head_attention_forward
    without calling the layers.
    """
    try:
        from open_clip.modified_resnet import AttentionPool2d
    except ImportError:
        return []
    return [getattr(m, name) for m in model.modules() if isinstance(m, AttentionPool2d) for name in ("q_proj", "k_proj", "v_proj", "c_proj")]


def make_batch_first(tower: nn.Module) -> None:
    """Switch a tower built with batch_first=False to batch-first blocks; outputs are unchanged."""
    transformer = tower.transformer
    if getattr(transformer, "batch_first", True):
        return
    for block in transformer.resblocks:
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention):
            attn.batch_first = True
    transformer.batch_first = True


@register_token_host("open_clip VisionTransformer (an open_clip CLIP's `visual`, or a model with it as `.visual`)")
def _open_clip_vit(model: nn.Module) -> TokenHost | None:
    tower = vision_tower(model)
    if tower is None:
        return None
    make_batch_first(tower)
    # ln_post normalises the last block's tokens unless it runs after an attentional pooler or
    # after pooling (final_ln_after_pool); then there is no per-token final norm to report.
    per_token_norm = tower.attn_pool is None and not tower.final_ln_after_pool
    return TokenHost(
        blocks=list(tower.transformer.resblocks),
        dim=tower.transformer.width,
        num_prefix_tokens=1,
        patch_size=tuple(tower.patch_size),
        in_chans=tower.conv1.in_channels,
        norm=tower.ln_post if per_token_norm else None,
    )
