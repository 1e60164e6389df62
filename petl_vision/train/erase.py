"""Train an SPM membrane that erases a concept from a Stable Diffusion UNet (the official SPM recipe).

Each step (official `train_spm.py`):
1. x_t: sample t_to in [1, T) (T = 30 DDIM steps) and denoise random latents for t_to DDIM steps
   with the membrane on, classifier-free guidance 3 on [unconditional, concept]; the matching
   1000-step timestep is ``timesteps_1000[int(t_to * 1000 / T)]``.
2. Erasing loss (ESD style, the surrogate "" as neutral): with the original UNet (membrane off)
   ``target = eps(x_t, surrogate) - eta * (eps(x_t, positive) - eps(x_t, surrogate))``, eta 1, and
   ``L_erase = MSE(eps_spm(x_t, concept), target)``.
3. Latent anchoring: `anchors` random text embeddings with the concept embedding's flat norm times
   U(0.8, 1.2), each accepted with probability 1 - cos(anchor, concept);
   ``L = L_erase + anchor_strength * MSE(eps_spm(x_t, a), eps_orig(x_t, a))`` (1000, 4 anchors).
   The official code feeds the anchors through its CFG helper, so its anchor predictions are those of
   [uncond, a_3, uncond, a_4] (the second half of the interleaved [uncond, a_i] batch):
   `official_anchor_batch` reproduces that; the default uses the 4 anchors, as the paper says.

SDXL (UNets with addition_embed_type "text_time"; the official code is SD 1.x / 2.x only): every prompt
is encoded as diffusers' SDXL pipeline does (conditioning.py: both encoders' penultimate states
concatenated, text_encoder_2's pooled embeddings); the unconditional prompt is encoded too (not zeroed as
the pipeline's force_zeros_for_empty_prompt would). time ids are those of the pipeline at inference for
the step's latent size: original = target = (h, w) in pixels, crop (0, 0). An anchor is a pair
(states, pooled), each drawn by the official rule above from its own part of the concept: states around
the concept's states and their norm, pooled around the concept's pooled embedding and its norm (both random
directions, so an anchor is "some other prompt" in both inputs the UNet reads text from).

Defaults are the official snoopy recipe (SD 1.4, rank 1, alpha 1, 3000 steps, batch 1, lr 1e-4,
cosine with 3 restarts, 500 warm-up steps, 512 px with dynamic resolution, no gradient clipping).
The official optimizer is bitsandbytes' AdamW8bit (`optimizer: adamw8bit`); the default `adamw`
(torch, same hyper-parameters) needs no extra package. On Accelerate: mixed precision, checkpoints
every `checkpoint_every` steps with exact `--resume`, the official file every checkpoint
(``<name>_<step>steps.safetensors``) and at the end (``<name>_last.safetensors``).

Under FSDP2 (an FSDP launch, see sharding.py) the UNet is sharded per block after the membrane is
applied; every process runs the same seeded step (there is no data to split), so the averaged
gradient is the single-process one; the membrane file is gathered and written once by rank 0.
"""
from __future__ import annotations

import random
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import petl_vision as pv
from petl_vision.core.distributed import sharding
from petl_vision.methods.spm import membranes_disabled

from .conditioning import TextConditioning
from .config import ConfigError, check_override, coerce, parse_override, read_mapping
from .deepspeed_support import deepspeed_requested
from .checkpoint import check_finite, save_checkpoint
from .diffusion import (ARTIFACTS, check_attention, config_record, load_unet_and_conditioning, resumable_state, set_attention,
                        start_diffusion_run)
from .sharding import maybe_shard, prepare_all
from .tracking import MetricsLog, check_trackers, finish_trackers, start_trackers

# A run folder of erase_concept also holds the membranes it wrote.
ERASE_ARTIFACTS = (*ARTIFACTS, "*steps.safetensors", "*_last.safetensors")


