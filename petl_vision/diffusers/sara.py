"""SaRA in diffusers pipelines: load a trained SaRA into a pipeline's UNet, and take it out again.

    pv.diffusers.load_sara(pipe, "runs/sd15_sara/adapter")     # a pv.save_adapter directory
    pv.diffusers.load_sara(pipe, "checkpoint-5000/unet.pt")   # an official SaRA checkpoint
    pv.diffusers.load_sara(pipe, "user/sd15-sara")             # a Hub repo holding an adapter folder
    pv.diffusers.unload_sara(pipe)

Loading changes only the selected entries of the UNet's weights (written in place, no copy of the
UNet); unloading writes the base values back, so the pipeline is exactly as before. A diffusers LoRA
(`pipe.load_lora_weights`) may be loaded before or after, and unloaded in either order: SaRA acts on
the layers the LoRA wraps, under their own names, and never on the LoRA's tensors.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from ..core.api import apply
from ..core.errors import AdapterFileError, AdapterMismatchError
from ..core.hub import is_repo_id, resolve_dir, resolve_file
from ..core.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from ..core.state import get_state
from ..methods.sara import SaRAConfig, host_name, sara_module, unload
from ._plugin import pipeline_denoiser

OFFICIAL_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_sara(pipe, file_or_dir: str | os.PathLike, *, weight_name: str | None = None, revision: str | None = None,
              **overrides):
    """Load SaRA into `pipe`'s UNet (in place) and return `pipe`.

    file_or_dir: a directory written by `pv.save_adapter` (or a file of it), an official SaRA
        checkpoint ``{'threshold': t, 0: values, ...}`` (.pt/.pth/.bin/.ckpt, read with
        torch.load(weights_only=True)), or a Hub repo id ``"user/repo"`` holding either (through
        huggingface_hub: its cache and HF_HUB_OFFLINE work; a local path of that name wins).
    weight_name: a file inside the folder / repo (e.g. an official ``unet.pt``); default: the
        folder / repo is a petl_vision adapter. revision: Hub branch, tag or commit.
    overrides: SaRAConfig fields for an official checkpoint (its file carries only the threshold).
    Unreadable, truncated or foreign files raise AdapterFileError naming the file.
    """
    unet = pipeline_denoiser(pipe)
    state = get_state(unet)
    if state is not None and "sara" in state.method_names:
        raise ValueError(f"load_sara: SaRA is already loaded into the {type(unet).__name__}; call unload_sara(pipe) first")
    if state is not None:
        raise ValueError(f"load_sara: the {type(unet).__name__} already has petl_vision methods {state.method_names}; "
                         "load SaRA first (e.g. load_sara, then load_spm), or unload them first")
    fused = [name for name, wrapper in _lora_wrappers(unet) if wrapper.merged]
    if fused:
        raise ValueError(f"load_sara: a LoRA is fused into the UNet's weights ({fused[:3]}: pipe.fuse_lora()); SaRA selects and "
                         "checks entries of the base weights: call pipe.unfuse_lora() first (an unfused LoRA may stay loaded)")
    path = _resolve_source(file_or_dir, weight_name, revision)
    if path.is_file() and (path.suffix == ".json" or path.name == WEIGHTS_NAME):
        path = path.parent  # petl_adapter.json / adapter_config.json / adapter.safetensors: their folder
    if path.is_dir():
        if overrides:
            raise TypeError(f"load_sara({path}): overrides {sorted(overrides)} apply to official checkpoints only; the adapter config is in {CONFIG_NAME}")
        _check_is_sara(path)
        wrappers = _lora_wrappers(unet)
        try:
            with _without_lora_layers(unet, wrappers):  # the UNet an adapter is trained on: without the LoRA
                load_adapter(unet, path)
        except AdapterMismatchError as error:
            if not wrappers:
                raise
            try:
                load_adapter(unet, path)  # an adapter trained with this LoRA in place
            except AdapterMismatchError:
                raise error from None
            return pipe
        _freeze_lora(unet, wrappers)
    elif path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
        wrappers = _lora_wrappers(unet)
        with _without_lora_layers(unet, wrappers):
            load_official_checkpoint(unet, path, **overrides)
        _freeze_lora(unet, wrappers)
    elif not path.exists():
        raise FileNotFoundError(f"load_sara: {path} does not exist (expected an adapter directory or an official .pt file)")
    else:
        raise AdapterFileError(f"load_sara: {path} is neither an adapter directory ({CONFIG_NAME} + {WEIGHTS_NAME}) nor an official checkpoint {OFFICIAL_SUFFIXES}")
    return pipe


def _resolve_source(file_or_dir, weight_name: str | None, revision: str | None) -> Path:
    """A local path for load_sara: the path itself, `weight_name` in a folder, or a Hub repo's file or snapshot."""
    path = Path(file_or_dir)
    if not path.exists() and is_repo_id(str(file_or_dir)):
        if weight_name is not None:
            return resolve_file(str(file_or_dir), weight_name, revision)
        return resolve_dir(str(file_or_dir), revision, allow_patterns=["*.json", "*.safetensors", "*.md"])
    if weight_name is not None:
        return resolve_file(path, weight_name)
    return path


def unload_sara(pipe):
    """Remove SaRA from `pipe`'s UNet, restoring its base weights; a no-op when none is loaded."""
    unet = pipeline_denoiser(pipe)
    state = get_state(unet)
    if state is not None and "sara" in state.method_names:
        unload(unet)
    return pipe


