"""Finding a model's classifier head."""
from __future__ import annotations

from torch import nn

from ..core.errors import UnsupportedHostError


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier head module(s): timm's `get_classifier()` (a tuple for distilled DeiT).

    Returns [] when the model has no such method.
    """
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return []
    head = get_classifier()
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module)]


def unfreeze_head(model: nn.Module, method: str) -> None:
    """Make the classifier head trainable; raise if the model has none we can find."""
    heads = classifier_modules(model)
    if not heads:
        raise UnsupportedHostError(
            f"method {method!r} trains the classifier head, but {type(model).__name__} has no "
            "`get_classifier()`; pass train_head=False, or use a timm model"
        )
    for head in heads:
        head.requires_grad_(True)
