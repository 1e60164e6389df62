"""Fine-tune the UNet of a diffusers text-to-image pipeline: SaRA (default), LoRA (peft) or full.

The standard noise-prediction recipe of diffusers' text-to-image scripts, as the SaRA code uses it:
VAE latents * scaling_factor, uniform timesteps, `noise_scheduler.add_noise`, MSE to the noise (or
the velocity for v-prediction models); the VAE and text encoder are frozen (cast to fp16/bf16 under
mixed precision), the UNet stays fp32 under autocast. On Accelerate: mixed precision, gradient
accumulation, checkpoints every N steps with exact --resume, validation images every N steps.

Every applied method takes part through its training hooks (`MethodHooks` of the classifier
trainer): its extra loss is added to the noise-prediction loss and its `on_step` runs after each
optimizer step. SaRA thereby adds its nuclear-norm regulariser every step and re-selects its
trainable entries at the configured step (half of training by default), keeping the optimizer.

Under FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp.yaml`, or on CPU processes
``ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true torchrun ...``) the UNet is sharded per block after
the method is applied (sharding.py), the VAE and text encoders stay whole on every process; the
adapter (or the full UNet) is gathered and written once, checkpoints hold each process's shards.
SaRA then applies its values out of place (methods/sara.py) and its progressive re-selection is not
supported (method.progressive_fraction: null).

SDXL pipelines (UNets with ``addition_embed_type="text_time"``) train as diffusers' SDXL text-to-image
script does (see conditioning.py): both text encoders' penultimate states concatenated, text_encoder_2's
pooled embeddings and the time ids (original size, crop top-left, target size) of each image, the
VAE kept in fp32 (SDXL's VAE overflows in fp16), validation with StableDiffusionXLPipeline.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

import petl_vision as pv
from petl_vision.data.captions import CaptionedImageFolder, image_transform, sdxl_image_transform
from petl_vision.core.distributed import full_tensor, run_on_rank0, sharding
from .checkpoint import RUN_ARTIFACTS, Run, check_finite, load_checkpoint, run_record, save_checkpoint, start_run
from .conditioning import ConditioningError, TextConditioning, is_sdxl
from .config import ConfigError, MethodSection, check_override, coerce, merge_dicts, nested, parse_override, read_mapping
from .deepspeed_support import deepspeed_requested
from .sharding import maybe_shard, prepare_all
from .tracking import MetricsLog, check_trackers, finish_trackers, start_trackers
from .trainer import MethodHooks, TrainState

METHODS = ("sara", "lora", "full")
# diffusers' standard LoRA placement for Stable Diffusion: the attention projections.
LORA_DEFAULTS = {"r": 4, "alpha": 4.0, "target_modules": r"to_(q|k|v|out\.0)$", "train_head": False}
# Config keys that do not change what is trained: a run may be resumed with other values.
IGNORED_KEYS = ("output_dir", "progress", "overwrite", "keep_checkpoints", "checkpoint_every", "validation_prompt",
                "validation_every", "num_validation_images", "validation_inference_steps", "num_workers", "log_with",
                "attention")
# The UNet's attention processors (config key `attention`, see set_attention); config.KEY_CHOICES checks the value.
ATTENTION = ("sdpa", "xformers", "default")
ARTIFACTS = (*RUN_ARTIFACTS, "unet", "validation")


@dataclass
class DiffusionConfig:
    """Every field is a YAML key of configs/sd15_sara.yaml and a `key=value` override.

    model: a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
        scheduler/; SDXL: also text_encoder_2/, tokenizer_2/) or a hub id (needs network). data: a captioned image folder (data.captions).
    method: {name: sara | lora | full, ...config fields}; lora defaults to LORA_DEFAULTS.
    lr: None = the method's rule: SaRA 1e-3 * exp(-350 * threshold) (official), LoRA 1e-4, full 1e-5.
    lr_scheduler: any name of diffusers.optimization.get_scheduler (cosine, constant, linear, ...).
    checkpoint_every / validation_every: in optimizer steps; validation needs validation_prompt.
    overwrite: replace the run that output_dir holds (else an output_dir holding another run is refused).
    log_with: Accelerate trackers (tensorboard, wandb, ...; comma-separated) for per-step loss / lr and the
        validation images, files under output_dir/logs; metrics.jsonl is always written.
    attention: the UNet's attention processors: sdpa (diffusers' AttnProcessor2_0, torch's
        scaled_dot_product_attention), xformers (needs the xformers package and a CUDA GPU) or default
        (diffusers' plain AttnProcessor). See set_attention.
    """

    model: str = "runwayml/stable-diffusion-v1-5"
    data: str = "data/finetune"
    output_dir: str = "runs/diffusion"
    method: MethodSection = field(default_factory=lambda: MethodSection(name="sara"))
    revision: str | None = None
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    caption_prefix: str = ""
    batch_size: int = 4
    grad_accum_steps: int = 1
    max_steps: int = 5005
    lr: float | None = None
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    mixed_precision: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validation_prompt: str | None = None
    validation_every: int = 500
    num_validation_images: int = 4
    validation_inference_steps: int = 30
    seed: int = 42
    num_workers: int = 0
    progress: bool = True
    overwrite: bool = False
    log_with: str | None = None
    attention: str = "sdpa"


def load_diffusion_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DiffusionConfig:
    """DiffusionConfig from a YAML file (or the defaults) plus `dotted.key=value` overrides (see config.parse_override)."""
    raw = read_mapping(path) if path is not None else {}
    keys = typing.get_type_hints(DiffusionConfig)
    for item in overrides:
        parts, value = parse_override(item)
        check_override(item, parts, keys, sections=("method",))
        if parts[0] != "method":  # method fields are checked by pv.make_config in from_dict
            coerce(value, keys[parts[0]], f"override {item!r}", parts[0])
        raw = merge_dicts(raw, nested(parts, value))
    return from_dict(raw, str(path or "config"))


def from_dict(raw: dict, source: str = "config") -> DiffusionConfig:
    hints = typing.get_type_hints(DiffusionConfig)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {', '.join(hints)}")
        if key == "method":
            method = {"name": value} if isinstance(value, str) else dict(value or {})
            kwargs["method"] = MethodSection(name=method.pop("name", "sara"), overrides=method)
        else:
            kwargs[key] = coerce(value, hints[key], source, key)
    cfg = DiffusionConfig(**kwargs)
    if cfg.method.name not in METHODS:
        raise ConfigError(f"{source}: method.name must be one of {METHODS}, got {cfg.method.name!r}")
    if cfg.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ConfigError(f"{source}: mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    for key in ("max_steps", "batch_size", "grad_accum_steps", "checkpoint_every", "validation_every", "keep_checkpoints", "resolution"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{source}: {key} must be >= 1, got {getattr(cfg, key)}")
    try:
        pv.make_config(cfg.method.name, **method_overrides(cfg))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: method {cfg.method.name!r}: {e}") from e
    return cfg


def method_overrides(cfg: DiffusionConfig) -> dict:
    return {**LORA_DEFAULTS, **cfg.method.overrides} if cfg.method.name == "lora" else dict(cfg.method.overrides)


def default_lr(cfg: DiffusionConfig) -> float:
    if cfg.lr is not None:
        return cfg.lr
    if cfg.method.name == "sara":
        return 1e-3 * math.exp(-350 * pv.make_config("sara", **cfg.method.overrides).threshold)
    return 1e-4 if cfg.method.name == "lora" else 1e-5


def check_text_conditioned(unet, model: str, sdxl: bool = True) -> None:
    """ConfigError unless `unet` is conditioned like Stable Diffusion 1.x / 2.x (text states alone) or,
    with `sdxl`, like SDXL (text states, pooled text embeddings and time ids: addition_embed_type "text_time").

    Other conditioning (class labels, image embeddings, other addition_embed_types) is refused.
    """
    extra = {key: unet.config.get(key) for key in ("addition_embed_type", "class_embed_type") if unet.config.get(key)}
    if sdxl and is_sdxl(unet) and not unet.config.get("class_embed_type"):
        return
    if extra:
        supported = ("Stable Diffusion 1.x / 2.x and SDXL pipelines" if sdxl else
                     "Stable Diffusion 1.x / 2.x pipelines (one CLIP text encoder), not SDXL-style UNets yet")
        raise ConfigError(f"{model}: the UNet needs conditioning besides text states ({extra}); the training scripts "
                          f"support {supported}")


def check_attention(attention: str) -> None:
    """ImportError (xformers not installed) or ValueError (no CUDA GPU) when `attention` cannot run here;
    the trainers call it before they write or load anything."""
    if attention not in ATTENTION:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if attention != "xformers":
        return
    if importlib.util.find_spec("xformers") is None:
        raise ImportError("attention=xformers: xformers is not installed; pip install xformers or use attention=sdpa")
    if not torch.cuda.is_available():
        raise ValueError("attention=xformers: xformers' memory-efficient attention needs a CUDA GPU and none is visible; "
                         "use attention=sdpa")


def set_attention(unet, attention: str) -> None:
    """Set the attention processors of every attention layer of `unet` (check_attention first):

    sdpa: diffusers' AttnProcessor2_0 (torch's scaled_dot_product_attention, diffusers' default on torch 2);
    xformers: `unet.enable_xformers_memory_efficient_attention()` (XFormersAttnProcessor);
    default: `unet.set_default_attn_processor()` (AttnProcessor: plain matmuls and softmax).
    The SaRA and SPM plugins work with each of them (tests/test_attention_processors.py).
    """
    check_attention(attention)
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "default":
        unet.set_default_attn_processor()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def load_unet_and_conditioning(model: str, revision: str | None = None):
    """(unet, TextConditioning) of the pipeline `model`: the UNet, checked to be conditioned like SD
    1.x / 2.x or SDXL, and the tokenizer(s) and text encoder(s) that feed it. ConfigError otherwise."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", revision=revision)
    check_text_conditioned(unet, model)
    try:
        return unet, TextConditioning.from_pretrained(model, unet, revision)
    except ConditioningError as e:
        raise ConfigError(str(e)) from e


