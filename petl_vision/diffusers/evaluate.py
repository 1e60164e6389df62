"""Evaluate concept erasure: CLIP score, CLIP error rate and noise-prediction gap, before vs after SPM.

For every concept (erased and preserved), every template ("a photo of {}", ...) and fixed seeds,
images are generated with the original pipeline (membranes disabled) and with the membranes, on the
same seeds. Measured per concept, before and after:
- CLIP score (the official SPM evaluation, from CLIPScore): 2.5 * max(cos(image, concept text), 0),
  with open_clip (official: OpenAI ViT-B/32); the text is the bare concept.
- CLIP error rate: the share of images whose CLIP score against "" is not below the score against
  the concept ("closer to the empty prompt than to the concept"); high after erasure = erased.
- Noise-prediction gap: MSE between the membrane-equipped and the original UNet's noise prediction
  for the concept's prompt on fixed latents and timesteps, relative to the original's mean square
  (with Facilitated Transport, at the concept prompt's own strength).
`write_report` writes results.json, report.md and grid.png (rows: concepts; columns: before / after).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..methods.spm import has_spm, spm_module
from ._plugin import pipeline_denoiser
from .spm import disabled

CLIP_SCORE_WEIGHT = 2.5  # w of CLIPScore, as the official evaluation
GAP_TIMESTEPS = (900, 700, 500, 300, 100)


@torch.no_grad()
def clip_scores(images, texts: list[str], clip_model, tokenizer, preprocess) -> torch.Tensor:
    """(len(images), len(texts)) CLIP scores 2.5 * max(cos, 0) of PIL images against texts."""
    device = next(clip_model.parameters()).device
    pixels = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(device)
    image = F.normalize(clip_model.encode_image(pixels).float(), dim=-1)
    text = F.normalize(clip_model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)
    return (CLIP_SCORE_WEIGHT * image @ text.T).clamp(min=0).cpu()


def generate(pipe, prompt: str, seeds: list[int], steps: int, guidance: float, height: int | None, width: int | None, device) -> list:
    """One image per seed (PIL), each with its own generator."""
    images = []
    for seed in seeds:
        generator = torch.Generator(device=device).manual_seed(seed)
        images += pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator, height=height, width=width).images
    return images


@torch.no_grad()
def noise_gap(pipe, prompt: str, samples: int = 4, seed: int = 0) -> float:
    """Relative MSE between the membrane-equipped and original noise prediction for `prompt`."""
    unet = pipeline_denoiser(pipe)
    device = unet.device
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples * len(GAP_TIMESTEPS), unet.config.in_channels, size, size, generator=g).to(device, unet.dtype)
    t = torch.tensor(GAP_TIMESTEPS, device=device).repeat_interleave(samples)
    encoded = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)  # with transport: sets this prompt's strengths
    try:
        states = encoded[0].expand(x.shape[0], -1, -1)
        extra = added_conditioning(pipe, unet, encoded, x.shape[0], size)
        with disabled(pipe):
            original = unet(x, t, states, **extra).sample.float()
        spm = unet(x, t, states, **extra).sample.float()
    finally:
        spm_module(unet).strengths = None
    return (F.mse_loss(spm, original) / original.square().mean()).item()


def added_conditioning(pipe, unet, encoded, batch: int, latent_size: int) -> dict:
    """The UNet's conditioning besides the text states: SDXL's pooled text embeddings and time ids
    (original size, crop (0, 0), target size: the image size of `latent_size` latents), as the SDXL
    pipeline builds them; {} for SD 1.x / 2.x UNets. Other extra conditioning (class labels, image
    embeddings) is refused with what is supported."""
    config = unet.config
    kind = config.addition_embed_type
    supported = "supported: UNets conditioned on the text alone (SD 1.x / 2.x) or on text + time ids (SDXL, addition_embed_type='text_time')"
    if config.class_embed_type is not None or config.num_class_embeds is not None:
        raise ValueError(f"noise_gap: this UNet needs class_labels (class_embed_type={config.class_embed_type!r}); {supported}")
    if kind is None:
        return {}
    pooled = encoded[2] if isinstance(encoded, tuple) and len(encoded) >= 3 else None
    time_dim = None if pooled is None else unet.add_embedding.linear_1.in_features - pooled.shape[-1]
    if kind != "text_time" or time_dim != 6 * config.addition_time_embed_dim:
        raise ValueError(f"noise_gap: this UNet takes addition_embed_type={kind!r} with {type(pipe).__name__}'s encode_prompt; {supported}")
    pixels = latent_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], device=pooled.device, dtype=pooled.dtype)
    return {"added_cond_kwargs": {"text_embeds": pooled.expand(batch, -1), "time_ids": time_ids.expand(batch, -1)}}


def evaluate_erasure(pipe, erased: list[str], preserved: list[str], clip_model, clip_tokenizer, clip_preprocess,
                     templates=("{}",), num_images: int = 2, seed: int = 0, steps: int = 30, guidance: float = 7.5,
                     height: int | None = None, width: int | None = None, gap_samples: int = 4) -> dict:
    """Generate before/after images of every concept and measure them; see the module docstring.

    Returns {"concepts": [{"concept", "kind", "clip_before", "clip_after", "cer_before", "cer_after",
    "noise_gap"}], "images": {concept: {"before": [...], "after": [...]}}, "settings": {...}}.
    """
    if not has_spm(pipeline_denoiser(pipe)):
        raise ValueError("evaluate_erasure: no SPM membrane is loaded into the pipeline; call pv.diffusers.load_spm first")
    if not erased and not preserved:
        raise ValueError("evaluate_erasure: give at least one erased or preserved concept")
    device = pipeline_denoiser(pipe).device
    seeds = [seed + i for i in range(num_images)]
    rows, images = [], {}
    for kind, concepts in (("erased", erased), ("preserved", preserved)):
        for concept in concepts:
            before, after = [], []
            for template in templates:
                prompt = template.format(concept)
                with disabled(pipe):
                    before += generate(pipe, prompt, seeds, steps, guidance, height, width, device)
                after += generate(pipe, prompt, seeds, steps, guidance, height, width, device)
            images[concept] = {"before": before, "after": after}
            row = {"concept": concept, "kind": kind}
            for label, ims in (("before", before), ("after", after)):
                scores = clip_scores(ims, [concept, ""], clip_model, clip_tokenizer, clip_preprocess)
                row[f"clip_{label}"] = scores[:, 0].mean().item()
                row[f"cer_{label}"] = (scores[:, 1] >= scores[:, 0]).float().mean().item()
            row["noise_gap"] = noise_gap(pipe, templates[0].format(concept), gap_samples, seed)
            rows.append(row)
    settings = {"templates": list(templates), "num_images": num_images, "seed": seed, "steps": steps, "guidance": guidance}
    return {"concepts": rows, "images": images, "settings": settings}


def image_grid(images: dict, columns: int = 4):
    """A PIL grid: one row per concept, its first `columns` "before" then "after" images."""
    from PIL import Image

    first = next(iter(images.values()))["before"][0]
    w, h = first.size
    n = min(columns, min(len(v["before"]) for v in images.values()))
    grid = Image.new("RGB", (2 * n * w + w // 4, len(images) * h), "white")
    for r, group in enumerate(images.values()):
        for c in range(n):
            grid.paste(group["before"][c], (c * w, r * h))
            grid.paste(group["after"][c], (n * w + w // 4 + c * w, r * h))
    return grid


def write_report(result: dict, output_dir: str | Path, title: str = "Concept erasure") -> Path:
    """results.json, grid.png and report.md in `output_dir`; returns the report's path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"concepts": result["concepts"], "settings": result["settings"]}, indent=2))
    image_grid(result["images"]).save(out / "grid.png")
    lines = [
        f"# {title}", "",
        f"Templates {result['settings']['templates']}, {result['settings']['num_images']} seeds from {result['settings']['seed']}, "
        f"{result['settings']['steps']} steps, guidance {result['settings']['guidance']}.", "",
        "| concept | kind | CLIP score before | after | CLIP error rate before | after | noise-prediction gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["concepts"]:
        lines.append(f"| {r['concept']} | {r['kind']} | {r['clip_before']:.4f} | {r['clip_after']:.4f} | "
                     f"{r['cer_before']:.3f} | {r['cer_after']:.3f} | {r['noise_gap']:.4g} |")
    lines += ["", "CLIP score: 2.5 x max(cos, 0) against the concept text (lower after = erased). CLIP error rate: share of "
              "images closer to \"\" than to the concept (higher after = erased). Noise-prediction gap: MSE(eps_spm, eps_orig) / "
              "mean(eps_orig^2) for the concept prompt.", "", "Rows: concepts in table order; left: original model, right: with SPM.", "",
              "![before / after](grid.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
