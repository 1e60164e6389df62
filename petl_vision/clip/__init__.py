"""CLIP through open_clip: loading, zero-shot heads, the tuned classifier, few-shot data.

    import petl_vision as pv
    from petl_vision.clip import CLIPClassifier, load_clip

    clip_model, tokenizer = load_clip("ViT-B-16", pretrained="openai")
    clf = CLIPClassifier(clip_model, class_names, templates="oxford_pets", tokenizer=tokenizer)
    pv.apply(clf, "mask_tuning")        # or "ssf", "vpt" (train_head has no effect on a frozen head)

Importing this package registers open_clip's ViT tower as a token host (petl_vision.hosts.open_clip).
"""
from ..hosts import open_clip as _open_clip_host  # noqa: F401  (registers the open_clip token host)
from .data import class_names_from_folders, clip_transforms, few_shot, few_shot_indices, read_class_names
from .load import load_clip
from .zero_shot import (
    DATASET_TEMPLATES,
    DEFAULT_TEMPLATES,
    CLIPClassifier,
    ZeroShotHead,
    default_tokenizer,
    resolve_templates,
    zero_shot_weights,
)

__all__ = [
    "CLIPClassifier",
    "DATASET_TEMPLATES",
    "DEFAULT_TEMPLATES",
    "ZeroShotHead",
    "class_names_from_folders",
    "clip_transforms",
    "default_tokenizer",
    "few_shot",
    "few_shot_indices",
    "load_clip",
    "read_class_names",
    "resolve_templates",
    "zero_shot_weights",
]