def load_components(cfg: DiffusionConfig) -> dict:
    """conditioning (a TextConditioning: the tokenizer(s) and text encoder(s)), vae, unet and the DDPM
    noise scheduler of the pipeline `cfg.model`."""
    from diffusers import AutoencoderKL, DDPMScheduler

    unet, conditioning = load_unet_and_conditioning(cfg.model, cfg.revision)
    return {
        "conditioning": conditioning,
        "vae": AutoencoderKL.from_pretrained(cfg.model, subfolder="vae", revision=cfg.revision),
        "unet": unet,
        "noise_scheduler": DDPMScheduler.from_pretrained(cfg.model, subfolder="scheduler"),
    }


def config_record(cfg) -> dict:
    """The YAML record of a DiffusionConfig / EraseConfig (method overrides flattened into `method`)."""
    record = dataclasses.asdict(cfg)
    if isinstance(getattr(cfg, "method", None), MethodSection):
        record["method"] = {"name": cfg.method.name, **cfg.method.overrides}
    return record


def start_diffusion_run(cfg, resume, overwrite: bool, artifacts: tuple[str, ...] = ARTIFACTS) -> Run:
    """`checkpoint.start_run` for a diffusion config (checkpoints `step_<n>`); writes nothing."""
    record = run_record(config_record(cfg), IGNORED_KEYS)
    return start_run(cfg.output_dir, record, resume=resume, overwrite=overwrite or cfg.overwrite, prefix="step", artifacts=artifacts)


