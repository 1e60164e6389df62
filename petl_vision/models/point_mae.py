"""The Point-MAE / Point-BERT point-cloud transformer, with a loader for their official checkpoints.

    points (B, N, 3)
      -> FPS + kNN grouping: G groups of M points, centred           (B, G, M, 3), centres (B, G, 3)
      -> mini-PointNet tokenizer (3->128->256, max, concat, 512->512->C, max)          (B, G, C)
      -> reduce_dim (Point-BERT, C=256 -> D; identity for Point-MAE, C = D)           (B, G, D)
      -> [CLS; tokens], positions [cls_pos; MLP 3->128->D (centres)]             (B, 1 + G, D)
      -> blocks: x = block(x + pos) for every block (positions re-added before each block)
      -> final LayerNorm -> head on [CLS, extra tokens, max-pool of the G patch tokens]

Tokens that methods insert between CLS and the patch tokens get the position 0 unless the method
passes its own (IDPT does); those still present after the last block feed the head, in order.
The blocks are timm `Block`s; importing this module registers the model as a token host, so
VPT runs on it.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .pointnet_ops import group_points


class MiniPointNet(nn.Module):
    """Point-MAE's tokenizer: (B, G, M, 3) point groups -> (B, G, out_dim) tokens."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, m, _ = groups.shape
        f = self.first_conv(groups.reshape(b * g, m, 3).transpose(1, 2))  # (BG, 256, M)
        f = torch.cat([f.amax(dim=2, keepdim=True).expand(-1, -1, m), f], dim=1)  # (BG, 512, M)
        return self.second_conv(f).amax(dim=2).reshape(b, g, self.out_dim)


class PointBlock(Block):
    """A timm `Block` that adds the token positions to its input: block(x + pos).

    pos (B, N_pos, D) covers the prefix (CLS) token and the patch tokens; when x has more tokens
    (prompts inserted after CLS), those get position 0.
    """

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if pos is not None:
            extra = x.shape[1] - pos.shape[1]
            if extra > 0:
                pos = torch.cat([pos[:, :1], pos.new_zeros(pos.shape[0], extra, pos.shape[2]), pos[:, 1:]], dim=1)
            x = x + pos
        return super().forward(x, **kwargs)


def classification_head(in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.5) -> nn.Sequential:
    """The Point-MAE / IDPT fine-tuning head: in -> 256 -> 256 -> classes with BatchNorm, ReLU, dropout."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class PointTransformer(nn.Module):
    """Point-MAE's fine-tuning transformer (Point-BERT with encoder_dims=256).

    num_classes: classifier outputs. num_group, group_size: G groups of M points (64 x 32 for 1024
    points, 128 x 32 for 2048). dim, depth, num_heads: the transformer (384, 12, 6).
    encoder_dims: tokenizer width (None = dim, Point-MAE; Point-BERT uses 256 and a Linear to dim).
    drop_path_rate: stochastic depth, linear over the blocks (0.1 when fine-tuning).
    Input (B, N, 3) points with N >= num_group and N >= group_size; output (B, num_classes).
    """

    def __init__(self, num_classes: int = 40, num_group: int = 64, group_size: int = 32, dim: int = 384, depth: int = 12,
                 num_heads: int = 6, encoder_dims: int | None = None, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1):
        super().__init__()
        self.num_classes, self.num_group, self.group_size = num_classes, num_group, group_size
        self.dim = self.embed_dim = dim
        self.num_prefix_tokens = 1
        encoder_dims = encoder_dims or dim
        self.encoder = MiniPointNet(encoder_dims)
        self.reduce_dim = nn.Linear(encoder_dims, dim) if encoder_dims != dim else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace(0, rate, depth)
        self.blocks = nn.ModuleList(
            [PointBlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, drop_path=r, norm_layer=nn.LayerNorm) for r in rates]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = classification_head(2 * dim, num_classes)
        self.apply(_init_weights)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.cls_pos, std=0.02)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, num_extra_tokens: int = 0, hidden: int = 256, dropout: float = 0.5) -> None:
        """A fresh head for num_classes on [CLS, num_extra_tokens tokens, max-pool]: (2 + extra) * dim inputs."""
        ref = self.cls_token
        self.num_classes = num_classes
        self.head = classification_head((2 + num_extra_tokens) * self.dim, num_classes, hidden, dropout).to(device=ref.device, dtype=ref.dtype)
        self.head.apply(_init_weights)
        self.head.train(self.training)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def embed(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points (B, N, 3) -> tokens (B, 1 + G, D) with CLS first, positions (B, 1 + G, D)."""
        if points.ndim != 3 or points.shape[-1] < 3:
            raise ValueError(f"{type(self).__name__} expects points of shape (B, N, 3), got {tuple(points.shape)}")
        with torch.autocast(points.device.type, enabled=False):
            groups, center = group_points(points[..., :3].float(), self.num_group, self.group_size)
        dtype = self.cls_token.dtype
        tokens = self.reduce_dim(self.encoder(groups.to(dtype)))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(center.to(dtype))], dim=1)
        return x, pos

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) -> final-norm tokens (B, 1 + extra + G, D)."""
        x, pos = self.embed(points)
        for block in self.blocks:
            x = block(x, pos=pos)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 1 + extra + G, D) -> head input [CLS, extra tokens, max of patch tokens] or logits."""
        g = self.num_group
        extra = x[:, 1:x.shape[1] - g].flatten(1)
        features = torch.cat([x[:, 0], extra, x[:, -g:].amax(dim=1)], dim=-1)
        return features if pre_logits else self.head(features)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(points))


