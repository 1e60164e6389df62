"""Sparse updates of host tensors: only k chosen entries of a weight W (N entries) train.

A `SparseDelta` holds, per host tensor, ``values`` (k,) (the trainable entries), ``indices`` (k,)
(their flat row-major positions in W), ``base`` (k,) (W there before training) and
``fixed_indices`` / ``fixed_values`` / ``fixed_base`` (m,) (entries trained earlier, now frozen).

Mechanism: W is registered with ``torch.nn.utils.parametrize`` (`_Parametrization`). An access
writes the values into W's storage in place (only when they changed since the last write: once per
optimizer step in training, never in inference) and returns W itself, through `_SparseWeight` when a
gradient is recorded (its backward gathers dL/dW at the k indices with one index_select). So the
host's forward is unchanged, no dense copy of W is made, an unmerged model runs the merged model's
kernels, and gradients and optimizer state hold the k values only. Which entries train, and when, is
up to the method using this module (SaRA).

Out of place (``SparseDelta.out_of_place``, set by SaRA on an FSDP2-sharded host): an access returns
a new tensor, W with the values put at their entries (`SparseDelta.applied`), and leaves W as it is.
FSDP2 gathers W from its shards before each forward and again before the backward, so an in-place
write would not last; the copy is what the layer uses, its backward gathers dL/dW at the k positions
(index_put's backward). The cost: one dense copy of each sparsified tensor per access, kept by the
layer for its backward.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..core.state import get_state

_TENSORS = ("values", "indices", "base", "fixed_indices", "fixed_values", "fixed_base")


def _index_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.int32 if weight.numel() < 2**31 else torch.int64  # int32 halves the index memory


def _gather(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(-1)[idx]


def _put(data: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """data.flatten()[idx] = values, in place (also for non-contiguous data, e.g. channels_last)."""
    if idx.numel() == 0:  # a shape, not a value: no device sync, and no kernel for an empty selection
        return
    if values.dtype != data.dtype:
        values = values.to(data.dtype)
    if data.is_contiguous():
        data.view(-1)[idx] = values
    else:
        data[torch.unravel_index(idx.long(), data.shape)] = values


class _SparseWeight(torch.autograd.Function):
    """Returns W (already holding the values) as is; backward: dL/dvalues = dL/dW.flatten()[indices]."""

    @staticmethod
    def forward(ctx, values, weight, indices):
        ctx.save_for_backward(indices)
        return weight

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return grad.reshape(-1).index_select(0, indices), None, None  # int32 indices as they are: one kernel


class SparseDelta(nn.Module):
    """The sparse update of one host tensor of shape `shape` (see the module docstring for tensors)."""

    def __init__(self, shape, values, indices, base, fixed=None):
        super().__init__()
        self.shape = tuple(shape)
        self.values = nn.Parameter(values)
        self.register_buffer("indices", indices)
        self.register_buffer("base", base)
        fixed = fixed or (indices[:0], base[:0], base[:0])
        for name, tensor in zip(("fixed_indices", "fixed_values", "fixed_base"), fixed):
            self.register_buffer(name, tensor.clone())
        self._written: tuple | None = None  # what the last write wrote (see `stale`)
        self.out_of_place = False  # `applied` instead of `write` at each access (an FSDP2-sharded host)

    def _stamp(self, weight: torch.Tensor) -> tuple[tuple, tuple]:
        """(tensors, versions) a write reads and writes; versions are Python ints (no device sync).
        Optimizer steps, load_state_dict and re-selection each change one of them."""
        tensors = (self.values, self.indices, self.fixed_values, self.fixed_indices, weight)
        return tensors, (*(t._version for t in tensors), weight.data_ptr())

    def stale(self, weight: torch.Tensor) -> bool:
        """Whether `weight` may differ from the values at the selected entries (a write is due)."""
        if self._written is None:
            return True
        tensors, versions = self._stamp(weight)
        return versions != self._written[1] or any(a is not b for a, b in zip(tensors, self._written[0]))

    @torch.no_grad()
    def write(self, weight: torch.Tensor, restore: bool = False) -> None:
        """Write the values (or, with restore, the base) into `weight` in place.

        Through `.data`, so the version counter does not move: graphs that saved W from an earlier
        forward stay valid (the write only changes W when the optimizer changed the values).
        """
        data = weight.data
        _put(data, self.fixed_indices, self.fixed_base if restore else self.fixed_values)
        _put(data, self.indices, self.base if restore else self.values)
        self._written = None if restore else self._stamp(weight)

    def applied(self, weight: torch.Tensor) -> torch.Tensor:
        """A new tensor of W's shape: W with the fixed values and the values at their entries; W is left
        as it is. Differentiable w.r.t. the values (their gradient: dL/dW.flatten()[indices])."""
        flat = weight.detach().reshape(-1)
        if self.fixed_indices.numel():
            flat = flat.index_put((self.fixed_indices.long(),), self.fixed_values.detach().to(flat.dtype))
        return flat.index_put((self.indices.long(),), self.values.to(flat.dtype)).view(weight.shape)

    def dense_update(self, values: torch.Tensor) -> torch.Tensor:
        """The update W - W_base, dense, of shape `shape`; differentiable w.r.t. `values`."""
        flat = torch.zeros(math.prod(self.shape), dtype=values.dtype, device=values.device)
        flat = flat.index_put((self.fixed_indices.long(),), self.fixed_values - self.fixed_base)
        return flat.index_put((self.indices.long(),), values - self.base).view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, selected={self.values.numel()}, fixed={self.fixed_indices.numel()}"


def named_deltas(module: nn.Module) -> dict[str, SparseDelta]:
    """Name (relative to `module`) -> SparseDelta, for every SparseDelta under `module`."""
    return {n: m for n, m in module.named_modules() if isinstance(m, SparseDelta)}


class _Parametrization(nn.Module):
    """Registered on the host tensor; holds its SparseDelta outside the module tree (kept elsewhere)."""

    def __init__(self, delta: SparseDelta):
        super().__init__()
        self._delta = [delta]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self._delta[0]
        if delta.out_of_place:  # an FSDP2-sharded host: W is gathered from unchanged shards at each use
            return delta.applied(weight)
        if torch.compiler.is_compiling() or delta.stale(weight):  # traced graphs write unconditionally (no Python state)
            delta.write(weight)
        if delta.values.requires_grad and torch.is_grad_enabled():
            return _SparseWeight.apply(delta.values, weight, delta.indices)
        return weight  # inference: W as is, no autograd node, no kernel


def _drop_empty(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: leave out empty tensors (no fixed entries yet, ...). Empty tensors all
    share the null storage, which safetensors checkpoints (accelerate) treat as shared and drop."""
    for key in [k for k, v in state_dict.items() if k.startswith(prefix) and v.numel() == 0]:
        del state_dict[key]