@dataclass
class EraseConfig:
    """Every field is a YAML key of configs/methods/spm.yaml and a `key=value` override.

    model: diffusers pipeline folder or hub id. concept: the prompt to erase (official "target").
    positive: the prompt whose noise prediction is pushed away (None: the concept).
    surrogate: the neutral prompt the concept falls back to (official "neutral": "").
    name: membrane / file name (None: the concept with "_" for spaces).
    max_denoising_steps: T of the DDIM sampling of x_t. sampling_guidance: its CFG scale.
    erase_guidance: eta of the erasing target. anchors / anchor_strength: latent anchoring
    (sampling_batch_size / la_strength); latent_anchoring false = the official "erase" action.
    resolution / dynamic_resolution: image size (random in [res/2, res) in 64 px steps when dynamic).
    optimizer: adamw (torch) or adamw8bit (bitsandbytes, official). lr_scheduler: any name of
    diffusers.optimization.get_scheduler. max_grad_norm: 0 = no clipping (official).
    overwrite: replace the run that output_dir holds (else an output_dir holding another run is refused).
    log_with: Accelerate trackers (tensorboard, wandb, ...) for per-step losses and lr (output_dir/logs).
    attention: the UNet's attention processors: sdpa (default), xformers or default (diffusion.set_attention).
    """

    model: str = "CompVis/stable-diffusion-v1-4"
    concept: str = ""
    positive: str | None = None
    surrogate: str = ""
    unconditional: str = ""
    name: str | None = None
    output_dir: str = "runs/spm"
    revision: str | None = None
    rank: int = 1
    alpha: float = 1.0
    max_steps: int = 3000
    batch_size: int = 1
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    lr_scheduler: str = "cosine_with_restarts"
    lr_num_cycles: int = 3
    warmup_steps: int = 500
    max_grad_norm: float = 0.0
    max_denoising_steps: int = 30
    sampling_guidance: float = 3.0
    erase_guidance: float = 1.0
    latent_anchoring: bool = True
    anchors: int = 4
    anchor_strength: float = 1000.0
    official_anchor_batch: bool = False
    resolution: int = 512
    dynamic_resolution: bool = True
    mixed_precision: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    overwrite: bool = False
    log_with: str | None = None
    attention: str = "sdpa"

    @property
    def membrane_name(self) -> str:
        return self.name or re.sub(r"[^A-Za-z0-9_\-]", "_", self.concept.strip()) or "spm"