def train_diffusion(cfg: DiffusionConfig, resume: str | Path | bool | None = None, stop_after_step: int | None = None,
                    overwrite: bool = False) -> dict:
    """Train and return {"unet", "output_dir", "adapter_dir", "unet_dir", "steps", "losses", "trainable_params"}.

    resume: a checkpoint dir, an output dir or True (the latest complete checkpoint under
        `cfg.output_dir/checkpoints`), written by the same configuration (IGNORED_KEYS aside).
    stop_after_step: stop (as if interrupted) after that step's checkpoint; for tests.
    overwrite: replace the run output_dir holds (also `cfg.overwrite`); else FileExistsError. Nothing
        is written before the pipeline, data and checkpoint are loaded.
    A NaN or infinite loss raises FloatingPointError naming the step; nothing is exported then.
    metrics.jsonl gets {"step", "loss", "lr"} per optimizer step.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm

    if deepspeed_requested():
        raise ConfigError("deepspeed: finetune_diffusion has no DeepSpeed path; launch it with configs/accelerate/fsdp.yaml "
                          "(FSDP2) or configs/accelerate/ddp.yaml")
    check_attention(cfg.attention)
    trackers = check_trackers(cfg.log_with)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        log_with=trackers, project_dir=cfg.output_dir,
    )
    set_seed(cfg.seed)
    run = start_diffusion_run(cfg, resume, overwrite)
    accelerator.wait_for_everyone()
    out = run.out

    parts = load_components(cfg)
    conditioning, vae, unet, noise_scheduler = (parts[k] for k in ("conditioning", "vae", "unet", "noise_scheduler"))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # diffusers' SDXL script keeps SDXL's VAE in fp32 (it overflows in fp16); SD's VAE follows the mixed precision.
    vae_dtype = torch.float32 if conditioning.sdxl and vae.config.get("force_upcast", True) else weight_dtype
    vae.requires_grad_(False).to(accelerator.device, vae_dtype).eval()
    conditioning.requires_grad_(False).to(accelerator.device, weight_dtype).eval()
    unet.to(accelerator.device)
    set_attention(unet, cfg.attention)
    pv.apply(unet, cfg.method.name, **method_overrides(cfg))
    hooks = MethodHooks(unet, cfg.max_steps, seed=cfg.seed)
    if hooks.owner is not None:
        raise ConfigError(f"method {hooks.owner[0].name!r} computes its own gradients; the diffusion loop does not support that")
    unet = maybe_shard(accelerator, unet)  # FSDP2 per block under an FSDP launch
    sharded = sharding(unet) == "fsdp2"
    if sharded:
        check_sharded_method(cfg, unet)
    trainable = [p for p in unet.parameters() if p.requires_grad]  # after sharding: DTensors under FSDP2

    transform = (sdxl_image_transform if conditioning.sdxl else image_transform)(cfg.resolution, cfg.center_crop, cfg.random_flip)
    dataset = CaptionedImageFolder(cfg.data, transform, cfg.caption_prefix)

    def collate(items):
        return collate_captioned(items, conditioning, cfg.resolution)

    loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, shuffle=True, collate_fn=collate, num_workers=cfg.num_workers)
    optimizer = torch.optim.AdamW(trainable, lr=default_lr(cfg), betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    from diffusers.optimization import get_scheduler

    # Not prepared: stepped once per optimizer step, so the schedule does not depend on the number of processes.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    unet, optimizer, loader = prepare_all(accelerator, unet, optimizer, loader)
    state = resumable_state(accelerator, run, unet, optimizer, scheduler)
    run.commit(accelerator, yaml.safe_dump(config_record(cfg), sort_keys=False))
    start_trackers(accelerator, config_record(cfg))
    log = MetricsLog(out, enabled=accelerator.is_main_process)
    log.truncate_after(state.step, key="step")
    hint = f"lower lr (now {default_lr(cfg):g})"

    plain_unet = accelerator.unwrap_model(unet)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum_steps))
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (cfg.progress and accelerator.is_local_main_process))
    losses: list[float] = []
    unet.train()
    while state.step < cfg.max_steps:
        epoch, done_in_epoch = divmod(state.step, steps_per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * cfg.grad_accum_steps) if done_in_epoch else loader
        resumed_rng = torch.get_rng_state() if done_in_epoch else None
        for pixels, batch in batches:
            if resumed_rng is not None:  # see restore_rng_after_skip
                torch.set_rng_state(resumed_rng)
                resumed_rng = None
            with accelerator.accumulate(unet):
                loss = noise_prediction_loss(unet, vae, conditioning, noise_scheduler, pixels, batch, weight_dtype)
                total = hooks.loss(loss)
                check_finite(total, state.step + 1, "", hint, accelerator)
                accelerator.backward(total)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)  # the frozen ones have no .grad
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            losses.append(accelerator.gather(loss.detach()).mean().item())
            log.log({"step": state.step, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]})
            accelerator.log({"train/loss": losses[-1], "train/lr": scheduler.get_last_lr()[0]}, step=state.step)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            hooks.on_step(optimizer, state.step, accelerator.print)  # SaRA's re-selection swaps Parameters
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps:
                save_checkpoint(accelerator, run, state.step, unet, optimizer, scheduler, state.state_dict(), cfg.keep_checkpoints)
            # A sharded UNet runs on every process together (rank 0 writes the images).
            if cfg.validation_prompt and (accelerator.is_main_process or sharded) and (
                    state.step % cfg.validation_every == 0 or state.step == cfg.max_steps):
                paths = validate(cfg, parts, plain_unet, accelerator, state.step, weight_dtype)
                if accelerator.is_main_process:
                    log_images(accelerator, paths, state.step)
                unet.train()
            if state.step >= cfg.max_steps or state.step == stop_after_step:
                break
        if state.step == stop_after_step:
            break
    bar.close()
    log.close()
    result = {"unet": plain_unet, "output_dir": str(out), "adapter_dir": None, "unet_dir": None, "steps": state.step,
              "losses": losses, "trainable_params": sum(p.numel() for p in plain_unet.parameters() if p.requires_grad)}
    finish_trackers(accelerator)
    if state.step < cfg.max_steps:  # stopped early
        return result
    accelerator.wait_for_everyone()
    if sharded or accelerator.is_main_process:  # sharded: every process (the saves gather the shards, rank 0 writes)
        export(cfg, plain_unet, out, result)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def check_sharded_method(cfg: DiffusionConfig, unet) -> None:
    """ConfigError for what a sharded (FSDP2) UNet cannot do: SaRA's progressive re-selection (it reads
    whole weights and resizes the trainable values, which FSDP2 holds as fixed-size shards)."""
    if cfg.method.name == "sara":
        from petl_vision.methods.sara import reselect_step

        at = reselect_step(unet, cfg.max_steps)
        if at is not None:
            raise ConfigError(f"method sara under FSDP2: progressive re-selection (after step {at}) is not supported on a "
                              "sharded UNet; set method.progressive_fraction=null (or train with DDP / on one process)")


def export(cfg: DiffusionConfig, unet, out: Path, result: dict) -> None:
    """Write the trained UNet (full: `out/unet`) or adapter (`out/adapter`; LoRA: diffusers' file too) and
    record the folder in `result`. A sharded (FSDP2) UNet: call on every process (the tensors are gathered)."""
    if cfg.method.name == "full":
        result["unet_dir"] = str(save_full_unet(unet, out / "unet"))
        return
    result["adapter_dir"] = str(pv.save_adapter(unet, out / "adapter"))
    if cfg.method.name == "lora":  # diffusers' own file beside ours: pipe.load_lora_weights(adapter_dir)
        pv.diffusers.export_diffusers_lora(unet, out / "adapter")


def save_full_unet(unet, folder: Path) -> Path:
    """`pv.merge(unet).save_pretrained(folder)`; a sharded (FSDP2) UNet: its state gathered tensor by
    tensor on every process, loaded by rank 0 into an unsharded UNet of the same config, which it saves."""
    if sharding(unet) != "fsdp2":
        pv.merge(unet).save_pretrained(folder)
        return folder
    from diffusers import UNet2DConditionModel

    state = {k: full_tensor(v.detach()).cpu() for k, v in unet.state_dict().items() if not k.startswith("petl.")}

    def write() -> Path:
        whole = UNet2DConditionModel.from_config(unet.config)
        whole.load_state_dict(state)
        whole.save_pretrained(folder)
        return folder

    return run_on_rank0(write)


def collate_captioned(items, conditioning: TextConditioning, resolution: int):
    """(pixels (B, 3, H, W), {"input_ids": [ids per tokenizer], "time_ids": (B, 6) for SDXL}).

    Items are (image, caption) with image a tensor or (tensor, original (h, w), crop (top, left)); SDXL
    time ids use the image's original size and crop when given, else (resolution, resolution) and (0, 0).
    """
    images = [x[0] if isinstance(x, tuple) else x for x, _ in items]
    batch = {"input_ids": conditioning.tokenize([c for _, c in items])}
    if conditioning.sdxl:
        size = (resolution, resolution)
        original = [x[1] if isinstance(x, tuple) else size for x, _ in items]
        crops = [x[2] if isinstance(x, tuple) else (0, 0) for x, _ in items]
        batch["time_ids"] = conditioning.time_ids(original, crops, size)
    return torch.stack(images), batch


def noise_prediction_loss(unet, vae, conditioning: TextConditioning, noise_scheduler, pixels, batch: dict, weight_dtype) -> torch.Tensor:
    """MSE between the UNet's prediction and the noise (epsilon) or velocity (v_prediction) target.

    batch: collate_captioned's {"input_ids", "time_ids" (SDXL)}.
    """
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        states, pooled = conditioning.encode(batch["input_ids"])
        unet_kwargs = conditioning.unet_kwargs(states, pooled, batch.get("time_ids"))
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"noise scheduler prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
    prediction = unet(noisy, timesteps, **unet_kwargs).sample
    return F.mse_loss(prediction.float(), target.float())


@torch.no_grad()
def validate(cfg: DiffusionConfig, parts: dict, unet, accelerator, step: int, weight_dtype) -> list[Path]:
    """Generate `num_validation_images` for `validation_prompt`; saved as validation/step_<n>_<i>.png."""
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    conditioning = parts["conditioning"]
    if conditioning.sdxl:
        encoders = dict(zip(("tokenizer_2", "text_encoder_2"), (conditioning.tokenizers[-1], conditioning.text_encoders[-1])))
        if len(conditioning.text_encoders) == 2:
            encoders.update(tokenizer=conditioning.tokenizers[0], text_encoder=conditioning.text_encoders[0])
        pipe = StableDiffusionXLPipeline.from_pretrained(cfg.model, unet=unet, vae=parts["vae"], revision=cfg.revision, **encoders)
    else:
        pipe = DiffusionPipeline.from_pretrained(
            cfg.model, unet=unet, vae=parts["vae"], text_encoder=conditioning.text_encoders[0], tokenizer=conditioning.tokenizers[0],
            revision=cfg.revision, safety_checker=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    unet.eval()
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
    folder = Path(cfg.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with accelerator.autocast():
        for i in range(cfg.num_validation_images):
            image = pipe(cfg.validation_prompt, num_inference_steps=cfg.validation_inference_steps, generator=generator,
                         height=cfg.resolution, width=cfg.resolution).images[0]
            paths.append(folder / f"step_{step:06d}_{i}.png")
            if accelerator.is_main_process:  # a sharded UNet generates on every process alike
                image.save(paths[-1])
    del pipe
    return paths


def log_images(accelerator, paths: list[Path], step: int) -> None:
    """The validation images as one (N, H, W, 3) batch to every tracker that takes images (TensorBoard, W&B, ...)."""
    trackers = [t for t in accelerator.trackers if hasattr(t, "log_images")]
    if not trackers or not paths:
        return
    import numpy as np
    from PIL import Image

    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    for tracker in trackers:
        kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
        tracker.log_images({"validation": images}, step=step, **kwargs)


# restore_rng_after_skip: a run resumed inside an epoch starts a new data iterator there, which draws its
# seed from the CPU generator (the uninterrupted run drew it at the epoch's start) and fetches the
# skipped batches; the CPU generator is set back to the checkpoint's state at the first batch, so the
# noise and timesteps drawn on the CPU are the uninterrupted run's (exact when the image transforms
# draw no random numbers, i.e. random_flip off; a GPU run draws its noise on the GPU's generator).


def resumable_state(accelerator, run: Run, model, optimizer, scheduler) -> TrainState:
    """The step counters; restored (with the trainable state, optimizer, scheduler and RNG states) from
    `run.resume_from` when the run resumes."""
    state = TrainState()
    if run.resume_from is not None:
        state.load_state_dict(load_checkpoint(accelerator, run.resume_from, model, optimizer, scheduler))
        accelerator.print(f"resumed from {run.resume_from} at step {state.step}")
    return state
