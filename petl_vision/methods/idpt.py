"""IDPT: Instance-aware Dynamic Prompt Tuning (Zha et al., ICCV 2023) on the Point-MAE transformer.

At the input of block L (the last by default) a DGCNN-style generator reads the G patch tokens and
makes one prompt token per cloud:

    patch tokens (B, G, D) -> 3 x EdgeConv (kNN k=20 in feature space, [x_j - x_i, x_i], 1x1 conv
    2D -> D, BatchNorm, LeakyReLU 0.2, max over k) -> concat (B, 3D, G) -> conv1d 3D -> D + BN +
    LeakyReLU -> max over G -> prompt (B, 1, D)

The prompt is inserted after CLS, ``[CLS, prompt, patches]``, with its own learnable position
(added before every block from L on, like the others). The head reads
``[CLS, prompt, max-pool of patches]`` (3D) -> 256 -> 256 -> classes.
Trainable: CLS token and its position, the prompt position, the generator, the head.

Official defects fixed here (``official=True`` reproduces them): the prompt position is never
trained (the official trainable set is chosen by the substring "cls"), and the frozen backbone runs
in train mode, so the tokenizer's BatchNorm statistics drift and drop-path stays on.
"""
from __future__ import annotations

import dataclasses

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..models.point_mae import PointTransformer
from ..models.pointnet_ops import edge_features, knn


@dataclasses.dataclass
class IDPTConfig(MethodConfig):
    """Config of IDPT.

    prompt_layer: index of the block at whose input the prompt is generated and inserted
        (-1 = the last block, the official setting: 11 of 12).
    k: neighbours of each patch token in the generator's EdgeConv layers (feature-space kNN; needs
        k <= num_group).
    head_hidden: width of the two hidden layers of the head (256).
    head_dropout: dropout in the head (0.5).
    official: reproduce the official code: the prompt position stays frozen at its random init, and
        the frozen backbone runs in train mode (BatchNorm statistics of the tokenizer drift, dropout
        and drop-path are on). The drifted statistics are host buffers: save_adapter does not hold them.
    """

    name = "idpt"
    prompt_layer: int = -1
    k: int = 20
    head_hidden: int = 256
    head_dropout: float = 0.5
    official: bool = False

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"IDPTConfig.k must be >= 1, got {self.k}")


class EdgeConv(nn.Sequential):
    """1x1 Conv2d (2C -> C, no bias), BatchNorm2d, LeakyReLU(0.2) on edge features; max over neighbours."""

    def __init__(self, dim: int):
        super().__init__(nn.Conv2d(2 * dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(B, C, G) -> (B, C, G)."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 distances: in fp16/bf16 |a|^2 + |b|^2 - 2ab cancels
            tokens = x.transpose(1, 2).float()
            idx = knn(tokens, tokens, k)
        return super().forward(edge_features(x, idx)).amax(dim=-1)


class PromptGenerator(nn.Module):
    """Patch tokens (B, G, D) -> one prompt token (B, 1, D): three EdgeConvs, conv1d 3D -> D, max-pool."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.k = k
        self.edge = nn.ModuleList([EdgeConv(dim) for _ in range(3)])
        self.fuse = nn.Sequential(nn.Conv1d(3 * dim, dim, 1, bias=False), nn.BatchNorm1d(dim), nn.LeakyReLU(0.2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, outs = tokens.transpose(1, 2), []
        for edge in self.edge:
            x = edge(x, self.k)
            outs.append(x)
        return self.fuse(torch.cat(outs, dim=1)).amax(dim=-1).unsqueeze(1)


class IDPTPrompt(nn.Module):
    """The generator, the prompt position and the block hooks that insert them (``model.petl.idpt``).

    prompt_pos: (1, 1, D); a trained Parameter, or a buffer (frozen) with ``official=True``.
    """

    def __init__(self, model: PointTransformer, config: IDPTConfig):
        super().__init__()
        self.num_group = model.num_group
        self.generator = PromptGenerator(model.dim, config.k)
        pos = trunc_normal_(torch.zeros(1, 1, model.dim), std=0.02)
        if config.official:
            self.register_buffer("prompt_pos", pos)
        else:
            self.prompt_pos = nn.Parameter(pos)
        ref = model.cls_token
        self.to(device=ref.device, dtype=ref.dtype)

    def _with_prompt_pos(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.cat([pos[:, :1], self.prompt_pos.expand(pos.shape[0], -1, -1).to(pos.dtype), pos[:, 1:]], dim=1)

    def insert(self, block: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of block L: x (B, 1 + G, D) -> (B, 1 + 1 + G, D), the prompt after CLS."""
        x = args[0]
        prompt = self.generator(x[:, -self.num_group:]).to(x.dtype)
        x = torch.cat([x[:, :1], prompt, x[:, 1:]], dim=1)
        return (x,) + args[1:], {**kwargs, "pos": self._with_prompt_pos(kwargs["pos"])}

    def add_position(self, block: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of blocks after L: the prompt keeps its position in every later block."""
        return args, {**kwargs, "pos": self._with_prompt_pos(kwargs["pos"])}


def _train_frozen_parts(model: nn.Module, args) -> None:
    """Official behaviour: undo the core's eval mode of frozen modules while the model trains."""
    if model.training:
        for module in get_state(model).frozen_modules:
            module.train(True)


@register_method
class IDPT(Method):
    name = "idpt"
    config_class = IDPTConfig
    input_kind = "points"
    merge_refusal = "the prompt generator and the new head are extra modules"

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        if not isinstance(model, PointTransformer):
            raise UnsupportedHostError(
                f"method 'idpt' needs a point-cloud transformer; got {type(model).__name__} "
                "(supported: petl_vision.models.point_mae.PointTransformer)"
            )

    @classmethod
    def attach(cls, model: PointTransformer, config: IDPTConfig) -> None:
        depth = len(model.blocks)
        layer = config.prompt_layer + depth if config.prompt_layer < 0 else config.prompt_layer
        if not 0 <= layer < depth:
            raise ValueError(f"IDPTConfig.prompt_layer {config.prompt_layer} is outside the {depth} blocks (use 0..{depth - 1} or -1..-{depth})")
        if config.k > model.num_group:
            raise ValueError(f"IDPTConfig.k={config.k} exceeds the {model.num_group} patch tokens (num_group); use k <= {model.num_group}")
        prompt = IDPTPrompt(model, config).train(model.training)
        get_state(model).add_module("idpt", prompt)
        model.blocks[layer].register_forward_pre_hook(prompt.insert, with_kwargs=True)
        for block in model.blocks[layer + 1:]:
            block.register_forward_pre_hook(prompt.add_position, with_kwargs=True)
        model.reset_classifier(model.num_classes, num_extra_tokens=1, hidden=config.head_hidden, dropout=config.head_dropout)
        model.head.requires_grad_(True)
        model.cls_token.requires_grad_(True)
        model.cls_pos.requires_grad_(True)
        if config.official:
            model.register_forward_pre_hook(_train_frozen_parts)
