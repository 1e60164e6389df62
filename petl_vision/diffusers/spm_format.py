"""SPM files: the official format (read and write) and export to a diffusers LoRA file.

Official format (the SPM authors' `save_weights`): safetensors with, per target layer,
``lora_unet_<module path with "." -> "_">.lora_down.weight`` (r, in[, kh, kw]),
``.lora_up.weight`` (out, r[, 1, 1]) and ``.alpha`` (a 0-dim tensor), and the metadata
``{"prompts": "<erased concept>[,<more>]", "rank": "1", "alpha": "1.0"}``. Files saved with
`torch.save` (.pt / .ckpt / .bin, no metadata) load too (torch.load with weights_only=True).
`load_spm` also takes a folder or a Hub repo id holding one such file (`resolve_spm_source`).
Every file that cannot be read as SPM (garbage, truncated, foreign keys) raises AdapterFileError
naming it.

The diffusers LoRA export holds ``unet.<module path>.lora_A.weight`` = lora_down and
``unet.<module path>.lora_B.weight`` = lora_up scaled by weight * alpha / rank (so no alpha is
needed); `pipe.load_lora_weights` loads it into any pipeline of the same UNet. It is the static
membrane (no transport). Several membranes: their down / up matrices are stacked along the rank,
which is exactly the sum of their updates (with `official_transport`, the key-by-key sum instead).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_file

from ..core.distributed import full_tensor, is_dtensor, run_on_rank0
from ..core.errors import AdapterFileError
from ..core.io import atomic_write
from ..core.hub import is_repo_id, resolve_dir, resolve_file
from ..methods.spm import SPMModule, spm_module
from ._plugin import pipeline_denoiser

SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclasses.dataclass
class SPMFile:
    """One membrane read from a file: layer key -> {"lora_down.weight", "lora_up.weight", "alpha"}."""

    name: str
    layers: dict[str, dict[str, torch.Tensor]]
    prompts: str
    rank: int
    metadata: dict[str, str]
    source: str

    @property
    def num_params(self) -> int:
        return sum(t[s].numel() for t in self.layers.values() for s in SUFFIXES[:2])


def name_from_path(path: str | os.PathLike) -> str:
    """A membrane name from a file name: ``snoopy_last.safetensors`` -> ``snoopy_last``."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).name.split(".")[0])
    return name or "spm"


def resolve_spm_source(source, weight_name: str | None = None, revision: str | None = None):
    """A local SPM file (or the state dict itself) for `source`.

    source: a state dict, a file, a folder holding `weight_name` or exactly one SPM file
        (.safetensors / .pt / .pth / .ckpt / .bin), or a Hub repo id ``"user/repo"`` holding the same
        (through huggingface_hub: its cache, HF_HUB_OFFLINE and `revision` work; a local path wins).
    """
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.exists() and is_repo_id(str(source)):
        if weight_name is not None:
            return resolve_file(str(source), weight_name, revision)
        path = resolve_dir(str(source), revision, allow_patterns=[f"*{s}" for s in (".safetensors", *TORCH_SUFFIXES)])
    if not path.is_dir():
        return path  # a file, or a missing path that read_spm reports
    if weight_name is not None:
        return resolve_file(path, weight_name)
    found = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", *TORCH_SUFFIXES))
    if len(found) != 1:
        raise FileNotFoundError(f"load_spm: {source} holds {len(found)} SPM files {found[:5]}; name one with weight_name=")
    return path / found[0]


