"""HST: Hierarchical Side-Tuning for Vision Transformers (Lin et al., 2023).

One learnable meta token per ViT block is prepended before the prefix tokens (CLS, registers) at
that block's input and removed from its output: ``[meta, prefix..., patches]``. A 4-stage
hierarchical side network (strides 4, 8, 16, 32) reads each block's outputs: its patch tokens as a
(B, D, gh, gw) map and its meta token. Stage i reads one group of consecutive blocks (blocks 0-2,
3-5, 6-8, 9-11 of a 12-block ViT) and has one side block per ViT block of its group. A side block:

    vit  = resize(bridge_i(patch map), stage resolution)           (B, H*W, d)
    kv   = [LN_j(bridge_i(meta output of block j)), mean(vit)]      (B, 2, d)
    x = x + attn(LN(x), kv);  x = x + vit;  x = x + mlp(LN(x))

The stage outputs form a feature pyramid (`feature_pyramid`); the classification head is the mean
of the last stage -> BatchNorm1d without affine -> Linear.

HST cannot run the backbone without an autograd graph: the meta tokens pass through every block,
so their gradients flow back through the frozen backbone (unlike LST and UniPT, which run it under
no_grad). Its training memory is therefore close to that of in-backbone methods such as VPT.

Implemented with hooks: a forward pre-hook on the root model captures the image for the side
network's stem, pre-hooks/hooks on every block insert and remove the meta tokens and record the
block outputs, and a forward hook on the root replaces the host's logits with HST's. Everything
HST adds lives in ``model.petl.hst`` (state_dict keys ``petl.hst...``). The host's own head is
unused and stays frozen.

Bridge then resize equals the official resize then bridge exactly (bilinear weights sum to 1 and
the bridge is per-position affine), and runs the bridge at the ViT's resolution instead of the
stage's, so it is much cheaper at stride 4.

Multi-process training (DDP, FSDP; issue #15): the side network's BatchNorm layers (the stems'
BatchNorm2d and fc_norm) normalise with the statistics of each process's share of the batch, so a
step on a batch split over ranks differs from the step on the whole batch. For the global
statistics convert them after `pv.apply` and before wrapping:
``model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`` (same state_dict keys, so the
adapter files are unchanged). PyTorch's SyncBatchNorm runs on GPU / XPU only: on CPU (gloo) keep
the per-rank statistics.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import TokenHost, classifier_modules, token_host
from ._autocast import autocast_input
from ._side import check_single_output_method

NUM_STAGES = 4
STRIDES = (4, 8, 16, 32)  # of the pyramid levels, relative to the input image


@dataclasses.dataclass
class HSTConfig(MethodConfig):
    """Config of HST (defaults: the official ViT-B/16 setting).

    widths: channels of the 4 side stages and of the pyramid levels (32, 48, 64, 72).
    num_heads: attention heads of the side blocks of each stage (2, 4, 8, 12); must divide widths.
    block_indices: index of the last ViT block each stage reads, increasing, the last one = depth - 1
        (official: (2, 5, 8, 11)). Stage i has one side block per ViT block of its group, so the
        paper's 3 side blocks per stage come from 3 ViT blocks per stage. None: 4 groups of
        depth // 4 blocks, the remainder going one each to the last stages (depth 14: 3/3/4/4).
    mlp_ratio: hidden width of the side blocks' MLP over their width (4).
    qkv_bias: bias on the side attention's q, k, v (official: True).
    drop_path: stochastic depth, ramped linearly over the side blocks (recipe: 0).
    train_block_norms: train the norm layers inside the backbone blocks (paper: yes).
    num_classes: classes of HST's head; None = the host head's output size (0 when the host's head
        is an Identity); 0 = no Linear: the forward returns the normalised pooled feature (B, widths[-1]).
    """

    name = "hst"
    widths: tuple[int, ...] = (32, 48, 64, 72)
    num_heads: tuple[int, ...] = (2, 4, 8, 12)
    block_indices: tuple[int, ...] | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    train_block_norms: bool = True
    num_classes: int | None = None

    def __post_init__(self):
        self.widths, self.num_heads = tuple(self.widths), tuple(self.num_heads)  # YAML gives lists
        if self.block_indices is not None:
            self.block_indices = tuple(self.block_indices)
        for field in ("widths", "num_heads") + (("block_indices",) if self.block_indices is not None else ()):
            value = getattr(self, field)
            if len(value) != NUM_STAGES:
                raise ValueError(f"HSTConfig.{field} needs {NUM_STAGES} values (one per side stage), got {value!r}")
        bad = [(w, h) for w, h in zip(self.widths, self.num_heads) if h < 1 or w % h]
        if bad:
            raise ValueError(f"HSTConfig: each width must be a multiple of its num_heads; got (width, heads) {bad}")
        if self.block_indices is not None and (self.block_indices[0] < 0 or any(b <= a for a, b in zip(self.block_indices, self.block_indices[1:]))):
            raise ValueError(f"HSTConfig.block_indices must be increasing and >= 0, got {self.block_indices!r}")
        if self.num_classes is not None and self.num_classes < 0:
            raise ValueError(f"HSTConfig.num_classes must be >= 0 or None, got {self.num_classes}")


def stage_groups(depth: int, block_indices: tuple[int, ...] | None = None) -> list[list[int]]:
    """The ViT block indices each side stage reads, e.g. depth 12 -> [[0, 1, 2], ..., [9, 10, 11]]."""
    if block_indices is None:
        if depth < NUM_STAGES:
            raise ValueError(f"HST needs at least {NUM_STAGES} blocks, got {depth}")
        base, extra = divmod(depth, NUM_STAGES)
        sizes = [base + (i >= NUM_STAGES - extra) for i in range(NUM_STAGES)]
        block_indices = tuple(end - 1 for end in itertools.accumulate(sizes))
    if block_indices[-1] != depth - 1:
        raise ValueError(f"HSTConfig.block_indices={block_indices!r}: the last stage must end at the last block, {depth - 1}")
    starts = (0,) + tuple(b + 1 for b in block_indices[:-1])
    return [list(range(s, e + 1)) for s, e in zip(starts, block_indices)]


class SideAttention(nn.Module):
    """Side tokens (B, N, d) attend to a few key/value tokens (B, M, d) -> (B, N, d)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, h, n, d / h)
        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(kv)), heads(self.v(kv)))
        return self.proj(out.transpose(1, 2).flatten(2))