def _init_weights(m: nn.Module) -> None:
    """The official init: truncated normal (std 0.02) for Linear / Conv1d weights, zero biases, unit norms."""
    if isinstance(m, (nn.Linear, nn.Conv1d)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


POINT_MAE_SMALL = dict(num_group=64, group_size=32, dim=384, depth=12, num_heads=6)


def create_point_mae(num_classes: int = 40, checkpoint: str | Path | None = None, **kwargs) -> PointTransformer:
    """A PointTransformer (Point-MAE size unless kwargs say otherwise), optionally loading an official .pth.

    With a checkpoint, the loader's report ({"loaded", "skipped", "missing"}) is kept as
    `model.checkpoint_report`; IDPT fine-tuned checkpoints load with
    `petl_vision.methods.idpt.load_official_idpt_checkpoint` after applying IDPT (a warning says so).
    """
    model = PointTransformer(num_classes=num_classes, **{**POINT_MAE_SMALL, **kwargs})
    if checkpoint is not None:
        model.checkpoint_report = load_official_checkpoint(model, checkpoint)
    return model


# ----------------------------------------------------------------------------- official checkpoints

_PREFIXES = ("module.", "base_model.", "MAE_encoder.", "transformer_q.")
_RENAMES = (("blocks.blocks.", "blocks."), ("cls_head_finetune.", "head."))
# Keys a pre-training checkpoint may lack: Point-MAE's encoder has no CLS token, and no checkpoint
# made for another label set has our head.
_OPTIONAL = ("cls_token", "cls_pos", "head.")


class CheckpointError(ValueError):
    """An official checkpoint that cannot be read or does not fit the model."""


def official_to_ours(key: str) -> str:
    """Map an official Point-MAE / Point-BERT key onto ours (e.g. MAE_encoder.blocks.blocks.0.* -> blocks.0.*)."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    for old, new in _RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
    return key


def read_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The `base_model` state dict of an official .pth (torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (expected an official Point-MAE / Point-BERT .pth)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refusing to load, it holds objects that need pickle ({reason}). Only tensors and plain "
            "containers are read (torch.load(weights_only=True)); re-save it as torch.save({'base_model': state_dict}, path)"
        ) from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("base_model"), dict):
        return ckpt["base_model"]
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise CheckpointError(f"{path}: no 'base_model' state dict in this checkpoint (top-level keys: {keys})")


def load_official_checkpoint(model: PointTransformer, path: str | Path) -> dict[str, list[str]]:
    """Load an official Point-MAE (pre-trained or fine-tuned) or Point-BERT checkpoint into `model`.

    Key names are mapped onto ours; decoder, momentum-encoder and dVAE weights are ignored. The CLS
    token, its position and the head may be absent (kept as initialised); a head of another shape is
    skipped. Any other missing or wrongly shaped backbone weight raises CheckpointError naming it.
    An IDPT fine-tuned checkpoint's prompt generator (`blocks.cls.*`) and `prompt_pos` are not
    loaded here (a warning says so): apply IDPT and use `petl_vision.methods.idpt.load_official_idpt_checkpoint`.
    Returns {"loaded": [...], "skipped": [...] (ignored checkpoint keys), "missing": [...] (ours, kept)}.
    """
    state = read_official_state(path)
    report = load_official_state(model, state, source=str(path))
    idpt = [k for k in report["skipped"] if official_to_ours(k).startswith(IDPT_KEYS)]
    if idpt:
        warnings.warn(f"{path}: an IDPT fine-tuned checkpoint; its prompt generator and prompt position ({len(idpt)} tensors, "
                      f"e.g. {idpt[0]!r}) were not loaded: apply IDPT, then call "
                      "petl_vision.methods.idpt.load_official_idpt_checkpoint(model, path)", stacklevel=2)
    return report


# Keys of IDPT's additions in its fine-tuned checkpoints (after official_to_ours).
IDPT_KEYS = ("blocks.cls.", "prompt_pos")


def load_official_state(model: PointTransformer, state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, list[str]]:
    """`load_official_checkpoint` on a state dict read already (official key names); `source` names it in errors.

    Only the host's own tensors are matched (those of applied methods, under `petl.`, are not).
    """
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("petl.")}
    loaded, skipped, bad = {}, [], []
    for key, value in state.items():
        name = official_to_ours(key)
        if name not in ours or not isinstance(value, torch.Tensor):
            skipped.append(key)
        elif tuple(value.shape) != tuple(ours[name].shape):
            (skipped if name.startswith("head.") else bad).append(f"{key}: {list(value.shape)} vs ours {list(ours[name].shape)}")
        else:
            loaded[name] = value
    missing = [k for k in ours if k not in loaded]
    required = [k for k in missing if not k.startswith(_OPTIONAL) and not k.endswith("num_batches_tracked")]
    if bad or required:
        parts = ([f"shape mismatch {bad[:5]}"] if bad else []) + ([f"missing {required[:8]} ({len(required)})"] if required else [])
        raise CheckpointError(f"{source}: does not fit this {type(model).__name__} (dim {model.dim}, depth {len(model.blocks)}): {'; '.join(parts)}")
    with torch.no_grad():
        for name, value in loaded.items():
            ours[name].copy_(value)
    return {"loaded": sorted(loaded), "skipped": skipped, "missing": missing}


from ..hosts import point_mae as _register_host  # noqa: E402,F401  (registers PointTransformer as a token host)
