"""SaRA: progressive sparse low-rank adaptation (Hu et al., 2024), on any PyTorch model.

Only the "ineffective" entries of the host's weights train: those with |W| below a threshold
(official default 2e-3), or the smallest `fraction` of each tensor. Per host tensor W (N entries,
k selected) the method keeps, in ``model.petl.sara.<parameter name>``:

- ``values`` (k,): the trainable entries, initialised to W at the selected positions;
- ``indices`` (k,): their flat (row-major) positions in W; ``base`` (k,): W there before training;
- ``fixed_indices`` / ``fixed_values`` / ``fixed_base`` (m,): entries trained before a progressive
  re-selection and no longer selected; they keep their learned values, frozen.

Unstructured backpropagation (the paper's memory trick, as the official optimizer does it; the
mechanism lives in `_sparse`): W is registered with ``torch.nn.utils.parametrize``; every access
writes the values into W's storage in place and returns W itself, whose backward gathers the dense
gradient at the k positions. So the host's forward is unchanged, no dense copy of W is made, and
gradients and optimizer state exist for the k values only. Everything outside the selection stays
bit-identical.

The classifier head of a timm model is not sparsified: it trains fully (`train_head`), as with the
other methods. `merge` writes the values into W and removes the parametrizations (a plain model with
the original state_dict keys); `unload` restores the base weights instead.

Under FSDP2 (`fully_shard` after `pv.apply`): FSDP2 gathers W from its shards before every forward and
again before the backward, so an in-place write would not last. On a sharded host each access returns
W with the values put in, out of place (`SparseDelta.applied`; the forward pre-hook switches the
deltas when the model is an FSDP2 module), and the host's shards keep the base weights (its
state_dict too: the trained values live in ``petl.sara``, sharded like any trainable tensor). The
cost: a dense copy of each sparsified tensor per forward, held until its backward. Progressive
re-selection, unload and SaRA's own merge refuse a sharded model; `pv.merge` on every process
merges an unsharded copy on rank 0 (core.distributed.unsharded_copy).
"""
from __future__ import annotations

import dataclasses
import re
import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.api import forget_method
from ..core.distributed import full_tensor, is_dtensor, is_fsdp2_module
from ..core.errors import AdapterMismatchError, UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state, host_modules
from ..hosts import classifier_modules, unfreeze_head
from ._sparse import (
    _TENSORS, SparseDelta, _drop_empty, _gather, _index_dtype, _lookup, _Parametrization, _resize_before_load,
    _swap_parameter, named_deltas,
)
from ._wrap import WrapperLayer, runs_fused_qkv


@dataclasses.dataclass
class SaRAConfig(MethodConfig):
    """Config of SaRA.

    threshold: entries with |W| < threshold train (official default 2e-3; roughly the smallest
        10-20% of a Stable Diffusion UNet). Official learning rate rule: 1e-3 * exp(-350 * threshold).
    fraction: if set, train the smallest `fraction` (0 < f < 1) of the entries of every eligible
        tensor instead of using `threshold`.
    target_params: regular expression searched in the full parameter name (``down_blocks.0.
        attentions.0.proj_in.weight``) to restrict the eligible tensors (default: all).
    module_types: class names (matched along the MRO, e.g. "Linear", "Conv2d") of the modules whose
        parameters are eligible (default: every module). Default eligibility is every parameter of
        the model outside the classifier head, as in the official code.
    rank_weight: weight of the nuclear-norm regulariser on the sparse update of one randomly chosen
        2-D tensor per step (paper: 5e-4); see `regularization_loss`.
    rank_min_dim: only 2-D tensors with min(shape) > rank_min_dim are regularised (official: 64).
    official_regularizer_defect: reproduce the official default optimizer, where the regulariser's
        gradient lands on a tensor the optimizer does not hold, so it has no effect.
    progressive_fraction: re-select the trainable entries after this fraction of the training steps
        (paper: half); None: never. See `reselect_step` and `reselect`.
    progressive_step: re-select after this absolute step instead (overrides progressive_fraction).
    official_reselection: re-select as the official optimizer does: before the update of the
        progressive step, with the optimizer state of every trainable entry reset, and that step's
        update skipped. Default: after that step's update, keeping the state (moments, step count)
        of the entries that stay selected.
    train_head: train the classifier head fully; None: when the model has one (timm classifiers).
    """

    name = "sara"
    threshold: float = 2e-3
    fraction: float | None = None
    target_params: str | None = None
    module_types: tuple[str, ...] = ()
    rank_weight: float = 5e-4
    rank_min_dim: int = 64
    official_regularizer_defect: bool = False
    progressive_fraction: float | None = 0.5
    progressive_step: int | None = None
    official_reselection: bool = False
    train_head: bool | None = None

    def __post_init__(self):
        if self.fraction is None and not self.threshold > 0:
            raise ValueError(f"SaRAConfig.threshold must be > 0, got {self.threshold}")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"SaRAConfig.fraction must be in (0, 1) or None, got {self.fraction}")
        if self.progressive_fraction is not None and not 0 < self.progressive_fraction < 1:
            raise ValueError(f"SaRAConfig.progressive_fraction must be in (0, 1) or None, got {self.progressive_fraction}")
        if self.rank_weight < 0:
            raise ValueError(f"SaRAConfig.rank_weight must be >= 0, got {self.rank_weight}")


