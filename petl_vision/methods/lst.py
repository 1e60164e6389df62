"""LST: Ladder Side-Tuning (Sung et al., NeurIPS 2022), for token hosts (timm ViTs).

The backbone runs frozen and builds no autograd graph (see `_side.py`). A side network of reduced
width d = D / r reads the backbone through "ladders" (Linear D -> d, with bias), as in the official
T5 code:

    h = ladder_0(embedding output)                                # (B, N, d)
    for each kept layer i (all by default):
        g = sigmoid(alpha_i / T)                                  # alpha_i init 0: g = 0.5
        h = g * h + (1 - g) * ladder_{i+1}(block_i output)
        h = side_block_i(h)                                       # timm Block at width d
    logits = head(upsample(pool(norm(h))))                        # upsample: Linear d -> D

Side blocks are timm `Block`s with the host's head count, MLP ratio, qkv bias and norm epsilon.
The head is a new Linear(D -> num_classes), a copy of the host's head; the host's head is unused
and stays frozen. On a CLIP classifier (petl_vision.clip) the upsample maps to the embedding width
E and the head starts as the zero-shot classifier (see `_side.make_head`).
Trainable: ladders, gates, side blocks, side norm, upsample, head.

Side-network init (`init`): "random" (timm ViT init), or structured pruning of the backbone's
blocks down to 1/r of every width: "magnitude" (rows/columns of largest L1 weight, done by `apply`)
or "fisher" (the empirical Fisher: per-sample squared gradients summed over the samples of a few
training batches, as the official code does over 1,024 samples; the training script calls
`init_side_from_backbone(model, loader=...)`). Ladders and upsample stay random, as in the
official code. Which rows and columns are kept:

- ours (default): one set of d residual channels for the whole side network (so residual adds,
  the side blocks' norms and the side final norm all index the same channels), and per block the
  q/k and v dimensions of every head (an equal count per head) and the MLP hidden units that
  score highest;
- official (`official=True`, the official `pruning_without_residual`): a chain over the linears in
  forward order; each linear's columns are the rows its input layer kept, its rows are the d (or
  hidden) of largest L1 importance over those columns, and a norm takes the rows of the linear
  before it. q, k and v keep one row set, ranked by the product of their importances; heads are
  ignored. The first set is the patch embedding's output channels (T5: the token embedding's);
  the kept residual set changes after every attention projection and fc2.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import TokenHost, token_host
from ._side import SideNetwork, check_side_host, make_head, pool_kind, pool_tokens, side_network

INIT_MODES = ("random", "magnitude", "fisher")


@dataclasses.dataclass
class LSTConfig(MethodConfig):
    """Config of LST.

    reduction: r; the side network's width is dim / r (paper: 8).
    layers: increasing indices of the backbone blocks that get a ladder and a side block (None =
        every block, about 2.4M parameters on ViT-B/16; the paper drops some side layers and keeps
        9 of 12 in its base setting).
    gate_temperature: T in g = sigmoid(alpha / T) (paper: 0.1); alpha starts at `gate_init` (0).
    gate_init: initial alpha of every gate (0: g = 0.5).
    num_heads: attention heads of the side blocks (0 = the host's head count).
    init: side-network init: "random", "magnitude" (pruned from the backbone by L1 magnitude when
        applied) or "fisher" (pruned by Fisher importance: call `init_side_from_backbone` with a
        training loader; the paper's choice).
    fisher_batches: training batches for the Fisher importance (init="fisher"); the importance
        sums the squared gradient of every sample of these batches (official: 1,024 samples, so
        fisher_batches = 1024 / batch size reproduces it).
    official: prune as the official code does (per-linear row sets, q/k/v by the product of their
        importances; see the module docstring); False keeps one residual channel set and heads intact.
    """

    name = "lst"
    reduction: int = 8
    layers: tuple[int, ...] | None = None
    gate_temperature: float = 0.1
    gate_init: float = 0.0
    num_heads: int = 0
    init: str = "random"
    fisher_batches: int = 8
    official: bool = False

    def __post_init__(self):
        if self.reduction < 1:
            raise ValueError(f"LSTConfig.reduction must be >= 1, got {self.reduction}")
        if self.gate_temperature <= 0:
            raise ValueError(f"LSTConfig.gate_temperature must be > 0, got {self.gate_temperature}")
        if self.init not in INIT_MODES:
            raise ValueError(f"LSTConfig.init must be one of {INIT_MODES}, got {self.init!r}")
        if self.fisher_batches < 1:
            raise ValueError(f"LSTConfig.fisher_batches must be >= 1, got {self.fisher_batches}")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"LSTConfig.layers must be a non-empty list of distinct block indices, got {self.layers}")


class LSTSide(SideNetwork):
    """Ladders, gates, side blocks, side norm, upsample and head. Tensor widths: D host, d = D / r."""

    method = "lst"

    def __init__(self, model: nn.Module, host: TokenHost, config: LSTConfig):
        super().__init__()
        dim, r, depth = host.dim, config.reduction, len(host.blocks)
        layers = config.layers if config.layers is not None else tuple(range(depth))
        bad = [i for i in layers if not 0 <= i < depth]
        if bad or list(layers) != sorted(layers):
            raise ValueError(f"LSTConfig.layers must be increasing block indices in [0, {depth}), got {layers}")
        if dim % r:
            raise ValueError(f"LSTConfig.reduction={r} must divide the host width {dim}")
        width = dim // r
        ref = host.blocks[0]
        heads = config.num_heads or getattr(getattr(ref, "attn", None), "num_heads", 1)  # timm Attention, nn.MultiheadAttention
        if width % heads:
            raise ValueError(f"LST side width {width} (= {dim} / reduction {r}) is not divisible by num_heads={heads}; "
                             "set LSTConfig.num_heads")
        mlp, attn = getattr(ref, "mlp", None), getattr(ref, "attn", None)
        fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "c_fc", None)  # timm / open_clip
        mlp_hidden = fc1.out_features // r if isinstance(fc1, nn.Linear) else 4 * width
        qkv = getattr(attn, "qkv", None)
        qkv_bias = qkv.bias is not None if isinstance(qkv, nn.Linear) else getattr(attn, "in_proj_bias", True) is not None
        eps = getattr(host.norm, "eps", 1e-6) if isinstance(host.norm, nn.LayerNorm) else 1e-6
        param = next(ref.parameters())
        kw = dict(device=param.device, dtype=param.dtype)
        layer_scale = getattr(getattr(ref, "ls1", None), "gamma", None) is not None

        self.layers = layers
        self._ladder_of = {0: 0, **{layer + 1: j + 1 for j, layer in enumerate(layers)}}  # hidden index -> ladder
        self.width, self.mlp_hidden, self.num_heads = width, mlp_hidden, heads
        self.temperature = config.gate_temperature
        self.num_prefix_tokens, self.pool = host.num_prefix_tokens, pool_kind(model, host)
        self.init_mode, self.fisher_batches, self.official = config.init, config.fisher_batches, config.official
        self.init_pending = config.init == "fisher"
        norm_layer = functools.partial(nn.LayerNorm, eps=eps)
        self.ladders = nn.ModuleList(nn.Linear(dim, width, **kw) for _ in range(len(layers) + 1))
        self.gates = nn.Parameter(torch.full((len(layers),), float(config.gate_init), **kw))
        self.blocks = nn.ModuleList(  # the +0.5 makes timm's int(width * mlp_ratio) exactly mlp_hidden
            Block(width, heads, mlp_ratio=(mlp_hidden + 0.5) / width, qkv_bias=qkv_bias, norm_layer=norm_layer,
                  init_values=1e-5 if layer_scale else None, **kw)
            for _ in layers
        )
        self.norm = norm_layer(width, **kw)
        self.head, out_dim = make_head(model, host)  # out_dim: the host head's input width (D on timm ViTs)
        self.upsample = nn.Linear(width, out_dim, **kw)
        if param.device.type != "meta":
            for module in (self.ladders, self.blocks, self.upsample):
                module.apply(init_weights_vit_timm)

    def read(self, index: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Hidden state `index` (B, N, D) through its ladder -> (B, N, d); None for blocks without a side layer."""
        ladder = self._ladder_of.get(index)
        return self.ladders[ladder](hidden) if ladder is not None else None

    def forward(self, hidden: list[torch.Tensor | None], pooled: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: L + 1 laddered states (B, N, d) (`read`; None where unused) -> logits (B, num_classes)."""
        h = hidden[0]
        gates = torch.sigmoid(self.gates / self.temperature).to(h.dtype)  # cast at use: h stays in the autocast dtype
        for j, layer in enumerate(self.layers):
            g = gates[j]
            h = torch.lerp(hidden[layer + 1], h, g)  # g * h + (1 - g) * ladder
            h = self.blocks[j](h)
        if self.pool == "token":  # LayerNorm is per token: norm only the pooled one
            h = self.norm(h[:, 0])
        else:
            h = pool_tokens(self.norm(h), self.pool, self.num_prefix_tokens)
        return self.head(self.upsample(h))

    def before_training_forward(self) -> None:
        if self.init_pending and self.training:
            self.warn_once("fisher", "lst: init='fisher' but init_side_from_backbone(model, loader=...) was not called; "
                                     "the side network trains from a random init")


# ------------------------------------------------------------------ pruned init
def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest entries of a 1-d score."""
    return score.topk(k).indices.sort().values


def _block_parts(block: nn.Module) -> dict[str, nn.Module]:
    """The layers of a timm ViT Block that pruning reads; ValueError for other block types."""
    try:
        parts = {"norm1": block.norm1, "qkv": block.attn.qkv, "proj": block.attn.proj, "norm2": block.norm2,
                 "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}
    except AttributeError:
        parts = {}
    if not all(isinstance(m, (nn.Linear, nn.LayerNorm)) for m in parts.values()) or len(parts) < 6:
        raise ValueError(f"lst: pruned init needs timm ViT blocks (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2); "
                         f"got {type(block).__name__}: use init='random'")
    return parts


def _residual_score(blocks: list[dict], scores: dict) -> torch.Tensor:
    """(D,) importance of each residual channel, summed over every block that reads or writes it."""
    total = 0
    for parts in blocks:
        s = lambda name, attr="weight": scores[id(getattr(parts[name], attr))]  # noqa: E731
        total = total + s("qkv").sum(0) + s("fc1").sum(0) + s("proj").sum(1) + s("fc2").sum(1) + s("norm1") + s("norm2")
    return total


@torch.no_grad()
def _prune_copy(side: LSTSide, host: TokenHost, scores: dict) -> None:
    """Copy the top-scoring rows/columns of the backbone's blocks into the side blocks.

    scores: id(host parameter) -> importance tensor of the same shape (|w| or summed grad^2).
    """
    host_parts = [_block_parts(b) for b in host.blocks]
    d, heads = side.width, side.num_heads
    host_heads = getattr(host.blocks[0].attn, "num_heads", None)
    if host_heads != heads:
        raise ValueError(f"lst: pruned init keeps the host's {host_heads} heads; LSTConfig.num_heads={heads} differs")
    D, hd, shd = host.dim, host.dim // heads, d // heads
    keep = _top(_residual_score(host_parts, scores), d)  # residual channels kept everywhere
    for j, layer in enumerate(side.layers):
        src, dst = host_parts[layer], side.blocks[j]
        s = lambda name: scores[id(src[name].weight)]  # noqa: E731
        qkv_s, proj_s, fc1_s, fc2_s = s("qkv").sum(1), s("proj").sum(0), s("fc1").sum(1), s("fc2").sum(0)
        qk_rows, v_rows = [], []
        for h in range(heads):
            span = torch.arange(h * hd, (h + 1) * hd, device=keep.device)
            qk_rows.append(span[_top(qkv_s[span] + qkv_s[D + span], shd)])
            v_rows.append(span[_top(qkv_s[2 * D + span] + proj_s[span], shd)])
        qk, v = torch.cat(qk_rows), torch.cat(v_rows)
        mlp = _top(fc1_s + fc2_s, side.mlp_hidden)
        _copy(dst.attn.qkv, src["qkv"], torch.cat([qk, D + qk, 2 * D + v]), keep)
        _copy(dst.attn.proj, src["proj"], keep, v)
        _copy(dst.mlp.fc1, src["fc1"], mlp, keep)
        _copy(dst.mlp.fc2, src["fc2"], keep, mlp)
        _copy(dst.norm1, src["norm1"], keep)
        _copy(dst.norm2, src["norm2"], keep)
        _copy_gamma(dst, host.blocks[layer], "ls1", keep)
        _copy_gamma(dst, host.blocks[layer], "ls2", keep)
    if isinstance(host.norm, nn.LayerNorm) and host.norm.weight is not None and host.norm.weight.shape == (D,):
        _copy(side.norm, host.norm, keep)


def _copy(dst: nn.Module, src: nn.Module, rows: torch.Tensor, cols: torch.Tensor | None = None) -> None:
    """dst.weight = src.weight[rows][:, cols] (1-d weights: [rows]); dst.bias = src.bias[rows]."""
    weight = src.weight[rows]
    dst.weight.copy_(weight[:, cols] if cols is not None else weight)
    if getattr(src, "bias", None) is not None and getattr(dst, "bias", None) is not None:
        dst.bias.copy_(src.bias[rows])


@torch.no_grad()
def _prune_copy_official(side: LSTSide, host: TokenHost, scores: dict, embed: torch.Tensor | None) -> None:
    """The official chain: every linear keeps the rows of largest L1 importance over the columns its input kept.

    scores: id(host parameter) -> importance of the same shape. embed: the patch embedding's weight
    (D, ...), whose rows (output channels) give the first set; None: the first block's qkv columns.
    """
    host_parts = [_block_parts(b) for b in host.blocks]
    D, d = host.dim, side.width
    s = lambda module: scores[id(module.weight)]  # noqa: E731
    first = s(host_parts[side.layers[0]]["qkv"]).sum(0) if embed is None else scores[id(embed)].reshape(D, -1).sum(1)
    prev = _top(first, d)
    for j, layer in enumerate(side.layers):
        src, dst = host_parts[layer], side.blocks[j]
        _copy(dst.norm1, src["norm1"], prev)
        q, k, v = s(src["qkv"])[:, prev].chunk(3, dim=0)
        rows = _top((q * k * v).abs().sum(1), d)  # one row set for q, k and v
        _copy(dst.attn.qkv, src["qkv"], torch.cat([rows, D + rows, 2 * D + rows]), prev)
        prev = _top(s(src["proj"])[:, rows].abs().sum(1), d)
        _copy(dst.attn.proj, src["proj"], prev, rows)
        _copy_gamma(dst, host.blocks[layer], "ls1", prev)
        _copy(dst.norm2, src["norm2"], prev)
        hidden = _top(s(src["fc1"])[:, prev].abs().sum(1), side.mlp_hidden)
        _copy(dst.mlp.fc1, src["fc1"], hidden, prev)
        prev = _top(s(src["fc2"])[:, hidden].abs().sum(1), d)
        _copy(dst.mlp.fc2, src["fc2"], prev, hidden)
        _copy_gamma(dst, host.blocks[layer], "ls2", prev)
    if isinstance(host.norm, nn.LayerNorm) and host.norm.weight is not None and host.norm.weight.shape == (D,):
        _copy(side.norm, host.norm, prev)


def _copy_gamma(dst: nn.Module, src: nn.Module, name: str, rows: torch.Tensor) -> None:
    gamma = getattr(getattr(src, name, None), "gamma", None)
    if gamma is not None:
        getattr(dst, name).gamma.copy_(gamma[rows])


def _patch_embedding(model: nn.Module, host: TokenHost) -> nn.Parameter | None:
    """The patch embedding's weight (D, C, ph, pw): timm's `patch_embed.proj`, open_clip's `visual.conv1`; else None."""
    for owner in (model, getattr(model, "visual", None)):
        conv = getattr(getattr(owner, "patch_embed", None), "proj", None) or getattr(owner, "conv1", None)
        weight = getattr(conv, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.shape[0] == host.dim:
            return weight
    return None


def _pruned_params(host: TokenHost, embed: nn.Parameter | None = None) -> list[nn.Parameter]:
    params = [p for b in host.blocks for p in b.parameters()]
    params += list(host.norm.parameters()) if host.norm is not None else []
    return params + ([embed] if embed is not None else [])


def fisher_scores(model: nn.Module, loader, num_batches: int, loss_fn=None) -> dict:
    """id(param) -> the empirical Fisher: sum over the samples of `num_batches` batches of (per-sample grad)^2.

    Covers the backbone blocks, the final norm and the patch embedding. Each sample runs alone
    (batch of one), so the model runs as the plain host (side network off, host head on), in eval
    mode, with `loss_fn(logits, targets)` (default cross-entropy) on that sample. `loader` yields
    (inputs, targets, ...). Cost: one forward and backward per sample.
    """
    side, host = side_network(model), token_host(model, "lst")
    params = _pruned_params(host, _patch_embedding(model, host))
    flags = [p.requires_grad for p in params]
    scores = {id(p): torch.zeros_like(p) for p in params}
    was_training, device = model.training, params[0].device
    loss_fn = loss_fn or F.cross_entropy
    side.enabled = False
    model.eval()
    seen = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in loader:
            if seen >= num_batches:
                break
            inputs, targets = batch[0].to(device), batch[1].to(device)
            for i in range(inputs.shape[0]):
                logits = model(inputs[i:i + 1])
                logits = logits[0] if isinstance(logits, tuple) else logits
                grads = torch.autograd.grad(loss_fn(logits, targets[i:i + 1]), params, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        scores[id(p)] += g.detach().pow(2)
            seen += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        side.enabled = True
        model.train(was_training)
    if seen == 0:
        raise ValueError("init_side_from_backbone: the loader yielded no batch")
    return scores


def init_side_from_backbone(model: nn.Module, mode: str | None = None, loader=None, num_batches: int | None = None,
                            loss_fn=None) -> nn.Module:
    """Initialise the LST side blocks by structured pruning of the backbone; returns `model`.

    mode: "magnitude" or "fisher" (None: the applied LSTConfig.init).
    loader: batches (inputs, targets, ...) of training data; needed for "fisher".
    num_batches: batches for the Fisher importance (None: LSTConfig.fisher_batches).
    loss_fn: loss(logits, targets) of the host model for the Fisher gradients (default cross-entropy).
    The copy is in place, so an optimizer built before this call still holds the right tensors.
    """
    side = side_network(model)
    if not isinstance(side, LSTSide):
        raise ValueError(f"init_side_from_backbone: needs a model with 'lst' applied, got {side.method!r}")
    mode = mode or side.init_mode
    host = token_host(model, "lst")
    embed = _patch_embedding(model, host)
    if mode == "magnitude":
        scores = {id(p): p.detach().abs() for p in _pruned_params(host, embed)}
    elif mode == "fisher":
        if loader is None:
            raise ValueError("init_side_from_backbone(mode='fisher') needs `loader`: batches (inputs, targets) of training data")
        scores = fisher_scores(model, loader, num_batches or side.fisher_batches, loss_fn)
    else:
        raise ValueError(f"init_side_from_backbone: mode must be 'magnitude' or 'fisher', got {mode!r}")
    if side.official:
        _prune_copy_official(side, host, scores, embed)
    else:
        _prune_copy(side, host, scores)
    side.init_pending = False
    return model


def needs_data_init(model: nn.Module) -> bool:
    """True when LST is applied with init="fisher" and `init_side_from_backbone` has not run yet."""
    state = get_state(model)
    side = getattr(state, "lst", None) if state is not None else None
    return isinstance(side, LSTSide) and side.init_pending


@register_method
class LST(Method):
    name = "lst"
    config_class = LSTConfig
    merge_refusal = "the side network is a separate network next to the backbone, not a change of its weights"

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        check_side_host(model, cls.name)

    @classmethod
    def attach(cls, model: nn.Module, config: LSTConfig) -> None:
        host = check_side_host(model, cls.name)
        side = LSTSide(model, host, config)
        get_state(model).add_module("lst", side)
        side.install(model, host)
        if config.init == "magnitude" and next(side.parameters()).device.type != "meta":
            init_side_from_backbone(model, "magnitude")
