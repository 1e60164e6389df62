"""Erase a concept from a Stable Diffusion UNet with an SPM membrane (official SPM recipe by default).

    python scripts/erase_concept.py --model CompVis/stable-diffusion-v1-4 --concept "snoopy"
    python scripts/erase_concept.py --model PIPELINE_DIR --concept "van gogh" --config configs/methods/spm.yaml max_steps=1000
    python scripts/erase_concept.py --model PIPELINE_DIR --concept snoopy --output-dir runs/snoopy --resume
    accelerate launch scripts/erase_concept.py --model ... --concept ... --mixed-precision bf16

Trailing key=value overrides set any config key (lr=1e-4, anchors=4, surrogate="a dog"); values are YAML.
The result: <output_dir>/<name>_last.safetensors, an official SPM file (load it with
pv.diffusers.load_spm(pipe, path)), <name>_<step>steps.safetensors at every checkpoint, and
checkpoints/step_<n> for --resume.
"""
from __future__ import annotations

import argparse

from petl_vision.train.erase import load_erase_config, train_erasure


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers pipeline folder or hub id")
    parser.add_argument("--concept", help="the prompt to erase, e.g. snoopy")
    parser.add_argument("--config", help="YAML config, e.g. configs/methods/spm.yaml")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--max-steps", type=int, help="overrides max_steps")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="overrides mixed_precision")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                        help="resume from DIR (a checkpoint); alone: the latest checkpoint under output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    flags = {"model": args.model, "output_dir": args.output_dir, "max_steps": args.max_steps, "mixed_precision": args.mixed_precision}
    extra = [f"{k}={v}" for k, v in flags.items() if v is not None] + (["progress=false"] if args.no_progress else [])
    if args.concept is not None:
        extra.append(f"concept={_yaml_string(args.concept)}")
    cfg = load_erase_config(args.config, extra + list(args.overrides))
    result = train_erasure(cfg, resume=args.resume)
    print(f"done: {result['steps']} steps; SPM file: {result['spm_file']}")
    return result


def _yaml_string(text: str) -> str:
    """`text` as a YAML scalar that reads back as the same string ("yes", "1.0", ": x" stay strings)."""
    return "'" + text.replace("'", "''") + "'"


if __name__ == "__main__":
    main()
