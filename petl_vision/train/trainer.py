"""Training loop on HF Accelerate: build, adapt, train, evaluate, checkpoint, resume, save."""
from __future__ import annotations

import copy
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import petl_vision as pv
from petl_vision.core.state import get_state
from petl_vision.data import build_datasets
from petl_vision.methods import lst as lst_method
from petl_vision.methods._feature_cache import FeatureCache, IndexedDataset, cache_key, logits_with_cache, uses_side_network

from .config import TrainConfig, to_dict
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .tracking import MetricsLog


class TrainState:
    """Epoch / step counters saved with every checkpoint (registered with the accelerator)."""

    def __init__(self):
        self.epoch = 0  # completed epochs
        self.step = 0  # optimizer steps taken

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir: `path` itself if it is one, else the latest `path/checkpoints/epoch_<n>`."""
    path = Path(path)
    if (path / "custom_checkpoint_0.pkl").is_file():
        return path
    ckpts = sorted((path / "checkpoints").glob("epoch_*"), key=_epoch_of) if path.is_dir() else []
    if not ckpts:
        raise FileNotFoundError(f"resume: no checkpoint in {path} (expected <output_dir>/checkpoints/epoch_<n>)")
    return ckpts[-1]


def _epoch_of(path: Path) -> int:
    match = re.fullmatch(r"epoch_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def train(cfg: TrainConfig, resume: str | Path | bool | None = None, stop_after_epoch: int | None = None) -> dict:
    """Train `cfg.method` on `cfg.model` and return a result dict.

    resume: a checkpoint dir, an output dir (its latest checkpoint), or True for `cfg.output_dir`.
        Model, optimizer, scheduler, RNG states and the epoch counter are restored; the sampler is
        seeded per epoch, so the result equals an uninterrupted run.
    stop_after_epoch: stop (as if interrupted) after that epoch's checkpoint; for tests.
    Result keys: metrics (last epoch), history, model (unwrapped, adapted), trainable_params,
    total_params, output_dir, adapter_dir, merged_path, checkpoint_dir, stopped_early.
    """
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    model = build_model(cfg)
    train_ds, eval_ds, num_classes = build_datasets(cfg.data, model, cfg.num_classes)
    if getattr(model, "num_classes", num_classes) != num_classes:
        model.reset_classifier(num_classes)
    pv.apply(model, cfg.method.name, **cfg.method.overrides)
    counts = pv.summary(model)

    cache = None  # side networks (lst, unipt) on data without augmentation, one process
    if cfg.feature_cache and not cfg.data.augment and uses_side_network(model) and accelerator.num_processes == 1:
        cache = FeatureCache(out / "feature_cache", cache_key(model, train_ds), len(train_ds))
        accelerator.print(f"feature cache: {cache.status} ({cache.directory})")
        train_ds = IndexedDataset(train_ds)  # batches (indices, images, targets)
    train_loader = DataLoader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
    eval_loader = DataLoader(eval_ds, cfg.eval_batch_size or 2 * cfg.batch_size, num_workers=cfg.num_workers)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    effective_batch = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    optimizer = build_optimizer(model, cfg.optim, effective_batch)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.epochs, steps_per_epoch)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    if lst_method.needs_data_init(accelerator.unwrap_model(model)) and not resume:
        batches = ((b[-2], b[-1]) for b in train_loader)  # (images, targets), with or without indices
        lst_method.init_side_from_backbone(accelerator.unwrap_model(model), loader=batches)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    log = MetricsLog(out, enabled=accelerator.is_main_process)
    if resume:
        ckpt = find_checkpoint(out if resume is True else resume)
        accelerator.load_state(str(ckpt))
        log.truncate_after(state.epoch)
        accelerator.print(f"resumed from {ckpt} at epoch {state.epoch}")

    show_bar = cfg.progress and sys.stderr.isatty() and accelerator.is_local_main_process
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history, stopped_early, ckpt_dir = [], False, None
    for epoch in range(state.epoch, cfg.epochs):
        loader = train_loader
        if cache is not None and cache.is_complete():  # no backbone, no image decoding
            cached = DataLoader(cache.dataset(), cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
            loader = accelerator.prepare_data_loader(cached)
        loader.set_epoch(epoch)
        stats = train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator, cfg, state, epoch, show_bar, cache)
        stats.update(evaluate(model, eval_loader, accelerator, num_classes))
        state.epoch = epoch + 1
        record = {"epoch": state.epoch, "step": state.step, **stats}
        history.append(record)
        log.log(record)
        top5 = f" top5 {record['top5']:.2f}" if "top5" in record else ""
        accelerator.print(
            f"epoch {state.epoch}/{cfg.epochs}  loss {record['train_loss']:.4f}  top1 {record['top1']:.2f}{top5}"
            f"  ({record['epoch_time']:.1f}s, {record['images_per_s']:.0f} img/s)"
        )
        ckpt_dir = save_checkpoint(accelerator, out, state.epoch, cfg.keep_checkpoints)
        if stop_after_epoch is not None and state.epoch >= stop_after_epoch and state.epoch < cfg.epochs:
            stopped_early = True
            break
    log.close()

    unwrapped = accelerator.unwrap_model(model)
    result = {
        "metrics": history[-1] if history else {},
        "history": history,
        "model": unwrapped,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "output_dir": str(out),
        "adapter_dir": None,
        "merged_path": None,
        "checkpoint_dir": str(ckpt_dir) if ckpt_dir else None,
        "stopped_early": stopped_early,
    }
    if stopped_early:
        return result
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result["adapter_dir"] = str(out / "adapter")
        pv.save_adapter(unwrapped, out / "adapter")
        if cfg.merge:
            result["merged_path"] = save_merged(unwrapped, out / "merged.safetensors")
    return result


def train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator, cfg, state, epoch, show_bar, cache=None) -> dict:
    """One pass over `loader`; returns train_loss (mean over batches), lr, epoch_time, images_per_s.

    cache: a side network's FeatureCache; batches then come from an IndexedDataset (filling it) or
    from the complete cache (no backbone).
    """
    model.train()
    loss_sum, batches, images = torch.zeros((), device=accelerator.device), 0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_bar, leave=False)
    for batch in loader:
        with accelerator.accumulate(model):
            if cache is not None:
                with accelerator.autocast():
                    logits, targets = logits_with_cache(accelerator.unwrap_model(model), batch, cache)
            else:
                inputs, targets = batch
                logits = model(inputs)
            loss = criterion(logits, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if cfg.clip_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                state.step += 1
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        loss_sum += loss.detach()
        batches += 1
        images += targets.shape[0] * accelerator.num_processes
        if show_bar:
            rate = images / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{rate:.0f}")
            bar.update()
    bar.close()
    elapsed = time.perf_counter() - start
    mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(batches, 1)
    return {
        "train_loss": mean_loss,
        "lr": optimizer.param_groups[0]["lr"],
        "epoch_time": elapsed,
        "images_per_s": images / max(elapsed, 1e-9),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, num_classes: int) -> dict:
    """top1 (and top5 when num_classes >= 5) in percent, and eval_loss, over the whole eval set."""
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for inputs, targets in loader:
        logits, targets = accelerator.gather_for_metrics((model(inputs), targets))
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=1).indices  # (B, k)
        hits = top == targets[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        total += targets.numel()
    metrics = {"top1": 100.0 * correct1 / total, "eval_loss": loss_sum / total}
    if num_classes >= 5:
        metrics["top5"] = 100.0 * correct5 / total
    return metrics


def save_checkpoint(accelerator: Accelerator, out: Path, epoch: int, keep: int) -> Path:
    """`accelerator.save_state` to `out/checkpoints/epoch_<epoch>`, keeping the last `keep`."""
    ckpt = out / "checkpoints" / f"epoch_{epoch}"
    accelerator.save_state(str(ckpt))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = sorted((out / "checkpoints").glob("epoch_*"), key=_epoch_of)[:-keep]
        for path in old:
            shutil.rmtree(path)
    return ckpt


def save_merged(model: nn.Module, path: Path) -> str | None:
    """Write a merged plain-model checkpoint when every applied method can be merged."""
    from safetensors.torch import save_model

    if not pv.can_merge(model):
        state = get_state(model)
        names = state.method_names if state is not None else []
        print(f"merge skipped: methods {names} cannot be merged into the host's weights; the adapter was saved instead")
        return None
    merged = pv.merge(copy.deepcopy(model))
    save_model(merged, str(path))
    return str(path)
