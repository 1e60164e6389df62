"""Baselines run through the same API: `linear` (head only), `full` (everything), `bitfit` (biases + head).

Merging any of them is trivial (they add nothing), so `merge` just removes petl_vision's state.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..core.registry import Method, MethodConfig, register_method
from ..core.state import host_modules
from ..core.errors import UnsupportedHostError
from ..hosts import classifier_modules, unfreeze_head


@dataclasses.dataclass
class LinearConfig(MethodConfig):
    """Linear probing: only the classifier head trains."""

    name = "linear"


@dataclasses.dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter trains."""

    name = "full"


@dataclasses.dataclass
class BitFitConfig(MethodConfig):
    """BitFit: every bias of the host trains, and the classifier head.

    train_head: train the classifier head too.
    """

    name = "bitfit"
    train_head: bool = True


@register_method
class Linear(Method):
    name = "linear"
    config_class = LinearConfig
    mergeable = True

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        heads = classifier_modules(model)
        if heads and not any(True for head in heads for _ in head.parameters()):
            raise UnsupportedHostError(
                f"method 'linear' trains only the classifier head, but {type(model).__name__}'s head "
                f"({', '.join(type(h).__name__ for h in heads)}) has no parameters; create the model with num_classes > 0"
            )

    @classmethod
    def attach(cls, model: nn.Module, config: LinearConfig) -> None:
        unfreeze_head(model, cls.name)


@register_method
class Full(Method):
    name = "full"
    config_class = FullConfig
    mergeable = True

    @classmethod
    def attach(cls, model: nn.Module, config: FullConfig) -> None:
        model.requires_grad_(True)


@register_method
class BitFit(Method):
    name = "bitfit"
    config_class = BitFitConfig
    mergeable = True

    @classmethod
    def attach(cls, model: nn.Module, config: BitFitConfig) -> None:
        for _, module in host_modules(model):
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
        if config.train_head:
            unfreeze_head(model, cls.name)
