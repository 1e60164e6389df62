"""A tiny pretrained ViT used by the embedded demo.

The backbone is a plain ``timm`` VisionTransformer, so every timm-based
method in this package applies to it unchanged. Its weights ship in
``assets/demo_vit.safetensors`` and are produced by
``scripts/make_demo_backbone.py`` from procedurally rendered strokes and
shapes only (no real dataset).
"""
from __future__ import annotations

from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

DEMO_VIT_KWARGS = dict(
    img_size=32,
    patch_size=4,
    in_chans=3,
    embed_dim=96,
    depth=6,
    num_heads=3,
    mlp_ratio=4.0,
    class_token=True,
    global_pool="token",
)

DEMO_VIT_PATH = Path(__file__).resolve().parents[2] / "assets" / "demo_vit.safetensors"

DEMO_VIT_CFG = dict(
    architecture="vit_demo_patch4_32",
    input_size=(3, 32, 32),
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bilinear",
    crop_pct=1.0,
    crop_mode="center",
    num_classes=10,
    first_conv="patch_embed.proj",
    classifier="head",
)

REGENERATE_HINT = "python scripts/make_demo_backbone.py"


def load_backbone_state(model: VisionTransformer, checkpoint: str | Path) -> None:
    """Load every weight except ``head.*`` from a safetensors file into ``model``.

    Raises FileNotFoundError if the file is missing and ValueError on any
    missing, unexpected or wrongly shaped key.
    """
    from safetensors.torch import load_file

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo ViT checkpoint not found: {path}. Regenerate it with `{REGENERATE_HINT}`."
        )
    state = load_file(str(path))
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"checkpoint {path} does not match the demo ViT: "
            f"missing={missing}, unexpected={unexpected}, shape mismatch={bad_shape}"
        )
    model.load_state_dict(state, strict=False)


def create_demo_vit(
    num_classes: int = 10,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
) -> VisionTransformer:
    """Build the demo ViT: input (B, 3, 32, 32) in [-1, 1] -> logits (B, num_classes).

    64 patches of 4x4 pixels, width 96, 6 blocks, 3 heads. With
    ``pretrained=True`` the backbone (all but the head) is loaded from
    ``checkpoint`` (default ``DEMO_VIT_PATH``); the head stays freshly initialised.
    """
    model = VisionTransformer(num_classes=num_classes, **DEMO_VIT_KWARGS)
    model.pretrained_cfg = dict(DEMO_VIT_CFG, num_classes=num_classes)
    model.default_cfg = model.pretrained_cfg  # older timm helpers read this name
    if pretrained:
        load_backbone_state(model, checkpoint if checkpoint is not None else DEMO_VIT_PATH)
    return model
