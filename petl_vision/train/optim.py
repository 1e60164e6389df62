"""Optimizer over the trainable parameters, and a per-step cosine schedule with linear warm-up."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig, SchedConfig


def scaled_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """`lr`, or `lr * effective_batch / 256` with lr_scaling "linear256" (the VPT rule)."""
    return cfg.lr * effective_batch / 256 if cfg.lr_scaling == "linear256" else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, effective_batch: int) -> torch.optim.Optimizer:
    """AdamW or SGD over parameters with requires_grad only.

    Weight decay is applied to parameters with 2+ dims only: biases, norm weights, SSF scales and
    shifts and the model's `no_weight_decay()` names get none (timm's grouping, as in the SSF code).
    """
    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_wd)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (did the method freeze everything?)")
    lr = scaled_lr(cfg, effective_batch)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {cfg.name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, epochs: int, steps_per_epoch: int) -> LambdaLR:
    """LambdaLR stepped once per optimizer step over `epochs * steps_per_epoch` steps.

    Warm-up: lr rises linearly to the base lr over `warmup_epochs` (first step at lr/warmup_steps);
    then cosine decay to `min_lr` at the last step ("constant" keeps the base lr after warm-up).
    """
    total = max(1, epochs * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    base_lr = optimizer.param_groups[0]["lr"]
    min_ratio = cfg.min_lr / base_lr if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
