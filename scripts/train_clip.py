"""Few-shot tuning of an open_clip CLIP model with a PETL method (R-AMT mask tuning, SSF, VPT, ...).

    python scripts/train_clip.py --config configs/clip_fewshot_oxford_pets.yaml data.root=/data/oxford_pets
    python scripts/train_clip.py --config configs/clip_fewshot_oxford_pets.yaml checkpoint=/ckpt/ViT-B-16.pt
    python scripts/train_clip.py --config CONFIG data.shots=4 data.seed=2 method.grad_dropout_lambda=1.0
    python scripts/train_clip.py --config CONFIG --resume                  # latest checkpoint of output_dir
    accelerate launch scripts/train_clip.py --config CONFIG ...            # multi-GPU / mixed precision
    (FSDP2 and DeepSpeed: accelerate launch --config_file configs/accelerate/<fsdp|ddp|deepspeed_zero2|deepspeed_zero3>.yaml; README: Multi-GPU)

Prints the zero-shot accuracy before training and the tuned accuracy after. Trailing key=value
overrides use dotted keys (optim.lr=1e-4, data.shots=8, clip.tag=laion2b_s34b_b88k); values are
parsed as YAML.
"""
from __future__ import annotations

import sys

from petl_vision.train.cli import parse_training_args, report, run_cli, trainer_options, training_parser
from petl_vision.train.clip import load_clip_config, train_clip


def main(argv=None) -> dict:
    args, overrides = parse_training_args(training_parser(__doc__, "YAML config (see configs/clip_fewshot_*.yaml)"), argv)
    result = train_clip(load_clip_config(args.config, overrides), **trainer_options(train_clip, args))
    report(f"done: zero-shot top1 {result['zero_shot']['top1']:.2f}, tuned top1 {result['metrics']['top1']:.2f}; "
          f"adapter: {result['adapter_dir']}; merged: {result['merged_path']}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
