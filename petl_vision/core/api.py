"""apply / summary / merge: the entry points every method goes through."""
from __future__ import annotations

import dataclasses

from torch import nn

from .distributed import numel_by_param, refuse_sharded, sharding, unsharded_copy, unwrap
from .errors import MergeError, UnsupportedHostError
from .registry import MethodConfig, get_method, make_config
from .state import STATE_NAME, AppliedMethod, PetlState, get_state, host_class


def apply(model: nn.Module, method: str | MethodConfig, **overrides) -> nn.Module:
    """Apply a method to `model` in place and return it.

    The first call freezes every host parameter; each method then adds its parameters and unfreezes
    what it trains (usually the classifier head). Methods compose: applying a second method keeps
    the first one's parameters trainable. Applying the same method twice is an error.

    Args:
        model: a host model (a timm model, ...).
        method: a registered method name (see `list_methods()`) or a config object.
        **overrides: config fields to change, e.g. ``apply(model, "vpt", num_prompts=50)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: `model` must be a torch.nn.Module, got {type(model).__name__}")
    refuse_sharded(model, f"apply({getattr(method, 'name', method)!r})",
                   "apply methods before sharding it (fully_shard / FullyShardedDataParallel / accelerator.prepare): "
                   "their new parameters must be inside FSDP's parameter groups", UnsupportedHostError)
    return _apply(model, make_config(method, **overrides))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _apply(model: nn.Module, config: MethodConfig, saved: dict | None = None) -> nn.Module:
    """`apply` with a config; with `saved` adapter tensors (from load_adapter) uses `attach_saved`."""
    method_cls = get_method(config.name)
    state = get_state(model)
    if state is not None and config.name in state.method_names:
        raise ValueError(f"method {config.name!r} is already applied to this model (applied: {state.method_names})")
    if state is None and hasattr(model, STATE_NAME):
        raise UnsupportedHostError(f"{type(model).__name__} already has an attribute {STATE_NAME!r}; petl_vision needs that name")
    if state is None and not any(True for _ in model.children()):
        raise UnsupportedHostError(
            f"method {config.name!r}: {type(model).__name__} is a single layer with no submodules; petl_vision adapts "
            "the layers inside a model: wrap it in an nn.Module whose forward calls it"
        )
    if state is None and isinstance(model, _CONTAINERS):
        raise UnsupportedHostError(
            f"{type(model).__name__} runs (or holds) every child module, so petl_vision cannot register its state on it; "
            "wrap it in an nn.Module whose forward calls it"
        )
    method_cls.check_host(model)

    created = state is None
    if created:
        state = PetlState(model)
        model.requires_grad_(False)
        model.add_module(STATE_NAME, state)
    before = {id(p): p.requires_grad for p in model.parameters()}
    try:
        if saved is None:
            method_cls.attach(model, config)
        else:
            method_cls.attach_saved(model, config, saved)
    except Exception:
        # Methods validate before they modify the model; undo what the core did here.
        if created:
            remove_state(model)
        else:
            for p in model.parameters():
                p.requires_grad_(before.get(id(p), False))
        raise
    params = list(model.parameters())
    added = [p for p in params if id(p) not in before]
    unfrozen = [p for p in params if id(p) in before and p.requires_grad and not before[id(p)]]
    state.applied.append(AppliedMethod(config, added, unfrozen))
    model.train(model.training)  # modules the method created follow the model's mode
    state.refresh_frozen(model)
    return model


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a model with methods applied.

    total: all parameters. trainable: those with requires_grad.
    by_method: per method, the trainable parameters it added plus the host parameters it unfroze
        (the head, biases, ...). added: per method, the parameters it added (trainable or not).
    notes: per method, an extra line the method reports (e.g. mask tuning's masked-off share).
    """

    total: int
    trainable: int
    by_method: dict[str, int]
    added: dict[str, int]
    host_class: str
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"{self.host_class}"]
        for name, count in self.by_method.items():
            lines.append(f"  {name:<12} trainable {count:>14,}  (added {self.added[name]:,})")
            if self.notes.get(name):
                lines.append(f"  {'':<12} {self.notes[name]}")
        lines.append(f"  {'trainable':<12} {self.trainable:>24,} / {self.total:,} ({self.trainable_percent:.3f}%)")
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Trainable and total parameter counts, per method. Works on any module; on a model sharded
    by FSDP the counts are global (those of the unsharded model), on every rank, with no collective
    (a method's note may read sharded tensors: call it on every rank there)."""
    model = unwrap(model)  # DDP / DataParallel
    params = list(model.parameters())
    fsdp1_numel = numel_by_param(model)  # FSDP1's original parameters are local pieces

    def numel(p) -> int:
        return fsdp1_numel.get(id(p), p.numel())  # a DTensor's numel is the global one

    state = get_state(model)
    by_method, added, notes = {}, {}, {}
    seen: set[int] = set()
    for applied in state.applied if state else []:
        owned = [p for p in applied.added + applied.unfrozen if p.requires_grad and id(p) not in seen]
        seen |= {id(p) for p in owned}
        by_method[applied.name] = sum(numel(p) for p in owned)
        added[applied.name] = sum(numel(p) for p in applied.added)
        notes[applied.name] = get_method(applied.name).summary_note(model, applied.config)
    return Summary(
        total=sum(numel(p) for p in params),
        trainable=sum(numel(p) for p in params if p.requires_grad),
        by_method=by_method,
        added=added,
        host_class=host_class(model).__name__,
        notes={k: v for k, v in notes.items() if v},
    )


def can_merge(model: nn.Module) -> bool:
    """True when every applied method can be folded into the host's weights."""
    state = get_state(model)
    return state is not None and not any(get_method(a.name).merge_blocker(model, a.config) for a in state.applied)


def merge(model: nn.Module) -> nn.Module:
    """Fold every applied method into the host's weights and remove petl_vision's state.

    The result is a plain model of the original class with the same state_dict keys and the same
    outputs (to float tolerance). Methods are merged last-applied first. Refuses, before changing
    anything, when a method cannot be merged (VPT and the side networks change the architecture),
    and on a model sharded by FSDP1 (gather first: `save_adapter` on every rank, then on one process
    `load_adapter` onto an unsharded host and merge that).

    On an FSDP2 model call it on every process: the merged model, unsharded, is returned on rank 0
    and None on the others; the sharded model is left as it was (`distributed.unsharded_copy`).
    """
    kind = sharding(model)
    if kind == "fsdp2":
        check_mergeable(model)  # on every rank, before the collective
        whole = unsharded_copy(model)
        return merge(whole) if whole is not None else None
    if kind is not None:
        raise MergeError(f"merge: the model is sharded ({kind.upper()}); gather first: pv.save_adapter(model, dir) on every "
                         "rank, then on one process pv.load_adapter(<unsharded host>, dir) and pv.merge that model")
    check_mergeable(model)
    state = get_state(model)
    for applied in reversed(state.applied):
        get_method(applied.name).merge(model, applied.config)
    remove_state(model)
    return model


def check_mergeable(model: nn.Module) -> None:
    """MergeError when no method is applied or an applied method cannot be folded into the host."""
    state = get_state(model)
    if state is None:
        raise MergeError("merge: no petl_vision method is applied to this model")
    blocking = {a.name: reason for a in state.applied if (reason := get_method(a.name).merge_blocker(model, a.config))}
    if blocking:
        reasons = "; ".join(f"{n!r}: {reason}" for n, reason in blocking.items())
        raise MergeError(f"merge: cannot fold {list(blocking)} into the host's weights ({reasons}); save it with save_adapter instead")


def forget_method(model: nn.Module, name: str) -> nn.Module:
    """Drop `name` from the applied methods after the method removed its own modules (an unload);
    the whole petl_vision state goes when no method is left. Returns `model`."""
    state = get_state(model)
    state.applied = [a for a in state.applied if a.name != name]
    if not state.applied:
        remove_state(model)
    else:
        state.refresh_frozen(model)
    return model


def remove_state(model: nn.Module) -> None:
    """Drop `model.petl`, its hook, and restore the host's requires_grad flags and train/eval mode."""
    state = get_state(model)
    state.hook_handle.remove()
    delattr(model, STATE_NAME)
    for param, flag in state.original_requires_grad:
        param.requires_grad_(flag)
    model.train(model.training)
