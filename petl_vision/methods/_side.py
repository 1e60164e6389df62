"""Plumbing shared by side networks (LST, UniPT): read a frozen token host, replace its output.

A side network never sends gradients into the backbone. With every backbone parameter frozen and
an input that does not require grad, PyTorch records no autograd graph for the backbone's
operations, so the backbone's activations are freed as its forward goes, exactly as under
``torch.no_grad()``. `SideNetwork.install` registers forward hooks that:

- detach the model's input and check that no backbone parameter requires grad (root pre-hook);
- capture the embedding output (pre-hook of the first block) and every block output, detached:
  L + 1 hidden states of shape (B, N, D), N = prefix tokens + patch tokens;
- capture the pooled final feature (UniPT's "raw anchor"), as the official UniPT reads it: the
  input of the host's head dropout (timm's `head_drop`, so the anchor is never dropped), else the
  input of the classifier head; on petl_vision's CLIPClassifier the tower's output before the
  normalisation (`ln_post(CLS) @ proj`), with `anchor_normalized_after = True`;
- run the side network in a forward hook of the host's head (the last module of the forward, so
  that under `torch.compile(model)` it is part of the model's graph), and replace the model's
  output with its logits (root forward hook, which does no tensor work).

The host's own classifier head still runs but its output is discarded; it stays frozen and is not
part of the trainable set (each side network has its own head, initialised as a copy of the host's,
see `make_head`).

Under autocast the hidden states (the host's fp32 residual stream) are cast to the autocast dtype
at use (`_autocast.autocast_input`, in the methods that read them), as autocast would cast them for the side network's first matmul.

`side_features(model, images)` runs only the backbone and returns what the side network reads, and
`side_forward_from_cache(model, features)` runs only the side network: the feature cache uses them.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..core.state import get_state, host_modules
from ..core.errors import UnsupportedHostError
from ..hosts import TokenHost, classifier_modules, token_host


def pool_kind(model: nn.Module, host: TokenHost) -> str:
    """How the host pools tokens: "token" (the CLS token, index 0) or "avg" (mean of patch tokens).

    timm's `global_pool` or open_clip's `pool_type` (on the model or its `visual`) decide: 'token'
    or 'tok' -> "token", anything else -> "avg"; without either, a host with prefix tokens is
    taken to pool its first token.
    """
    for owner in (model, getattr(model, "visual", None)):
        pool = getattr(owner, "global_pool", None) or getattr(owner, "pool_type", None)
        if isinstance(pool, str):
            return "token" if pool in ("token", "tok") else "avg"
    return "token" if host.num_prefix_tokens > 0 else "avg"


def pool_tokens(x: torch.Tensor, kind: str, num_prefix_tokens: int) -> torch.Tensor:
    """(B, N, C) -> (B, C): the first token, or the mean of the patch tokens."""
    return x[:, 0] if kind == "token" else x[:, num_prefix_tokens:].mean(dim=1)


# Methods whose own network replaces the model's output: applied together, only the last one's
# output would remain and the others would silently get no gradient.
OUTPUT_METHODS = ("hst", "lst", "unipt", "moment_probing")


def check_single_output_method(model: nn.Module, method: str) -> None:
    """Raise UnsupportedHostError when another method of OUTPUT_METHODS is applied to `model`."""
    state = get_state(model)
    others = [name for name in (state.method_names if state is not None else []) if name in OUTPUT_METHODS and name != method]
    if others:
        raise UnsupportedHostError(
            f"method {method!r} replaces the model's output with its own network, and so does {others[0]!r}, already "
            f"applied; apply only one of {', '.join(OUTPUT_METHODS)} to a model"
        )


def check_side_host(model: nn.Module, method: str) -> TokenHost:
    """The token host of `model`, which must also have a classifier head a side network can copy."""
    check_single_output_method(model, method)
    host = token_host(model, method)
    heads = classifier_modules(model)
    if not heads:
        raise UnsupportedHostError(
            f"method {method!r} needs a classifier with a head (`get_classifier()`), got {type(model).__name__} without one "
            "(supported: timm ViTs, petl_vision.clip.CLIPClassifier)"
        )
    weight = getattr(heads[0], "weight", None)
    if not isinstance(heads[0], (nn.Linear, nn.Identity)) and not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        raise UnsupportedHostError(f"method {method!r}: cannot copy a {type(heads[0]).__name__} head (supported: Linear, "
                                   "Identity, a zero-shot head with a (classes, dim) weight)")
    return host


def make_head(model: nn.Module, host: TokenHost) -> tuple[nn.Module, int]:
    """The side network's own head and its input width, copied from the host's first head.

    Linear: a copy. Identity (timm num_classes=0): Identity, width D. A zero-shot head
    (`logit_scale.exp() * f @ weight.T`, petl_vision.clip): a Linear with that weight, no bias.
    """
    head = classifier_modules(model)[0]
    if isinstance(head, nn.Identity):
        return nn.Identity(), host.dim
    weight = head.weight
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=getattr(head, "bias", None) is not None,
                    device=weight.device, dtype=weight.dtype)
    if weight.device.type != "meta":
        with torch.no_grad():
            scale = head.logit_scale.exp() if isinstance(getattr(head, "logit_scale", None), torch.Tensor) else 1.0
            new.weight.copy_(weight * scale)
            if new.bias is not None:
                new.bias.copy_(head.bias)
    return new, weight.shape[1]


class SideNetwork(nn.Module):
    """Base of side networks. Subclasses define `forward(hidden, pooled) -> logits`.

    hidden: L + 1 entries, `read(i, t)` of the detached hidden states t (B, N, D) (embedding output,
        then every block's output).
    pooled: (B, D) input of the host's classifier head, or None when the host has none.
    """

    method = "side"

    def __init__(self):
        super().__init__()
        self.enabled = True  # False: the model runs as the plain host (Fisher init uses this)
        self._capture_only = False
        self._captured: list[torch.Tensor] = []
        self._pooled: torch.Tensor | None = None
        self._last: dict | None = None
        self._logits: torch.Tensor | None = None  # the side network's output of the forward in progress
        self._backbone_params: list[nn.Parameter] = []
        self._warned: set[str] = set()
        self.anchor_normalized_after = False  # True: `pooled` is CLIP's unnormalised embedding; the host normalises it

    def install(self, model: nn.Module, host: TokenHost) -> None:
        """Register the hooks on `model` (the side network must already be inside `model.petl`)."""
        frozen = [(n, p) for n, m in host_modules(model) for n, p in m.named_parameters(recurse=False)]
        trainable = [n for n, p in frozen if p.requires_grad]
        if trainable:
            raise ValueError(
                f"method {self.method!r} reads the backbone's activations detached, so backbone parameters cannot train "
                f"(trainable: {trainable[:3]}{' ...' if len(trainable) > 3 else ''}); apply {self.method!r} alone, on a fresh model"
            )
        self._backbone_params = [p for _, p in frozen]
        model.register_forward_pre_hook(self._before_model, with_kwargs=True)
        host.blocks[0].register_forward_pre_hook(self._capture_embedding)
        for block in host.blocks:
            block.register_forward_hook(self._capture_block)
        heads = classifier_modules(model)
        if heads:
            visual, head_drop = getattr(model, "visual", None), getattr(model, "head_drop", None)
            if isinstance(visual, nn.Module) and callable(getattr(model, "image_features", None)):  # CLIPClassifier
                visual.register_forward_hook(self._capture_embedding_output)
                self.anchor_normalized_after = True
            else:
                if isinstance(head_drop, nn.Module):  # timm: pool -> fc_norm -> head_drop -> head
                    head_drop.register_forward_pre_hook(self._capture_pooled)
                # The head's input where no head_drop ran first (older timm's DeiT-distilled forward_head).
                heads[0].register_forward_pre_hook(self._capture_pooled)
            heads[0].register_forward_hook(self._run_side)
        model.register_forward_hook(self._replace_output)

    # ------------------------------------------------------------------ hooks
    def _before_model(self, model: nn.Module, args: tuple, kwargs: dict):
        self._captured, self._pooled, self._logits = [], None, None
        if not self.enabled or not torch.is_grad_enabled():
            return None
        for p in self._backbone_params:
            if p.requires_grad:
                raise RuntimeError(
                    f"method {self.method!r}: a backbone parameter of shape {tuple(p.shape)} requires grad; the side "
                    "network keeps the backbone frozen (set requires_grad=False, or use a method that trains the backbone)"
                )
        grad = lambda v: isinstance(v, torch.Tensor) and v.requires_grad  # noqa: E731
        if not any(map(grad, (*args, *kwargs.values()))):
            return None  # nothing to detach: no tensor work here, so no graph of its own under torch.compile
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}

    def read(self, index: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Hidden state `index` (B, N, D), detached, as the side network takes it in `forward`.

        Called as soon as its block has run, so a subclass that projects it here (LST's ladders,
        UniPT's layer projections) lets the backbone's fp32 hidden state go at once instead of holding
        L + 1 of them to the end of the backbone; None drops a state the side network does not read.
        """
        return hidden

    def _capture(self, hidden: torch.Tensor) -> None:
        hidden = hidden.detach()
        self._captured.append(hidden if self._capture_only else self.read(len(self._captured), hidden))

    def _capture_embedding(self, block: nn.Module, args: tuple):
        if self.enabled:
            self._captured = []
            self._capture(args[0])

    def _capture_block(self, block: nn.Module, args: tuple, output: torch.Tensor):
        if self.enabled:
            self._capture(output)

    def _capture_pooled(self, head: nn.Module, args: tuple):
        """The first pooled feature of this forward (DeiT-distilled drops CLS, then the distillation token)."""
        if self.enabled and self._pooled is None:
            self._pooled = args[0].detach()

    def _capture_embedding_output(self, tower: nn.Module, args: tuple, output):
        if self.enabled:
            self._pooled = (output[0] if isinstance(output, tuple) else output).detach()

    def _run_side(self, head: nn.Module, args: tuple, output) -> None:
        """Head hook: every hidden state and the pooled feature are captured; run the side network."""
        if not self.enabled or self._capture_only or not self._captured:
            return
        hidden, pooled = self._captured, self._pooled
        self._captured, self._pooled = [], None
        self.before_training_forward()
        self._logits = self(hidden, pooled)

    def _replace_output(self, model: nn.Module, args: tuple, output):
        if not self.enabled:
            return None
        logits, hidden, pooled = self._logits, self._captured, self._pooled
        self._logits, self._captured, self._pooled = None, [], None
        if self._capture_only:
            self._last = {"hidden": hidden, "pooled": pooled}
            return None
        if logits is None:  # the head did not run after the blocks: run the side network here
            self.before_training_forward()
            logits = self(hidden, pooled)
        return logits

    def before_training_forward(self) -> None:
        """Called before each side forward through the model; subclasses may warn here."""

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def side_network(model: nn.Module) -> SideNetwork:
    """The side network applied to `model` (ValueError when there is none)."""
    state = get_state(model)
    found = [m for m in state.children() if isinstance(m, SideNetwork)] if state is not None else []
    if not found:
        applied = state.method_names if state is not None else []
        raise ValueError(f"no side network (lst, unipt) is applied to this model (applied: {applied})")
    return found[0]


def side_features(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run only the backbone; return what the side network reads.

    Returns {"hidden": (B, L + 1, N, D), "pooled": (B, D)} ("pooled" only when the host has a head).
    """
    side = side_network(model)
    side._capture_only = True
    try:
        with torch.no_grad():
            model(images)
        captured = side._last
    finally:
        side._capture_only, side._last = False, None
    features = {"hidden": torch.stack(captured["hidden"], dim=1)}
    if captured["pooled"] is not None:
        features["pooled"] = captured["pooled"]
    return features


def side_forward_from_cache(model: nn.Module, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the side network from stored backbone features, without running the backbone.

    features: {"hidden": (B, L + 1, N, D), "pooled": (B, D) optional}, as `side_features` returns
    (other keys, such as "target", are ignored). Tensors are cast to the side network's dtype.
    """
    side = side_network(model)
    ref = next(side.parameters())
    hidden = features["hidden"].to(device=ref.device, dtype=ref.dtype)
    pooled = features.get("pooled")
    pooled = pooled.to(device=ref.device, dtype=ref.dtype) if pooled is not None else None
    return side([side.read(i, t) for i, t in enumerate(hidden.unbind(1))], pooled)
