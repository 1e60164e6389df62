"""Mixed precision at use: adapter parameters stay fp32 master weights, activations follow autocast.

Autocast casts the inputs of matmuls and convolutions, not of elementwise ops: a method that mixes
an fp32 parameter or input into an activation casts it here first, so the activation keeps the
autocast dtype (bf16 / fp16) instead of being promoted to fp32.
"""
from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of `device_type` ("cpu", "cuda", ...) when autocast is on there, else None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype of its device when autocast is on (and x is floating), else x."""
    dtype = autocast_dtype(x.device.type) if x.is_floating_point() else None
    return x if dtype is None else x.to(dtype)
