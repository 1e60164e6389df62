"""Erase a concept from a Stable Diffusion (1.x, 2.x or SDXL) UNet with an SPM membrane (official SPM recipe by default).

    python scripts/erase_concept.py --model CompVis/stable-diffusion-v1-4 --concept "snoopy"
    python scripts/erase_concept.py --model PIPELINE_DIR --concept "van gogh" --config configs/methods/spm.yaml max_steps=1000
    python scripts/erase_concept.py --model PIPELINE_DIR --concept snoopy --output-dir runs/snoopy --resume
    accelerate launch scripts/erase_concept.py --model ... --concept ... --mixed-precision bf16

Trailing key=value overrides set any config key (lr=1e-4, anchors=4, surrogate="a dog"); values are YAML.
attention=sdpa (default: torch's scaled_dot_product_attention), xformers (needs `pip install xformers` and
a CUDA GPU) or default (diffusers' plain AttnProcessor) sets the UNet's attention processors.
The result: <output_dir>/<name>_last.safetensors, an official SPM file (load it with
pv.diffusers.load_spm(pipe, path)), <name>_<step>steps.safetensors at every checkpoint, and
checkpoints/step_<n> for --resume.
"""
from __future__ import annotations

import sys

from petl_vision.train.cli import check_pipeline_arg, diffusion_parser, parse_training_args, report, run_cli, trainer_options
from petl_vision.train.erase import load_erase_config, train_erasure


def parse_args(argv=None):
    """(args, overrides): the flags (--model, --concept, ...) as `key=value` before the trailing overrides."""
    parser = diffusion_parser(__doc__, "YAML config, e.g. configs/methods/spm.yaml")
    parser.add_argument("--concept", help="the prompt to erase, e.g. snoopy")
    return parse_training_args(parser, argv, config_flags=("model", "concept", "max_steps"), flags_win=False)


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_erase_config(args.config, overrides)
    check_pipeline_arg(cfg.model, "model (--model)")  # before the pipeline loads
    result = train_erasure(cfg, **trainer_options(train_erasure, args))
    report(f"done: {result['steps']} steps; SPM file: {result['spm_file']}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