def read_spm(source, name: str | None = None) -> SPMFile:
    """Read an official SPM file (path) or an in-memory state dict of official keys.

    Raises AdapterFileError naming the file (and the offending keys) when it cannot be read or its
    layout is not the official one.
    """
    if isinstance(source, dict):
        tensors, metadata, label = dict(source), {}, "state dict"
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"load_spm: no such file {path} (expected an SPM .safetensors file)")
        tensors, metadata = _read_file(path)
    if not isinstance(tensors, dict):
        raise AdapterFileError(f"{label}: holds a {type(tensors).__name__}, not a state dict of SPM tensors")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, tensor in tensors.items():
        module, _, suffix = key.partition(".") if isinstance(key, str) else (key, "", "")
        if not isinstance(key, str) or not module.startswith("lora_unet_") or suffix not in SUFFIXES:
            bad.append(key)
            continue
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise AdapterFileError(f"{label}: {key} is {type(tensor).__name__}, not a float tensor")
        layers.setdefault(module, {})[suffix] = tensor
    if bad:
        raise AdapterFileError(f"{label}: keys {bad[:5]} are not SPM keys (expected lora_unet_<path>.{{{', '.join(SUFFIXES)}}})")
    if not layers:
        raise AdapterFileError(f"{label}: holds no SPM tensors")
    ranks = set()
    for module, parts in layers.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise AdapterFileError(f"{label}: {module} lacks lora_down.weight or lora_up.weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = parts.get("alpha", torch.tensor(1.0))
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or alpha.numel() != 1:
            raise AdapterFileError(f"{label}: {module} has lora_down {list(down.shape)} and lora_up {list(up.shape)}; "
                                   "expected (r, in[, kh, kw]) and (out, r[, 1, 1]) with a scalar alpha")
        rank = down.shape[0]
        parts.setdefault("alpha", torch.tensor(float(rank)))  # the official loaders' default: no scaling
        ranks.add(rank)
    if len(ranks) != 1:
        raise AdapterFileError(f"{label}: membranes of ranks {sorted(ranks)} in one file")
    return SPMFile(name or (name_from_path(source) if not isinstance(source, dict) else "spm"), layers,
                   metadata.get("prompts", ""), ranks.pop(), metadata, label)


def _read_file(path: Path) -> tuple[object, dict[str, str]]:
    """(contents, safetensors metadata) of an SPM file; unreadable files raise AdapterFileError naming it."""
    try:
        if path.suffix in TORCH_SUFFIXES:
            return torch.load(path, map_location="cpu", weights_only=True), {}
        tensors = load_file(path)
        with safetensors.safe_open(path, framework="pt") as f:
            return tensors, f.metadata() or {}
    except (safetensors.SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError,
            AttributeError, ImportError, IndexError, KeyError, UnicodeDecodeError, OSError) as e:
        kind = "torch" if path.suffix in TORCH_SUFFIXES else "safetensors"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterFileError(f"{path}: not a readable {kind} SPM file ({type(e).__name__}: {reason})") from None


def membrane_state_dict(model, name: str | None = None) -> dict[str, torch.Tensor]:
    """The official state dict of membrane `name` (default: the only one) of a UNet or pipeline."""
    spm = spm_module(pipeline_denoiser(model))
    name = _one_name(spm, name)
    out = {}
    for key, mem in spm.membranes[name].items():
        out[f"{key}.lora_down.weight"] = mem.lora_down.weight
        out[f"{key}.lora_up.weight"] = mem.lora_up.weight
        out[f"{key}.alpha"] = mem.alpha
    return out


def save_spm(model, path: str | os.PathLike, name: str | None = None, prompts: str | None = None,
             dtype: torch.dtype | None = torch.float32) -> Path:
    """Write membrane `name` of a UNet / pipeline as an official SPM file; returns the path.

    prompts: the metadata "prompts" (default: the membrane's concept prompt from its config).
    dtype: the saved dtype (official: the training precision, float32); None keeps the tensors'.
    On an FSDP2-sharded UNet (DTensor membranes) call it on every process: the tensors are gathered
    (a collective), rank 0 writes the file, every process returns its path once it exists.
    """
    spm = spm_module(pipeline_denoiser(model))
    name = _one_name(spm, name)
    state = membrane_state_dict(model, name)
    sharded = any(is_dtensor(v) for v in state.values())
    tensors = {k: full_tensor(v.detach()).to("cpu", dtype or v.dtype).contiguous().clone() for k, v in state.items()}
    rank = next(m.rank for m in spm.membranes[name].values())
    alpha = next(iter(spm.membranes[name].values())).alpha.item()
    metadata = {"prompts": spm.config.prompt_of(name) if prompts is None else prompts, "rank": str(rank), "alpha": str(float(alpha))}
    path = Path(path)

    def write() -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))
        return path

    return run_on_rank0(write) if sharded else write()


def export_lora(model, path: str | os.PathLike, names=None, weights: dict[str, float] | None = None) -> Path:
    """Write the loaded membranes of a UNet / pipeline as a diffusers LoRA file (static, no transport).

    names: membranes to export (default: all loaded); weights: name -> weight (default: the current
    weights). `pipe.load_lora_weights(path)` then gives the same UNet output as the membranes with
    transport off.
    """
    unet = pipeline_denoiser(model)
    spm = spm_module(unet)
    names = list(spm.membranes) if names is None else [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in spm.membranes]
    if missing:
        raise KeyError(f"export_lora: no membrane named {missing}; loaded: {list(spm.membranes)}")
    weights = {n: spm.weights[n] for n in names} | dict(weights or {})
    paths = {id(layer): name for name, layer in unet.named_modules()}
    tensors = {}
    for key, layer in spm.layers.items():
        module_path = paths[id(layer)].replace(".base_layer", "")
        mems = [spm.membranes[n][key] for n in names]
        downs = [m.lora_down.weight.detach() for m in mems]
        ups = [m.lora_up.weight.detach() * (weights[n] * m.alpha / m.rank) for n, m in zip(names, mems)]
        if spm.config.official_transport:
            down = sum(weights[n] * d for n, d in zip(names, downs))
            up = sum(ups)
        else:
            down, up = torch.cat(downs), torch.cat(ups, dim=1)
        tensors[f"unet.{module_path}.lora_A.weight"] = down.cpu().contiguous()
        tensors[f"unet.{module_path}.lora_B.weight"] = up.cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, {"format": "pt"})
    return path


def _one_name(spm: SPMModule, name: str | None) -> str:
    if name is None:
        if len(spm.membranes) != 1:
            raise ValueError(f"several membranes are loaded ({list(spm.membranes)}); pass name=")
        return next(iter(spm.membranes))
    if name not in spm.membranes:
        raise KeyError(f"no membrane named {name!r}; loaded: {list(spm.membranes)}")
    return name
