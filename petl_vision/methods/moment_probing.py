"""Moment Probing (Gao, Wang et al., ICCV 2023): a classifier head on first- and second-order moments.

MP replaces linear probing of the frozen backbone with a head that also reads the covariance of
the final patch tokens (the "multi-head convolutional cross-covariance", MHC3). With D the token
width, h = `hidden_dim`, H = `num_heads` and d = h / H, following the official
`Moment_Probing_ViT` head (models/representation/MP.py of mingzeG/Moment-Probing):

    z = Linear(D -> h)(patch tokens)                          # (B, N, h), N patch tokens
    z_1..z_H = LayerNorm_d(split of z into H groups of d)     # one LayerNorm shared by the groups
    z_k = z_k - mean(z_k)                                     # one scalar per sample and group *
    S_k = z_k^T z_{k+1} / N,  k = 1..H-1                      # (B, d, d) adjacent cross-covariances
    S_k = S_k / ||column of S_k||_2                           # L2 over the first index
    f = flatten(Conv3x3/2(GELU(Conv3x3/2(stack(S_1..S_{H-1})))))   # H-1 channels, no padding, no bias
    logits = (Linear(pooled) + Linear(f)) / 2

(*) The official centring (`Covariance._remove_mean`: adaptive average pooling of a 3-d tensor)
subtracts the mean over all tokens and channels of a group, not a per-channel mean; after the
LayerNorm it is the mean of the affine output. Kept as in the official code.

With the defaults (h = 512, H = 4, d = 128) the maps go 128 -> 63 -> 31, so f has 3 x 31 x 31 =
2883 features. "patch tokens" are the last block's tokens after the host's final per-token norm
(timm's `forward_features` output) without the prefix (CLS, register, distillation) tokens;
"pooled" is the input of the host's classifier head (the final-norm CLS token for timm ViTs, the
pooled and fc-normed patch tokens for avg-pool hosts). The first Linear is a copy of the host's
head; the host's own head still runs but its output is replaced, and it stays frozen.

MP+ (`psrp=True`) adds PSRP ("partially shared recalibrating parameters", official
models/representation/PSRP.py and `Block.forward` with tuning_mode='psrp') to every block: from
the block's residual stream x after attention (the input of `norm2`), a shared bottleneck
a = ReLU(x W_down) (D -> r, no bias) gives a per-token scale and shift (r -> D each, no bias),
and the MLP branch becomes `shift + (1 + scale) * mlp(norm2(x))` (before layer-scale/drop-path).
PSRP needs gradients through the frozen backbone; plain MP builds no autograd graph for it.

Init as in the official code (timm's `init_weights_vit_timm` over the whole model): Linear weights
trunc-normal(std 0.02), biases 0; LayerNorm 1/0; convolutions PyTorch's default. Only the first
classifier differs: it starts as the host's head (official: a fresh trunc-normal Linear).
Trainable: projection, LayerNorm, the two convolutions, both classifiers (and PSRP).
ViT-B/16, 1000 classes: 4,047,146 (MP), 4,489,514 (MP+: + 12 x 3 x 768 x 16). The official
README's 3.65M / 4.10M are these counts without the 393,728 of the projection.
Only adjacent pairs are implemented: the official head's other pairings ('n/2', 'cn2') cannot run
there (its convolutions are fixed at 3 channels and its classifier at 2883 inputs).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import TokenHost, classifier_modules
from ._side import check_side_host, make_head

_PSRP_BLOCKS = "timm Block (norm2, mlp), open_clip ResidualAttentionBlock (ln_2, mlp)"


@dataclasses.dataclass
class MomentProbingConfig(MethodConfig):
    """Config of Moment Probing (MP) and MP+.

    hidden_dim: width h of the projection of the patch tokens (official: 512).
    num_heads: groups H the projection is split into; the H - 1 adjacent pairs give the
        cross-covariances (official: 4, so 3 matrices of 128 x 128 and 2883 features).
    psrp: MP+: add PSRP, a per-block scale and shift of the MLP branch generated from the block's
        tokens, trained with the head (official MP+; default off: plain MP).
    psrp_dim: bottleneck width r of PSRP's shared down-projection (official: 16).
    """

    name = "moment_probing"
    hidden_dim: int = 512
    num_heads: int = 4
    psrp: bool = False
    psrp_dim: int = 16

    def __post_init__(self):
        if self.num_heads < 2:
            raise ValueError(f"MomentProbingConfig.num_heads must be >= 2 (pairs of adjacent groups), got {self.num_heads}")
        if self.hidden_dim < 1 or self.hidden_dim % self.num_heads:
            raise ValueError(f"MomentProbingConfig.hidden_dim={self.hidden_dim} must be a positive multiple of "
                             f"num_heads={self.num_heads}")
        if self.hidden_dim // self.num_heads < 7:
            raise ValueError(f"MomentProbingConfig: hidden_dim / num_heads = {self.hidden_dim // self.num_heads} is too "
                             "small for the two 3x3 stride-2 convolutions (needs >= 7)")
        if self.psrp_dim < 1:
            raise ValueError(f"MomentProbingConfig.psrp_dim must be >= 1, got {self.psrp_dim}")


def conv_out(size: int) -> int:
    """Side of a 3x3, stride-2, unpadded convolution's output."""
    return (size - 3) // 2 + 1


