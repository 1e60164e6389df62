"""UniPT: Universal Parallel Tuning (Diao et al., CVPR 2024), for image classification on token hosts.

The backbone runs frozen and builds no autograd graph (see `_side.py`); all L + 1 hidden states
(embedding output and every block's output) are read detached. With d = D_anchor / f, following
the official `Our_tuning_for_transformer` module:

    anchor = Linear(ReLU(raw_anchor))                                   # (B, d)
    for every hidden state t_i (B, N, D):
        x_i = Linear_i(ReLU(t_i))                                       # (B, N, d)
        A_i = l1norm(relu(anchor @ x_i^T))                              # (B, N), over tokens
        m_i = A_i @ x_i + cls(x_i)                                      # parallel interaction
        c_i = gate(anchor * mean_tokens(x_i))                           # (B, 1), one shared gate
    w = softmax_i(c_i)                                                  # confidence aggregation
    out = raw_anchor + Linear(ReLU(sum_i w_i m_i))                      # (B, D_anchor)
    logits = head(out)

raw_anchor is the backbone's final pooled feature, as in the official code: on timm ViTs the
final-norm CLS token (the input of the host's head dropout, so the anchor is never dropped out);
on a CLIP classifier (petl_vision.clip) the unnormalised image embedding `ln_post(CLS) @ proj`
(width E), and `out` is normalised before the head, which starts as the zero-shot classifier, so
an all-zero up-projection gives zero-shot logits. cls(x_i) is the layer's CLS token.
Hosts without a CLS token: ours (default) takes the pooled feature (the mean of the patch tokens,
through the host's norms) as anchor and the mean of x_i's patch tokens as cls(x_i); the official
code always reads token 0, which there is a patch token: `official=True` does so (anchor = the
host's final norm(s) on token 0 of the last block's output, cls(x_i) = x_i[:, 0]).
The head is a new Linear(D -> num_classes), a copy of the host's; the host's head is unused and
stays frozen. Trainable: the L + 1 layer projections, the anchor projection, the gate, the
up-projection, the head.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import TokenHost
from ._autocast import autocast_input
from ._side import SideNetwork, check_side_host, make_head, pool_kind, pool_tokens


@dataclasses.dataclass
class UniPTConfig(MethodConfig):
    """Config of UniPT.

    reduction: f; the side modules work at width D / f (official scripts: 2).
    eps: floor of the L1 norm in the attention normalisation (official: 1e-6).
    official: on hosts without a CLS token, read token 0 as the official code does (anchor and
        each layer's cls(x_i)); False (default) uses the mean of the patch tokens there. Hosts
        with a CLS token are the same either way.
    """

    name = "unipt"
    reduction: int = 2
    eps: float = 1e-6
    official: bool = False

    def __post_init__(self):
        if self.reduction < 1:
            raise ValueError(f"UniPTConfig.reduction must be >= 1, got {self.reduction}")
        if self.eps <= 0:
            raise ValueError(f"UniPTConfig.eps must be > 0, got {self.eps}")


def l1norm(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """x / max(sum |x| over `dim`, eps)."""
    return x / x.abs().sum(dim=dim, keepdim=True).clamp(min=eps)


class UniPTSide(SideNetwork):
    """Parallel interaction and confidence aggregation over L + 1 hidden states, then the head."""

    method = "unipt"

    def __init__(self, model: nn.Module, host: TokenHost, config: UniPTConfig):
        super().__init__()
        head, anchor_dim = make_head(model, host)
        if anchor_dim % config.reduction:
            raise ValueError(f"UniPTConfig.reduction={config.reduction} must divide the anchor width {anchor_dim}")
        width = anchor_dim // config.reduction
        param = next(host.blocks[0].parameters())
        kw = dict(device=param.device, dtype=param.dtype)
        self.eps = config.eps
        self.num_prefix_tokens, self.pool = host.num_prefix_tokens, pool_kind(model, host)
        # official on a no-CLS host: token 0 everywhere; the anchor from the last block's token 0
        self.token0_anchor = config.official and self.pool != "token"
        if self.token0_anchor:
            self.pool = "token"
            norms = [m for m in (host.norm, getattr(model, "fc_norm", None)) if isinstance(m, nn.Module)]
            self._anchor_norms = tuple(norms)  # host modules, kept out of the side network's parameters
            self._last = len(host.blocks)
            self._token0 = None
        self.layers = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(host.dim, width, **kw)) for _ in range(len(host.blocks) + 1)
        )
        self.anchor = nn.Sequential(nn.ReLU(), nn.Linear(anchor_dim, width, **kw))
        self.gate = nn.Linear(width, 1, **kw)
        self.upsample = nn.Sequential(nn.ReLU(), nn.Linear(width, anchor_dim, **kw))
        self.head = head

    def read(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """x_i = Linear_i(ReLU(t_i)): (B, N, D) -> (B, N, d), in the autocast dtype (ReLU commutes with the cast)."""
        if self.token0_anchor and index == self._last:
            self._token0 = hidden[:, 0]
        return self.layers[index](autocast_input(hidden))

    def _anchor_from_token0(self) -> torch.Tensor:
        """Official raw anchor on a no-CLS host: the host's final norm(s) on token 0 of the last block (B, D)."""
        x, self._token0 = self._token0, None
        with torch.no_grad():
            for norm in self._anchor_norms:
                x = norm(x)
        return x

    def forward(self, hidden: list[torch.Tensor], pooled: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: L + 1 projected states x_i (B, N, d) (`read`); pooled: (B, D_anchor) raw anchor -> logits (B, C)."""
        if self.token0_anchor:
            pooled = self._anchor_from_token0()
        if pooled is None:
            raise ValueError("unipt: no raw anchor (the host's classifier-head input) was captured")
        anchor = self.anchor(autocast_input(pooled))  # (B, d); ReLU commutes with the cast
        merged, confidence = [], []
        for x in hidden:
            attn = l1norm(torch.relu(torch.einsum("bd,bnd->bn", anchor, x)), dim=-1, eps=self.eps)
            merged.append(torch.einsum("bn,bnd->bd", attn, x) + pool_tokens(x, self.pool, self.num_prefix_tokens))
            confidence.append(self.gate(anchor * x.mean(dim=1)))  # (B, 1)
        weights = torch.softmax(torch.cat(confidence, dim=1), dim=1)  # (B, L + 1)
        fused = (torch.stack(merged, dim=1) * weights.unsqueeze(-1)).sum(dim=1)  # (B, d)
        out = pooled + self.upsample(fused)
        if self.anchor_normalized_after:  # CLIP: the embedding is normalised after UniPT, as the host does
            out = F.normalize(out, dim=-1)
        return self.head(out)


@register_method
class UniPT(Method):
    name = "unipt"
    config_class = UniPTConfig
    merge_refusal = "the side network is a separate network next to the backbone, not a change of its weights"

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        check_side_host(model, cls.name)

    @classmethod
    def attach(cls, model: nn.Module, config: UniPTConfig) -> None:
        host = check_side_host(model, cls.name)
        side = UniPTSide(model, host, config)
        get_state(model).add_module("unipt", side)
        side.install(model, host)