def _lora_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the peft LoRA layers (outermost) that `pipe.load_lora_weights` put into `model`."""
    peft_utils = sys.modules.get("peft.tuners.tuners_utils")  # without peft imported there are none
    if peft_utils is None:
        return []
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, peft_utils.BaseTunerLayer) and not any(name.startswith(f"{n}.") for n, _ in out):
            out.append((name, module))
    return out


@contextlib.contextmanager
def _without_lora_layers(model: nn.Module, wrappers: list[tuple[str, nn.Module]]):
    """Within the block each peft LoRA layer is replaced by the layer it wraps: the model as without the LoRA."""
    for name, wrapper in wrappers:
        model.set_submodule(name, wrapper.get_base_layer())
    try:
        yield model
    finally:
        for name, wrapper in wrappers:
            model.set_submodule(name, wrapper)


def _freeze_lora(model: nn.Module, wrappers: list[tuple[str, nn.Module]]) -> None:
    """Freeze the LoRA's parameters as `apply` freezes every host parameter (unload_sara restores them), so
    `pv.summary` and `pv.save_adapter` see SaRA's values alone."""
    state = get_state(model)
    known = {id(p) for p, _ in state.original_requires_grad}
    for _, wrapper in wrappers:
        for param in wrapper.parameters():
            if id(param) not in known:
                state.original_requires_grad.append((param, param.requires_grad))
                param.requires_grad_(False)
    state.refresh_frozen(model)


def _check_is_sara(directory: Path) -> None:
    """The adapter in `directory` must be SaRA alone (other methods have their own plugins)."""
    try:
        names = [m["name"] for m in json.loads((directory / CONFIG_NAME).read_text())["methods"]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # load_adapter reports the problem with the file precisely
    if names != ["sara"]:
        raise ValueError(f"load_sara({directory}): the adapter holds methods {names}; load_sara takes a SaRA adapter")


def load_official_checkpoint(model: nn.Module, checkpoint, **overrides) -> nn.Module:
    """Apply SaRA from an official checkpoint ``{'threshold': t, 0: values, 1: values, ...}``.

    Key i holds the trained values of the i-th tensor of ``model.parameters()`` at the entries with
    |W| < t on the base weights (row-major order), as the official `save_params` writes them.
    checkpoint: a path (read with torch.load(weights_only=True)) or the loaded dict.
    overrides: further SaRAConfig fields (e.g. rank_weight) for continued training.
    """
    source = checkpoint if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__") else "checkpoint"
    state = _read_checkpoint(source) if source != "checkpoint" else checkpoint
    values = _checkpoint_values(state, source)
    # as on the model without a diffusers LoRA (its lora_A / lora_B are not the host's tensors)
    names = [n for n in (host_name(m) for m, _ in model.named_parameters()) if n is not None]
    bad = [k for k in values if not 0 <= k < len(names)]
    if bad:
        raise ValueError(f"{source}: parameter indices {bad[:5]} outside this model's {len(names)} parameters")
    config = SaRAConfig(**{"threshold": float(state["threshold"]), "train_head": False, **overrides})
    deltas = sara_module(apply(model, config)).deltas()
    with torch.no_grad():
        for i, tensor in sorted(values.items()):
            delta = deltas.get(names[i])
            k = 0 if delta is None else delta.values.numel()
            if tensor.numel() != k:
                unload(model)
                raise AdapterMismatchError(
                    f"{source}: entry {i} ({names[i]}) holds {tensor.numel()} values, but |W| < {config.threshold} "
                    f"selects {k} entries of this model's tensor (another base model?)"
                )
            if k:
                delta.values.copy_(tensor.reshape(-1))
    return model


OFFICIAL_LAYOUT = "a dict {'threshold': t, 0: values, 1: values, ...} (the official save_params)"


def _read_checkpoint(path) -> object:
    """torch.load(weights_only=True) of an official checkpoint; unreadable files raise AdapterFileError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, UnicodeDecodeError, OSError) as e:  # garbage, truncated, foreign pickles
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterFileError(f"{path}: not a readable SaRA checkpoint ({type(e).__name__}: {reason}); expected {OFFICIAL_LAYOUT}") from None


def _checkpoint_values(state, source) -> dict[int, torch.Tensor]:
    """{parameter index: trained values} of an official checkpoint, its layout checked."""
    if not isinstance(state, dict) or "threshold" not in state:
        found = f"a dict with keys {list(state)[:5]}" if isinstance(state, dict) else type(state).__name__
        raise AdapterFileError(f"{source}: not an official SaRA checkpoint: holds {found}; expected {OFFICIAL_LAYOUT}")
    threshold = state["threshold"]
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise AdapterFileError(f"{source}: 'threshold' is {state['threshold']!r}; expected a positive number")
    values: dict[int, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "threshold":
            continue
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(key, bool) or not isinstance(key, int):
            raise AdapterFileError(f"{source}: key {key!r} is not a parameter index; expected {OFFICIAL_LAYOUT}")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise AdapterFileError(f"{source}: entry {key} is {type(tensor).__name__}, not a float tensor of trained values")
        values[key] = tensor
    if not values:
        raise AdapterFileError(f"{source}: holds only the threshold {threshold}, no trained values: not a trained SaRA "
                               f"checkpoint (expected {OFFICIAL_LAYOUT})")
    return values
