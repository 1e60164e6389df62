"""Training loop on HF Accelerate: build, adapt, train, evaluate, checkpoint, resume, save.

`train` builds a timm classifier and its data from the config, or trains a model and data it is
given (the CLIP and point-cloud trainers build theirs and call it). Every applied method takes part
through its training hooks (`MethodHooks`): extra loss terms, its own backward, per-step updates.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
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
from petl_vision.core.distributed import is_dtensor, sharding
from petl_vision.core.registry import TrainStep, applied_methods, get_method
from petl_vision.core.state import get_state
from petl_vision.data import build_datasets
from petl_vision.methods import lst as lst_method
from petl_vision.methods._feature_cache import FeatureCache, IndexedDataset, cache_key, logits_with_cache, uses_side_network
from petl_vision.methods._side import side_features

from . import deepspeed_support
from .checkpoint import any_process, check_finite, load_checkpoint, run_record, save_checkpoint, start_run
from .checkpoint import find_checkpoint as _find_checkpoint
from .cli import report
from .config import TrainConfig, to_dict
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .sharding import average_whole_gradients, clip_grad_norm, fsdp_requested, maybe_shard, prepare_all
from .tracking import MetricsLog, check_trackers, finish_trackers, start_trackers


# Config keys that do not change what is trained: a run may be resumed with other values.
IGNORED_KEYS = ("output_dir", "progress", "keep_checkpoints", "merge", "overwrite", "num_workers", "log_with", "eval_batch_size")


class TrainState:
    """Epoch / step counters saved with every checkpoint."""

    def __init__(self):
        self.epoch = 0  # completed epochs
        self.step = 0  # optimizer steps taken

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir: `path` itself if it is one, else the latest complete `path/checkpoints/epoch_<n>`."""
    return _find_checkpoint(path, "epoch")


def start_classifier_run(cfg: TrainConfig, resume=None, overwrite: bool = False, config_record: dict | None = None):
    """`checkpoint.start_run` for a classifier-style config: refuses an output_dir holding another run
    (FileExistsError) and a checkpoint of another configuration; writes nothing."""
    record = {**to_dict(cfg), **(config_record or {})}
    return start_run(cfg.output_dir, run_record(record, IGNORED_KEYS), resume=resume,
                     overwrite=overwrite or bool(getattr(cfg, "overwrite", False)), prefix="epoch")


