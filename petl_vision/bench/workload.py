"""Workloads: what the benchmark builds, feeds and differentiates for a host family.

A workload is one class registered with `@register_workload`. The harness only calls the methods
below, so a new host family (a diffusers UNet, a point-cloud transformer, ...) joins the benchmark
by adding a file under `petl_vision/bench/workloads/` (imported automatically) or any module named
with `--import`; the harness is not edited.

    @register_workload
    class UNetWorkload(Workload):
        name = "diffusers-unet"
        input_kind = "latents"
        def build_model(self): ...
        def make_batch(self, model, batch_size, device, generator): ...
        def loss(self, model, batch): ...
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..core.registry import Method

_WORKLOADS: dict[str, type["Workload"]] = {}


class Workload:
    """Base class. An instance holds the user's options for one benchmark run.

    model: a model name the workload understands (a timm name, a config preset, ...).
    model_kwargs: extra keyword arguments for building it (e.g. ``{"img_size": 32}``).
    num_classes: classes of the task head, where the host has one.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Methods whose `input_kind` equals this are benchmarked by default (see `accepts`).
    input_kind: ClassVar[str] = "image"

    def __init__(self, model: str, model_kwargs: dict | None = None, num_classes: int = 100):
        self.model = model
        self.model_kwargs = dict(model_kwargs or {})
        self.num_classes = num_classes

    def build_model(self) -> nn.Module:
        """The host model with fresh (random) weights, on the current default device."""
        raise NotImplementedError

    def build_meta_model(self) -> nn.Module:
        """The host without allocating its weights (device 'meta'), to check which methods fit it."""
        try:
            with torch.device("meta"):
                return self.build_model()
        except Exception:  # a builder that cannot run on meta: build it for real
            return self.build_model()

    def make_batch(self, model: nn.Module, batch_size: int, device: torch.device, generator: torch.Generator) -> Any:
        """Random inputs (and targets) of one step, already on `device`."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of one forward pass."""
        raise NotImplementedError

    def infer(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """One inference forward pass (called under torch.inference_mode)."""
        raise NotImplementedError

    def feeds(self, method: type[Method]) -> bool:
        """Whether this workload's inputs are what `method`'s adapted model takes."""
        return method.input_kind == self.input_kind

    def accepts(self, method: type[Method], model: nn.Module) -> bool:
        """Whether `method` is benchmarked by default on `model` (a meta-device build)."""
        return self.feeds(method) and method.supports(model)


def register_workload(cls: type[Workload]) -> type[Workload]:
    """Class decorator adding a workload under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a workload needs a `name`")
    if cls.name in _WORKLOADS and _WORKLOADS[cls.name] is not cls:
        raise ValueError(f"workload {cls.name!r} is already registered by {_WORKLOADS[cls.name].__name__}")
    _WORKLOADS[cls.name] = cls
    return cls


def list_workloads() -> list[str]:
    """Names of every registered workload, sorted."""
    return sorted(_WORKLOADS)


def get_workload(name: str) -> type[Workload]:
    try:
        return _WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; registered workloads: {', '.join(list_workloads())}") from None
