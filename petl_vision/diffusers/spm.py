"""SPM in diffusers pipelines: load concept-erasing membranes into an existing pipeline object.

    pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
    load_spm(pipe, ["snoopy.safetensors", "van_gogh.safetensors"])   # Facilitated Transport on
    pipe(["snoopy on a skateboard", "a cat"]).images                   # strengths per prompt, per image
    set_weights(pipe, {"snoopy": 0.5}); list_loaded(pipe)
    with disabled(pipe): pipe("snoopy").images                         # the original model
    unload(pipe)                                                       # exactly as before

Files are official SPM files (see `spm_format`); each becomes one membrane named after its file stem.
Membranes are applied as the SPM method (`pv.apply(unet, SPMConfig(...))`, frozen), so `pv.summary`
and `pv.merge` see them; transport hooks live on the pipeline object (`transport.Transport`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from ..core.api import apply
from ..core.state import get_state
from ..methods import spm as spm_method
from ..methods.spm import SPMConfig, has_spm, spm_module, target_layers
from ._plugin import pipeline_denoiser
from .spm_format import SPMFile, read_spm, resolve_spm_source
from .transport import Transport

TRANSPORT_ATTR = "_petl_spm_transport"


def load_spm(pipe, files, weights=None, transport: bool = True, official: bool = False, names=None,
             weight_name: str | None = None, revision: str | None = None):
    """Load SPM membranes into `pipe` (a diffusers pipeline, or a bare UNet with transport=False).

    files: a path (or official state dict), or a list of them; one membrane each. A path may be a
        folder or a Hub repo id ``"user/repo"`` holding one SPM file (or `weight_name`; Hub `revision`).
    weights: None (1 each), a float for all, a list aligned with `files`, or {name: weight}.
    transport: Facilitated Transport inside `pipe(...)` calls (needs the pipeline's text encoder); a
        pipeline-wide switch for every loaded membrane (`set_transport` changes it later).
        ``pipe(prompt_embeds=...)`` calls use the cosine term only (no token ids exist).
    official: the official inference composition (strength c applied to both matrices: c^2 and cross
        terms between membranes, every membrane scaled by the first file's alpha) instead of each
        membrane's strength and alpha applied once.
    names: membrane names (default: the file stems). Returns `pipe`.
    Everything is checked (keys, shapes, names) before the UNet is touched.
    """
    unet = pipeline_denoiser(pipe)
    if not has_spm(unet):
        spm_method.SPM.check_host(unet)  # an unsupported UNet is refused before its files are compared with it
    sources = [files] if isinstance(files, (str, os.PathLike, dict)) else list(files)
    sources = [resolve_spm_source(src, weight_name, revision) for src in sources]
    if not sources:
        raise ValueError("load_spm: no file given")
    names = [None] * len(sources) if names is None else [names] if isinstance(names, str) else list(names)
    if len(names) != len(sources):
        raise ValueError(f"load_spm: {len(names)} names for {len(sources)} files")
    read = _unique([read_spm(src, name) for src, name in zip(sources, names)], unet)
    SPMConfig(membranes=tuple(f.name for f in read))  # checks the names
    weight_of = _weights(weights, [f.name for f in read])
    layers = target_layers(unet) if not has_spm(unet) else spm_module(unet).layers
    for f in read:
        _check_layers(f, layers, unet)
    ranks = {f.rank for f in read} | ({spm_module(unet).config.rank} if has_spm(unet) else set())
    if len(ranks) != 1:
        raise ValueError(f"load_spm: membranes of different ranks {sorted(ranks)} cannot be loaded together (as in the official code)")
    if has_spm(unet) and spm_module(unet).config.official_transport != official:
        raise ValueError(f"load_spm: the loaded membranes use official={spm_module(unet).config.official_transport}; pass the same")
    if transport:
        _check_transport(pipe)

    new = [f.name for f in read]
    if has_spm(unet):
        _add_membranes(unet, read)
    else:
        apply(unet, SPMConfig(rank=ranks.pop(), membranes=tuple(new), prompts=tuple(f.prompts for f in read), official_transport=official))
    spm = spm_module(unet)
    with torch.no_grad():
        for f in read:
            for key, parts in f.layers.items():
                mem = spm.membranes[f.name][key]
                for suffix, tensor in parts.items():
                    target = mem.get_parameter(suffix) if suffix != "alpha" else mem.alpha
                    target.copy_(tensor.reshape(target.shape))
                mem.refresh()
            spm.membranes[f.name].requires_grad_(False)
            spm.weights[f.name] = weight_of[f.name]
        if official:  # the official code sums the files key by key: every key keeps the first file's alpha
            first = spm.membranes[next(iter(spm.membranes))]
            for name in new:
                for key, mem in spm.membranes[name].items():
                    mem.alpha.copy_(first[key].alpha)
                    mem.refresh()
            spm.changed()  # the next forward builds its state anew
    if isinstance(pipe, torch.nn.Module):
        return pipe
    set_transport(pipe, transport)
    return pipe


def unload(pipe, names=None):
    """Remove SPM membranes (all, or those named) and, with the last one, the transport hooks.

    The pipeline then runs exactly as before loading. Other petl_vision methods on the UNet (SaRA:
    `unload_sara`) stay. A no-op when nothing is loaded.
    """
    unet = pipeline_denoiser(pipe)
    if not has_spm(unet):
        _remove_transport(pipe)
        return pipe
    spm = spm_module(unet)
    names = list(spm.membranes) if names is None else [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in spm.membranes]
    if missing:
        raise KeyError(f"unload: no membrane named {missing}; loaded: {list(spm.membranes)}")
    if set(names) >= set(spm.membranes):
        _remove_transport(pipe)
        spm_method.unload(unet)
        return pipe
    applied = _applied(unet)
    removed = {id(p) for n in names for p in spm.membranes[n].parameters()}
    for name in names:
        spm.remove(name)
    keep = [n for n in applied.config.membranes if n not in names]
    prompts = tuple(applied.config.prompt_of(n) for n in keep) if applied.config.prompts else ()
    _set_config(unet, dataclasses.replace(applied.config, membranes=tuple(keep), prompts=prompts))
    applied.added = [p for p in applied.added if id(p) not in removed]
    return pipe


def set_weights(pipe, weights) -> None:
    """Set membrane weights: a float for all, a list in `list_loaded` order, or {name: weight}."""
    spm = spm_module(pipeline_denoiser(pipe))
    spm.weights.update(_weights(weights, list(spm.membranes), partial=True))


def list_loaded(pipe) -> list[dict]:
    """One dict per loaded membrane: name, prompts, weight, rank, params, active, transport."""
    unet = pipeline_denoiser(pipe)
    if not has_spm(unet):
        return []
    spm = spm_module(unet)
    on = isinstance(getattr(pipe, TRANSPORT_ATTR, None), Transport)
    return [{"name": n, "prompts": spm.config.prompt_of(n), "weight": spm.weights[n], "rank": spm.config.rank,
             "params": sum(p.numel() for p in m.parameters()), "active": n in spm.active(), "transport": on}
            for n, m in spm.membranes.items()]


@contextlib.contextmanager
def disabled(pipe, names=None):
    """Within the block the pipeline runs without its membranes (or without those named)."""
    with spm_method.membranes_disabled(pipeline_denoiser(pipe), names):
        yield pipe


def set_transport(pipe, enabled: bool = True, official: bool | None = None) -> None:
    """Switch Facilitated Transport on or off; `official` switches the composition (see load_spm)."""
    unet = pipeline_denoiser(pipe)
    spm = spm_module(unet)
    if official is not None and official != spm.config.official_transport:
        _set_config(unet, dataclasses.replace(spm.config, official_transport=official))  # all membranes share one rank
    if enabled and not isinstance(getattr(pipe, TRANSPORT_ATTR, None), Transport):
        _check_transport(pipe)
        setattr(pipe, TRANSPORT_ATTR, Transport(pipe))
    elif not enabled:
        _remove_transport(pipe)


def transport_strengths(pipe) -> dict[str, torch.Tensor] | None:
    """Membrane name -> g per image (P * num_images_per_prompt,) of the last `pipe(...)` call."""
    transport = getattr(pipe, TRANSPORT_ATTR, None)
    return None if transport is None else transport.last


# ----------------------------------------------------------------------------- helpers


def _unique(read: list[SPMFile], unet) -> list[SPMFile]:
    taken = set(spm_module(unet).membranes) if has_spm(unet) else set()
    for f in read:
        if f.name in taken:
            raise ValueError(f"load_spm: a membrane named {f.name!r} is already loaded (from {f.source}); unload it or pass names=")
        taken.add(f.name)
    return read


def _weights(weights, names: list[str], partial: bool = False) -> dict[str, float]:
    if weights is None:
        return {} if partial else {n: 1.0 for n in names}
    if isinstance(weights, (int, float)):
        return {n: float(weights) for n in names}
    if isinstance(weights, dict):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise KeyError(f"weights name unknown membranes {unknown}; membranes: {names}")
        return ({} if partial else {n: 1.0 for n in names}) | {k: float(v) for k, v in weights.items()}
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"weights: {len(weights)} values for {len(names)} membranes {names}")
    return {n: float(w) for n, w in zip(names, weights)}


def _check_layers(f: SPMFile, layers: dict, unet) -> None:
    missing, unexpected = sorted(set(layers) - set(f.layers)), sorted(set(f.layers) - set(layers))
    if missing or unexpected:
        raise ValueError(
            f"{f.source}: does not fit this {type(unet).__name__}: missing {len(missing)} layers {missing[:3]}, "
            f"unexpected {len(unexpected)} {unexpected[:3]} (an SPM for another base model?)"
        )
    for key, parts in f.layers.items():
        layer = layers[key]
        mem_shapes = spm_method.Membrane(_meta_like(layer), f.rank, 1.0)
        for suffix in ("lora_down.weight", "lora_up.weight"):
            expected = mem_shapes.get_parameter(suffix).shape
            if parts[suffix].numel() != expected.numel() or parts[suffix].shape[:2] != expected[:2]:
                raise ValueError(f"{f.source}: {key}.{suffix} has shape {tuple(parts[suffix].shape)}, this UNet needs {tuple(expected)}")


def _meta_like(layer):
    """A meta-device copy of the layer's type and sizes (for shape checks without allocation)."""
    with torch.device("meta"):
        if isinstance(layer, torch.nn.Conv2d):
            return torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding)
        return torch.nn.Linear(layer.in_features, layer.out_features)


def _check_transport(pipe) -> None:
    if isinstance(pipe, torch.nn.Module):
        raise ValueError("load_spm: transport needs the pipeline (its text encoder); a bare UNet takes transport=False")
    for attr in ("text_encoder", "tokenizer"):
        if getattr(pipe, attr, None) is None:
            raise ValueError(f"load_spm: transport needs pipe.{attr}; {type(pipe).__name__} has none (pass transport=False)")


def _remove_transport(pipe) -> None:
    transport = getattr(pipe, TRANSPORT_ATTR, None) if not isinstance(pipe, torch.nn.Module) else None
    if isinstance(transport, Transport):
        transport.remove()
        delattr(pipe, TRANSPORT_ATTR)


def _applied(unet):
    return next(a for a in get_state(unet).applied if a.name == "spm")


def _set_config(unet, config: SPMConfig) -> None:
    _applied(unet).config = config
    spm_module(unet).config = config
    spm_module(unet).changed()


def _add_membranes(unet, read: list[SPMFile]) -> None:
    """Add membranes to an SPM already on the UNet, keeping the core's bookkeeping in step."""
    spm, applied = spm_module(unet), _applied(unet)
    config = applied.config
    for f in read:
        spm.add(f.name, f.rank, 1.0)
        applied.added += list(spm.membranes[f.name].parameters())
    prompts = tuple(config.prompt_of(n) for n in config.membranes) + tuple(f.prompts for f in read)
    _set_config(unet, dataclasses.replace(config, membranes=config.membranes + tuple(f.name for f in read),
                                          prompts=prompts if any(prompts) else ()))
    get_state(unet).refresh_frozen(unet)
