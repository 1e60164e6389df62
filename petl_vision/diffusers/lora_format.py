"""Export a petl_vision `lora` adapter of a diffusers UNet in diffusers' LoRA layout.

    pv.apply(pipe.unet, "lora", r=4)  ...train...                 # or pv.load_adapter(pipe.unet, "runs/x/adapter")
    pv.diffusers.export_diffusers_lora(pipe.unet, "runs/x/adapter")   # writes pytorch_lora_weights.safetensors
    other_pipe.load_lora_weights("runs/x/adapter")                # diffusers' own loader: same UNet outputs

The file is what diffusers' training scripts write: `StableDiffusionLoraLoaderMixin.save_lora_weights`
with peft's `get_peft_model_state_dict` of the UNet, keys ``unet.<module path>.lora_A.weight`` (r, in)
and ``unet.<module path>.lora_B.weight`` (out, r) (convolutions: (r, in, kh, kw) and (out, r, 1, 1)),
with lora_B scaled by alpha / r and a minimal peft LoraConfig (r, lora_alpha = r, target modules) in
the safetensors metadata: loaders that read the metadata and those that ignore it (alpha = r) build
the same update. The same file loads into SD 1.x / 2.x and SDXL pipelines (both read the ``unet.``
prefix); `load_lora_weights(dir)` picks it by its name even when the folder also holds petl_vision's
own adapter files.

Only LoRA exports this way. SaRA's trained update is a sparse full-rank change of the base weights
(also of biases and norms), which diffusers' SD/SDXL loaders cannot load: they have no full-rank
("diff") path (diffusers 0.42 reads ``.diff`` keys only in its Flux/Wan/LTX converters). Share SaRA as
a petl_vision adapter (`pv.diffusers.load_sara`) or merged (`pv.merge(unet).save_pretrained(dir)`).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.distributed import full_tensor, is_dtensor, run_on_rank0
from ..core.state import get_state
from ._plugin import pipeline_denoiser

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_ADAPTER = "default"  # the adapter name petl_vision's `lora` method injects under


def diffusers_lora_state_dict(model) -> tuple[dict, dict]:
    """(state dict, peft LoraConfig fields) of the `lora` of a UNet / pipeline, as diffusers saves them.

    Keys are ``<module path>.lora_A.weight`` / ``.lora_B.weight`` (peft's `get_peft_model_state_dict`);
    tensors are CPU copies with lora_B scaled by alpha / r, and the config says lora_alpha = r, so a
    loader that reads the metadata and one that ignores it (alpha defaults to r) build the same update.
    The config holds only r, lora_alpha and target_modules (the adapted module paths), fields every peft
    version reads.
    """
    unet = pipeline_denoiser(model)
    state = get_state(unet)
    if state is None or "lora" not in state.method_names:
        found = state.method_names if state is not None else "no petl_vision method"
        raise ValueError(f"export_diffusers_lora: the {type(unet).__name__} holds {found}; it needs petl_vision's "
                         "'lora' (pv.apply(unet, 'lora', ...) or pv.load_adapter(unet, <lora adapter dir>))")
    from peft.utils import get_peft_model_state_dict

    config = getattr(unet, "peft_config", {}).get(PEFT_ADAPTER)
    if config is None:
        raise ValueError(f"export_diffusers_lora: the {type(unet).__name__} has no peft adapter {PEFT_ADAPTER!r} "
                         f"(peft adapters: {sorted(getattr(unet, 'peft_config', {}))})")
    if config.rank_pattern or config.alpha_pattern or config.use_dora or config.use_rslora:
        raise ValueError("export_diffusers_lora: only a plain LoRA (one rank and alpha, no DoRA / rsLoRA) exports")
    scale = config.lora_alpha / config.r
    tensors = {}
    for key, value in get_peft_model_state_dict(unet, adapter_name=PEFT_ADAPTER).items():
        value = full_tensor(value.detach()).to("cpu")  # FSDP2: gathered (every process calls)
        tensors[key] = (value * scale if ".lora_B." in key else value.clone()).contiguous()
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    return tensors, {"r": config.r, "lora_alpha": config.r, "target_modules": modules}


def export_diffusers_lora(model, save_directory: str | os.PathLike, weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write the UNet's petl_vision `lora` as diffusers' LoRA file; returns its path.

    model: a UNet (or a pipeline) with `pv.apply(unet, "lora", ...)` or a loaded `lora` adapter.
    save_directory: created if needed; `pipe.load_lora_weights(save_directory)` loads the file.
    On an FSDP2-sharded UNet call it on every process: the tensors are gathered, rank 0 writes.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    sharded = any(is_dtensor(p) for p in pipeline_denoiser(model).parameters())
    tensors, config = diffusers_lora_state_dict(model)

    def write() -> Path:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            save_directory, unet_lora_layers=tensors, unet_lora_adapter_metadata=config,
            weight_name=weight_name, safe_serialization=True,
        )
        return Path(save_directory) / weight_name

    return run_on_rank0(write) if sharded else write()