class SideBlock(nn.Module):
    """x = x + attn(LN(x), kv); x = x + x_vit; x = x + mlp(LN(x)); all (B, N, d)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SideAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, kv: torch.Tensor, x_vit: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), kv))
        x = x + x_vit
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resize_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) weights of 1-d linear interpolation, as `F.interpolate(..., align_corners=False)`."""
    eye = torch.eye(n_in, device=device).unsqueeze(1)  # (n_in, 1, n_in): one input position per row
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False).squeeze(1).t()


def resize_tokens(x: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                  weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Bilinear resize of a token map (B, gh*gw, d) -> (B, H*W, d), as `F.interpolate` (bilinear,
    align_corners=False) on (B, d, gh, gw) but with two small matmuls: no layout copies, and a
    backward that is a matmul too (the CUDA upsample backward scatters with atomics).

    weights: the (H, gh) and (W, gw) `resize_weights` in x's dtype, when already at hand.
    """
    (gh, gw), (h, w) = grid, size
    if (gh, gw) == (h, w):
        return x
    rows, cols = weights if weights is not None else (resize_weights(gh, h, x.device).to(x.dtype), resize_weights(gw, w, x.device).to(x.dtype))
    b, _, d = x.shape
    x = rows @ x.reshape(b, gh, gw * d)  # rows: (B, H, gw*d)
    x = cols @ x.reshape(b * h, gw, d)  # columns: (B*H, W, d)
    return x.reshape(b, h * w, d)


class SideStage(nn.Module):
    """One side stage: downsample, then one SideBlock per ViT block of its group.

    embed: stage 0, the stem conv 3x3 s2 (no bias) -> BN -> ReLU -> conv 2x2 s2 from the image (1/4);
        later stages, the overlapping patch embed conv 3x3 s2 (1/2 of the previous stage). A
        LayerNorm (`embed_norm`) follows on the tokens.
    bridge: the transformation bridge Linear(D -> d), shared by the stage's ViT maps and meta tokens.
    meta_norms: one LayerNorm per ViT block, on its projected meta token.
    """

    def __init__(self, in_chans: int, dim: int, vit_dim: int, num_blocks: int, num_heads: int, first: bool,
                 mlp_ratio: float, qkv_bias: bool, drop_paths: list[float]):
        super().__init__()
        if first:
            self.embed = nn.Sequential(
                nn.Conv2d(in_chans, dim, 3, 2, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
                nn.Conv2d(dim, dim, 2, 2),
            )
        else:
            self.embed = nn.Conv2d(in_chans, dim, 3, 2, padding=1)
        self.embed_norm = nn.LayerNorm(dim)
        self.bridge = nn.Linear(vit_dim, dim)
        self.meta_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_blocks))
        self.blocks = nn.ModuleList(SideBlock(dim, num_heads, mlp_ratio, qkv_bias, dp) for dp in drop_paths)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def bridge_inputs(self, metas: list[torch.Tensor], maps: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Bridge the stage's meta tokens (B, D) -> (B, d) and ViT maps (B, gh*gw, D) -> (B, gh*gw, d)."""
        return [self.bridge(m) for m in metas], [self.bridge(v) for v in maps]

    def forward(self, x: torch.Tensor, metas: list[torch.Tensor], maps: list[torch.Tensor], grid: tuple[int, int],
                batch_stats: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """x: image or previous map (B, C, H', W'); metas: (B, d) and maps: (B, gh*gw, d) per block, bridged.

        Returns the stage's map (B, d, H, W) and, with `batch_stats` on the first stage, the stem
        BatchNorm's batch statistics (mean, unbiased var): it then normalises with them and leaves its
        running statistics to the caller (a recomputation in backward must not update them twice).
        """
        stats = None
        if batch_stats and isinstance(self.embed, nn.Sequential):
            conv, bn, relu, proj = self.embed
            x = conv(x)
            with torch.no_grad():
                var, mean = torch.var_mean(x.float(), dim=(0, 2, 3))
            stats = (mean, var)
            x = proj(relu(F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)))
        else:
            x = self.embed(x)
        size = tuple(x.shape[-2:])
        x = self.embed_norm(x.flatten(2).transpose(1, 2))
        dtype = maps[0].dtype
        weights = (resize_weights(grid[0], size[0], x.device).to(dtype), resize_weights(grid[1], size[1], x.device).to(dtype))
        for block, meta_norm, meta, vit in zip(self.blocks, self.meta_norms, metas, maps):
            vit = resize_tokens(vit, grid, size, weights)  # (B, H*W, d)
            kv = torch.cat([meta_norm(meta).unsqueeze(1), vit.mean(1, keepdim=True)], dim=1)
            x = block(x, kv, vit)
        return self.norm(x).transpose(1, 2).unflatten(2, size), stats


def _init_weights(module: nn.Module) -> None:
    """Official init: Linear trunc-normal(0.02) with zero bias; Conv2d normal(0, sqrt(2 / fan_out))."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class HSTNetwork(nn.Module):
    """Meta tokens, side stages and head of HST, and the hooks that feed them.

    meta_tokens: (depth, D), one token per ViT block, each initialised like the official
        xavier_uniform on a (1, 1, D) tensor: U(-sqrt(3 / D), sqrt(3 / D)).
    """

    def __init__(self, host: TokenHost, config: HSTConfig, groups: list[list[int]], num_classes: int):
        super().__init__()
        self.groups = groups
        self.num_prefix_tokens = host.num_prefix_tokens
        self.patch_size = host.patch_size
        bound = math.sqrt(3.0 / host.dim)
        self.meta_tokens = nn.Parameter(torch.empty(len(host.blocks), host.dim).uniform_(-bound, bound))
        drop_paths = torch.linspace(0, config.drop_path, sum(map(len, groups))).tolist()
        stages, in_chans, start = [], host.in_chans, 0
        for i, (group, width, heads) in enumerate(zip(groups, config.widths, config.num_heads)):
            dps = drop_paths[start:start + len(group)]
            stages.append(SideStage(in_chans, width, host.dim, len(group), heads, i == 0, config.mlp_ratio, config.qkv_bias, dps))
            in_chans, start = width, start + len(group)
        self.stages = nn.ModuleList(stages)
        self.stages.apply(_init_weights)
        self.fc_norm = nn.BatchNorm1d(config.widths[-1], eps=1e-6, affine=False)  # official fc_norm; follows the model's mode
        self.head = nn.Linear(config.widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)
        self.return_pyramid = False
        self.tokens_at_norm = False  # set by attach when the host's final norm takes the last block's tokens
        self.recompute = True  # activation checkpointing of the side stages in training (False: keep their activations)
        self._run: dict | None = None  # the image and block outputs of the forward in progress

    # -- hooks -------------------------------------------------------------------------------
    def capture(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Root pre-hook: keep the image (B, C, H, W) and start recording block outputs."""
        image = args[0] if args else next(iter(kwargs.values()), None)
        self._run = {"image": image, "metas": [], "maps": []}

    def insert(self, index: int, block: nn.Module, args: tuple, kwargs: dict):
        """Block pre-hook: (B, N, D) -> (B, 1 + N, D), block `index`'s meta token first."""
        x = args[0]
        meta = self.meta_tokens[index].to(x.dtype).expand(x.shape[0], 1, -1)
        return (torch.cat([meta, x], dim=1),) + args[1:], kwargs

    def remove(self, index: int, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Block hook: record the meta output (B, D) and patch tokens (B, gh*gw, D); drop the meta token.

        The last block's output keeps its meta token when the host has a final norm: `finish_tokens`,
        the norm's pre-hook, reads and drops it there, from the tensor this block returned. (FSDP2 puts
        the block's pre-backward hook, which gathers its weights for backward, on that returned tensor;
        read from the raw output here, the side network's gradient would reach the block around it.)
        """
        run = self._run
        if run is None:
            return output[:, 1:]
        if index == self.meta_tokens.shape[0] - 1 and self.tokens_at_norm:
            run["at_norm"] = True
            return output
        run["metas"].append(output[:, 0])
        run["maps"].append(output[:, 1 + self.num_prefix_tokens:])
        if index == self.meta_tokens.shape[0] - 1:
            self.run_side(run)
        return output[:, 1:]

    def finish_tokens(self, norm: nn.Module, args: tuple):
        """Pre-hook of the host's final norm: read the last block's tokens (B, 1 + N, D), run the side
        network (inside the model's forward: one graph under `torch.compile`, the root's parameters
        still gathered under FSDP) and pass the tokens on without the meta token (B, N, D)."""
        run = self._run
        if run is None or not run.pop("at_norm", False):
            return None
        x = args[0]
        run["metas"].append(x[:, 0])
        run["maps"].append(x[:, 1 + self.num_prefix_tokens:])
        self.run_side(run)
        return (x[:, 1:],) + args[1:]

    def run_side(self, run: dict) -> None:
        pyramid = self.side_forward(run["image"], run["metas"], run["maps"])
        run["out"] = pyramid if self.return_pyramid else self.classify(pyramid[-1])
        run["metas"], run["maps"] = [], []

    def finish(self, model: nn.Module, args: tuple, output):
        """Root hook: return HST's logits (or the pyramid for `feature_pyramid`), computed after the last block."""
        run, self._run = self._run, None
        if run is None:
            return output
        if "out" not in run:
            raise RuntimeError(f"hst: the last block did not run in this forward ({len(run['maps'])} block outputs recorded)")
        return run["out"]

    # -- side network ------------------------------------------------------------------------
    def side_forward(self, image: torch.Tensor, metas: list[torch.Tensor], maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The 4 pyramid levels (B, widths[i], H / s_i, W / s_i), s = 4, 8, 16, 32.

        In training with autograd on, the stages run under activation checkpointing: only the bridges'
        inputs (the ViT maps in the autocast dtype) and outputs (B, gh*gw, d) are kept, and the side
        stages are recomputed in backward, so HST keeps for backward little more than the frozen
        backbone's own input-gradient needs (the stride-4 stage alone would keep about 2 ViT blocks' worth).
        """
        depth = self.meta_tokens.shape[0]
        if len(maps) != depth:
            raise RuntimeError(f"hst: recorded {len(maps)} block outputs in this forward, expected {depth} (one per block)")
        grid = (image.shape[-2] // self.patch_size[0], image.shape[-1] // self.patch_size[1])
        padded = (-(-image.shape[-2] // self.patch_size[0]), -(-image.shape[-1] // self.patch_size[1]))
        if maps[0].shape[1] == padded[0] * padded[1]:  # timm's dynamic_img_pad pads the image up to whole patches
            grid = padded
        if maps[0].shape[1] != grid[0] * grid[1]:
            raise RuntimeError(
                f"hst: blocks output {maps[0].shape[1]} patch tokens for a {tuple(image.shape[-2:])} image, expected "
                f"{grid[0]}x{grid[1]} (patch {self.patch_size}); another method changing the token layout is not supported with hst"
            )
        bridged = [stage.bridge_inputs([metas[j] for j in group], [maps[j] for j in group]) for stage, group in zip(self.stages, self.groups)]
        image = autocast_input(image.to(self.meta_tokens.dtype))  # the stem conv's cast, done once before checkpointing
        if not (self.recompute and self.training and torch.is_grad_enabled()):
            return self._stages(image, bridged, grid, False)[0]
        pyramid, stats = checkpoint(self._stages, image, bridged, grid, True, use_reentrant=False)
        self._update_stem_stats(*stats)
        return pyramid

    def _stages(self, image: torch.Tensor, bridged: list, grid: tuple[int, int], batch_stats: bool):
        """The pyramid, and the stem BatchNorm's batch statistics when `batch_stats` (else None)."""
        pyramid, x, stats = [], image, None
        for i, (stage, (metas, maps)) in enumerate(zip(self.stages, bridged)):
            x, stage_stats = stage(x, metas, maps, grid, batch_stats and i == 0)
            stats = stage_stats if i == 0 else stats
            pyramid.append(x)
        return pyramid, stats

    @torch.no_grad()
    def _update_stem_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """The stem BatchNorm's running statistics, updated as nn.BatchNorm2d does in training."""
        bn = self.stages[0].embed[1]
        if not bn.track_running_stats:
            return
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
        bn.running_var.lerp_(var.to(bn.running_var.dtype), momentum)

    def classify(self, last: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) last pyramid level -> mean over positions -> BatchNorm1d -> Linear: (B, num_classes)."""
        return self.head(self.fc_norm(last.mean(dim=(2, 3))))


# Norm layers of the backbone blocks that HST trains (timm norm1/norm2, open_clip ln_1/ln_2).
_BLOCK_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def hst_network(model: nn.Module) -> HSTNetwork:
    state = get_state(model)
    if state is None or not isinstance(getattr(state, "hst", None), HSTNetwork):
        raise ValueError(f"{type(model).__name__} has no HST applied; call pv.apply(model, 'hst') first")
    return state.hst


def feature_pyramid(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """HST's feature pyramid of a model with HST applied, for dense-prediction heads.

    images: (B, C, H, W). Returns 4 tensors (B, widths[i], H / s_i, W / s_i) for strides
    s = 4, 8, 16, 32 (sizes rounded as the strided convs do; exact when H and W are multiples of 32).
    Runs the model's forward (the backbone with the meta tokens, then the side network) without
    the classification head; gradients flow as in training.
    """
    hst = hst_network(model)
    hst.return_pyramid = True
    try:
        return model(images)
    finally:
        hst.return_pyramid = False


@register_method
class HST(Method):
    name = "hst"
    config_class = HSTConfig
    merge_refusal = "it adds a side network and meta tokens, not weight updates"

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        state = get_state(model)
        if state is not None and "vpt" in state.method_names:
            raise UnsupportedHostError("method 'hst' cannot be combined with 'vpt': both change the token layout of every block")
        check_single_output_method(model, cls.name)
        host = token_host(model, cls.name)
        if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            raise UnsupportedHostError(
                f"method 'hst' needs an image token host (its side network reads patch maps); {type(model).__name__} "
                "has no Conv2d patch embedding (supported: timm ViTs with depth >= 4)"
            )
        patch_drop = getattr(model, "patch_drop", None)
        if getattr(patch_drop, "prob", 0.0) > 0.0:
            raise UnsupportedHostError(
                f"method 'hst' reads every block's patch tokens as a full (gh, gw) map, but {type(model).__name__} drops "
                f"patch tokens in training (patch_drop_rate={patch_drop.prob}); create the model with patch_drop_rate=0"
            )
        if len(host.blocks) < NUM_STAGES:
            raise UnsupportedHostError(
                f"method 'hst' needs a ViT with at least {NUM_STAGES} blocks (one group per side stage); "
                f"{type(model).__name__} has {len(host.blocks)} (supported: token hosts such as timm ViTs with depth >= {NUM_STAGES})"
            )

    @classmethod
    def attach(cls, model: nn.Module, config: HSTConfig) -> None:
        host = token_host(model, cls.name)
        groups = stage_groups(len(host.blocks), config.block_indices)
        num_classes = config.num_classes
        if num_classes is None:
            heads = classifier_modules(model)
            if not heads or not isinstance(heads[0], (nn.Linear, nn.Identity)):
                raise UnsupportedHostError(f"hst: {type(model).__name__} has no Linear head to size HST's head from; pass num_classes")
            num_classes = heads[0].out_features if isinstance(heads[0], nn.Linear) else 0
        ref = next(host.blocks[0].parameters())
        hst = HSTNetwork(host, config, groups, num_classes).to(device=ref.device, dtype=ref.dtype).train(model.training)
        get_state(model).add_module("hst", hst)
        model.register_forward_pre_hook(hst.capture, with_kwargs=True)
        for i, block in enumerate(host.blocks):
            block.register_forward_pre_hook(functools.partial(hst.insert, i), with_kwargs=True)
            block.register_forward_hook(functools.partial(hst.remove, i))
        if host.norm is not None:
            host.norm.register_forward_pre_hook(hst.finish_tokens)
            hst.tokens_at_norm = True
        model.register_forward_hook(hst.finish)
        if config.train_block_norms:
            for block in host.blocks:
                for module in block.modules():
                    if isinstance(module, _BLOCK_NORMS):
                        module.requires_grad_(True)
