"""Fine-tune a Stable Diffusion UNet on a captioned image folder with SaRA (default), LoRA or full FT.

    python scripts/finetune_diffusion.py --model runwayml/stable-diffusion-v1-5 --data data/Barbie \
        --config configs/sd15_sara.yaml caption_prefix="Barbie style, " validation_prompt="a man wearing a jacket"
    python scripts/finetune_diffusion.py --model PIPELINE_DIR --data DIR --method lora method.r=8
    python scripts/finetune_diffusion.py --model PIPELINE_DIR --data DIR --output-dir runs/x --resume
    accelerate launch scripts/finetune_diffusion.py --model ... --data ... --mixed-precision fp16

--data: images with captions in metadata.jsonl ({"file_name", "text"} per line) or same-name .txt files.
Trailing key=value overrides set any config key (max_steps=100, method.threshold=1e-3); values are YAML.
The result: <output_dir>/adapter (sara, lora; load with pv.load_adapter or pv.diffusers.load_sara)
or <output_dir>/unet (full), checkpoints/step_<n>, validation/step_<n>_<i>.png.
"""
from __future__ import annotations

import argparse

from petl_vision.train.diffusion import load_diffusion_config, train_diffusion


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers pipeline folder or hub id")
    parser.add_argument("--data", help="captioned image folder")
    parser.add_argument("--config", help="YAML config, e.g. configs/sd15_sara.yaml")
    parser.add_argument("--method", choices=["sara", "lora", "full"], help="overrides method.name (default: sara)")
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
    flags = {"model": args.model, "data": args.data, "method": args.method, "output_dir": args.output_dir,
             "max_steps": args.max_steps, "mixed_precision": args.mixed_precision}
    extra = [f"{k}={v}" for k, v in flags.items() if v is not None] + (["progress=false"] if args.no_progress else [])
    cfg = load_diffusion_config(args.config, extra + list(args.overrides))
    result = train_diffusion(cfg, resume=args.resume)
    print(f"done: {result['steps']} steps; adapter: {result['adapter_dir']}; unet: {result['unet_dir']}")
    return result


if __name__ == "__main__":
    main()
