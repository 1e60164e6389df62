"""Method registry: a method is one class in one file under `petl_vision/methods/`.

A method declares its name, its config dataclass, whether it can be merged, and three hooks:
`check_host` (raise if the model is unsupported), `attach` (add parameters, mark trainable ones) and
`merge` (fold itself into the host's weights). Training hooks (`extra_loss`, `owns_backward` /
`backward`, `on_step`, `epoch_metrics`) let a method take part in the training loops of
`petl_vision.train` without the loops naming it; their defaults do nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .errors import ConfigError, UnknownMethodError

_METHODS: dict[str, type["Method"]] = {}


@dataclasses.dataclass
class MethodConfig:
    """Base of every method config. Subclasses are dataclasses whose field docs are the user docs.

    `name` (a class variable) is the registered method name the config belongs to.
    """

    name: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Method:
    """Base class of a method. Subclasses override the class attributes and the hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = False
    merge_refusal: ClassVar[str] = "it changes the architecture"
    # What the adapted model takes as input: "image" (B, C, H, W) for classifiers; other kinds
    # ("points", "latents", ...) are tested by their own test files, not by the generic image tests.
    input_kind: ClassVar[str] = "image"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """True when `check_host` accepts the model."""
        try:
            cls.check_host(model)
        except (TypeError, ValueError):
            return False
        return True

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        """Raise UnsupportedHostError when the method cannot run on `model`. Default: any model."""

    @classmethod
    def attach(cls, model: nn.Module, config: MethodConfig) -> None:
        raise NotImplementedError

    @classmethod
    def summary_note(cls, model: nn.Module, config: MethodConfig) -> str:
        """An extra line for `pv.summary` (mask tuning: the share of weights masked off)."""
        return ""

    @classmethod
    def attach_saved(cls, model: nn.Module, config: MethodConfig, saved: dict) -> None:
        """Attach for `load_adapter`, given the saved adapter tensors (state_dict names -> tensors).

        Override when what `attach` creates depends on data the file holds (SaRA's selected entries
        depend on the weights at training time). Also called on a meta-device copy of the model
        during the load's dry run, where tensor values are unavailable: read shapes, not values,
        of the model's tensors there. Default: `attach`.
        """
        cls.attach(model, config)

    @classmethod
    def merge_blocker(cls, model: nn.Module, config: MethodConfig) -> str | None:
        """Why this application cannot be merged, or None when it can. `pv.merge` asks every applied
        method before merging any. Default: `merge_refusal` unless the method is `mergeable`."""
        return None if cls.mergeable else cls.merge_refusal

    @classmethod
    def merge(cls, model: nn.Module, config: MethodConfig) -> None:
        """Fold the method into the host's weights. Only called when `merge_blocker` returned None."""

    # ---- training hooks, called by the training loops for every applied method (model: unwrapped)

    @classmethod
    def extra_loss(cls, model: nn.Module, config: MethodConfig) -> torch.Tensor | None:
        """A 0-dim term added to the task loss at every training step, or None. Default: None."""
        return None

    @classmethod
    def owns_backward(cls, config: MethodConfig) -> bool:
        """True when `backward` computes the gradients itself. The loop then hands it a frozen copy
        of the model made before the method was applied (`TrainStep.reference`), runs the step
        without gradient synchronisation and averages the gradients across processes itself.
        At most one applied method may own the backward. Default: False."""
        return False

    @classmethod
    def backward(cls, model: nn.Module, config: MethodConfig, loss: torch.Tensor, step: "TrainStep") -> None:
        """Set (add to) the .grad of the trainable parameters from `loss` (task loss + extra losses).
        Only called when `owns_backward(config)` is True."""
        raise NotImplementedError(f"method {cls.name!r} owns the backward but does not implement `backward`")

    @classmethod
    def on_step(cls, model: nn.Module, config: MethodConfig, optimizer, step: int, total_steps: int) -> dict | None:
        """Called after each optimizer step; `step` counts the steps taken (1 after the first) of
        `total_steps`. May change the trainable parameters if it updates `optimizer` to match.
        Returns what the loop should report for this step (SaRA: its re-selection counts), or None."""

    @classmethod
    def epoch_metrics(cls, model: nn.Module, config: MethodConfig) -> dict[str, float]:
        """Numbers added to each epoch's metrics record (mask tuning: masked_fraction). Default: none."""
        return {}


