"""Per-model bookkeeping: which methods are applied, what they own, the host's fingerprint.

The state lives in a `PetlState` module registered as `model.petl`, so it travels with the model
through `.to()`, `deepcopy` and pickling. Method modules that are not wrappers (VPT's prompts, for
instance) are registered inside it: their state_dict keys start with ``petl.``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from torch import nn

from .registry import MethodConfig

STATE_NAME = "petl"

# Norm layers whose running statistics change in training mode.
_RUNNING_STAT_NORMS = (nn.modules.batchnorm._NormBase,)


@dataclasses.dataclass
class AppliedMethod:
    """One `apply` call: its config, the parameters it added and the host parameters it unfroze."""

    config: MethodConfig
    added: list[nn.Parameter]
    unfrozen: list[nn.Parameter]

    @property
    def name(self) -> str:
        return self.config.name


def host_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every tensor in the host's state_dict."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def fingerprint(shapes: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()


def host_class(model: nn.Module) -> type:
    """The model's class; for a model FSDP2's `fully_shard` re-classed (class FSDP<Name>(FSDPModule,
    <Name>)), the original class."""
    cls = type(model)
    if cls.__name__.startswith("FSDP") and any(b.__name__ == "FSDPModule" for b in cls.__bases__):
        cls = next(b for b in cls.__bases__ if b.__name__ != "FSDPModule")
    return cls


def host_class_name(model: nn.Module) -> str:
    cls = host_class(model)
    return f"{cls.__module__}.{cls.__qualname__}"


class PetlState(nn.Module):
    """Registered as `model.petl` by the first `apply`. Holds method modules and bookkeeping."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.host_class = host_class_name(model)
        self.host_shapes = host_shapes(model)
        self.original_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.applied: list[AppliedMethod] = []
        self.frozen_modules: list[nn.Module] = []
        self.hook_handle = model.register_forward_pre_hook(self._keep_frozen_in_eval)

    @property
    def method_names(self) -> list[str]:
        return [a.name for a in self.applied]

    def extra_repr(self) -> str:
        return f"methods={self.method_names}"

    def refresh_frozen(self, model: nn.Module) -> None:
        """Recompute which host modules stay in eval mode while the model trains.

        A module whose parameters are all frozen runs in eval mode (dropout off, BatchNorm statistics
        fixed), as the frozen encoder does in the VPT and IDPT code. A norm layer with running
        statistics is kept in eval mode unless all of its own parameters train (for a parametrized
        weight or bias, its stored original: SSF's scale and shift on a norm do not unfreeze it).
        Parameter-free modules (dropout, drop-path) follow their parent.
        """
        frozen: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                params = list(child.parameters())
                if params and not any(p.requires_grad for p in params):
                    frozen.append(child)
                    continue
                own = list(child.parameters(recurse=False))
                plists = child._modules.get("parametrizations")
                if plists is not None:  # parametrized tensors: their stored originals are the layer's own
                    own += [p for plist in plists.values() for p in plist.parameters(recurse=False)]
                if isinstance(child, _RUNNING_STAT_NORMS) and own and not all(p.requires_grad for p in own):
                    frozen.append(child)
                visit(child)

        visit(model)
        self.frozen_modules = frozen
        if model.training:
            self._keep_frozen_in_eval(model, ())

    def frozen_module_ids(self) -> set[int]:
        """ids of frozen modules and all their descendants."""
        return {id(m) for root in self.frozen_modules for m in root.modules()}

    def _keep_frozen_in_eval(self, model: nn.Module, args) -> None:
        if model.training:
            for module in self.frozen_modules:
                if module.training:
                    module.train(False)

    def owner_of(self, param: nn.Parameter) -> str | None:
        for applied in self.applied:
            if any(p is param for p in applied.added):
                return applied.name
        return None


def get_state(model: nn.Module) -> PetlState | None:
    state = getattr(model, STATE_NAME, None)
    return state if isinstance(state, PetlState) else None


def host_modules(model: nn.Module, exclude: list[nn.Module] = ()):
    """(name, module) pairs of the host, skipping `model.petl` and the subtrees of `exclude`."""
    skip = {id(m) for root in exclude for m in root.modules()}
    state = get_state(model)
    if state is not None:
        skip |= {id(m) for m in state.modules()}
    for name, module in model.named_modules():
        if id(module) not in skip:
            yield name, module
