"""Fine-tune a Stable Diffusion (1.x, 2.x or SDXL) UNet on a captioned image folder with SaRA (default), LoRA or full FT.

    python scripts/finetune_diffusion.py --model runwayml/stable-diffusion-v1-5 --data data/Barbie \
        --config configs/sd15_sara.yaml caption_prefix="Barbie style, " validation_prompt="a man wearing a jacket"
    python scripts/finetune_diffusion.py --model PIPELINE_DIR --data DIR --method lora method.r=8
    python scripts/finetune_diffusion.py --model PIPELINE_DIR --data DIR --output-dir runs/x --resume
    accelerate launch scripts/finetune_diffusion.py --model ... --data ... --mixed-precision fp16

--data: images with captions in metadata.jsonl ({"file_name", "text"} per line) or same-name .txt files.
Trailing key=value overrides set any config key (max_steps=100, method.threshold=1e-3); values are YAML.
attention=sdpa (default: torch's scaled_dot_product_attention), xformers (needs `pip install xformers` and
a CUDA GPU) or default (diffusers' plain AttnProcessor) sets the UNet's attention processors.
The result: <output_dir>/adapter (sara, lora; load with pv.load_adapter or pv.diffusers.load_sara)
or <output_dir>/unet (full), checkpoints/step_<n>, validation/step_<n>_<i>.png.
"""
from __future__ import annotations

import sys

from petl_vision.data.common import require_dir
from petl_vision.train.cli import check_pipeline_arg, diffusion_parser, parse_training_args, report, run_cli, trainer_options
from petl_vision.train.diffusion import METHODS, load_diffusion_config, train_diffusion


def parse_args(argv=None):
    """(args, overrides): the flags (--model, --data, ...) as `key=value` before the trailing overrides."""
    parser = diffusion_parser(__doc__, "YAML config, e.g. configs/sd15_sara.yaml")
    parser.add_argument("--data", help="captioned image folder")
    parser.add_argument("--method", choices=METHODS, help="overrides method.name (default: sara)")
    return parse_training_args(parser, argv, config_flags=("model", "data", "method", "max_steps"), flags_win=False)


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_diffusion_config(args.config, overrides)
    check_pipeline_arg(cfg.model, "model (--model)")  # before the pipeline loads
    require_dir(cfg.data, "captioned image folder (--data)")
    result = train_diffusion(cfg, **trainer_options(train_diffusion, args))
    report(f"done: {result['steps']} steps; adapter: {result['adapter_dir']}; unet: {result['unet_dir']}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