def select_entries(weight: torch.Tensor, config: SaRAConfig) -> torch.Tensor:
    """Sorted flat indices (k,) of the entries of `weight` that train under `config`."""
    magnitude = weight.detach().reshape(-1).abs()
    if config.fraction is not None:
        k = int(round(config.fraction * magnitude.numel()))
        idx = torch.topk(magnitude, k, largest=False, sorted=False).indices.sort().values
    else:
        idx = torch.nonzero(magnitude < config.threshold).squeeze(1)
    return idx.to(_index_dtype(weight))


def select_delta(weight: torch.Tensor, config: SaRAConfig) -> SparseDelta:
    """A SparseDelta over the entries `select_entries` picks; values and base (k,) start at W there."""
    idx = select_entries(weight, config)
    base = _gather(weight, idx).clone()
    return SparseDelta(weight.shape, base.clone(), idx, base)


class SaRAModule(nn.Module):
    """``model.petl.sara``: the SparseDelta of every selected host tensor, under the tensor's own name."""

    def __init__(self, config: SaRAConfig):
        super().__init__()
        self.config = config
        self.register_load_state_dict_pre_hook(_resize_before_load)
        self.register_state_dict_post_hook(_drop_empty)

    def add(self, name: str, delta: SparseDelta) -> None:
        node = self
        *path, leaf = name.split(".")
        for part in path:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(leaf, delta)

    def deltas(self) -> dict[str, SparseDelta]:
        """Host parameter name -> its SparseDelta."""
        return named_deltas(self)


# Modules of a peft LoRA that diffusers' `pipe.load_lora_weights` injects around a layer (kept as `base_layer`).
_PEFT_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout")


