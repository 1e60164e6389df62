"""The default workload: a timm image classifier trained with cross-entropy on random images."""
from __future__ import annotations

import difflib

import timm
import torch
from torch import nn
from torch.nn import functional as F

from ...data.transforms import _fixed_input_size
from ..workload import Workload, register_workload


@register_workload
class TimmClassifier(Workload):
    """`timm.create_model(model, pretrained=False, num_classes=..., **model_kwargs)`.

    Inputs are (B, 3, H, W) standard-normal images at the model's input size (its timm data config,
    or the size a patch-embedding model was built for, e.g. ``img_size=32``); targets are random
    class indices (B,); the loss is cross-entropy on the (B, num_classes) logits.
    """

    name = "timm-classifier"
    description = "timm image classifier, cross-entropy on random images"
    input_kind = "image"

    def build_model(self) -> nn.Module:
        if not timm.is_model(self.model):
            close = difflib.get_close_matches(self.model, timm.list_models(), n=3, cutoff=0.7)
            hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models('*vit*') lists them"
            raise ValueError(f"unknown timm model {self.model!r}{hint}")
        return timm.create_model(self.model, pretrained=False, num_classes=self.num_classes, **self.model_kwargs)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = timm.data.resolve_model_data_config(model)["input_size"]
        return (c, *(_fixed_input_size(model) or (h, w)))

    def make_batch(self, model, batch_size, device, generator):
        images = torch.randn(batch_size, *self.input_size(model), generator=generator)
        targets = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return images.to(device), targets.to(device)

    def loss(self, model, batch):
        images, targets = batch
        return F.cross_entropy(model(images).float(), targets)

    def infer(self, model, batch):
        return model(batch[0])
