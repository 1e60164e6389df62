"""Tests for the bundled demo ViT (petl_vision.models.demo_vit)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from petl_vision.models import DEMO_VIT_PATH, create_demo_vit


def test_builds_and_forwards():
    model = create_demo_vit(pretrained=False)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_data_config():
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=create_demo_vit(pretrained=False))
    assert cfg["input_size"] == (3, 32, 32)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0


def test_pretrained_loads_backbone():
    assert DEMO_VIT_PATH.is_file(), "run python scripts/make_demo_backbone.py"
    torch.manual_seed(0)
    random = create_demo_vit(pretrained=False)
    torch.manual_seed(0)
    loaded = create_demo_vit(num_classes=3, pretrained=True)
    assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert not torch.equal(random.patch_embed.proj.weight, loaded.patch_embed.proj.weight)
    assert not torch.equal(random.blocks[-1].mlp.fc2.weight, loaded.blocks[-1].mlp.fc2.weight)
    state = load_file(str(DEMO_VIT_PATH))
    assert not any(k.startswith("head.") for k in state)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_demo_vit(checkpoint=path)


def test_wrong_shape_checkpoint(tmp_path):
    state = {k: v for k, v in create_demo_vit(pretrained=False).state_dict().items() if not k.startswith("head.")}
    state["pos_embed"] = torch.zeros(1, 5, 96)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="pos_embed"):
        create_demo_vit(checkpoint=path)
