"""Pipeline-level plugins for diffusers: call them on an existing pipeline object.

    pipe = StableDiffusionPipeline.from_pretrained(...)
    pv.diffusers.load_sara(pipe, "runs/sd15_sara/adapter")   # or an official SaRA .pt file
    image = pipe("a photo of a cat").images[0]
    pv.diffusers.unload_sara(pipe)                          # base weights back, bit for bit
"""
from .sara import load_official_checkpoint, load_sara, unload_sara

__all__ = ["load_official_checkpoint", "load_sara", "unload_sara"]