def moment_features(hidden_dim: int, num_heads: int) -> int:
    """Length of the flattened second-order feature: (H - 1) * s^2 (2883 for h = 512, H = 4)."""
    side = conv_out(conv_out(hidden_dim // num_heads))
    return (num_heads - 1) * side * side


def _init_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.trunc_normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class MomentProbingHead(nn.Module):
    """The MP head and the hooks that feed it; `forward(tokens, pooled) -> logits`.

    tokens: (B, N_prefix + N, D) final tokens; pooled: (B, D_pool) input of the host's head.
    """

    def __init__(self, model: nn.Module, host: TokenHost, config: MomentProbingConfig):
        super().__init__()
        head, pooled_dim = make_head(model, host)
        if not isinstance(head, nn.Linear):
            raise UnsupportedHostError(
                f"method 'moment_probing' replaces a classifier head, but {type(model).__name__} has none "
                "(get_classifier() is Identity); create the model with num_classes > 0")
        param = next(host.blocks[0].parameters())
        kw = dict(device=param.device, dtype=param.dtype)
        h, groups = config.hidden_dim, config.num_heads
        self.num_prefix_tokens, self.num_heads = host.num_prefix_tokens, groups
        self.proj = _init_linear(nn.Linear(host.dim, h, **kw))
        self.norm = nn.LayerNorm(h // groups, **kw)
        pairs = groups - 1
        self.convs = nn.Sequential(
            nn.Conv2d(pairs, pairs, kernel_size=3, stride=2, bias=False, **kw),
            nn.GELU(),
            nn.Conv2d(pairs, pairs, kernel_size=3, stride=2, bias=False, **kw),
        )
        self.classifier1 = head  # first-order: a copy of the host's head on the pooled feature
        self.classifier2 = _init_linear(nn.Linear(moment_features(h, groups), head.out_features, **kw))
        self.psrp = nn.ModuleList(
            PSRP(host.dim, config.psrp_dim, **kw) for _ in host.blocks
        ) if config.psrp else None
        self._tokens: torch.Tensor | None = None
        self._pooled: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None

    def second_order(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N_prefix + N, D) -> (B, F) flattened, convolved cross-covariances of adjacent groups."""
        z = self.proj(tokens[:, self.num_prefix_tokens:])  # (B, N, h)
        b, n, h = z.shape
        z = self.norm(z.view(b, n, self.num_heads, h // self.num_heads))  # (B, N, H, d)
        z = z - z.mean(dim=(1, 3), keepdim=True)  # official centring: one mean per sample and group
        cov = torch.einsum("bnki,bnkj->bkij", z[:, :, :-1], z[:, :, 1:]) / n  # (B, H-1, d, d)
        cov = F.normalize(cov, dim=2)
        return self.convs(cov).flatten(1)

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return (self.classifier1(pooled) + self.classifier2(self.second_order(tokens))) / 2

    # ------------------------------------------------------------------ hooks
    def install(self, model: nn.Module, host: TokenHost) -> None:
        model.register_forward_pre_hook(self._reset)
        (host.norm if host.norm is not None else host.blocks[-1]).register_forward_hook(self._capture_tokens)
        classifier_modules(model)[0].register_forward_pre_hook(self._capture_pooled)
        classifier_modules(model)[0].register_forward_hook(self._run_probe)  # inside the model's graph under torch.compile
        model.register_forward_hook(self._replace_output)
        if self.psrp is not None:
            for block, psrp in zip(host.blocks, self.psrp):
                psrp.install(block)

    def _reset(self, model: nn.Module, args: tuple) -> None:
        self._tokens = self._pooled = self._logits = None

    def _capture_tokens(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._tokens = output

    def _capture_pooled(self, head: nn.Module, args: tuple) -> None:
        self._pooled = args[0]

    def _run_probe(self, head: nn.Module, args: tuple, output) -> None:
        """Head hook: the final tokens and the head's input are captured; run the probe (the root hook returns it)."""
        tokens, pooled = self._tokens, self._pooled
        if tokens is not None and pooled is not None and tokens.dim() == 3:
            self._tokens = self._pooled = None
            self._logits = self(tokens, pooled)

    def _replace_output(self, model: nn.Module, args: tuple, output):
        logits, tokens, pooled = self._logits, self._tokens, self._pooled
        self._tokens = self._pooled = self._logits = None
        if logits is not None:
            return logits
        if tokens is None or pooled is None or tokens.dim() != 3:
            raise RuntimeError("moment_probing: the forward did not produce the final tokens (B, N, D) and the "
                               "classifier head's input it reads; was the host's forward changed?")
        return self(tokens, pooled)


class PSRP(nn.Module):
    """Partially shared recalibrating parameters of one block: x -> (scale, shift), both (B, N, D)."""

    def __init__(self, dim: int, rank: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.down = _init_linear(nn.Linear(dim, rank, **kw))  # shared by scale and shift
        self.up_weight = _init_linear(nn.Linear(rank, dim, **kw))
        self.up_bias = _init_linear(nn.Linear(rank, dim, **kw))
        self._x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.relu(self.down(x))
        return self.up_weight(a), self.up_bias(a)

    def install(self, block: nn.Module) -> None:
        """Hooks: remember the input of the block's MLP norm; recalibrate the MLP's output."""
        norm, mlp = psrp_sites(block)
        norm.register_forward_pre_hook(self._remember)
        mlp.register_forward_hook(self._recalibrate)

    def _remember(self, norm: nn.Module, args: tuple) -> None:
        self._x = args[0]

    def _recalibrate(self, mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("moment_probing PSRP: the block's MLP ran without its norm; cannot recalibrate")
        scale, shift = self(x)
        return shift + (1 + scale) * output


def psrp_sites(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the norm before the MLP, the MLP) of a pre-norm transformer block."""
    norm = getattr(block, "norm2", None)
    norm = norm if norm is not None else getattr(block, "ln_2", None)
    mlp = getattr(block, "mlp", None)
    if not isinstance(norm, nn.Module) or not isinstance(mlp, nn.Module):
        raise UnsupportedHostError(f"method 'moment_probing' with psrp=True needs pre-norm blocks with an MLP branch; "
                                   f"got {type(block).__name__} (supported: {_PSRP_BLOCKS})")
    return norm, mlp


@register_method
class MomentProbing(Method):
    name = "moment_probing"
    config_class = MomentProbingConfig
    merge_refusal = ("the head reads second-order moments of the patch tokens through a new network (and PSRP "
                     "recalibrates every block per token); neither is a change of the host's weights")

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        check_side_host(model, cls.name)
        if isinstance(classifier_modules(model)[0], nn.Identity):
            raise UnsupportedHostError(
                f"method {cls.name!r} replaces a classifier head, but {type(model).__name__}'s is Identity "
                "(supported: a model with a head, e.g. timm with num_classes > 0)")

    @classmethod
    def attach(cls, model: nn.Module, config: MomentProbingConfig) -> None:
        host = check_side_host(model, cls.name)
        if config.psrp:
            for block in host.blocks:
                psrp_sites(block)  # validate before changing the model
        head = MomentProbingHead(model, host, config)
        get_state(model).add_module("moment_probing", head)
        head.install(model, host)
