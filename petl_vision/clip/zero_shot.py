"""Zero-shot classifier heads from class names and prompt templates, and the tuned CLIP classifier.

    clf = CLIPClassifier(clip_model, ["cat", "dog"], templates=("a photo of a {}.",))
    logits = clf(images)        # (B, 3, H, W) -> (B, 2)

The head is CLIP's zero-shot classifier: for each class, the text embeddings of its prompts
(normalised), averaged over the templates and normalised again; logits are
``exp(logit_scale) * normalise(image_features) @ head.T``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The R-AMT / CoOp prompt of each few-shot benchmark (one template per data set).
DATASET_TEMPLATES = {
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "stanford_cars": ("a photo of a {}.",),
    "food101": ("a photo of {}, a type of food.",),
    "sun397": ("a photo of a {}.",),
    "caltech101": ("a photo of a {}.",),
    "ucf101": ("a photo of a person doing {}.",),
    "imagenet": ("a photo of a {}.",),
}
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def resolve_templates(templates: str | Sequence[str | Callable] | None) -> tuple:
    """Templates from a name or a sequence.

    A name: "default" ("a photo of a {}."), "clip_imagenet" (CLIP's 80-prompt ImageNet ensemble),
    "simple_imagenet" (its 7-prompt subset) or a key of DATASET_TEMPLATES. A sequence: format
    strings containing "{}" or callables `name -> prompt`.
    """
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, str):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        named = {"default": DEFAULT_TEMPLATES, "clip_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}
        named.update(DATASET_TEMPLATES)
        if templates not in named:
            raise ValueError(f"templates={templates!r}: unknown template set (known: {', '.join(sorted(named))}; or pass a list of strings with '{{}}')")
        return tuple(named[templates])
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates: empty; pass at least one template such as 'a photo of a {}.'")
    for t in templates:
        if not callable(t) and not (isinstance(t, str) and "{}" in t):
            raise ValueError(f"template {t!r} must be a string containing '{{}}' (where the class name goes) or a callable")
    return templates


def default_tokenizer(clip_model: nn.Module):
    """open_clip's CLIP BPE tokenizer (vocabulary shipped with open_clip) at the model's context length."""
    return _simple_tokenizer(int(getattr(clip_model, "context_length", 77)))


@functools.lru_cache(maxsize=4)
def _simple_tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def zero_shot_weights(clip_model: nn.Module, class_names: Sequence[str], templates=DEFAULT_TEMPLATES,
                      tokenizer=None, batch_classes: int = 10) -> torch.Tensor:
    """(C, E) unit-norm class embeddings: per class, the mean of its normalised prompt embeddings.

    clip_model: an open_clip CLIP (anything with `encode_text(tokens, normalize=True)`).
    tokenizer: `texts -> (N, context_length)` token ids (default `default_tokenizer`).
    Runs in eval mode without gradients (open_clip's `build_zero_shot_classifier`).
    """
    from open_clip import build_zero_shot_classifier

    if not class_names:
        raise ValueError("class_names: empty; pass one name per class")
    templates = resolve_templates(templates)
    tokenizer = tokenizer or default_tokenizer(clip_model)
    device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()
    try:
        weights = build_zero_shot_classifier(clip_model, tokenizer, list(class_names), list(templates), batch_classes, device)
    finally:
        clip_model.train(was_training)
    return weights.T.contiguous()


class ZeroShotHead(nn.Module):
    """Logits of normalised image features against class embeddings, scaled by CLIP's logit scale.

    weight: (C, E) class embeddings; a buffer when frozen, a parameter when `trainable`.
    logit_scale: CLIP's log temperature (a buffer); logits = exp(logit_scale) * f @ weight.T.
    """

    def __init__(self, weight: torch.Tensor, logit_scale: torch.Tensor | float, trainable: bool = False):
        super().__init__()
        weight = weight.detach().clone()
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=weight.dtype, device=weight.device).detach().clone().reshape(()))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, E), already normalised -> (B, C)."""
        return self.logit_scale.exp() * features @ self.weight.to(features.dtype).T

    def extra_repr(self) -> str:
        kind = "trainable" if isinstance(self.weight, nn.Parameter) else "frozen"
        return f"classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, {kind}"


class CLIPClassifier(nn.Module):
    """A CLIP image tower with a zero-shot head: `image -> normalised features -> logits`.

    clip_model: an open_clip CLIP; its `visual` tower is shared (not copied) and its text tower is
        used once, here, to build the head.
    class_names: one name per class, in label order.
    templates: prompt templates (see `resolve_templates`; default "a photo of a {}.").
    tokenizer: open_clip tokenizer of the model (default: CLIP's BPE tokenizer).
    train_text: False (default): the head is a fixed buffer. True: the head's class embeddings are a
        parameter, trained by methods that train the head (`train_head=True`).

    Forward: images (B, 3, H, W) -> logits (B, C). `get_classifier()` is the head, so methods find
    it as they find a timm head; the token-host interface finds `visual` (open_clip ViT towers).
    """

    def __init__(self, clip_model: nn.Module, class_names: Sequence[str], templates=DEFAULT_TEMPLATES,
                 tokenizer=None, train_text: bool = False):
        super().__init__()
        self.visual = clip_model.visual
        self.class_names = [str(c) for c in class_names]
        self.templates = resolve_templates(templates)
        weight = zero_shot_weights(clip_model, self.class_names, self.templates, tokenizer)
        self.head = ZeroShotHead(weight, clip_model.logit_scale, trainable=train_text)
        self.num_classes = len(self.class_names)

    def get_classifier(self) -> nn.Module:
        return self.head

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E) unit-norm image features."""
        features = self.visual(images)
        if isinstance(features, tuple):  # towers built with output_tokens=True
            features = features[0]
        return F.normalize(features, dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_features(images))
