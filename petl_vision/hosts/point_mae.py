"""The point-cloud transformer (petl_vision.models.point_mae.PointTransformer) as a token host.

Its blocks take `block(x, pos=pos)`: hooks that insert tokens after CLS (VPT) leave `pos` as it is,
and the block gives the inserted tokens position 0. A "patch" is a group of `group_size` points,
so `patch_size` is (group_size, 1): VPT's init bound sqrt(6 / (3 * group_size + dim)) then uses
the tokenizer's fan-in (3 coordinates x M points), as the image bound does (3 x ph x pw).
"""
from __future__ import annotations

from torch import nn

from .tokens import TokenHost, register_token_host


@register_token_host("petl_vision PointTransformer (Point-MAE / Point-BERT point clouds)")
def _point_transformer(model: nn.Module) -> TokenHost | None:
    from ..models.point_mae import PointTransformer

    if not isinstance(model, PointTransformer):
        return None
    return TokenHost(
        blocks=list(model.blocks),
        dim=model.dim,
        num_prefix_tokens=model.num_prefix_tokens,
        patch_size=(model.group_size, 1),
        in_chans=3,
        norm=model.norm,
    )