@dataclasses.dataclass
class TrainStep:
    """One training batch as a loop hands it to `Method.backward`."""

    inputs: Any  # the model's input batch, e.g. images (B, C, H, W)
    outputs: torch.Tensor  # the model's outputs on it, e.g. logits (B, num_classes)
    step: int  # optimizer steps taken before this batch
    seed: int  # the run's seed: seed random draws with (seed, step) so that every process draws the same
    backward: Callable  # backward(loss, **kwargs): accelerator.backward, or Tensor.backward
    reference: nn.Module | None = None  # frozen copy of the model made before the method was applied


def applied_methods(model: nn.Module) -> list[tuple[type[Method], MethodConfig]]:
    """(method class, config) of every method applied to `model` (or to the model a DDP /
    accelerate wrapper holds as `.module`), in the order applied; [] for a plain model."""
    from .state import get_state  # state imports this module

    state = get_state(model)
    if state is None and isinstance(getattr(model, "module", None), nn.Module):
        state = get_state(model.module)
    return [(get_method(a.name), a.config) for a in state.applied] if state is not None else []


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under `cls.name`."""
    if not cls.name or cls.config_class.name != cls.name:
        raise ValueError(f"{cls.__name__}: `name` must be set and equal to its config's name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {_METHODS[cls.name].__name__}")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())}") from None


def get_config_class(name: str) -> type[MethodConfig]:
    return get_method(name).config_class


def make_config(name_or_config: str | MethodConfig, **overrides) -> MethodConfig:
    """A config from a method name (its defaults) or a config object, with field overrides.

    Every field is checked against its annotation (bool, int, float, str, X | None, tuple[X, ...]):
    ints may be given as integral floats (8.0) and floats as strings ("1e-3"); lists become tuples.
    Unknown fields and wrong types raise ConfigError naming the method, the field and the type.
    """
    if isinstance(name_or_config, MethodConfig):
        config_class, base = type(name_or_config), name_or_config
    elif isinstance(name_or_config, str):
        config_class, base = get_config_class(name_or_config), None
    else:
        raise ConfigError(f"expected a method name or a MethodConfig, got {type(name_or_config).__name__}")
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{config_class.__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
    values = {name: getattr(base, name) for name in fields} if base is not None else {}
    values.update(overrides)
    values = {name: check_field(config_class, name, value) for name, value in values.items()}
    return config_class(**values)


def config_from_dict(name: str, values: dict) -> MethodConfig:
    """Rebuild a config saved with `to_dict` (lists become tuples; every field type-checked)."""
    if not isinstance(values, dict):
        raise ConfigError(f"method {name!r}: the config must be a mapping of field -> value, got {type(values).__name__}")
    return make_config(name, **values)


@functools.cache
def _field_types(config_class: type[MethodConfig]) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def check_field(config_class: type[MethodConfig], field: str, value: Any) -> Any:
    """`value` converted to the annotated type of `config_class.field`; ConfigError when it cannot be."""
    annotation = _field_types(config_class).get(field, Any)
    try:
        return _convert(annotation, value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"method {config_class.name!r}: field {field!r} must be {_type_name(annotation)}, got {value!r} ({type(value).__name__})"
        ) from None


def _convert(annotation: Any, value: Any) -> Any:
    """`value` as `annotation`; raises TypeError / ValueError when it does not fit."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value)
            except (TypeError, ValueError):
                pass
        raise TypeError(value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(value)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise TypeError(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(value)
            items = [_convert(a, v) for a, v in zip(args, value)]
        else:
            items = [_convert(args[0], v) for v in value] if args else list(value)
        return origin(items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # "8", "8.0", "1e3"
            number = float(value)
            if number.is_integer():
                return int(number)
            raise ValueError(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(value)
    if annotation is float:
        if isinstance(value, str):
            value = float(value)
            if math.isnan(value):
                raise ValueError(value)
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise TypeError(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise TypeError(value)
    return value


_NAMES = {int: ("an integer", "integers"), float: ('a number (or a string such as "1e-3")', "numbers"),
          bool: ("true or false", "booleans"), str: ("a string", "strings")}


def _type_name(annotation: Any, plural: bool = False) -> str:
    """'an integer', 'a string or None', 'a list of integers', ... for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a, plural) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)}: " + ", ".join(_type_name(a) for a in args)
        return f"a list of {_type_name(args[0], plural=True)}" if args else "a list"
    if annotation in _NAMES:
        return _NAMES[annotation][plural]
    return getattr(annotation, "__name__", str(annotation))
