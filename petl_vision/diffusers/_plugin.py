"""Helpers shared by the pipeline plugins: finding the denoiser of a pipeline."""
from __future__ import annotations

from torch import nn

DENOISER_NAMES = ("unet", "transformer", "prior")


def pipeline_denoiser(pipe) -> nn.Module:
    """The denoising network of a diffusers pipeline (`pipe.unet`, else `pipe.transformer`, ...).

    Also accepts the network itself (any nn.Module), so plugins work on a bare UNet too.
    """
    if isinstance(pipe, nn.Module):
        return pipe
    for name in DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(
        f"{type(pipe).__name__} has no denoiser among attributes {DENOISER_NAMES}; "
        "pass a diffusers pipeline (e.g. StableDiffusionPipeline) or the UNet itself"
    )
