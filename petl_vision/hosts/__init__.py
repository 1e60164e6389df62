"""What petl_vision knows about host model families.

- `classifier_modules(model)`: the classifier head(s) of a model (timm's `get_classifier`).
- `token_host(model)`: the token-layout interface host-level methods (VPT, ...) talk to.
"""
from . import open_clip as _open_clip  # noqa: F401  (registers open_clip's ViT tower)
from .heads import classifier_modules, unfreeze_head
from .tokens import TokenHost, register_token_host, token_host

__all__ = ["TokenHost", "classifier_modules", "register_token_host", "token_host", "unfreeze_head"]
