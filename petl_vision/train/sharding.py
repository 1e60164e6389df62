"""The trainers under FSDP2: `accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/<trainer>`.

The trainers shard the host themselves, after the method is applied and before the optimizer is
built (`maybe_shard`), one FSDP2 unit per host block (`core.distributed.block_units`, or the
classes Accelerate's `fsdp_transformer_layer_cls_to_wrap` names). Accelerate then finds an FSDP2
model and keeps it as it is (`prepare_all`). The same code runs on CPU processes (gloo, where
Accelerate itself has no FSDP: `ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true torchrun ...`).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from petl_vision.core.distributed import is_dtensor, shard_model, sharding
from petl_vision.methods._feature_cache import uses_side_network


# Accelerate FSDP options the trainers' own sharding does not carry out: refused rather than ignored.
UNSUPPORTED = {"fsdp_offload_params": "FSDP_OFFLOAD_PARAMS", "fsdp_activation_checkpointing": "FSDP_ACTIVATION_CHECKPOINTING",
               "fsdp_cpu_ram_efficient_loading": "FSDP_CPU_RAM_EFFICIENT_LOADING"}


def fsdp_requested(accelerator) -> bool:
    """Whether this run shards with FSDP: Accelerate's FSDP (version 2) or its `ACCELERATE_USE_FSDP`
    environment (what `accelerate launch` with an FSDP config sets), on more than one process."""
    if accelerator.num_processes < 2:
        return False
    if str(accelerator.distributed_type).endswith("FSDP"):
        if not getattr(accelerator, "is_fsdp2", False):
            raise ValueError("fsdp: the trainers run FSDP2 (fsdp_version: 2 in the Accelerate config, as "
                             "configs/accelerate/fsdp.yaml); FSDP1 is not supported by the trainers")
        return True
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def fsdp_settings() -> dict:
    """`class_names` and `reshard_after_forward` from Accelerate's FSDP environment (FSDP_* variables)."""
    names = [n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no")
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ValueError(f"fsdp: FSDP_VERSION={version}; the trainers run FSDP2 (fsdp_version: 2, as configs/accelerate/fsdp.yaml)")
    for key, variable in UNSUPPORTED.items():
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes"):
            raise ValueError(f"fsdp: {key}: true is not supported by the petl_vision trainers (set it to false, as "
                             "configs/accelerate/fsdp.yaml does); the frozen backbone is already sharded per block")
    return {"class_names": names or None, "reshard_after_forward": reshard}


def maybe_shard(accelerator, model: nn.Module, mixed_precision: str | None = None) -> nn.Module:
    """`model` sharded per block when `fsdp_requested(accelerator)` (in place), else as it is.
    Call it after the method is applied and before the optimizer is built (its parameters become DTensors).
    mixed_precision: "no" / "bf16" / "fp16"; None: the accelerator's."""
    if not fsdp_requested(accelerator):
        return model
    model.to(accelerator.device)
    return shard_model(model, mixed_precision=mixed_precision or accelerator.mixed_precision,
                       ignored_params=whole_parameters(model), **fsdp_settings())


def whole_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Parameters FSDP leaves whole on every process: a side network's (LST, UniPT). Small by design,
    they are averaged across processes like DDP's (`average_whole_gradients`), and the feature cache
    can run the side network alone, outside the sharded model's forward."""
    from petl_vision.methods._side import side_network

    return set(side_network(model).parameters()) if uses_side_network(model) else set()


def average_whole_gradients(model: nn.Module, accelerator) -> None:
    """On a sharded model, the mean over processes of the gradients FSDP did not reduce (plain
    tensors: `whole_parameters`). Call it once per optimizer step, before clipping."""
    if sharding(model) != "fsdp2" or accelerator.num_processes == 1:
        return
    for p in model.parameters():
        if p.requires_grad and p.grad is not None and not is_dtensor(p.grad):
            p.grad = accelerator.reduce(p.grad, reduction="mean")


def clip_grad_norm(model: nn.Module, max_norm: float, accelerator) -> torch.Tensor:
    """`accelerator.clip_grad_norm_` over the trainable parameters; on a sharded model the norm over
    the shards (summed across processes) and the whole tensors (alike on every process)."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if sharding(model) != "fsdp2":
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()  # fp16's loss scale (a no-op otherwise), as clip_grad_norm_ does
    squares = torch.zeros((), device=accelerator.device)
    for p in params:
        if is_dtensor(p.grad):
            squares = squares + p.grad.to_local().float().pow(2).sum()
    squares = accelerator.reduce(squares.reshape(1), reduction="sum").reshape(())
    for p in params:
        if not is_dtensor(p.grad):
            squares = squares + p.grad.float().pow(2).sum()
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        grad = p.grad.to_local() if is_dtensor(p.grad) else p.grad
        grad.mul_(scale.to(grad.dtype))
    return norm


def prepare_all(accelerator, model: nn.Module, *objects):
    """`accelerator.prepare(model, *objects)`; a model `maybe_shard` sharded is not wrapped again
    (Accelerate's FSDP2 keeps it; on CPU processes it is left out of `prepare`, which would wrap it in DDP)."""
    if sharding(model) == "fsdp2" and not getattr(accelerator, "is_fsdp2", False):
        if not objects:
            return (model,)
        prepared = accelerator.prepare(*objects)  # one object comes back bare, several as a tuple
        return (model, *(prepared if len(objects) > 1 else (prepared,)))
    prepared = accelerator.prepare(model, *objects)
    return prepared if objects else (prepared,)
