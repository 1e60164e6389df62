"""The classifier trainer under DeepSpeed ZeRO-2 / ZeRO-3, launched through Accelerate:
`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml scripts/train_classifier.py ...`.

Accelerate builds the DeepSpeed engine in `prepare` (the trainable parameters' fp32 master copies,
gradients and optimizer states are partitioned over the processes; under ZeRO-3 the parameters too).
What the trainer needs besides:
- CPU processes (tests): Accelerate chooses no process-group backend for DeepSpeed without a GPU;
  `accelerator_kwargs` hands it gloo (`ACCELERATE_USE_DEEPSPEED=true torchrun ...`, no ACCELERATE_USE_CPU,
  which would turn DeepSpeed off).
- `configure`: DeepSpeed clips the gradients itself: its `gradient_clipping` is the run's `clip_grad_norm`
  (a config file's other number is refused); under bf16 / fp16 the model's float inputs are cast to its
  dtype (DeepSpeed converts the weights only); methods that compute their gradients themselves or change
  parameters between steps are refused.
- `save_adapter`: on every process; the trainable tensors are the fp32 master values (whole, gathered
  under ZeRO-3), rank 0 writes one adapter.
- Checkpoints (safetensors + JSON, not DeepSpeed's pickled ones): the whole fp32 trainable tensors, and each
  process's ZeRO partitions (`optimizer_state` / `load_optimizer_state`): a run resumes exactly with the
  same stage and number of processes.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

FLAG = "ACCELERATE_USE_DEEPSPEED"


def deepspeed_requested() -> bool:
    """Whether this process was launched for DeepSpeed (`accelerate launch` with a DeepSpeed config sets
    ACCELERATE_USE_DEEPSPEED=true; torchrun sets LOCAL_RANK)."""
    return os.environ.get(FLAG, "false").lower() == "true" and int(os.environ.get("LOCAL_RANK", "-1")) != -1


def accelerator_kwargs() -> dict:
    """Extra `Accelerator(...)` arguments: on CPU processes under DeepSpeed, the gloo backend (Accelerate
    would pick none and run one process); otherwise none."""
    if not deepspeed_requested() or torch.cuda.is_available():
        return {}
    from accelerate.utils import InitProcessGroupKwargs
    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def is_deepspeed(accelerator) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run (0-3), None without DeepSpeed."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def configure(accelerator, model: nn.Module, clip_grad_norm: float | None, grad_accum_steps: int = 1) -> None:
    """Before `accelerator.prepare` of a DeepSpeed run: DeepSpeed's gradient_clipping set to
    `clip_grad_norm` (0: none) where the config leaves it to the script ('auto' / unset); refuses
    another number, another gradient_accumulation_steps than `grad_accum_steps`, methods owning the
    backward, and methods with per-step updates (`on_step`)."""
    from petl_vision.core.registry import Method, applied_methods

    plugin = accelerator.state.deepspeed_plugin
    wanted = float(clip_grad_norm or 0.0)
    if plugin.is_auto("gradient_clipping") or "gradient_clipping" not in plugin.deepspeed_config:
        plugin.deepspeed_config["gradient_clipping"] = wanted
    elif float(plugin.deepspeed_config["gradient_clipping"]) != wanted:
        raise ValueError(f"deepspeed: the DeepSpeed config's gradient_clipping is {plugin.deepspeed_config['gradient_clipping']} "
                         f"but the run's clip_grad_norm is {clip_grad_norm}; leave gradient_clipping out of the Accelerate "
                         "config (as configs/accelerate/deepspeed_zero2.yaml) or set the two alike")
    steps = plugin.deepspeed_config.get("gradient_accumulation_steps", "auto")
    if steps != "auto" and int(steps) != int(grad_accum_steps):
        raise ValueError(f"deepspeed: the DeepSpeed config's gradient_accumulation_steps is {steps} but the run's "
                         f"grad_accum_steps is {grad_accum_steps}; leave it out of the Accelerate config (as "
                         "configs/accelerate/deepspeed_zero2.yaml) or set the two alike")
    cast_inputs(model, compute_dtype(accelerator))
    for method, config in applied_methods(model):
        if method.owns_backward(config):
            raise ValueError(f"deepspeed: method {method.name} computes its gradients itself with this config (mask_tuning: "
                             "grad_dropout=true), which the DeepSpeed engine's backward does not allow; turn that option off, "
                             "or train under DDP / FSDP")
        if getattr(method.on_step, "__func__", None) is not Method.on_step.__func__:
            raise ValueError(f"deepspeed: method {method.name} changes its parameters between steps (on_step), which "
                             "DeepSpeed's partitioned fp32 copies would overwrite; train it under DDP / FSDP")
        if zero_stage(accelerator) == 3 and getattr(method.extra_loss, "__func__", None) is not Method.extra_loss.__func__:
            raise ValueError(f"deepspeed: method {method.name} adds a loss read from its parameters outside the forward, "
                             "where ZeRO-3 holds only each process's partition; use ZeRO-2 "
                             "(configs/accelerate/deepspeed_zero2.yaml) or FSDP")


def compute_dtype(accelerator) -> torch.dtype:
    """The dtype DeepSpeed gives the model: bfloat16 / float16 with its bf16 / fp16 enabled
    (Accelerate's mixed_precision), else float32."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def cast_inputs(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point tensors passed to `model`'s forward to `dtype` (a forward pre-hook):
    DeepSpeed's bf16 / fp16 convert the model's weights, not its inputs (images come as float32)."""
    if dtype == torch.float32:
        return

    def hook(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    model.register_forward_pre_hook(hook)


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a prepared one (Accelerate's wrapper; under DeepSpeed also the ZeRO
    optimizer, whose base optimizer's param_groups hold the lr): the one an LR scheduler steps."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer):
        if not hasattr(inner, "optimizer"):
            raise TypeError(f"torch_optimizer: {type(optimizer).__name__} holds no torch.optim.Optimizer")
        inner = inner.optimizer
    return inner


def _zero_optimizer(optimizer):
    """The ZeRO optimizer inside Accelerate's wrapper, and its fp32 master partitions (this process's)."""
    zero = getattr(optimizer, "optimizer", optimizer)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        if hasattr(zero, name):
            return zero, getattr(zero, name)
    raise TypeError(f"deepspeed: {type(zero).__name__} is not a ZeRO optimizer (zero_stage 1-3 expected)")


@contextlib.contextmanager
def _with_param_groups(zero):
    """ZeRO-3 lists its fp32 partitions in the base optimizer's param_groups only while it steps: listed inside."""
    if not hasattr(zero, "_set_fp32_optimizer_param_groups"):
        yield
        return
    zero._set_fp32_optimizer_param_groups()
    try:
        yield
    finally:
        zero._clear_fp32_optimizer_param_groups()