def host_name(module_name: str) -> str | None:
    """`module_name` as on the model without peft LoRA layers (``to_q.base_layer`` -> ``to_q``); None for a
    module of the LoRA itself (lora_A, lora_B, ...): SaRA sparsifies the host's weights, not a loaded LoRA."""
    parts = module_name.split(".") if module_name else []
    if any(p in _PEFT_PARTS for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def eligible_parameters(model: nn.Module, config: SaRAConfig, frozen_only: bool = True) -> list[tuple[str, nn.Module, str]]:
    """(full name, owning module, attribute name) of the tensors SaRA may sparsify.

    Names are those of the model without peft LoRA layers (`host_name`), so a SaRA adapter fits its UNet
    with or without a diffusers LoRA loaded; the LoRA's own tensors are never eligible.
    """
    regex = re.compile(config.target_params) if config.target_params else None
    out, seen = [], set()
    for module_name, module in host_modules(model, exclude=classifier_modules(model)):
        if isinstance(module, (WrapperLayer, parametrize.ParametrizationList)) or ".parametrizations" in f".{module_name}":
            continue
        if config.module_types and not any(c.__name__ in config.module_types for c in type(module).__mro__):
            continue
        module_name = host_name(module_name)
        if module_name is None:
            continue
        for attr, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{attr}" if module_name else attr
            if id(param) in seen or not param.is_floating_point() or (frozen_only and param.requires_grad):
                continue
            if regex is None or regex.search(full):
                seen.add(id(param))
                out.append((full, module, attr))
    return out


def _register(model: nn.Module, config: SaRAConfig, deltas: dict[str, SparseDelta]) -> None:
    """Add the deltas under model.petl.sara and parametrize their host tensors; unfreeze the head."""
    owners = {name: (module, attr) for name, module, attr in eligible_parameters(model, config)}
    orders = {id(owner): list(owner._parameters) for owner, _ in owners.values()}
    module = SaRAModule(config)
    get_state(model).add_module("sara", module)
    for name, delta in deltas.items():
        owner, attr = owners[name]
        delta.param_order = orders[id(owner)]  # the owner's parameter order, restored on merge / unload
        module.add(name, delta)
        parametrize.register_parametrization(owner, attr, _Parametrization(delta), unsafe=True)
    module.hook = model.register_state_dict_pre_hook(_write_all)
    module.fuse_guard = model.register_forward_pre_hook(_before_forward)
    heads = classifier_modules(model)
    if config.train_head or (config.train_head is None and heads):
        unfreeze_head(model, "sara")


@register_method
class SaRA(Method):
    name = "sara"
    config_class = SaRAConfig
    mergeable = True

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        if not eligible_parameters(model, SaRAConfig(), frozen_only=False):
            raise UnsupportedHostError(f"method 'sara' found no floating-point parameter outside the head of {type(model).__name__}")

    @classmethod
    def attach(cls, model: nn.Module, config: SaRAConfig) -> None:
        targets = eligible_parameters(model, config)
        deltas = {}
        for name, owner, attr in targets:
            delta = select_delta(getattr(owner, attr), config)
            if delta.values.numel():
                deltas[name] = delta
        if not deltas:
            rule = f"fraction={config.fraction}" if config.fraction is not None else f"threshold={config.threshold}"
            raise UnsupportedHostError(
                f"sara: {rule} selects no entry of the {len(targets)} eligible tensors of {type(model).__name__} "
                f"(target_params={config.target_params!r}, module_types={config.module_types}); raise the threshold"
            )
        _register(model, config, deltas)

    @classmethod
    def attach_saved(cls, model: nn.Module, config: SaRAConfig, saved: dict) -> None:
        """Take the selection from the saved tensors (on a meta-device model: their shapes only)."""
        prefix = "petl.sara."
        names = sorted({k[len(prefix):].rsplit(".", 1)[0] for k in saved if k.startswith(prefix)})
        owners = {name: (module, attr) for name, module, attr in eligible_parameters(model, config)}
        unknown = [n for n in names if n not in owners]
        if unknown:
            raise AdapterMismatchError(f"sara: the adapter sparsifies {unknown[:5]}, which this model has no eligible tensor named so")
        deltas = {}
        for name in names:
            weight = getattr(*owners[name])
            index_dtype = _index_dtype(weight)
            tensors = {t: saved.get(f"{prefix}{name}.{t}", weight.new_zeros(0, dtype=index_dtype if "indices" in t else None))
                       for t in _TENSORS}
            if weight.is_meta:
                tensors = {t: torch.empty(v.shape, dtype=v.dtype, device="meta") for t, v in tensors.items()}
            else:
                tensors = {t: v.to(weight.device, weight.dtype if v.is_floating_point() else v.dtype) for t, v in tensors.items()}
                _check_base(name, weight, tensors)
            fixed = (tensors["fixed_indices"], tensors["fixed_values"], tensors["fixed_base"])
            deltas[name] = SparseDelta(weight.shape, tensors["values"].clone(), tensors["indices"].clone(), tensors["base"].clone(), fixed)
        _register(model, config, deltas)

    @classmethod
    def merge(cls, model: nn.Module, config: SaRAConfig) -> None:
        _remove(model, restore=False)

    @classmethod
    def extra_loss(cls, model: nn.Module, config: SaRAConfig) -> torch.Tensor:
        """The nuclear-norm regulariser, `regularization_loss`."""
        return regularization_loss(model)

    @classmethod
    def on_step(cls, model: nn.Module, config: SaRAConfig, optimizer, step: int, total_steps: int) -> dict | None:
        """Progressive re-selection (`reselect`, optimizer state kept) after step `reselect_step`;
        returns its counts {"selected", "kept", "fixed"} then. With `official_reselection` it runs one
        step earlier, resets the optimizer state of the entries and skips the next update."""
        at = reselect_step(model, total_steps)
        if at is None or step != (at - 1 if config.official_reselection else at):
            return None
        counts = reselect(model, optimizer)
        if config.official_reselection:
            _reset_and_skip_next_update(model, optimizer)
        return {"reselection": counts}


def _check_base(name: str, weight: torch.Tensor, t: dict) -> None:
    """The saved base values must be this model's weights at the saved positions."""
    for idx, base in ((t["indices"], t["base"]), (t["fixed_indices"], t["fixed_base"])):
        if idx.numel() and (idx.min() < 0 or idx.max() >= weight.numel()):
            raise AdapterMismatchError(f"sara: {name}: saved indices outside [0, {weight.numel()})")
        differ = int((_gather(weight, idx) != base).sum()) if idx.numel() else 0
        if differ:
            raise AdapterMismatchError(
                f"sara: {name}: {differ} of {idx.numel()} saved base values differ from this model's weights; "
                "the adapter was trained on other base weights"
            )


def sara_module(model: nn.Module) -> SaRAModule:
    """`model.petl.sara` (also through a DDP / accelerate wrapper); ValueError when SaRA is not applied."""
    state = get_state(model)
    if state is None and isinstance(getattr(model, "module", None), nn.Module):  # DDP / accelerate wrapper
        state = get_state(model.module)
    module = getattr(state, "sara", None)
    if not isinstance(module, SaRAModule):
        raise ValueError(f"no SaRA is applied to this {type(model).__name__}; call pv.apply(model, 'sara') first")
    return module


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    host = getattr(model, "module", model) if get_state(model) is None else model
    path, _, attr = name.rpartition(".")
    owner = host.get_submodule(path)
    # A peft LoRA loaded after SaRA (pipe.load_lora_weights) wraps the parametrized layer as `base_layer`.
    while (attr not in owner._parameters and not parametrize.is_parametrized(owner, attr)
           and isinstance(getattr(owner, "base_layer", None), nn.Module)):
        owner = owner.base_layer
    return owner, attr


def _write_all(model: nn.Module, prefix: str = "", keep_vars: bool = False) -> None:
    """state_dict pre-hook of the host: the weights read out hold the values of the last optimizer
    step even when no forward ran since (writes otherwise happen on access, in the forward)."""
    module = getattr(get_state(model), "sara", None)
    for name, delta in (module.deltas() if isinstance(module, SaRAModule) else {}).items():
        owner, attr = _owner(model, name)
        weight = owner.parametrizations[attr].original
        if not is_dtensor(weight):  # FSDP2 shards keep the base weights (the values are in petl.sara)
            delta.write(weight)


def fused_lora_layers(model: nn.Module) -> list[str]:
    """Names of the peft LoRA layers fused into a weight SaRA writes (`pipe.fuse_lora()` after load_sara)."""
    peft_utils = sys.modules.get("peft.tuners.tuners_utils")  # without peft imported there is no peft layer
    if peft_utils is None or not any(isinstance(m, peft_utils.BaseTunerLayer) and m.merged for m in model.modules()):
        return []
    out = []
    for name, module in model.named_modules():
        if isinstance(module, peft_utils.BaseTunerLayer) and module.merged:
            base = module.get_base_layer()
            if parametrize.is_parametrized(base) and any(
                    isinstance(p, _Parametrization) for plist in base.parametrizations.values() for p in plist):
                out.append(name)
    return out


def _before_forward(model: nn.Module, args=()) -> None:
    """Forward pre-hook: the deltas of an FSDP2-sharded model apply their values out of place
    (`_set_out_of_place`); a fused LoRA is refused (`_refuse_fused_lora`)."""
    _set_out_of_place(model, is_fsdp2_module(model))
    _refuse_fused_lora(model)


def _set_out_of_place(model: nn.Module, sharded: bool) -> None:
    """Every delta writes its values into W in place (`sharded` False) or returns W with them put in, out of
    place (True: FSDP2 gathers W from its unchanged shards at every use). A no-op when nothing changes."""
    module = sara_module(model)
    if getattr(module, "out_of_place", False) == sharded:
        return
    for delta in module.deltas().values():
        delta.out_of_place = sharded
    module.out_of_place = sharded


def _refuse_fused_lora(model: nn.Module, args=()) -> None:
    """Forward pre-hook (and merge / unload check): SaRA writes its values into the weights at every access,
    so a LoRA fused into the same weights would silently lose its update at the selected entries."""
    fused = fused_lora_layers(model)
    if fused:
        raise RuntimeError(
            f"sara: a LoRA is fused into weights SaRA writes ({fused[:3]}{' ...' if len(fused) > 3 else ''}: pipe.fuse_lora()); SaRA "
            "rewrites its entries at every forward, which would drop the fused update there. SaRA works next to an unfused "
            "LoRA (pipe.load_lora_weights): call pipe.unfuse_lora() first"
        )


def _refuse_fsdp2(model: nn.Module, what: str) -> None:
    """RuntimeError naming `what` when `model` holds FSDP2 (DTensor) parameters: SaRA's values then live
    in shards and the host's weights in others, and `what` (merge, unload, re-selection) writes or reads
    whole weights."""
    if any(is_dtensor(d.values) for d in sara_module(model).deltas().values()):
        raise RuntimeError(
            f"sara: {what} on an FSDP2-sharded model is not supported (the values and the weights are sharded); "
            "save the adapter on every process (pv.save_adapter) and load it onto an unsharded host"
        )


def _remove(model: nn.Module, restore: bool) -> None:
    """Write the values (merge) or the base (restore) into the host tensors and drop SaRA's state."""
    module = sara_module(model)
    _refuse_fsdp2(model, "restoring the base weights (unload)" if restore else "merge")
    _refuse_fused_lora(model)
    fused = [name for name, m in model.named_modules() if runs_fused_qkv(m)]
    if fused:  # to_qkv / to_kv were copied from SaRA's weights: restoring to_q / to_k / to_v would leave them updated
        raise RuntimeError(f"sara: the attention projections are fused ({fused[0]}, ...: unet.fuse_qkv_projections()); "
                           "call unet.unfuse_qkv_projections() before unloading or merging SaRA")
    module.hook.remove()
    module.fuse_guard.remove()
    for name, delta in module.deltas().items():
        owner, attr = _owner(model, name)
        delta.write(owner.parametrizations[attr].original, restore=restore)
        # A deepcopy of a parametrized module shares its generated class; removing a
        # parametrization edits that class, so give this module a class of its own first.
        cls = type(owner)
        owner.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
        params = dict(owner._parameters)
        owner._parameters.clear()
        owner._parameters.update({k: params[k] for k in delta.param_order if k in params})
        owner._parameters.update(params)
    delattr(get_state(model), "sara")


def unload(model: nn.Module) -> nn.Module:
    """Remove SaRA from `model`, restoring the base weights bit for bit; other methods stay."""
    _remove(model, restore=True)
    return forget_method(model, "sara")


def regularization_loss(model: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
    """rank_weight * nuclear norm of the sparse update (W - W_base) of one random eligible 2-D tensor.

    Add it to the training loss each step. Candidates: 2-D tensors with min(shape) > rank_min_dim
    (official: 64). Returns a 0-dim tensor (zero when there is no candidate or rank_weight is 0).
    With `official_regularizer_defect` the value is the same but no gradient reaches the values.
    On an FSDP2-sharded model call it on every process with the same draw (`generator`, or the same seed):
    the drawn values are gathered from their shards.
    """
    module = sara_module(model)
    config = module.config
    candidates = [d for d in module.deltas().values() if len(d.shape) == 2 and min(d.shape) > config.rank_min_dim]
    device = next(module.parameters()).device
    if not candidates or config.rank_weight == 0:
        return torch.zeros((), device=device)
    delta = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    values = full_tensor(delta.values)  # FSDP2: the shards gathered (every process draws the same tensor), differentiable
    if config.official_regularizer_defect:  # the official gradient lands on a tensor no optimizer holds
        values = values.detach().clone().requires_grad_(True)
    update = delta.dense_update(values).float()
    return config.rank_weight * torch.linalg.matrix_norm(update, ord="nuc")


def _torch_optimizer(optimizer) -> torch.optim.Optimizer | None:
    """The torch optimizer inside `optimizer` (accelerate's AcceleratedOptimizer wraps it), or None."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _reset_and_skip_next_update(model: nn.Module, optimizer) -> None:
    """The official optimizer at re-selection: every trainable entry starts with fresh state (step 0,
    zero moments) and the update of this step is skipped (its gradients are dropped before the step)."""
    inner = _torch_optimizer(optimizer)
    if inner is None:
        return
    values = [delta.values for delta in sara_module(model).deltas().values()]
    for p in values:
        inner.state.pop(p, None)
    handle = None

    def drop_gradients(opt, args, kwargs):
        for p in values:
            p.grad = None  # an optimizer skips parameters without a gradient: no update, no state
        handle.remove()

    handle = inner.register_step_pre_hook(drop_gradients)


def reselect_step(model: nn.Module, total_steps: int) -> int | None:
    """The optimizer step after which `reselect` runs (progressive_step, or progressive_fraction of
    total_steps); None when progressive re-selection is off. The official code crashes on its first
    step when the progressive step is unset; here it simply never re-selects."""
    config = sara_module(model).config
    if config.progressive_step is not None:
        return config.progressive_step if config.progressive_step > 0 else None
    if config.progressive_fraction is None:
        return None
    return max(1, int(config.progressive_fraction * total_steps))


@torch.no_grad()
def reselect(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Progressive adjustment: select the trainable entries again, on the current weights.

    Entries that stay selected keep their learned values and their optimizer state (every
    per-entry state tensor, e.g. Adam's moments); newly selected entries start at their current
    weight with zero state; entries no longer selected keep their learned values, frozen (fixed_*).
    Each values Parameter is replaced by a new one of the new size (autograd caches a leaf's shape,
    so resizing in place breaks backward while an old graph is alive); `optimizer`'s param_groups
    and state are updated to the new Parameters, so it needs no rebuilding. Re-read the trainable
    parameters from the model afterwards (e.g. for gradient clipping).
    Returns {"selected": total new k, "kept": entries that stayed selected, "fixed": total m}.
    """
    module = sara_module(model)
    _refuse_fsdp2(model, "progressive re-selection (set progressive_fraction: null)")
    config = module.config
    inner = _torch_optimizer(optimizer)
    totals = {"selected": 0, "kept": 0, "fixed": 0}
    for name, delta in module.deltas().items():
        owner, attr = _owner(model, name)
        weight = owner.parametrizations[attr].original
        delta.write(weight)
        old_idx = delta.indices.long()
        new_idx = select_entries(weight, config).long()
        # Every entry ever trained (selected now or fixed before), sorted, with its base value.
        touched = torch.cat([old_idx, delta.fixed_indices.long()])
        touched_base = torch.cat([delta.base, delta.fixed_base])
        touched, order = touched.sort()
        touched_base = touched_base[order]
        hit_touched, pos_touched = _lookup(touched, new_idx)
        current = _gather(weight, new_idx)
        new_base = torch.where(hit_touched, touched_base[pos_touched], current)
        kept, pos_old = _lookup(old_idx, new_idx)
        still_fixed = ~torch.isin(touched, new_idx)

        old = delta.values
        delta.values = nn.Parameter(current.clone(), requires_grad=old.requires_grad)
        _swap_parameter(model, inner, old, delta.values, kept, pos_old)
        index_dtype = delta.indices.dtype
        delta.indices, delta.base = new_idx.to(index_dtype), new_base
        delta.fixed_indices = touched[still_fixed].to(index_dtype)
        delta.fixed_values = _gather(weight, touched[still_fixed])
        delta.fixed_base = touched_base[still_fixed]
        totals["selected"] += new_idx.numel()
        totals["kept"] += int(kept.sum())
        totals["fixed"] += int(still_fixed.sum())
    return totals