def train(cfg: TrainConfig, resume: str | Path | bool | None = None, stop_after_epoch: int | None = None, *,
          model: nn.Module | None = None, data: tuple | None = None, drop_last: bool = False,
          baseline: str | None = None, config_record: dict | None = None, overwrite: bool = False, log_with=None) -> dict:
    """Train `cfg.method` on `cfg.model` (or on the given model and data) and return a result dict.

    resume: a checkpoint dir, an output dir (its latest complete checkpoint), or True for
        `cfg.output_dir`. The checkpoint must have been written by the same configuration (keys in
        IGNORED_KEYS aside). The trainable state, optimizer, scheduler, RNG states and counters are
        restored (safetensors + JSON, no pickle); the sampler is seeded per epoch, so the result
        equals an uninterrupted run.
    overwrite: replace the run that `cfg.output_dir` holds (also `cfg.overwrite`); without it, an
        output_dir holding another run raises FileExistsError. Nothing is written before the model
        and data are built.
    log_with: Accelerate trackers ("tensorboard", "wandb", ..., also `cfg.log_with`): per-step train/loss
        and train/lr, per-epoch metrics, files under <output_dir>/logs; ImportError when one is not
        installed. metrics.jsonl (one line per epoch) is always written.
    stop_after_epoch: stop (as if interrupted) after that epoch's checkpoint; for tests.
    model: the host to train, before `cfg.method` is applied (default: `build_model(cfg)`, after
        seeding). A caller building it seeds first (`set_seed(cfg.seed)`): train() then does not
        seed again, so the run draws the same random numbers as with a model train() builds.
    data: (train_ds, eval_ds, num_classes), transforms set; needed with `model` (default:
        `build_datasets(cfg.data, ...)`). Batches are (inputs, targets).
    drop_last: drop the last incomplete training batch (BatchNorm heads need 2+ samples).
    baseline: evaluate the model before the method is applied, print it under this name
        ("zero-shot: top1 ...") and return it as result["baseline"].
    config_record: top-level sections written to config.yaml over the TrainConfig's (a trainer's own
        `data` section, ...).
    Every applied method's training hooks run (`Method.extra_loss`, `backward`, `on_step`,
    `epoch_metrics`; see petl_vision.core.registry).
    A NaN or infinite loss raises FloatingPointError naming the step; no adapter is saved then.
    Result keys: metrics (last epoch; an evaluation when no epoch ran), history, model (unwrapped,
    adapted), trainable_params, total_params, output_dir, adapter_dir, merged_path, checkpoint_dir,
    stopped_early, baseline.
    """
    if (model is None) != (data is None):
        raise ValueError("train: pass `model` and `data` together (or neither, to build them from cfg)")
    trackers = check_trackers(log_with if log_with is not None else getattr(cfg, "log_with", None))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        log_with=trackers, project_dir=str(cfg.output_dir), **deepspeed_support.accelerator_kwargs(),
    )
    run = start_classifier_run(cfg, resume, overwrite, config_record)
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    built = model is None
    if built:
        set_seed(cfg.seed)
    out = run.out
    if built:
        model = build_model(cfg)
        train_ds, eval_ds, num_classes = build_datasets(cfg.data, model, cfg.num_classes)
        if getattr(model, "num_classes", num_classes) != num_classes:
            model.reset_classifier(num_classes)
    else:
        train_ds, eval_ds, num_classes = data
    method_config = pv.make_config(cfg.method.name, **cfg.method.overrides)
    reference = None  # frozen copy before the method: the baseline, and a backward-owning method's reference
    if baseline is not None or get_method(method_config.name).owns_backward(method_config):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    pv.apply(model, method_config)
    counts = pv.summary(model)
    accelerator.print(counts)
    run_config = {**to_dict(cfg), **(config_record or {})}
    run.commit(accelerator, yaml.safe_dump(run_config, sort_keys=False))
    start_trackers(accelerator, run_config)

    cache = None  # side networks (lst, unipt) on data without augmentation, one process or FSDP, images not needed
    if (built and cfg.feature_cache and not cfg.data.augment and uses_side_network(model)
            and (accelerator.num_processes == 1 or fsdp_requested(accelerator))
            and not any(method.owns_backward(config) for method, config in applied_methods(model))):
        cache = open_feature_cache(accelerator, out / "feature_cache", cache_key(model, train_ds), len(train_ds))
        train_ds = IndexedDataset(train_ds)  # batches (indices, images, targets)
    if lst_method.needs_data_init(model) and run.resume_from is None:
        # Before sharding, on batches every process draws alike (seeded): the same side network everywhere.
        init_loader = DataLoader(train_ds, cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
        lst_method.init_side_from_backbone(model.to(accelerator.device), loader=((b[-2].to(accelerator.device), b[-1].to(accelerator.device))
                                                                                for b in init_loader))
    model = maybe_shard(accelerator, model)  # FSDP2 per block under an FSDP launch (sharding.py)
    sharded = sharding(model) == "fsdp2"
    if cache is not None and accelerator.num_processes > 1:
        allocate_shared_cache(accelerator, cache, model, train_ds)
    train_loader = DataLoader(train_ds, cfg.batch_size, shuffle=True, drop_last=drop_last, num_workers=cfg.num_workers)
    eval_loader = DataLoader(eval_ds, cfg.eval_batch_size or 2 * cfg.batch_size, num_workers=cfg.num_workers)
    effective_batch = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    optimizer = build_optimizer(model, cfg.optim, effective_batch)
    deepspeed = deepspeed_support.zero_stage(accelerator) is not None
    if deepspeed:  # DeepSpeed clips the gradients itself: clip_grad_norm goes into its config
        deepspeed_support.configure(accelerator, model, cfg.clip_grad_norm, cfg.grad_accum_steps)
    model, optimizer, train_loader, eval_loader = prepare_all(accelerator, model, optimizer, train_loader, eval_loader)
    # Optimizer steps of this process's shard; the scheduler is not prepared (accelerate would step it once
    # per process): it steps once per optimizer step, so the schedule does not depend on the process count.
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler = build_scheduler(deepspeed_support.torch_optimizer(optimizer), cfg.sched, cfg.epochs, steps_per_epoch)
    baseline_metrics = None
    if reference is not None:
        reference.to(accelerator.device)
    if baseline is not None:
        baseline_metrics = evaluate(reference, eval_loader, accelerator, num_classes)
        accelerator.print(f"{baseline}: top1 {baseline_metrics['top1']:.2f}")
    hooks = MethodHooks(accelerator.unwrap_model(model), cfg.epochs * steps_per_epoch, reference, cfg.seed)
    del reference  # kept by `hooks` only when a method owns the backward
    state = TrainState()
    if run.resume_from is not None:
        state.load_state_dict(load_checkpoint(accelerator, run.resume_from, model, optimizer, scheduler))
        accelerator.print(f"resumed from {run.resume_from} at epoch {state.epoch}")
    log = MetricsLog(out, enabled=accelerator.is_main_process)
    log.truncate_after(state.epoch)  # a fresh run starts an empty file

    show_bar = cfg.progress and accelerator.is_local_main_process  # tqdm's rules otherwise (TQDM_DISABLE, ...)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history, stopped_early, ckpt_dir = [], False, None
    for epoch in range(state.epoch, cfg.epochs):
        loader = train_loader
        if cache is not None and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()  # every process has written its samples of the last epoch
        if cache is not None and cache.is_complete():  # no backbone, no image decoding
            cached = DataLoader(cache.dataset(), cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
            loader = accelerator.prepare_data_loader(cached)
        loader.set_epoch(epoch)
        stats = train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator, cfg, state, epoch, show_bar, cache, hooks=hooks)
        stats.update(evaluate(model, eval_loader, accelerator, num_classes))
        stats.update(hooks.epoch_metrics())
        state.epoch = epoch + 1
        record = {"epoch": state.epoch, "step": state.step, **stats}
        history.append(record)
        log.log(record)
        accelerator.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=state.step)
        top5 = f" top5 {record['top5']:.2f}" if "top5" in record else ""
        accelerator.print(
            f"epoch {state.epoch}/{cfg.epochs}  loss {record['train_loss']:.4f}  top1 {record['top1']:.2f}{top5}"
            f"  ({record['epoch_time']:.1f}s, {record['images_per_s']:.0f} img/s)"
        )
        ckpt_dir = save_checkpoint(accelerator, run, state.epoch, model, optimizer, scheduler, state.state_dict(), cfg.keep_checkpoints)
        if stop_after_epoch is not None and state.epoch >= stop_after_epoch and state.epoch < cfg.epochs:
            stopped_early = True
            break
    log.close()
    finish_trackers(accelerator)

    unwrapped = accelerator.unwrap_model(model)
    result = {
        "metrics": history[-1] if history else evaluate(model, eval_loader, accelerator, num_classes),
        "history": history,
        "model": unwrapped,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "output_dir": str(out),
        "adapter_dir": None,
        "merged_path": None,
        "checkpoint_dir": str(ckpt_dir) if ckpt_dir else None,
        "stopped_early": stopped_early,
        "baseline": baseline_metrics,
    }
    if stopped_early:
        return result
    check_finite_parameters(unwrapped, f"after epoch {state.epoch}", accelerator)
    accelerator.wait_for_everyone()
    if sharded:  # every process: the save and the merge gather the shards, rank 0 writes
        result["adapter_dir"] = str(pv.save_adapter(unwrapped, out / "adapter"))
        if cfg.merge:
            merged_path = save_merged(unwrapped, out / "merged.safetensors")
            result["merged_path"] = merged_path if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
    elif deepspeed:  # every process: the fp32 masters are gathered, rank 0 writes
        result["adapter_dir"] = deepspeed_support.save_adapter(accelerator, model, out / "adapter")
        if cfg.merge and accelerator.is_main_process:
            result["merged_path"] = merge_from_adapter(cfg, out / "adapter", num_classes, out / "merged.safetensors") if built else None
            if not built:
                print("merge skipped: the model is partitioned by DeepSpeed; load the adapter onto the plain model and call pv.merge")
        accelerator.wait_for_everyone()
    elif accelerator.is_main_process:
        result["adapter_dir"] = str(out / "adapter")
        pv.save_adapter(unwrapped, out / "adapter")
        if cfg.merge:
            result["merged_path"] = save_merged(unwrapped, out / "merged.safetensors")
    return result


