"""Machine-independent cost of one training step: bytes saved for backward and aten op counts.

These do not depend on the machine's speed or load, so tests can assert them as ratios to full
fine-tuning of the same model and batch; on a GPU they predict the peak-memory and launch-overhead
ratios that `scripts/benchmark.py` measures.

- `saved_bytes`: bytes of every distinct storage autograd keeps for backward during the forward
  (`torch.autograd.graph.saved_tensors_hooks`), counted once per storage. The model's own
  parameters and buffers are left out (they are memory with or without training); copies made
  of them (autocast's bf16 weight casts, folded weights) count.
- `op_counts`: aten operators the profiler sees in forward + backward + optimizer step.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable

import torch
from torch import nn


def _autocast(dtype: torch.dtype | None, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, fake)
        return None
    return storage.data_ptr(), storage.nbytes()


def saved_bytes(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the distinct storages saved for backward by `loss_fn(model)` (a scalar loss).

    Runs the forward under autocast with `autocast_dtype` (None: no autocast) and the backward,
    so methods that save during backward are exercised too; gradients are left in `.grad`.
    """
    own = {key for key in map(_storage_key, (*model.parameters(), *model.buffers())) if key is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in own and key[0] != 0:
            seen[key[0]] = max(seen.get(key[0], 0), key[1])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with _autocast(autocast_dtype):
            loss = loss_fn(model)
    loss.backward()
    return sum(seen.values())


def op_counts(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], autocast_dtype: torch.dtype | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> Counter:
    """aten operator name -> calls in one step: forward (under autocast), backward, optimizer step.

    Every aten event the profiler records counts, nested ones too (`aten::linear` and the
    `aten::addmm` it calls), so compare counts of one model between methods, not across models.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with _autocast(autocast_dtype):
            loss = loss_fn(model)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
