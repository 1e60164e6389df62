"""Few-shot CLIP tuning: an open_clip model, a zero-shot head, any method; R-AMT's training terms.

A config is the classifier's YAML (`TrainConfig`: model, pretrained, checkpoint, method, optim,
sched, epochs, ...) whose `data` section is a few-shot image folder (`CLIPDataConfig`), plus a
`clip` section (`CLIPModelConfig`):

    base: methods/mask_tuning.yaml
    model: ViT-B-16                      # an open_clip architecture
    pretrained: true                     # with clip.tag ("openai"); or checkpoint: /path/clip.pt
    data: {root: data/oxford_pets, shots: 16, seed: 1, templates: oxford_pets}
    clip: {tag: openai}

The loop prints the zero-shot accuracy before training and the tuned accuracy after. With mask
tuning applied, the loss is CE + the score penalty and, with `grad_dropout`, gradients go through
R-AMT's gradient dropout against the KL to the frozen zero-shot classifier (a copy made before
the method is applied). It reuses the classifier trainer's evaluation, checkpoints, metrics log,
optimizer and schedule.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

import petl_vision as pv
from petl_vision.clip import CLIPClassifier, class_names_from_folders, clip_transforms, few_shot, load_clip, read_class_names
from petl_vision.clip.zero_shot import resolve_templates
from petl_vision.data.build import _image_folders
from petl_vision.methods import mask_tuning

from .config import ConfigError, TrainConfig, _build, apply_override, from_dict, merge_dicts, read_yaml, to_dict
from .optim import build_optimizer, build_scheduler
from .tracking import MetricsLog
from .trainer import TrainState, evaluate, find_checkpoint, save_checkpoint, save_merged


@dataclass
class CLIPDataConfig:
    root: str | None = None  # holds <train_split>/ and <eval_split>/, one sub-folder of images per class
    train_root: str | None = None  # instead of root
    eval_root: str | None = None  # instead of root
    train_split: str = "train"
    eval_split: str = "val"
    shots: int = 16  # training images per class, drawn with `seed` (0: all)
    seed: int = 1  # few-shot sampling seed (R-AMT reports seeds 1, 2, 3)
    class_names: str | None = None  # file: one name per line, sorted-folder order; None: folder names
    templates: Any = "default"  # a template-set name (see petl_vision.clip.resolve_templates) or a list
    augment: bool = True  # random resized crop + flip (R-AMT); false: the eval transform
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])


@dataclass
class CLIPModelConfig:
    tag: str = "openai"  # open_clip pretrained tag, used when pretrained: true and no checkpoint
    model_config: str | None = None  # JSON architecture file for open_clip.add_model_config
    train_text: bool = False  # the head's class embeddings are trained by methods with train_head


@dataclass
class CLIPTrainConfig:
    train: TrainConfig  # everything outside `data` and `clip` (its own `data` section is unused)
    data: CLIPDataConfig
    clip: CLIPModelConfig


def load_clip_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CLIPTrainConfig:
    """CLIPTrainConfig from a YAML file plus `key=value` overrides (`data.shots=4`, `optim.lr=1e-4`)."""
    source = str(path) if path is not None else "config"
    raw = read_yaml(path, train_keys=False) if path is not None else {}
    for item in overrides:
        key, _, text = item.partition("=")
        section = key.split(".", 1)[0]
        if section in ("data", "clip") and "." in key and "=" in item:
            raw = merge_dicts(raw, {section: {key.split(".", 1)[1]: yaml.safe_load(text) if text.strip() else None}})
        else:
            raw = apply_override(raw, item)  # checks the key against TrainConfig
    sections = {}
    for name, cls in (("data", CLIPDataConfig), ("clip", CLIPModelConfig)):
        values = dict(raw.pop(name, None) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid: {sorted(f'{name}.{n}' for n in names)}")
        templates = values.pop("templates", "default") if cls is CLIPDataConfig else None
        sections[name] = _build(cls, values, source, f"{name}.")
        if cls is CLIPDataConfig:
            try:
                resolve_templates(templates)
            except ValueError as e:
                raise ConfigError(f"{source}: data.templates: {e}") from None
            sections[name].templates = templates
    return CLIPTrainConfig(train=from_dict(raw, source), **sections)


def build_clip_classifier(cfg: CLIPTrainConfig, class_names: list[str]) -> CLIPClassifier:
    """The open_clip model of the config (tag, local checkpoint or random) with a zero-shot head."""
    tc = cfg.train
    pretrained = tc.checkpoint or (cfg.clip.tag if tc.pretrained else None)
    clip_model, tokenizer = load_clip(tc.model, pretrained=pretrained, model_config=cfg.clip.model_config)
    return CLIPClassifier(clip_model, class_names, cfg.data.templates, tokenizer, train_text=cfg.clip.train_text)


def build_fewshot_data(data: CLIPDataConfig):
    """(training ImageFolder, eval ImageFolder, class names) of the data section, without transforms."""
    train_full, eval_ds, _ = _image_folders(data)
    folders = train_full.classes
    names = read_class_names(data.class_names, folders) if data.class_names else class_names_from_folders(folders)
    return train_full, eval_ds, names


def train_clip(cfg: CLIPTrainConfig, resume: str | Path | bool | None = None, stop_after_epoch: int | None = None) -> dict:
    """Few-shot tuning of cfg.train.method on a CLIP classifier; returns a result dict.

    resume: a checkpoint dir, an output dir (its latest checkpoint), or True for the output_dir.
    stop_after_epoch: stop (as if interrupted) after that epoch's checkpoint; for tests.

    Result keys: zero_shot (metrics of the untuned classifier), metrics (last epoch), history,
    model (unwrapped, adapted), masked_fraction (mask tuning only), trainable_params,
    total_params, output_dir, adapter_dir, merged_path, checkpoint_dir.
    """
    tc = cfg.train
    if tc.grad_accum_steps != 1:
        raise ConfigError(f"grad_accum_steps={tc.grad_accum_steps}: the CLIP trainer steps on every batch (use 1)")
    accelerator = Accelerator(mixed_precision=tc.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tc.seed))
    set_seed(tc.seed)
    out = Path(tc.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        record = {**to_dict(tc), "data": dataclasses.asdict(cfg.data), "clip": dataclasses.asdict(cfg.clip)}
        (out / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))

    train_full, eval_ds, names = build_fewshot_data(cfg.data)
    model = build_clip_classifier(cfg, names)
    train_full.transform, eval_ds.transform = clip_transforms(model.visual, cfg.data.augment, cfg.data.crop_scale)
    train_ds = few_shot(train_full, cfg.data.shots, cfg.data.seed)
    accelerator.print(f"{len(names)} classes, {len(train_ds)} training images ({cfg.data.shots} shots), {len(eval_ds)} eval images")
    eval_loader = accelerator.prepare(DataLoader(eval_ds, tc.eval_batch_size or 2 * tc.batch_size, num_workers=tc.num_workers))
    zero_shot = evaluate(model.to(accelerator.device), eval_loader, accelerator, len(names))
    accelerator.print(f"zero-shot: top1 {zero_shot['top1']:.2f}")

    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen zero-shot classifier
    pv.apply(model, tc.method.name, **tc.method.overrides)
    counts = pv.summary(model)
    accelerator.print(counts)
    mt = mask_tuning.applied_config(model)
    if mt is None or not mt.grad_dropout:
        teacher = None

    train_loader = DataLoader(train_ds, tc.batch_size, shuffle=True, num_workers=tc.num_workers)
    optimizer = build_optimizer(model, tc.optim, tc.batch_size * accelerator.num_processes)
    scheduler = build_scheduler(optimizer, tc.sched, tc.epochs, len(train_loader))
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    log = MetricsLog(out, enabled=accelerator.is_main_process)
    if resume:
        ckpt = find_checkpoint(out if resume is True else resume)
        accelerator.load_state(str(ckpt))
        log.truncate_after(state.epoch)
        accelerator.print(f"resumed from {ckpt} at epoch {state.epoch}")

    history, ckpt_dir = [], None
    for epoch in range(state.epoch, tc.epochs):
        train_loader.set_epoch(epoch)
        stats = train_clip_epoch(model, teacher, train_loader, optimizer, scheduler, accelerator, tc, state)
        stats.update(evaluate(model, eval_loader, accelerator, len(names)))
        state.epoch = epoch + 1
        record = {"epoch": state.epoch, "step": state.step, **stats}
        if mt is not None:
            record["masked_fraction"] = mask_tuning.masked_fraction(model)
        history.append(record)
        log.log(record)
        accelerator.print(f"epoch {state.epoch}/{tc.epochs}  loss {record['train_loss']:.4f}  top1 {record['top1']:.2f}  ({record['epoch_time']:.1f}s)")
        ckpt_dir = save_checkpoint(accelerator, out, state.epoch, tc.keep_checkpoints)
        if stop_after_epoch is not None and state.epoch >= stop_after_epoch:
            break
    log.close()

    unwrapped = accelerator.unwrap_model(model)
    metrics = history[-1] if history else evaluate(model, eval_loader, accelerator, len(names))
    masked = f", masked off {100 * mask_tuning.masked_fraction(unwrapped):.2f}% of the masked weights" if mt is not None else ""
    accelerator.print(f"zero-shot top1 {zero_shot['top1']:.2f} -> tuned top1 {metrics['top1']:.2f}{masked}")
    result = {
        "zero_shot": zero_shot, "metrics": metrics, "history": history, "model": unwrapped,
        "masked_fraction": mask_tuning.masked_fraction(unwrapped) if mt is not None else None,
        "trainable_params": counts.trainable, "total_params": counts.total, "output_dir": str(out),
        "adapter_dir": None, "merged_path": None, "checkpoint_dir": str(ckpt_dir) if ckpt_dir else None,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result["adapter_dir"] = str(pv.save_adapter(unwrapped, out / "adapter"))
        if tc.merge:
            result["merged_path"] = save_merged(unwrapped, out / "merged.safetensors")
    return result


def train_clip_epoch(model, teacher, loader, optimizer, scheduler, accelerator: Accelerator, tc: TrainConfig, state: TrainState) -> dict:
    """One pass over `loader`; returns train_loss (mean CE + penalty), lr, epoch_time, images_per_s.

    Mask tuning: loss = CE + regularization_loss; with a teacher, the step is R-AMT's gradient
    dropout (CE gradient vs KL gradient), computed per process and then averaged across processes;
    the uniform draws are seeded by (seed, step), so every process draws the same.
    """
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    mt = mask_tuning.applied_config(unwrapped)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device=accelerator.device)
    loss_sum, batches, images, start = 0.0, 0, 0, time.perf_counter()
    for inputs, targets in loader:
        if teacher is None:
            loss = _task_loss(model(inputs), targets, unwrapped, mt)
            accelerator.backward(loss)
        else:
            with accelerator.no_sync(model):  # two backward passes: average the combined gradient below
                logits = model(inputs)
                loss = _task_loss(logits, targets, unwrapped, mt)
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                kl = mask_tuning.kl_to_teacher(logits.float(), teacher_logits.float(), mt.kl_temperature)
                generator.manual_seed(tc.seed * 1_000_003 + state.step)
                mask_tuning.gradient_dropout_backward(params, loss, kl, mt.grad_dropout_lambda, accelerator.backward, generator)
            if accelerator.num_processes > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
        if tc.clip_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state.step += 1
        loss_sum += loss.item()
        batches += 1
        images += inputs.shape[0] * accelerator.num_processes
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(batches, 1), "lr": optimizer.param_groups[0]["lr"],
            "epoch_time": elapsed, "images_per_s": images / max(elapsed, 1e-9)}


def _task_loss(logits: torch.Tensor, targets: torch.Tensor, model, mt) -> torch.Tensor:
    loss = F.cross_entropy(logits.float(), targets)
    return loss + mask_tuning.regularization_loss(model) if mt is not None else loss


__all__ = ["CLIPDataConfig", "CLIPModelConfig", "CLIPTrainConfig", "build_clip_classifier", "build_fewshot_data",
           "load_clip_config", "train_clip", "train_clip_epoch"]