def load_erase_config(path: str | Path | None = None, overrides=()) -> EraseConfig:
    """EraseConfig from a YAML file (or the defaults) plus `key=value` overrides (see config.parse_override).

    `key=` sets an empty string; a number given for a string field (concept=1984) is read as its text.
    """
    source = str(path or "config")
    hints = typing.get_type_hints(EraseConfig)
    raw = read_mapping(path) if path is not None else {}
    unknown = [k for k in raw if k not in hints]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(hints)}")
    for item in overrides:
        keys, value = parse_override(item, empty="")
        check_override(item, keys, hints)
        raw[keys[0]] = _field(value, hints[keys[0]], f"override {item!r}", keys[0])
    cfg = EraseConfig(**{k: _field(v, hints[k], source, k) for k, v in raw.items()})
    if not cfg.concept.strip():
        raise ConfigError(f"{source}: concept is empty; pass --concept \"snoopy\" (the prompt to erase)")
    for key in ("max_steps", "batch_size", "max_denoising_steps", "checkpoint_every", "keep_checkpoints", "rank", "resolution"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{source}: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_denoising_steps < 2:
        raise ConfigError(f"{source}: max_denoising_steps must be >= 2 (t_to is drawn from [1, T)), got {cfg.max_denoising_steps}")
    if cfg.latent_anchoring and cfg.anchors % cfg.batch_size:
        raise ConfigError(f"{source}: anchors ({cfg.anchors}) must be a multiple of batch_size ({cfg.batch_size})")
    if cfg.optimizer not in ("adamw", "adamw8bit"):
        raise ConfigError(f"{source}: optimizer must be adamw or adamw8bit, got {cfg.optimizer!r}")
    if cfg.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ConfigError(f"{source}: mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    return cfg


def _field(value, tp, source: str, key: str):
    """`value` coerced to the field type `tp`; a number for a string field becomes its text."""
    if tp in (str, str | None) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return coerce(value, tp, source, key)


def load_parts(cfg: EraseConfig) -> dict:
    """conditioning (TextConditioning: tokenizer(s) and text encoder(s)), unet, the official DDIM scheduler
    and the VAE's scale factor."""
    from diffusers import AutoencoderKL, DDIMScheduler

    kw = dict(revision=cfg.revision)
    try:
        prediction_type = DDIMScheduler.load_config(cfg.model, subfolder="scheduler").get("prediction_type", "epsilon")
    except (OSError, ValueError):
        prediction_type = "epsilon"
    vae = AutoencoderKL.load_config(cfg.model, subfolder="vae", **kw)
    unet, conditioning = load_unet_and_conditioning(cfg.model, cfg.revision)
    return {
        "conditioning": conditioning,
        "unet": unet,
        # The official DDIM (LECO's create_noise_scheduler): SD's betas, no clipping, default spacing.
        "scheduler": DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                   clip_sample=False, prediction_type=prediction_type),
        "vae_scale": 2 ** (len(vae["block_out_channels"]) - 1),
    }


def sample_anchors(target: torch.Tensor, n: int) -> torch.Tensor:
    """n anchor embeddings (n, L, D) around the concept embedding `target` (1, L, D), official rule."""
    samples = []
    flat = target.reshape(-1)
    while len(samples) < n:
        while True:
            noise = torch.randn_like(target)
            noise = noise / noise.reshape(-1).norm()
            sim = F.cosine_similarity(flat, noise.reshape(-1), dim=0)
            if random.random() < 1 - sim:
                break
        samples.append((random.random() * 0.4 + 0.8) * noise * flat.norm())
    return torch.cat(samples)


def anchor_batch(anchors: torch.Tensor, unconditional: torch.Tensor, official: bool) -> torch.Tensor:
    """The text states the anchoring loss runs on: the anchors (n, L, D); official: the second half of
    the interleaved [uncond, a_1, uncond, a_2, ...] that the official CFG helper keeps (n = 4:
    [uncond, a_3, uncond, a_4])."""
    if not official:
        return anchors
    pairs = torch.stack([unconditional[0].expand_as(anchors), anchors], 1).flatten(0, 1)
    return pairs[anchors.shape[0]:]


def latent_size(cfg: EraseConfig, vae_scale: int) -> tuple[int, int]:
    """(h, w) of the latents; dynamic: each side random in [res/2, res) in steps of 64 px (official)."""
    size = cfg.resolution // vae_scale
    if not cfg.dynamic_resolution:
        return size, size
    step = max(1, 64 // vae_scale)
    low, high = (size // 2) // step, size // step
    if high <= low:
        return size, size
    return tuple(int(torch.randint(low, high, (1,)).item()) * step for _ in range(2))


def erase_step(cfg: EraseConfig, unet, plain_unet, scheduler, embeds: dict, vae_scale: int, device, pooled: dict | None = None) -> dict:
    """One training step's losses {"loss", "erase", "anchor"} (the graph is on "loss").

    embeds: prompt key -> text states (1, L, D); pooled: prompt key -> pooled embeddings (1, P) for SDXL
    UNets (None: SD 1.x / 2.x, the states alone).
    """
    T = cfg.max_denoising_steps
    b = cfg.batch_size

    def rows(e):  # (1, L, D) -> (b, L, D)
        return e.expand(b, *e.shape[1:])

    time_ids = None

    def text(states, pooled_embeds=None):
        """The UNet's text conditioning kwargs: the states, and for SDXL the pooled embeddings and time ids."""
        if pooled is None:
            return {"encoder_hidden_states": states}
        return {"encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": pooled_embeds, "time_ids": time_ids.expand(states.shape[0], -1)}}

    def prompt(key):
        return text(rows(embeds[key]), rows(pooled[key]) if pooled is not None else None)

    with torch.no_grad():
        scheduler.set_timesteps(T, device=device)
        t_to = int(torch.randint(1, T, (1,)).item())
        h, w = latent_size(cfg, vae_scale)
        if pooled is not None:  # the pipeline's time ids at inference: original = target = the image size, no crop
            time_ids = TextConditioning.time_ids((h * vae_scale, w * vae_scale), (0, 0), (h * vae_scale, w * vae_scale), device=device)
        x = (torch.randn(b, plain_unet.config.in_channels, h, w) * scheduler.init_noise_sigma).to(device)
        cond = text(torch.cat([rows(embeds["unconditional"]), rows(embeds["concept"])]),
                    torch.cat([rows(pooled["unconditional"]), rows(pooled["concept"])]) if pooled is not None else None)
        for t in scheduler.timesteps[:t_to]:  # membrane on
            uncond, guided = unet(torch.cat([x, x]), t, **cond).sample.chunk(2)
            x = scheduler.step(uncond + cfg.sampling_guidance * (guided - uncond), t, x).prev_sample
        scheduler.set_timesteps(1000)
        t_cur = scheduler.timesteps[int(t_to * 1000 / T)].to(device)
        with membranes_disabled(plain_unet):
            positive = unet(x, t_cur, **prompt("positive")).sample.float()
            neutral = unet(x, t_cur, **prompt("surrogate")).sample.float()
    prediction = unet(x, t_cur, **prompt("concept")).sample.float()
    erase = F.mse_loss(prediction, neutral - cfg.erase_guidance * (positive - neutral))
    losses = {"loss": erase, "erase": erase.detach(), "anchor": torch.zeros(())}
    if cfg.latent_anchoring:
        anchors = anchor_batch(sample_anchors(embeds["concept"], cfg.anchors), embeds["unconditional"], cfg.official_anchor_batch)
        pooled_anchors = (anchor_batch(sample_anchors(pooled["concept"], cfg.anchors), pooled["unconditional"], cfg.official_anchor_batch)
                          if pooled is not None else None)
        anchor_text = text(anchors, pooled_anchors)
        xa = x.repeat(cfg.anchors // b, 1, 1, 1)
        anchored = unet(xa, t_cur, **anchor_text).sample.float()
        with torch.no_grad(), membranes_disabled(plain_unet):
            original = unet(xa, t_cur, **anchor_text).sample.float()
        anchor = F.mse_loss(anchored, original)
        losses["loss"] = erase + cfg.anchor_strength * anchor
        losses["anchor"] = anchor.detach()
    return losses


def train_erasure(cfg: EraseConfig, resume: str | Path | bool | None = None, stop_after_step: int | None = None,
                  overwrite: bool = False) -> dict:
    """Train and return {"unet", "output_dir", "spm_file", "steps", "losses", "trainable_params"}.

    resume: a checkpoint dir, an output dir or True (the latest complete checkpoint under
        `cfg.output_dir/checkpoints`), written by the same configuration.
    stop_after_step: stop (as if interrupted) after that step's checkpoint; for tests.
    overwrite: replace the run output_dir holds (also `cfg.overwrite`); else FileExistsError. Nothing
        is written before the pipeline and checkpoint are loaded.
    A NaN or infinite loss raises FloatingPointError naming the step; no membrane is written then.
    metrics.jsonl gets {"step", "loss", "erase", "anchor", "lr"} per step.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from petl_vision.diffusers.spm_format import save_spm

    if deepspeed_requested():
        raise ConfigError("deepspeed: erase_concept has no DeepSpeed path; launch it with configs/accelerate/fsdp.yaml "
                          "(FSDP2) or configs/accelerate/ddp.yaml")
    check_attention(cfg.attention)
    trackers = check_trackers(cfg.log_with)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers, project_dir=cfg.output_dir)
    set_seed(cfg.seed)
    run = start_diffusion_run(cfg, resume, overwrite, ERASE_ARTIFACTS)
    accelerator.wait_for_everyone()
    out = run.out
    parts = load_parts(cfg)
    conditioning, unet, scheduler = parts.pop("conditioning"), parts["unet"], parts["scheduler"]
    device = accelerator.device
    conditioning.requires_grad_(False).to(device).eval()
    prompts = {"concept": cfg.concept, "positive": cfg.positive if cfg.positive is not None else cfg.concept,
               "surrogate": cfg.surrogate, "unconditional": cfg.unconditional}
    with torch.no_grad():
        encoded = {k: conditioning.encode_prompts([p]) for k, p in prompts.items()}
    embeds = {k: states for k, (states, _) in encoded.items()}
    pooled = {k: p for k, (_, p) in encoded.items()} if conditioning.sdxl else None
    del conditioning, encoded
    unet.to(device).eval()
    set_attention(unet, cfg.attention)
    name = cfg.membrane_name
    pv.apply(unet, pv.SPMConfig(rank=cfg.rank, alpha=cfg.alpha, membranes=(name,), prompts=(cfg.concept,)))
    unet = maybe_shard(accelerator, unet)  # FSDP2 per block under an FSDP launch
    sharded = sharding(unet) == "fsdp2"  # then the membrane file is gathered on every process, written by rank 0
    trainable = [p for p in unet.parameters() if p.requires_grad]  # after sharding: DTensors under FSDP2
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes), or use optimizer=adamw") from e
        optimizer = bnb.optim.AdamW8bit(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps,
                                 num_cycles=cfg.lr_num_cycles)
    unet, optimizer = prepare_all(accelerator, unet, optimizer)  # the scheduler steps once per step, whatever the process count
    plain_unet = accelerator.unwrap_model(unet)
    state = resumable_state(accelerator, run, unet, optimizer, lr_scheduler)
    run.commit(accelerator, yaml.safe_dump(config_record(cfg), sort_keys=False))
    start_trackers(accelerator, config_record(cfg))
    log = MetricsLog(out, enabled=accelerator.is_main_process)
    log.truncate_after(state.step, key="step")

    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (cfg.progress and accelerator.is_local_main_process))
    losses: list[dict] = []
    while state.step < cfg.max_steps and state.step != stop_after_step:
        with accelerator.autocast():
            step_losses = erase_step(cfg, unet, plain_unet, scheduler, embeds, parts["vae_scale"], device, pooled)
        check_finite(step_losses["loss"], state.step + 1, "", f"lower lr (now {cfg.lr:g}) or anchor_strength", accelerator)
        accelerator.backward(step_losses["loss"])
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            lr_scheduler.step()
        optimizer.zero_grad()
        state.step += 1
        losses.append({k: v.item() for k, v in step_losses.items()})
        log.log({"step": state.step, **losses[-1], "lr": lr_scheduler.get_last_lr()[0]})
        accelerator.log({**{f"train/{k}": v for k, v in losses[-1].items()}, "train/lr": lr_scheduler.get_last_lr()[0]}, step=state.step)
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]['loss']:.3e}", erase=f"{losses[-1]['erase']:.3e}", lr=f"{lr_scheduler.get_last_lr()[0]:.1e}")
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps:
            save_checkpoint(accelerator, run, state.step, unet, optimizer, lr_scheduler, state.state_dict(), cfg.keep_checkpoints)
            if (accelerator.is_main_process or sharded) and state.step < cfg.max_steps:
                save_spm(plain_unet, out / f"{name}_{state.step}steps.safetensors", name)
    bar.close()
    log.close()
    result = {"unet": plain_unet, "output_dir": str(out), "spm_file": None, "steps": state.step, "losses": losses,
              "trainable_params": sum(p.numel() for p in trainable)}
    finish_trackers(accelerator)
    if state.step < cfg.max_steps:
        return result
    accelerator.wait_for_everyone()
    if accelerator.is_main_process or sharded:
        result["spm_file"] = str(save_spm(plain_unet, out / f"{name}_last.safetensors", name))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