def _resize_before_load(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: give every tensor the incoming shape (the selection may differ,
    e.g. when resuming a run checkpointed after a re-selection); a tensor of a delta in the
    incoming dict but missing there was empty (see `_drop_empty`)."""
    for name, delta in named_deltas(module).items():
        keys = {t: f"{prefix}{name}.{t}" for t in _TENSORS}
        if not any(k in state_dict for k in keys.values()):
            continue
        for tensor_name, key in keys.items():
            current = getattr(delta, tensor_name)
            incoming = state_dict.setdefault(key, current.new_zeros(0).detach())
            if incoming.shape != current.shape:
                current.data = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)


def _swap_parameter(model, optimizer, old: nn.Parameter, new: nn.Parameter, kept: torch.Tensor, pos_old: torch.Tensor) -> None:
    """Put `new` where `old` was: in the optimizer (state entries of kept positions carried over,
    per-entry tensors only; scalars like Adam's step kept) and in petl_vision's bookkeeping."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if state is not None:
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == old.shape and value.dim() == 1:
                    fresh = value.new_zeros(new.shape)
                    fresh[kept] = value[pos_old[kept]]
                    state[key] = fresh
            optimizer.state[new] = state
    state = get_state(model) or get_state(model.module)
    for applied in state.applied:
        applied.added = [new if p is old else p for p in applied.added]


def _lookup(sorted_idx: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(found (q,) bool, position (q,)) of each query in the sorted 1-D `sorted_idx`."""
    if sorted_idx.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool), torch.zeros_like(query)
    pos = torch.searchsorted(sorted_idx, query).clamp(max=sorted_idx.numel() - 1)
    return sorted_idx[pos] == query, pos
