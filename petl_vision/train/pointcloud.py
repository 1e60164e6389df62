"""Point-cloud classification training (IDPT, VPT and full fine-tuning on the point transformer; P2P).

A config is the classifier's YAML (`petl_vision.train.config.TrainConfig`: model, method, optim,
sched, epochs, ...) whose `data` section describes point clouds instead (`PointDataConfig`):

    model: point_mae              # or point_bert (encoder_dims 256), or any timm name (P2P)
    checkpoint: ckpts/pretrain.pth # official Point-MAE / Point-BERT .pth (point_mae / point_bert)
    model_kwargs: {num_group: 64, group_size: 32}
    data: {kind: modelnet40, root: data/modelnet40_ply_hdf5_2048, num_points: 1024, augment: [scale_translate]}
    method: {name: idpt}

`train_pointcloud` builds the model and data and hands them to the classifier trainer
(`petl_vision.train.trainer.train`), dropping the last incomplete training batch (the BatchNorm
heads of IDPT / Point-MAE need batches of 2 or more), as the official loaders do.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
from accelerate.utils import set_seed

from petl_vision.data.pointcloud import AUGMENTATIONS, build_point_datasets

from .config import ConfigError, TrainConfig, apply_section_override, build_section, from_dict, read_yaml
from .model import build_model
from .trainer import start_classifier_run, train

POINT_MODELS = ("point_mae", "point_bert")


@dataclass
class PointDataConfig:
    kind: str = "synthetic"  # "synthetic" | "modelnet40" (h5 or resampled layout) | "scanobjectnn"
    root: str | None = None  # folder of the data set (ScanObjectNN: the h5_files folder)
    variant: str | None = None  # scanobjectnn: obj_bg | obj_only | pb_t50_rs (default)
    num_points: int = 1024  # points per cloud (2048 for ScanObjectNN)
    augment: list[str] = field(default_factory=list)  # training: scale_translate, rotate, jitter
    samples_per_class: int = 50  # synthetic: training clouds per class
    eval_samples_per_class: int = 20  # synthetic: evaluation clouds per class
    noise: float = 0.02  # synthetic: Gaussian noise std
    seed: int = 0  # synthetic: generation seed


@dataclass
class PointTrainConfig:
    train: TrainConfig  # everything outside `data` (its own `data` section is unused)
    data: PointDataConfig


def load_point_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PointTrainConfig:
    """PointTrainConfig from a YAML file plus `key=value` overrides (`data.num_points=256`, `optim.lr=1e-3`)."""
    source = str(path) if path is not None else "config"
    raw = read_yaml(path, train_keys=False) if path is not None else {}
    for item in overrides:
        raw = apply_section_override(raw, item, {"data": PointDataConfig})
    data = build_section(PointDataConfig, raw.pop("data", None) or {}, source, "data.")
    bad = [a for a in data.augment if a not in AUGMENTATIONS]
    if bad:
        raise ConfigError(f"{source}: data.augment {bad} not among {list(AUGMENTATIONS)}")
    return PointTrainConfig(train=from_dict(raw, source), data=data)


def build_point_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """`point_mae` / `point_bert` -> PointTransformer (+ official checkpoint); any other name -> timm."""
    if cfg.model in POINT_MODELS:
        from petl_vision.models.point_mae import create_point_mae

        kwargs = dict(cfg.model_kwargs)
        if cfg.model == "point_bert":
            kwargs.setdefault("encoder_dims", 256)
        return create_point_mae(num_classes, checkpoint=cfg.checkpoint, **kwargs)
    return build_model(cfg, num_classes)


def train_pointcloud(cfg: PointTrainConfig, resume: str | Path | bool | None = None, stop_after_epoch: int | None = None,
                     overwrite: bool = False) -> dict:
    """Train cfg.train.method on a point-cloud task; returns the classifier trainer's result dict.

    resume / stop_after_epoch / overwrite: as in `petl_vision.train.trainer.train` (the output_dir is
    checked before anything is built)."""
    tc = cfg.train
    record = {"data": dataclasses.asdict(cfg.data)}
    start_classifier_run(tc, resume, overwrite, record)  # fail before building: the folder, the checkpoint
    set_seed(tc.seed)  # the backbone's random initialisation follows the seed
    train_ds, eval_ds, data_classes = build_point_datasets(cfg.data)
    num_classes = tc.num_classes or data_classes
    if tc.method.name == "p2p" and tc.method.overrides.get("official") and tc.label_smoothing:
        from petl_vision.methods.p2p import official_label_smoothing

        # the official P2P loss: eps / (C - 1) on the other classes (recorded in config.yaml as torch's value)
        tc = dataclasses.replace(tc, label_smoothing=official_label_smoothing(tc.label_smoothing, num_classes))
    model = build_point_model(tc, num_classes)
    return train(tc, resume, stop_after_epoch, model=model, data=(train_ds, eval_ds, num_classes),
                 drop_last=len(train_ds) > tc.batch_size, config_record=record, overwrite=overwrite)