class MethodHooks:
    """The training hooks of every method applied to `model` (see `Method.extra_loss` and the rest).

    model: the unwrapped, adapted model. total_steps: optimizer steps of the whole run. reference:
    frozen copy made before the method was applied (handed to a backward-owning method). seed: the run's.
    """

    def __init__(self, model: nn.Module, total_steps: int, reference: nn.Module | None = None, seed: int = 0):
        self.model, self.total_steps, self.seed = model, total_steps, seed
        self.methods = applied_methods(model)
        owners = [(m, c) for m, c in self.methods if m.owns_backward(c)]
        if len(owners) > 1:
            raise ValueError(f"methods {[m.name for m, _ in owners]} each compute the gradients themselves; apply only one of them")
        self.owner = owners[0] if owners else None
        self.reference = reference if self.owner is not None else None

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """`task_loss` plus every method's extra loss (0-dim)."""
        for method, config in self.methods:
            extra = method.extra_loss(self.model, config)
            if is_dtensor(extra):  # of sharded parameters (FSDP2), outside the forward: reduce it (differentiable)
                extra = extra.full_tensor()
            if extra is not None:
                task_loss = task_loss + extra
        return task_loss

    def sync_context(self, accelerator: Accelerator, model: nn.Module):
        """No gradient synchronisation when a method computes the gradients (see `average_gradients`)."""
        return accelerator.no_sync(model) if self.owner is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, inputs, outputs: torch.Tensor, step: int, backward) -> None:
        """`backward(loss)`, or the owning method's `backward`."""
        if self.owner is None:
            backward(loss)
            return
        method, config = self.owner
        method.backward(self.model, config, loss, TrainStep(inputs, outputs, step, self.seed, backward, self.reference))

    def average_gradients(self, accelerator: Accelerator) -> None:
        """Mean over processes of the gradients no wrapper reduced: under FSDP2 the whole (plain) ones
        (`sharding.average_whole_gradients`: FSDP reduced the DTensor ones in each backward); else all of
        them when a method computed them without synchronisation (DDP's no_sync)."""
        if sharding(self.model) == "fsdp2":
            average_whole_gradients(self.model, accelerator)
            return
        if self.owner is None or accelerator.num_processes == 1:
            return
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")

    def on_step(self, optimizer, step: int, say=print) -> dict:
        """Every method's `on_step`; what a method reports is passed to `say` ("step 5: sara {...}").
        Returns {method name: report} of those that reported."""
        reports = {}
        for method, config in self.methods:
            report = method.on_step(self.model, config, optimizer, step, self.total_steps)
            if report:
                reports[method.name] = report
                say(f"step {step}: {method.name} {report}")
        return reports

    def epoch_metrics(self) -> dict:
        metrics = {}
        for method, config in self.methods:
            metrics.update(method.epoch_metrics(self.model, config))
        return metrics


