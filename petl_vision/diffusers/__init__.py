"""Pipeline-level plugins for diffusers: call them on an existing pipeline object.

    pipe = StableDiffusionPipeline.from_pretrained(...)
    pv.diffusers.load_spm(pipe, ["snoopy.safetensors"])        # official SPM files; transport per prompt
    pv.diffusers.unload(pipe)                                  # membranes gone, outputs as before
    pv.diffusers.load_sara(pipe, "runs/sd15_sara/adapter")     # or an official SaRA .pt file
    pv.diffusers.unload_sara(pipe)                             # base weights back, bit for bit
"""
from .evaluate import evaluate_erasure, write_report
from .lora_format import export_diffusers_lora
from .sara import load_official_checkpoint, load_sara, unload_sara
from .spm import disabled, list_loaded, load_spm, set_transport, set_weights, transport_strengths, unload
from .spm_format import export_lora, read_spm, save_spm

__all__ = [
    "disabled", "evaluate_erasure", "export_diffusers_lora", "export_lora", "list_loaded", "load_official_checkpoint", "load_sara", "load_spm",
    "read_spm", "save_spm", "set_transport", "set_weights", "transport_strengths", "unload", "unload_sara", "write_report",
]
