"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022), shallow and deep.

P learnable prompt tokens are inserted after the prefix tokens (CLS, registers) at the input of the
first block: ``cat(x[:, :n_prefix], prompts, x[:, n_prefix:])``. They come after the position
embedding, so they get none. Deep VPT replaces the prompt outputs of the previous block with fresh
prompts before every block i >= 1: it drops them after every block and inserts the next layer's
before the next, so every block's output has the host's token layout (timm's
`forward_intermediates` / `get_intermediate_layers` see no prompts). Shallow VPT's prompt outputs
go on through every block; they are dropped after the last block, so the host's final norm,
pooling and head see the usual token layout (its intermediate block outputs hold the prompts).

Implemented with forward hooks on the host's blocks (found through the token-host interface);
the prompts live in ``model.petl.vpt``. Inserting and dropping are one copy each way
(`InsertTokens`, `DropTokens`: a cat forward, a cat backward; autograd's own cat-of-slices backward
writes a zero-filled copy per slice and adds them). Under autocast the prompts are cast at use to
the autocast dtype before the projection and dropout, and to the token stream's dtype in the cat.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import get_state
from ..hosts import TokenHost, token_host, unfreeze_head
from ._autocast import autocast_input


@dataclasses.dataclass
class VPTConfig(MethodConfig):
    """Config of VPT.

    num_prompts: prompts per layer, P.
    deep: a fresh set of prompts before every block (VPT-deep) or only before the first (shallow).
    dropout: dropout on the prompts (paper default 0), after their expansion over the batch: one
        mask per sample, as the official code.
    project_dim: if > 0, prompts have this width and a Linear projects them to the model width
        (the official PROJECT option and init: kaiming-normal fan-out weight, nn.Linear's default
        bias); -1 = no projection (default).
    train_head: train the classifier head too (paper: yes).
    """

    name = "vpt"
    num_prompts: int = 10
    deep: bool = True
    dropout: float = 0.0
    project_dim: int = -1
    train_head: bool = True

    def __post_init__(self):
        if self.num_prompts < 1:
            raise ValueError(f"VPTConfig.num_prompts must be >= 1, got {self.num_prompts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VPTConfig.dropout must be in [0, 1), got {self.dropout}")


def init_bound(patch_size: tuple[int, int], dim: int) -> float:
    """The official uniform init bound sqrt(6 / (3 * ph * pw + dim)) (0.0625 for 16x16, 768)."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))


class InsertTokens(torch.autograd.Function):
    """(B, N, D) tokens, (B, P, D) prompts -> (B, N + P, D) with the prompts after the first n tokens.

    The prompts are cast to the tokens' dtype; gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx, x, prompts, n: int):
        ctx.n, ctx.p, ctx.prompt_dtype = n, prompts.shape[1], prompts.dtype
        return torch.cat([x[:, :n], prompts.to(x.dtype), x[:, n:]], dim=1)

    @staticmethod
    def backward(ctx, grad):
        n, p = ctx.n, ctx.p
        grad_x = torch.cat([grad[:, :n], grad[:, n + p:]], dim=1) if ctx.needs_input_grad[0] else None
        grad_prompts = grad[:, n:n + p].to(ctx.prompt_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_prompts, None


class DropTokens(torch.autograd.Function):
    """(B, N + P, D) -> (B, N, D) without the P tokens after the first n."""

    @staticmethod
    def forward(ctx, x, n: int, p: int):
        ctx.n, ctx.p = n, p
        return torch.cat([x[:, :n], x[:, n + p:]], dim=1)

    @staticmethod
    def backward(ctx, grad):
        n, p = ctx.n, ctx.p
        return torch.cat([grad[:, :n], grad.new_zeros(grad.shape[0], p, grad.shape[2]), grad[:, n:]], dim=1), None, None


class VPTPrompts(nn.Module):
    """The prompts of every prompted layer and the hooks that insert them.

    prompts: (num_layers, P, prompt_dim); layer i's prompts become (B, P, dim) tokens.
    """

    def __init__(self, host: TokenHost, config: VPTConfig):
        super().__init__()
        self.num_prompts = config.num_prompts
        self.num_prefix_tokens = host.num_prefix_tokens
        prompt_dim = config.project_dim if config.project_dim > 0 else host.dim
        num_layers = len(host.blocks) if config.deep else 1
        ref = next(host.blocks[0].parameters())
        bound = init_bound(host.patch_size, prompt_dim)
        self.prompts = nn.Parameter(torch.empty(num_layers, config.num_prompts, prompt_dim, device=ref.device, dtype=ref.dtype).uniform_(-bound, bound))
        if config.project_dim > 0:
            self.proj = nn.Linear(prompt_dim, host.dim, device=ref.device, dtype=ref.dtype)
            nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")  # official; the bias keeps nn.Linear's init
        else:
            self.proj = nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def layer_prompts(self, layer: int, batch: int) -> torch.Tensor:
        """(B, P, dim) prompts of one layer: the (P, dim) prompts (projected) expanded over the batch,
        a view unless dropout is active; dropout then draws one mask per sample, as the official
        ``dropout(proj(prompts).expand(B, -1, -1))``."""
        prompts = self.prompts[layer]
        if not isinstance(self.proj, nn.Identity):
            prompts = self.proj(autocast_input(prompts))
        prompts = prompts.unsqueeze(0).expand(batch, -1, -1)
        if self.dropout.p > 0 and self.training:
            prompts = self.dropout(autocast_input(prompts))
        return prompts

    def insert(self, layer: int, block: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of the first block (deep: of every block): (B, N, D) -> (B, N + P, D)."""
        x = args[0]
        return (InsertTokens.apply(x, self.layer_prompts(layer, x.shape[0]), self.num_prefix_tokens),) + args[1:], kwargs

    def remove(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Hook after the last block (deep: after every block): (B, N + P, D) -> (B, N, D)."""
        return DropTokens.apply(output, self.num_prefix_tokens, self.num_prompts)


@register_method
class VPT(Method):
    name = "vpt"
    config_class = VPTConfig
    merge_refusal = "prompt tokens are extra inputs, not weights"

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        state = get_state(model)
        if state is not None and "hst" in state.method_names:
            raise UnsupportedHostError("method 'vpt' cannot be combined with 'hst': both change the token layout of every block")
        token_host(model, cls.name)

    @classmethod
    def attach(cls, model: nn.Module, config: VPTConfig) -> None:
        host = token_host(model, cls.name)
        prompts = VPTPrompts(host, config)
        get_state(model).add_module("vpt", prompts)
        if config.deep:  # every block: insert its prompts before it, drop their outputs after it
            for i, block in enumerate(host.blocks):
                block.register_forward_pre_hook(functools.partial(prompts.insert, i), with_kwargs=True)
                block.register_forward_hook(prompts.remove)
        else:  # the prompts' outputs carry on through every block
            host.blocks[0].register_forward_pre_hook(functools.partial(prompts.insert, 0), with_kwargs=True)
            host.blocks[-1].register_forward_hook(prompts.remove)
        if config.train_head:
            unfreeze_head(model, cls.name)
