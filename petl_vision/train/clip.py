"""Few-shot CLIP tuning: an open_clip model, a zero-shot head, any method (R-AMT mask tuning, ...).

A config is the classifier's YAML (`TrainConfig`: model, pretrained, checkpoint, method, optim,
sched, epochs, ...) whose `data` section is a few-shot image folder (`CLIPDataConfig`), plus a
`clip` section (`CLIPModelConfig`):

    base: methods/mask_tuning.yaml
    model: ViT-B-16                      # an open_clip architecture
    pretrained: true                     # with clip.tag ("openai"); or checkpoint: /path/clip.pt
    data: {root: data/oxford_pets, shots: 16, seed: 1, templates: oxford_pets}
    clip: {tag: openai}

`train_clip` builds the model and the few-shot data and hands them to the classifier trainer
(`petl_vision.train.trainer.train`), which prints the zero-shot accuracy before training (a copy
made before the method is applied) and runs the methods' training hooks: with mask tuning, the
loss is CE + the score penalty and, with `grad_dropout`, gradients go through R-AMT's gradient
dropout against the KL to that frozen zero-shot classifier. The tuned accuracy is printed after.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from petl_vision.clip import CLIPClassifier, class_names_from_folders, clip_transforms, few_shot, load_clip, read_class_names
from petl_vision.clip.zero_shot import resolve_templates
from petl_vision.data.build import image_folders
from petl_vision.methods import mask_tuning

from .cli import report
from .config import ConfigError, TrainConfig, apply_section_override, build_section, from_dict, read_yaml
from .trainer import start_classifier_run, train


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


CLIP_SECTIONS = {"data": CLIPDataConfig, "clip": CLIPModelConfig}  # the sections a CLIP config adds to TrainConfig's


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
        raw = apply_section_override(raw, item, CLIP_SECTIONS)
    data = build_section(CLIPDataConfig, raw.pop("data", None) or {}, source, "data.")
    clip = build_section(CLIPModelConfig, raw.pop("clip", None) or {}, source, "clip.")
    try:
        resolve_templates(data.templates)
    except ValueError as e:
        raise ConfigError(f"{source}: data.templates: {e}") from None
    return CLIPTrainConfig(train=from_dict(raw, source), data=data, clip=clip)


def build_clip_classifier(cfg: CLIPTrainConfig, class_names: list[str]) -> CLIPClassifier:
    """The open_clip model of the config (tag, local checkpoint or random) with a zero-shot head."""
    tc = cfg.train
    pretrained = tc.checkpoint or (cfg.clip.tag if tc.pretrained else None)
    clip_model, tokenizer = load_clip(tc.model, pretrained=pretrained, model_config=cfg.clip.model_config)
    return CLIPClassifier(clip_model, class_names, cfg.data.templates, tokenizer, train_text=cfg.clip.train_text)


def build_fewshot_data(data: CLIPDataConfig):
    """(training ImageFolder, eval ImageFolder, class names) of the data section, without transforms."""
    train_full, eval_ds, _ = image_folders(data)
    folders = train_full.classes
    names = read_class_names(data.class_names, folders) if data.class_names else class_names_from_folders(folders)
    return train_full, eval_ds, names


def train_clip(cfg: CLIPTrainConfig, resume: str | Path | bool | None = None, stop_after_epoch: int | None = None,
               overwrite: bool = False) -> dict:
    """Few-shot tuning of cfg.train.method on a CLIP classifier; returns a result dict.

    resume: a checkpoint dir, an output dir (its latest complete checkpoint), or True for the output_dir.
    stop_after_epoch: stop (as if interrupted) after that epoch's checkpoint; for tests.
    overwrite: replace the run output_dir holds; else an output_dir holding another run raises
        FileExistsError (checked before anything is built).

    Result keys: those of `petl_vision.train.trainer.train`, plus zero_shot (metrics of the untuned
    classifier) and masked_fraction (mask tuning only, else None).
    """
    tc = cfg.train
    if tc.grad_accum_steps != 1:
        raise ConfigError(f"grad_accum_steps={tc.grad_accum_steps}: the CLIP trainer steps on every batch (use 1)")
    say = report  # the main process only (a PartialState made here would miss Accelerate's CPU launch settings)
    record = {"data": dataclasses.asdict(cfg.data), "clip": dataclasses.asdict(cfg.clip)}
    start_classifier_run(tc, resume, overwrite, record)  # fail before building: the folder, the checkpoint
    set_seed(tc.seed)
    train_full, eval_ds, names = build_fewshot_data(cfg.data)
    model = build_clip_classifier(cfg, names)
    train_full.transform, eval_ds.transform = clip_transforms(model.visual, cfg.data.augment, cfg.data.crop_scale)
    train_ds = few_shot(train_full, cfg.data.shots, cfg.data.seed)
    say(f"{len(names)} classes, {len(train_ds)} training images ({cfg.data.shots} shots), {len(eval_ds)} eval images")

    result = train(tc, resume, stop_after_epoch, model=model, data=(train_ds, eval_ds, len(names)),
                   baseline="zero-shot", config_record=record, overwrite=overwrite)
    tuned = result["model"]
    masked = mask_tuning.masked_fraction(tuned) if mask_tuning.applied_config(tuned) is not None else None
    note = f", masked off {100 * masked:.2f}% of the masked weights" if masked is not None else ""
    say(f"zero-shot top1 {result['baseline']['top1']:.2f} -> tuned top1 {result['metrics']['top1']:.2f}{note}")
    return {**result, "zero_shot": result["baseline"], "masked_fraction": masked}


__all__ = ["CLIPDataConfig", "CLIPModelConfig", "CLIPTrainConfig", "build_clip_classifier", "build_fewshot_data",
           "load_clip_config", "train_clip"]
