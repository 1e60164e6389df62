"""Evaluate SPM concept erasure: CLIP score, CLIP error rate, noise-prediction gap, before/after grid.

    python scripts/evaluate_erasure.py --model CompVis/stable-diffusion-v1-4 --spm runs/spm/snoopy_last.safetensors \
        --erased snoopy --preserved dog mickey woman --num-images 4 --output-dir runs/spm/eval
    python scripts/evaluate_erasure.py --model PIPELINE_DIR --spm a.safetensors b.safetensors --erased a b \
        --clip-config my_clip.json --clip-pretrained weights.pt --templates "a photo of {}" "a painting of {}"

CLIP: an open_clip architecture and pretrained tag (default ViT-B-32 / openai, the official evaluation
model; downloaded by open_clip), or --clip-config (a JSON architecture) with --clip-pretrained (a
local file or none). Writes results.json, report.md and grid.png under --output-dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import petl_vision.diffusers.spm as spm_plugin
from petl_vision.clip.load import load_clip
from petl_vision.diffusers.evaluate import evaluate_erasure, write_report
from petl_vision.train.cli import ArgumentParser, add_debug_argument, check_pipeline_arg, run_cli
from petl_vision.train.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    parser.add_argument("--spm", nargs="+", required=True, help="SPM files (official format)")
    parser.add_argument("--erased", nargs="*", default=[], help="erased concepts to measure")
    parser.add_argument("--preserved", nargs="*", default=[], help="other concepts whose images should not change")
    parser.add_argument("--templates", nargs="+", default=["{}"], help="prompt templates with {} for the concept")
    parser.add_argument("--num-images", type=int, default=4, help="images per concept and template (seeds seed..seed+n-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30, help="inference steps")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--weights", nargs="+", type=float, help="membrane weights, one per --spm file")
    parser.add_argument("--no-transport", action="store_true", help="static membranes (no Facilitated Transport)")
    parser.add_argument("--official", action="store_true", help="official transport composition (g^2, cross terms)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip tag or local checkpoint; 'none' for random")
    parser.add_argument("--clip-config", help="open_clip JSON architecture file (instead of --clip-model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default="runs/spm_eval")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    for path in args.spm:  # checked before the pipeline loads (a Hub repo id passes on to load_spm)
        if path.endswith(".safetensors") and not Path(path).is_file():
            raise ConfigError(f"--spm: file not found: {path} (expected an SPM .safetensors file, e.g. from erase_concept.py)")
    if args.weights is not None and len(args.weights) != len(args.spm):
        raise ConfigError(f"--weights: {len(args.weights)} values for {len(args.spm)} --spm files (expected one per file)")
    if args.clip_config and not Path(args.clip_config).is_file():
        raise ConfigError(f"--clip-config: file not found: {args.clip_config} (expected an open_clip JSON architecture)")
    return args


def main(argv=None) -> dict:
    from diffusers import DiffusionPipeline

    args = parse_args(argv)
    check_pipeline_arg(args.model)  # before the pipeline loads
    pipe = DiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    spm_plugin.load_spm(pipe, args.spm, weights=args.weights, transport=not args.no_transport, official=args.official)
    pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
    clip_name = None if args.clip_config else args.clip_model
    clip_model, tokenizer = load_clip(clip_name, pretrained=pretrained, model_config=args.clip_config, device=args.device)
    import open_clip

    preprocess = open_clip.image_transform(clip_model.visual.image_size, is_train=False)
    result = evaluate_erasure(pipe, args.erased, args.preserved, clip_model, tokenizer, preprocess, templates=tuple(args.templates),
                              num_images=args.num_images, seed=args.seed, steps=args.steps, guidance=args.guidance,
                              height=args.height, width=args.width)
    report = write_report(result, args.output_dir, title=f"SPM erasure: {', '.join(args.spm)}")
    print(report.read_text())
    return result | {"report": str(report)}


if __name__ == "__main__":
    sys.exit(run_cli(main))
