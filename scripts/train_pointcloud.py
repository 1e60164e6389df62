"""Train a point-cloud classifier with a PETL method (IDPT, VPT, P2P, full fine-tuning).

    python scripts/train_pointcloud.py --config configs/pointcloud_synthetic_idpt.yaml
    python scripts/train_pointcloud.py --config configs/pointcloud_synthetic_p2p.yaml method.test_views=8
    python scripts/train_pointcloud.py --config configs/modelnet40_idpt.yaml checkpoint=ckpts/pretrain.pth
    python scripts/train_pointcloud.py --config CONFIG --resume              # latest checkpoint of output_dir
    accelerate launch scripts/train_pointcloud.py --config CONFIG ...        # multi-GPU / mixed precision

Trailing key=value overrides use dotted keys (optim.lr=0.01, data.num_points=2048,
method.prompt_layer=10); values are parsed as YAML.
"""
from __future__ import annotations

import argparse

from petl_vision.train.pointcloud import load_point_config, train_pointcloud


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/pointcloud_*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.001")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                        help="resume from DIR (a checkpoint or output dir); alone: the latest checkpoint of output_dir")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override, not a DIR
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    extra = list(args.overrides)
    if args.output_dir:
        extra.append(f"output_dir={args.output_dir}")
    if args.no_progress:
        extra.append("progress=false")
    result = train_pointcloud(load_point_config(args.config, extra), resume=args.resume)
    print(f"done: top1 {result['metrics'].get('top1', float('nan')):.2f}; adapter: {result['adapter_dir']}")
    return result


if __name__ == "__main__":
    main()
