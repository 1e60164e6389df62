"""Few-shot tuning of an open_clip CLIP model with a PETL method (R-AMT mask tuning, SSF, VPT, ...).

    python scripts/train_clip.py --config configs/clip_fewshot_oxford_pets.yaml data.root=/data/oxford_pets
    python scripts/train_clip.py --config configs/clip_fewshot_oxford_pets.yaml checkpoint=/ckpt/ViT-B-16.pt
    python scripts/train_clip.py --config CONFIG data.shots=4 data.seed=2 method.grad_dropout_lambda=1.0
    python scripts/train_clip.py --config CONFIG --resume                  # latest checkpoint of output_dir
    accelerate launch scripts/train_clip.py --config CONFIG ...            # multi-GPU / mixed precision

Prints the zero-shot accuracy before training and the tuned accuracy after. Trailing key=value
overrides use dotted keys (optim.lr=1e-4, data.shots=8, clip.tag=laion2b_s34b_b88k); values are
parsed as YAML.
"""
from __future__ import annotations

import argparse

from petl_vision.data import DataError
from petl_vision.train.clip import load_clip_config, train_clip
from petl_vision.train.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/clip_fewshot_*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.shots=4")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                        help="resume from DIR (a checkpoint or output dir); alone: the latest checkpoint of output_dir")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="overrides mixed_precision")
    parser.add_argument("--merge", action="store_true", help="also save <output_dir>/merged.safetensors when mergeable")
    parser.add_argument("--output-dir", help="overrides output_dir")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override, not a DIR
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    extra = list(args.overrides)
    if args.mixed_precision:
        extra.append(f"mixed_precision={args.mixed_precision}")
    if args.merge:
        extra.append("merge=true")
    if args.output_dir:
        extra.append(f"output_dir={args.output_dir}")
    result = train_clip(load_clip_config(args.config, extra), resume=args.resume)
    print(f"done: zero-shot top1 {result['zero_shot']['top1']:.2f}, tuned top1 {result['metrics']['top1']:.2f}; "
          f"adapter: {result['adapter_dir']}; merged: {result['merged_path']}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
