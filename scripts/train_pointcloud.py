"""Train a point-cloud classifier with a PETL method (IDPT, VPT, P2P, full fine-tuning).

    python scripts/train_pointcloud.py --config configs/pointcloud_synthetic_idpt.yaml
    python scripts/train_pointcloud.py --config configs/pointcloud_synthetic_p2p.yaml method.test_views=8
    python scripts/train_pointcloud.py --config configs/modelnet40_idpt.yaml data.root=data/modelnet40_ply_hdf5_2048 checkpoint=ckpts/pretrain.pth
    python scripts/train_pointcloud.py --config configs/scanobjectnn_idpt.yaml data.root=data/ScanObjectNN/h5_files checkpoint=ckpts/pretrain.pth
    python scripts/train_pointcloud.py --config configs/modelnet40_p2p.yaml data.root=data/modelnet40_normal_resampled
    python scripts/train_pointcloud.py --config CONFIG --resume              # latest checkpoint of output_dir
    accelerate launch scripts/train_pointcloud.py --config CONFIG ...        # multi-GPU / mixed precision

Trailing key=value overrides use dotted keys (optim.lr=0.01, data.num_points=2048,
method.prompt_layer=10); values are parsed as YAML.
"""
from __future__ import annotations

import sys

from petl_vision.train.cli import parse_training_args, report, run_cli, trainer_options, training_parser
from petl_vision.train.pointcloud import load_point_config, train_pointcloud


def main(argv=None) -> dict:
    parser = training_parser(__doc__, "YAML config (see configs/pointcloud_*.yaml)", merge=False)
    args, overrides = parse_training_args(parser, argv)
    result = train_pointcloud(load_point_config(args.config, overrides), **trainer_options(train_pointcloud, args))
    report(f"done: top1 {result['metrics'].get('top1', float('nan')):.2f}; adapter: {result['adapter_dir']}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
