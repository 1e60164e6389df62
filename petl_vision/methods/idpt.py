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
from pathlib import Path

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..models.point_mae import CheckpointError, PointTransformer, load_official_state, official_to_ours, read_official_state
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


# ----------------------------------------------------------------------------- official checkpoints
# The official generator (`blocks.cls`, a DGCNN "view" module of the prompt encoder): conv1..conv3 are
# the EdgeConvs (Conv2d 2D -> D, BatchNorm2d, LeakyReLU), conv5 the fusion (Conv1d 3D -> D, BatchNorm1d,
# LeakyReLU); bn1, bn2, bn3, bn5 are the same BatchNorms registered a second time (duplicate keys).
_GENERATOR_KEYS = {"conv1": "edge.0", "conv2": "edge.1", "conv3": "edge.2", "conv5": "fuse"}
_BN_ALIASES = {"bn1": "conv1", "bn2": "conv2", "bn3": "conv3", "bn5": "conv5"}


def official_generator_key(key: str) -> str | None:
    """`blocks.cls.conv2.1.running_mean` or `blocks.cls.bn2.running_mean` -> `edge.1.1.running_mean`; None if unknown."""
    if not key.startswith("blocks.cls."):
        return None
    module, _, rest = key[len("blocks.cls."):].partition(".")
    if module in _BN_ALIASES:
        module, rest = _BN_ALIASES[module], "1." + rest
    return f"{_GENERATOR_KEYS[module]}.{rest}" if module in _GENERATOR_KEYS and rest else None


def load_official_idpt_checkpoint(model: PointTransformer, path: str | Path) -> dict[str, list[str]]:
    """Load an official IDPT fine-tuned checkpoint (`{'base_model': state_dict}`) into `model`.

    model: a PointTransformer with IDPT applied (`pv.apply(model, "idpt", ...)`) whose settings
        match the run that made the checkpoint: prompt_layer (official configs: 11 of 12 blocks),
        k (official: 20), head_hidden (256) and the number of classes.
    Mapping: backbone keys as in `load_official_checkpoint`; the official DGCNN generator
    `blocks.cls.conv{1,2,3}.{0,1}.*` -> `generator.edge.{0,1,2}.*`, `blocks.cls.conv5.*` ->
    `generator.fuse.*` (`blocks.cls.bn{1,2,3,5}.*` are duplicates of the conv BatchNorms and must
    equal them), `prompt_pos` -> the prompt position, `cls_head_finetune.*` (3D inputs) -> `head.*`.
    Only the "dgcnn" prompt module (the paper's) is supported: any other `blocks.cls.*` key, a
    missing generator tensor, a missing prompt position / CLS token / head, or a wrong shape
    raises CheckpointError naming it.
    Returns {"loaded": [...] (our names), "skipped": [...] (ignored checkpoint keys), "missing": [] }.
    """
    prompt = getattr(get_state(model), "idpt", None) if get_state(model) is not None else None
    if not isinstance(prompt, IDPTPrompt):
        raise ValueError("load_official_idpt_checkpoint: apply IDPT to the model first (pv.apply(model, 'idpt', ...)); "
                         f"got a {type(model).__name__} without it")
    state = read_official_state(path)
    backbone, generator, aliases, unknown, prompt_pos = {}, {}, {}, [], None
    for key, value in state.items():
        name = official_to_ours(key)
        if name == "prompt_pos":
            prompt_pos = value
        elif name.startswith("blocks.cls."):
            ours = official_generator_key(name)
            if ours is None:
                unknown.append(key)
            elif name[len("blocks.cls."):].split(".")[0] in _BN_ALIASES:
                aliases[ours] = (key, value)
            else:
                generator[ours] = value
        else:
            backbone[key] = value
    if unknown:
        raise CheckpointError(f"{path}: prompt-generator tensors this loader does not know: {unknown[:6]} ({len(unknown)}); "
                              "only the official 'dgcnn' prompt module (blocks.cls.conv1/2/3/5, bn1/2/3/5) is supported")
    for ours, (key, value) in aliases.items():
        if ours not in generator:
            generator[ours] = value
        elif not torch.equal(generator[ours], value):
            raise CheckpointError(f"{path}: {key} differs from the BatchNorm it duplicates (blocks.cls conv*.1); a damaged checkpoint")
    if prompt_pos is None:
        raise CheckpointError(f"{path}: no 'prompt_pos' in this checkpoint: not an IDPT fine-tuned checkpoint "
                              "(use petl_vision.models.point_mae.load_official_checkpoint for Point-MAE ones)")
    expected = prompt.generator.state_dict()
    missing = [k for k in expected if k not in generator]
    wrong = [f"{k}: {list(v.shape)} vs ours {list(expected[k].shape)}" for k, v in generator.items()
             if k in expected and v.shape != expected[k].shape]
    if missing or wrong or prompt_pos.shape != prompt.prompt_pos.shape:
        parts = ([f"missing generator tensors {missing[:6]} ({len(missing)})"] if missing else []) + (
            [f"shape mismatch {wrong[:4]}"] if wrong else []) + (
            [f"prompt_pos {list(prompt_pos.shape)} vs ours {list(prompt.prompt_pos.shape)}"] if prompt_pos.shape != prompt.prompt_pos.shape else [])
        raise CheckpointError(f"{path}: the IDPT prompt generator does not fit this model (dim {model.dim}, k {prompt.generator.k}): "
                              + "; ".join(parts))
    report = load_official_state(model, backbone, source=str(path))
    absent = [k for k in report["missing"] if not k.endswith("num_batches_tracked")]
    if absent:
        raise CheckpointError(f"{path}: a fine-tuned IDPT checkpoint must hold the CLS token, its position and the "
                              f"{3 * model.dim}-input head; missing or of another shape: {absent[:6]} (skipped: "
                              f"{[k for k in report['skipped'] if 'head' in k][:3]})")
    with torch.no_grad():
        for name, value in generator.items():
            expected[name].copy_(value)
        prompt.prompt_pos.copy_(prompt_pos)
    loaded = report["loaded"] + [f"petl.idpt.generator.{k}" for k in sorted(generator)] + ["petl.idpt.prompt_pos"]
    return {"loaded": loaded, "skipped": report["skipped"], "missing": report["missing"]}