def train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator, cfg, state, epoch, show_bar, cache=None, *,
                    hooks: MethodHooks) -> dict:
    """One pass over `loader`; returns train_loss (mean over batches), lr, epoch_time, images_per_s.

    The loss is criterion(logits, targets) plus the applied methods' extra losses; `hooks` runs
    them, the backward and the per-step updates.
    cache: a side network's FeatureCache; batches then come from an IndexedDataset (filling it) or
    from the complete cache (no backbone).
    """
    model.train()
    # A sharded backbone's forward is collective: the cache runs it on all processes or none.
    anywhere = functools.partial(any_process, accelerator) if accelerator.num_processes > 1 else None
    loss_sum, batches, images = torch.zeros((), device=accelerator.device), 0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_bar, leave=False)
    for batch in loader:
        with accelerator.accumulate(model), hooks.sync_context(accelerator, model):
            if cache is not None:
                with accelerator.autocast():
                    logits, targets = logits_with_cache(accelerator.unwrap_model(model), batch, cache, anywhere)
                inputs = None
            else:
                inputs, targets = batch
                logits = model(inputs)
            loss = hooks.loss(criterion(logits.float(), targets))
            check_finite(loss, state.step + 1, f"epoch {epoch + 1}", nan_hint(cfg), accelerator)
            hooks.backward(loss, inputs, logits, state.step, accelerator.backward)
            if accelerator.sync_gradients:
                hooks.average_gradients(accelerator)
                if cfg.clip_grad_norm:
                    clip_grad_norm(accelerator.unwrap_model(model), cfg.clip_grad_norm, accelerator)
                state.step += 1
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step()  # once per optimizer step (not prepared: see train)
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            hooks.on_step(optimizer, state.step, accelerator.print)
            if accelerator.trackers:
                accelerator.log({"train/loss": loss.item(), "train/lr": optimizer.param_groups[0]["lr"]}, step=state.step)
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