def optimizer_state(optimizer, model) -> dict:
    """This process's part of a DeepSpeed run's training state: the base optimizer's state_dict (of the fp32
    partitions), the fp32 master partitions, and the engine's step counters. Tensors only (no pickle)."""
    zero, partitions = _zero_optimizer(optimizer)
    with _with_param_groups(zero):
        base = zero.optimizer.state_dict()
    counters = {k: int(getattr(model, k, 0)) for k in ("global_steps", "global_samples", "micro_steps")}
    scaler = getattr(zero, "loss_scaler", None)  # fp16's dynamic loss scale (scale, iterations since overflow, ...)
    scale = {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))} if scaler is not None else {}
    return {"base": base, "fp32": [t.detach().to("cpu", copy=True) for t in partitions], "engine": counters,
            "loss_scaler": scale}


def load_optimizer_state(optimizer, model, state: dict, trainable: dict[str, torch.Tensor]) -> None:
    """Restore what `optimizer_state` returned (same process count and stage), and the model's copies of the
    trainable tensors from their whole fp32 values `trainable` (every process)."""
    import deepspeed

    zero, partitions = _zero_optimizer(optimizer)
    if len(partitions) != len(state["fp32"]) or any(a.shape != b.shape for a, b in zip(partitions, state["fp32"])):
        raise ValueError("deepspeed: the checkpoint's fp32 partitions do not fit this run (another model, method, stage "
                         "or process count)")
    with _with_param_groups(zero):
        zero.optimizer.load_state_dict(state["base"])
    with torch.no_grad():
        for current, saved in zip(partitions, state["fp32"]):
            current.copy_(saved)
        module = getattr(model, "module", model)
        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            for name, p in module.named_parameters():
                if p.requires_grad:
                    p.data.copy_(trainable[name].to(p.device, p.dtype))
    for key, value in state["engine"].items():
        if hasattr(model, key):
            setattr(model, key, int(value))
    scaler = getattr(zero, "loss_scaler", None)
    for key, value in state.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: whole fp32 master value} of the trainable parameters of a DeepSpeed-prepared model (the
    engine's module), on the CPU. Every process must call it (ZeRO-3 gathers)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().to("cpu", copy=True)
            for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def whole_parameters(model: nn.Module, values: dict[str, torch.Tensor] | None = None):
    """Inside, every parameter of `model` is whole (gathered under ZeRO-3, on every process) and the
    named ones hold `values` (the fp32 masters); restored on exit. Peak memory: the unsharded model."""
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        saved = {}
        try:
            named = dict(model.named_parameters())
            for name, value in (values or {}).items():
                p = named[name]
                saved[name] = p.data
                p.data = value.to(p.device)
            yield model
        finally:
            for name, data in saved.items():
                named[name].data = data


def save_adapter(accelerator, model: nn.Module, directory) -> str:
    """`pv.save_adapter` of a DeepSpeed-prepared model, on every process: the fp32 master values of the
    trainable tensors, the whole model gathered under ZeRO-3; rank 0 writes. Returns the directory."""
    import petl_vision as pv

    module = accelerator.unwrap_model(model)
    values = trainable_tensors(module)
    with whole_parameters(module, values):
        if accelerator.is_main_process:
            pv.save_adapter(module, directory)
    accelerator.wait_for_everyone()
    return str(directory)
