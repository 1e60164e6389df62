"""Train an image classifier with a PETL method.

    python scripts/train_classifier.py                      # the digits demo (CPU, no network)
    python scripts/train_classifier.py --config configs/vtab_cifar100_ssf.yaml data.root=/data/vtab-1k
    python scripts/train_classifier.py --config configs/methods/vpt_deep.yaml optim.lr=0.5 method.num_prompts=50
    python scripts/train_classifier.py --config CONFIG --resume            # latest checkpoint of output_dir
    accelerate launch scripts/train_classifier.py --config CONFIG ...      # multi-GPU / mixed precision
    (FSDP2 and DeepSpeed: accelerate launch --config_file configs/accelerate/<fsdp|ddp|deepspeed_zero2|deepspeed_zero3>.yaml; README: Multi-GPU)

Trailing key=value overrides use dotted keys (optim.lr=0.01); values are parsed as YAML.
Without --config the demo runs; overrides then apply to each of its three runs.
"""
from __future__ import annotations

import inspect
import sys

from petl_vision.train import ConfigError, load_config, train
from petl_vision.train.cli import parse_training_args, report, run_cli, trainer_options, training_parser
from petl_vision.train.demo import run_demo


def main(argv=None) -> None:
    parser = training_parser(__doc__, "YAML config (see configs/); omit to run the digits demo", config_required=False)
    args, overrides = parse_training_args(parser, argv, output_dir=False)
    if args.config is None:
        if args.resume:
            raise ConfigError("--resume needs --config (the demo always starts its three runs afresh)")
        overwrite = {"overwrite": True} if args.overwrite and "overwrite" in inspect.signature(run_demo).parameters else {}
        run_demo(args.output_dir or "runs/demo", overrides, **overwrite)
        return
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    result = train(load_config(args.config, overrides), **trainer_options(train, args))
    metrics = ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items() if k in ("top1", "top5"))
    report(f"done: {metrics}; adapter: {result['adapter_dir']}; merged: {result['merged_path']}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
