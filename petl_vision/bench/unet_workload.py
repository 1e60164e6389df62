"""Benchmark workload: a diffusers UNet2DConditionModel trained on the noise-prediction loss.

    python scripts/benchmark.py --import petl_vision.bench.unet_workload --workload diffusers-unet \
        --model sd15-unet --methods full lora sara --method-arg lora.train_head=false --batch-size 1

`model` names a preset (below); `model_kwargs` override any UNet2DConditionModel config entry.
- "sd15-unet": Stable Diffusion 1.5's UNet (block widths 320/640/1280/1280, 2 layers per block,
  cross-attention dim 768, 8 heads), 64x64 latents (512 px images), 860M parameters.
- "sd15-unet-lite": the same widths, cross-attention dim and heads with 1 layer per block and
  32x32 latents (256 px), 579M parameters: SD 1.5's layer shapes at a size a CPU can train.
- "tiny-unet": widths 16/32, for tests.

Inputs: latents (B, 4, S, S), timesteps (B,) in [0, 1000), text states (B, 77, cross_attention_dim),
all standard-normal; the loss is the MSE between the UNet output and a noise target (B, 4, S, S).
Inference on a UNet with SPM membranes runs them live as Facilitated Transport does inside a
pipeline call: with per-sample strengths (B,) set (all 1, so the merged UNet gives the same output).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .workload import Workload, register_workload

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
PRESETS = {
    "sd15-unet": SD15_UNET,
    "sd15-unet-lite": {**SD15_UNET, "layers_per_block": 1, "sample_size": 32},
    "tiny-unet": {**SD15_UNET, "block_out_channels": (16, 32), "layers_per_block": 1, "sample_size": 8, "norm_num_groups": 8,
                  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                  "cross_attention_dim": 32},
}
TEXT_TOKENS = 77


@register_workload
class DiffusersUNet(Workload):
    """A UNet2DConditionModel from a preset; noise-prediction MSE on random latents and text states."""

    name = "diffusers-unet"
    description = "diffusers UNet2DConditionModel, noise-prediction MSE on random latents"
    # Module-level methods (SaRA, LoRA, SSF, full, ...) declare input_kind "image"; they run on any
    # model, so this workload accepts them. Methods that need a classifier head fail to attach
    # (LoRA: pass lora.train_head=false).
    input_kind = "image"

    def feeds(self, method) -> bool:
        """Module-level methods ("image") and UNet methods such as SPM ("latents")."""
        return method.input_kind in ("image", "latents")

    def config(self) -> dict:
        if self.model not in PRESETS:
            raise ValueError(f"diffusers-unet: unknown preset {self.model!r}; presets: {', '.join(PRESETS)}")
        return {**PRESETS[self.model], **self.model_kwargs}

    def build_model(self) -> nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**self.config())

    def make_batch(self, model, batch_size, device, generator):
        config = model.config
        size = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        latents, noise = torch.randn(size, generator=generator), torch.randn(size, generator=generator)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        text = torch.randn(batch_size, TEXT_TOKENS, config.cross_attention_dim, generator=generator)
        return tuple(t.to(device) for t in (latents, timesteps, text, noise))

    def loss(self, model, batch):
        latents, timesteps, text, noise = batch
        return F.mse_loss(model(latents, timesteps, text).sample.float(), noise)

    def infer(self, model, batch):
        latents, timesteps, text, _ = batch
        set_transport_strengths(model, latents.shape[0])
        return model(latents, timesteps, text).sample


def set_transport_strengths(model: nn.Module, batch_size: int) -> None:
    """Per-sample membrane strengths (B,) of 1, as `pv.diffusers` transport sets them (CPU tensors)."""
    from ..methods.spm import has_spm, spm_module

    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if has_spm(model):
        spm = spm_module(model)
        if spm.strengths is None:
            with torch.inference_mode(False):  # transport computes them outside the pipeline's no-grad forward
                spm.strengths = {name: torch.ones(batch_size) for name in spm.membranes}
