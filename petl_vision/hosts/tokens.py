"""The token-host interface: what host-level methods need to know about a transformer.

A token host has a sequence of blocks that map tokens (B, N, D) -> (B, N, D), where the first
`num_prefix_tokens` tokens are class/register/distillation tokens and the rest are patch tokens.
Host families register a function that recognises their models and describes them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from ..core.errors import UnsupportedHostError

_TOKEN_HOSTS: list[tuple[str, Callable[[nn.Module], "TokenHost | None"]]] = []


@dataclasses.dataclass
class TokenHost:
    """Description of a token-based model.

    blocks: the transformer blocks, in order; each maps (B, N, D) -> (B, N, D).
    dim: token width D.
    num_prefix_tokens: tokens before the patch tokens (CLS, registers, distillation).
    patch_size: (ph, pw) of the patch embedding.
    in_chans: image channels.
    norm: the final norm applied to the last block's output (None when the host has none).
    """

    blocks: list[nn.Module]
    dim: int
    num_prefix_tokens: int
    patch_size: tuple[int, int]
    in_chans: int = 3
    norm: nn.Module | None = None

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (gh, gw) of an (H, W) image: the patch tokens reshape to (B, gh, gw, D)."""
        return image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1]


def register_token_host(family: str):
    """Decorator: register `fn(model) -> TokenHost | None` for a model family."""

    def decorator(fn):
        _TOKEN_HOSTS.append((family, fn))
        return fn

    return decorator


def token_host(model: nn.Module, method: str = "this method") -> TokenHost:
    """Describe `model` as a token host or raise UnsupportedHostError naming the supported families."""
    for _, describe in _TOKEN_HOSTS:
        host = describe(model)
        if host is not None:
            return host
    families = ", ".join(family for family, _ in _TOKEN_HOSTS)
    raise UnsupportedHostError(
        f"method {method!r} needs a token-based host; got {type(model).__name__} (supported: {families})"
    )


@register_token_host("timm VisionTransformer and subclasses (ViT, DeiT, register-token and no-CLS variants)")
def _timm_vit(model: nn.Module) -> TokenHost | None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return None
    patch = model.patch_embed.patch_size
    return TokenHost(
        blocks=list(model.blocks),
        dim=model.embed_dim,
        num_prefix_tokens=model.num_prefix_tokens,
        patch_size=tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch),
        in_chans=model.patch_embed.proj.in_channels,
        norm=model.norm,
    )
