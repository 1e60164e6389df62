"""Helpers shared by module-level methods: wrapper base class and target selection."""
from __future__ import annotations

import re

from torch import nn

from ..core.state import host_modules
from ..hosts import classifier_modules


class WrapperLayer(nn.Module):
    """A layer wrapping `base`. Attributes it lacks (``weight``, ``in_features``, ...) come from `base`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)


def select_targets(model: nn.Module, accept, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of host modules outside the classifier head for which `accept(module)` holds.

    pattern: optional regular expression searched in the module name to narrow the selection.
    Wrappers placed by a method are never selected themselves; the layers they wrap can be (LoRA
    on a linear that SSF wraps).
    """
    regex = re.compile(pattern) if pattern else None
    return [
        (name, module)
        for name, module in host_modules(model, exclude=classifier_modules(model))
        if not isinstance(module, WrapperLayer) and accept(module) and (regex is None or regex.search(name))
    ]
