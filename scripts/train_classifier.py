"""Train an image classifier with a PETL method.

    python scripts/train_classifier.py                      # the digits demo (CPU, no network)
    python scripts/train_classifier.py --config configs/vtab_cifar100_ssf.yaml data.root=/data/vtab-1k
    python scripts/train_classifier.py --config configs/methods/vpt_deep.yaml optim.lr=0.5 method.num_prompts=50
    python scripts/train_classifier.py --config CONFIG --resume            # latest checkpoint of output_dir
    accelerate launch scripts/train_classifier.py --config CONFIG ...      # multi-GPU / mixed precision

Trailing key=value overrides use dotted keys (optim.lr=0.01); values are parsed as YAML.
Without --config the demo runs; overrides then apply to each of its three runs.
"""
from __future__ import annotations

import argparse

from petl_vision.data import DataError
from petl_vision.train import ConfigError, load_config, train
from petl_vision.train.demo import run_demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/); omit to run the digits demo")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                        help="resume from DIR (a checkpoint or output dir); alone: the latest checkpoint of output_dir")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="overrides mixed_precision")
    parser.add_argument("--merge", action="store_true", help="also save <output_dir>/merged.safetensors when mergeable")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override, not a DIR
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    extra = list(args.overrides)
    if args.mixed_precision:
        extra.append(f"mixed_precision={args.mixed_precision}")
    if args.merge:
        extra.append("merge=true")
    if args.no_progress:
        extra.append("progress=false")
    if args.config is None:
        run_demo(args.output_dir or "runs/demo", extra)
        return
    if args.output_dir:
        extra.append(f"output_dir={args.output_dir}")
    result = train(load_config(args.config, extra), resume=args.resume)
    metrics = ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items() if k in ("top1", "top5"))
    print(f"done: {metrics}; adapter: {result['adapter_dir']}; merged: {result['merged_path']}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
