"""Point-cloud classification training (IDPT, VPT and full fine-tuning on the point transformer; P2P).

A config is the classifier's YAML (`petl_vision.train.config.TrainConfig`: model, method, optim,
sched, epochs, ...) whose `data` section describes point clouds instead (`PointDataConfig`):

    model: point_mae              # or point_bert (encoder_dims 256), or any timm name (P2P)
    checkpoint: ckpts/pretrain.pth # official Point-MAE / Point-BERT .pth (point_mae / point_bert)
    model_kwargs: {num_group: 64, group_size: 32}
    data: {kind: modelnet40, root: data/modelnet40_ply_hdf5_2048, num_points: 1024, augment: [scale_translate]}
    method: {name: idpt}

The loop reuses the classifier trainer's pieces (epoch loop, evaluation, checkpoints, metrics log,
optimizer, schedule); it differs in building the model and data, and in dropping the last
incomplete training batch (the BatchNorm heads of IDPT / Point-MAE need batches of 2 or more), as
the official loaders do.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

import petl_vision as pv
from petl_vision.data.pointcloud import AUGMENTATIONS, build_point_datasets

from .config import ConfigError, TrainConfig, _build, apply_override, from_dict, merge_dicts, read_yaml, to_dict
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .tracking import MetricsLog
from .trainer import TrainState, evaluate, find_checkpoint, save_checkpoint, save_merged, train_one_epoch

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
        key, _, text = item.partition("=")
        if key.startswith("data.") and "=" in item:
            raw = merge_dicts(raw, {"data": {key[len("data."):]: yaml.safe_load(text) if text.strip() else None}})
        else:
            raw = apply_override(raw, item)  # checks the key against TrainConfig
    data_raw = raw.pop("data", None) or {}
    names = {f.name for f in dataclasses.fields(PointDataConfig)}
    unknown = sorted(set(data_raw) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {['data.' + k for k in unknown]}; valid: {sorted('data.' + n for n in names)}")
    data = _build(PointDataConfig, data_raw, source, "data.")
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


def train_pointcloud(cfg: PointTrainConfig, resume: str | Path | bool | None = None) -> dict:
    """Train cfg.train.method on a point-cloud task; returns the classifier trainer's result dict."""
    tc = cfg.train
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tc.seed),
    )
    set_seed(tc.seed)
    out = Path(tc.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        record = {**to_dict(tc), "data": dataclasses.asdict(cfg.data)}
        (out / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))

    train_ds, eval_ds, data_classes = build_point_datasets(cfg.data)
    num_classes = tc.num_classes or data_classes
    model = build_point_model(tc, num_classes)
    pv.apply(model, tc.method.name, **tc.method.overrides)
    counts = pv.summary(model)
    accelerator.print(counts)

    train_loader = DataLoader(train_ds, tc.batch_size, shuffle=True, drop_last=len(train_ds) > tc.batch_size, num_workers=tc.num_workers)
    eval_loader = DataLoader(eval_ds, tc.eval_batch_size or 2 * tc.batch_size, num_workers=tc.num_workers)
    steps_per_epoch = math.ceil(len(train_loader) / tc.grad_accum_steps)
    optimizer = build_optimizer(model, tc.optim, tc.batch_size * tc.grad_accum_steps * accelerator.num_processes)
    scheduler = build_scheduler(optimizer, tc.sched, tc.epochs, steps_per_epoch)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    log = MetricsLog(out, enabled=accelerator.is_main_process)
    if resume:
        ckpt = find_checkpoint(out if resume is True else resume)
        accelerator.load_state(str(ckpt))
        log.truncate_after(state.epoch)

    show_bar = tc.progress and sys.stderr.isatty() and accelerator.is_local_main_process
    criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    history, ckpt_dir = [], None
    for epoch in range(state.epoch, tc.epochs):
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, accelerator, tc, state, epoch, show_bar)
        stats.update(evaluate(model, eval_loader, accelerator, num_classes))
        state.epoch = epoch + 1
        record = {"epoch": state.epoch, "step": state.step, **stats}
        history.append(record)
        log.log(record)
        accelerator.print(f"epoch {state.epoch}/{tc.epochs}  loss {record['train_loss']:.4f}  top1 {record['top1']:.2f}  ({record['epoch_time']:.1f}s)")
        ckpt_dir = save_checkpoint(accelerator, out, state.epoch, tc.keep_checkpoints)
    log.close()

    unwrapped = accelerator.unwrap_model(model)
    result = {
        "metrics": history[-1] if history else {}, "history": history, "model": unwrapped,
        "trainable_params": counts.trainable, "total_params": counts.total, "output_dir": str(out),
        "adapter_dir": None, "merged_path": None, "checkpoint_dir": str(ckpt_dir) if ckpt_dir else None,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result["adapter_dir"] = str(pv.save_adapter(unwrapped, out / "adapter"))
        if tc.merge:
            result["merged_path"] = save_merged(unwrapped, out / "merged.safetensors")
    return result