def nan_hint(cfg: TrainConfig) -> str:
    clip = "" if cfg.clip_grad_norm else " or set clip_grad_norm=1.0"
    return f"lower optim.lr (now {cfg.optim.lr:g}){clip}"


def check_finite_parameters(model: nn.Module, where: str, accelerator: Accelerator | None = None) -> None:
    """FloatingPointError, on every process, when a trainable parameter holds NaN or inf on any
    (FSDP2: each process checks its shards); nothing is saved then."""
    bad = [name for name, p in model.named_parameters()
           if p.requires_grad and not bool(torch.isfinite(p.to_local() if is_dtensor(p) else p).all())]
    if any_process(accelerator, bool(bad)):
        names = bad[:3] if bad else "(on another process)"
        raise FloatingPointError(f"trainable parameters {names} hold NaN or inf {where}; lower the learning rate; "
                                 "no adapter was saved")


def open_feature_cache(accelerator: Accelerator, directory: Path, key: dict, num_samples: int) -> FeatureCache:
    """The run's FeatureCache: the main process opens (or wipes and creates) it first, then the others."""
    cache = FeatureCache(directory, key, num_samples) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if cache is None:
        cache = FeatureCache(directory, key, num_samples)
    accelerator.print(f"feature cache: {cache.status} ({cache.directory})")
    return cache


def allocate_shared_cache(accelerator: Accelerator, cache: FeatureCache, model: nn.Module, train_ds) -> None:
    """Field files of a cache several processes fill: shapes from one sample through the backbone
    (every process runs it: a sharded forward is collective), files made by the main process."""
    if cache.fields:
        return
    _, image, target = train_ds[0]
    model.eval()
    features = side_features(model, image[None].to(accelerator.device))
    model.train()
    if accelerator.is_main_process:
        cache.allocate({**features, "target": torch.as_tensor([target])})
    accelerator.wait_for_everyone()
    cache.reload()


def merge_from_adapter(cfg: TrainConfig, adapter_dir: Path, num_classes: int, path: Path) -> str | None:
    """The merged checkpoint of a DeepSpeed run (its parameters are partitioned): the host rebuilt from
    `cfg` (seeded as `train` built it), the saved adapter loaded onto it, then `save_merged`."""
    set_seed(cfg.seed)
    host = build_model(cfg)
    if getattr(host, "num_classes", num_classes) != num_classes:
        host.reset_classifier(num_classes)
    return save_merged(pv.load_adapter(host, adapter_dir), path)


def save_merged(model: nn.Module, path: Path) -> str | None:
    """Write a merged plain-model checkpoint when every applied method can be merged. On an FSDP2 model
    call it on every process: the merge gathers, rank 0 writes (None elsewhere)."""
    from safetensors.torch import save_model

    if not pv.can_merge(model):
        state = get_state(model)
        names = state.method_names if state is not None else []
        report(f"merge skipped: methods {names} cannot be merged into the host's weights; the adapter was saved instead")
        return None
    merged = pv.merge(model) if sharding(model) == "fsdp2" else pv.merge(copy.deepcopy(model))  # sharded: a merged copy on rank 0
    if merged is None:
        return None
    save_model(merged, str(path))
    return str(path)
