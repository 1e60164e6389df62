"""The core on sharded models: FSDP2 (`fully_shard`, DTensor parameters) and FSDP1 (`use_orig_params=True`).

What works (tested on CPU with 2 gloo processes, see tests/test_fsdp.py):
- `save_adapter` called on every process gathers the trainable tensors (FSDP2:
  `DTensor.full_tensor()`; FSDP1: `summon_full_params`) and writes one adapter on rank 0, the same
  file an unsharded save of the same weights writes; every rank returns after the file exists
  (an error on rank 0 is raised on every rank). FSDP1's `summon_full_params` unshards the whole
  model on every rank for the moment of the save; FSDP2 gathers the trainable tensors alone.
- `summary` counts global numbers (FSDP2: a DTensor's numel is the global one; FSDP1: the original
  shapes recorded in each flat parameter).
- `merge` on an FSDP2 model, called on every process, returns the merged, unsharded model on rank 0
  (None elsewhere; `unsharded_copy`: gathered, copied, then merged); the sharded model is unchanged.
  On FSDP1 it refuses: gather first (save the adapter, load it onto an unsharded host, merge there).
- `load_adapter` and `apply` on a model before it is sharded; on a sharded model they refuse (the
  methods' new parameters would be outside FSDP's parameter groups: no gradient reduction).
- `push_to_hub` called on every process: gathered like `save_adapter`, uploaded from rank 0.
- `shard_model` applies FSDP2 per block (`block_units`: the host family's blocks or named classes), as
  the trainers do under `accelerate launch --config_file configs/accelerate/fsdp.yaml`.

DDP and Accelerate wrappers (`.module`) are unwrapped; their parameters are whole, so saving on
rank 0 alone (as usual) is enough, and nothing here runs a collective for them.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

FSDP1_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return None
    return DTensor


def _fsdp1_cls():
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel
    return FullyShardedDataParallel


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel (Accelerate's `prepare` wraps with these)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_dtensor(tensor) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(tensor, cls)


def is_fsdp1(model: nn.Module) -> bool:
    cls = _fsdp1_cls()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def sharding(model: nn.Module) -> str | None:
    """"fsdp2" when a parameter is a DTensor, "fsdp1" when a module is FullyShardedDataParallel, else None."""
    if is_fsdp1(model):
        return "fsdp1"
    if any(is_dtensor(p) for p in model.parameters()):
        return "fsdp2"
    return None


def clean_name(name: str) -> str:
    """A state_dict / parameter name without FSDP1's wrapper prefixes."""
    for prefix in FSDP1_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The global tensor of a DTensor (a collective: every rank calls it); any other tensor as is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def numel_by_param(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> global number of elements, for the original parameters of FSDP1 flat
    parameters (their local views hold only this rank's piece). Empty for other models."""
    cls = _fsdp1_cls()
    counts: dict[int, int] = {}
    if cls is None:
        return counts
    for module in model.modules():
        handle = getattr(module, "_handle", None) if isinstance(module, cls) else None
        if handle is not None:  # FlatParameter: _params (use_orig_params=True) and their unsharded _numels
            flat = handle.flat_param
            for param, numel in zip(getattr(flat, "_params", None) or [], flat._numels):
                counts[id(param)] = int(numel)
    return counts


def run_on_rank0(fn):
    """`fn()` on rank 0 while the other ranks wait; every rank returns its result (broadcast, so it
    must pickle), and its error, if any, is raised on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:  # sent to the other ranks, then raised here too
            error = e
    message = [None if error is None else f"{type(error).__name__}: {error}", result if error is None else None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"rank 0 failed: {message[0]}")
    return message[1]


def refuse_sharded(model: nn.Module, what: str, advice: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming `what` when `model` is sharded by FSDP."""
    kind = sharding(model)
    if kind is not None:
        raise error(f"{what}: the model is sharded ({kind.upper()}); {advice}")


def is_fsdp2_module(module: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `module` (a cheap isinstance check, fit for a forward hook)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def block_units(model: nn.Module, class_names: list[str] | tuple[str, ...] | None = None) -> list[nn.Module]:
    """The modules FSDP2 makes one shard unit each (the root unit, the model, holds the rest).

    class_names: the block classes by name (Accelerate's `fsdp_transformer_layer_cls_to_wrap`); the
    outermost modules of those classes are the units (not those of the methods' state, `model.petl`). Default, by host family: timm's `blocks`
    (ViT, EVA, DeiT; ConvNeXt `stages[i].blocks`, Swin `layers[i].blocks`), open_clip's `transformer.resblocks`,
    Point-MAE's `blocks`, a diffusers UNet's time embedding and every down / mid / up block's resnets
    and attentions. ValueError when nothing matches.
    """
    model = unwrap(model)
    if class_names:
        wanted, units = set(class_names), []
        state = getattr(model, "petl", None)  # the methods' own modules (an LST side network's blocks) are not host blocks
        inside = {id(m) for m in state.modules()} if isinstance(state, nn.Module) else set()
        for module in model.modules():  # parents come before their children
            if id(module) in inside:
                continue
            if type(module).__name__ in wanted and module is not model:
                units.append(module)
                inside.update(id(m) for m in module.modules())
        if not units:
            found = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(f"fsdp: no module of class {sorted(wanted)} in {type(model).__name__}; set "
                             f"fsdp_transformer_layer_cls_to_wrap to its block class (its classes: {found[:40]})")
        return units
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):  # diffusers UNet2DConditionModel
        units = [model.time_embedding]
        for block in [*model.down_blocks, model.mid_block, *model.up_blocks]:
            if block is not None:
                units += [*getattr(block, "resnets", []), *(getattr(block, "attentions", None) or [])]
        return units
    for owner in (model, getattr(model, "visual", None), getattr(model, "trunk", None)):
        if owner is None:
            continue
        if isinstance(getattr(owner, "blocks", None), (nn.ModuleList, nn.Sequential)):
            return list(owner.blocks)
        resblocks = getattr(getattr(owner, "transformer", None), "resblocks", None)
        if isinstance(resblocks, (nn.ModuleList, nn.Sequential)):
            return list(resblocks)
        for stages in (getattr(owner, "stages", None), getattr(owner, "layers", None)):  # ConvNeXt, Swin
            if isinstance(stages, (nn.ModuleList, nn.Sequential)) and all(hasattr(s, "blocks") for s in stages):
                return [block for stage in stages for block in stage.blocks]
    raise ValueError(f"fsdp: no block list found in {type(model).__name__} (looked for blocks, transformer.resblocks, "
                     "stages[i].blocks, layers[i].blocks, a UNet's down/mid/up blocks); name its block class with "
                     "fsdp_transformer_layer_cls_to_wrap")


def shard_model(model: nn.Module, class_names=None, mixed_precision: str = "no", reshard_after_forward: bool = True,
                ignored_params: set | None = None) -> nn.Module:
    """FSDP2 (`fully_shard`) on each of `block_units(model, class_names)`, then on the model (in place).

    Apply the methods first (`pv.apply` refuses a sharded model). ignored_params: parameters left whole
    (plain tensors, not DTensors) on every process; they must not be inside a block unit, and their
    gradients are not reduced by FSDP. mixed_precision "bf16" / "fp16":
    the gathered parameters and the compute in that dtype, gradients reduced in fp32 (as Accelerate's
    FSDP2 plugin does); "no": fp32. Needs an initialised process group (Accelerate's, torchrun's).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in dtypes:
        raise ValueError(f"fsdp: mixed_precision {mixed_precision!r}; expected one of {sorted(dtypes)}")
    param_dtype = dtypes[mixed_precision]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    units = block_units(model, class_names)
    if param_dtype is not None:  # Point-MAE's encoder and head, HST's side stems, P2P's point encoder
        norms = [name for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.affine]
        if norms:
            raise ValueError(f"fsdp: mixed_precision {mixed_precision!r} gathers the parameters in {mixed_precision}, but "
                             f"{type(unwrap(model)).__name__} has BatchNorm layers ({norms[0]}, ...): a {mixed_precision} "
                             "weight next to their fp32 running statistics fails in the forward (and a Point-MAE host would "
                             "group its points in that dtype); shard it with mixed_precision='no', or train it with DDP and "
                             "bf16 autocast (configs/accelerate/ddp.yaml)")
    ignored = set(ignored_params or ())
    inside = [u for u in units if any(p in ignored for p in u.parameters())]
    if inside:
        raise ValueError(f"fsdp: ignored parameters inside the block unit {type(inside[0]).__name__}; leave them outside the blocks")
    for unit in units:
        fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)
    return model


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _fsdp_owner(hook):
    """The torch.distributed object a hook is bound to (FSDP2's per-module state), or None."""
    for owner in (getattr(hook, "__self__", None), getattr(getattr(hook, "func", None), "__self__", None)):
        if owner is not None and type(owner).__module__.startswith("torch.distributed"):
            return owner
    return None


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """A plain, unsharded copy of an FSDP2 model on rank 0 (None on the other ranks): every rank gathers
    each parameter (a collective), rank 0 copies the module tree with the whole tensors, the original
    classes and without FSDP's hooks. The sharded model is left as it was."""
    from torch.distributed.fsdp import FSDPModule

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    memo: dict[int, object] = {}
    for p in model.parameters():
        if is_dtensor(p):
            whole = p.full_tensor()  # every rank takes part; rank 0 keeps it
            if rank0:
                memo[id(p)] = nn.Parameter(whole.detach().clone(), requires_grad=p.requires_grad)
    if not rank0:
        return None
    for module in model.modules():  # FSDP's gathered parameters (a method's cache may hold one) copy as the whole one
        state = module._get_fsdp_state() if isinstance(module, FSDPModule) else None
        for fsdp_param in getattr(getattr(state, "_fsdp_param_group", None), "fsdp_params", None) or []:
            gathered, sharded = getattr(fsdp_param, "_unsharded_param", None), getattr(fsdp_param, "sharded_param", None)
            if gathered is not None and id(sharded) in memo:
                memo[id(gathered)] = memo[id(sharded)]
    for module in model.modules():  # FSDP's states stay shared (not copied), their hooks are dropped below
        for hooks in (getattr(module, name, None) or {} for name in _HOOK_DICTS):
            for hook in hooks.values():
                owner = _fsdp_owner(hook)
                if owner is not None:
                    memo[id(owner)] = owner
    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, FSDPModule)]
    try:  # FSDP's classes refuse deepcopy: copy as the original classes
        for module, cls in swapped:
            module.__class__ = next(b for b in cls.__bases__ if b is not FSDPModule)
        copy_ = copy.deepcopy(model, memo)
    finally:
        for module, cls in swapped:
            module.__class__ = cls
    for module in copy_.modules():
        for hooks in (getattr(module, name, None) for name in _HOOK_DICTS):
            for key in [k for k, h in (hooks or {}).items() if _fsdp_owner(h) is not None]:
                del hooks[key]
    return copy_
