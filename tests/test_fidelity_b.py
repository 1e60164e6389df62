"""Fidelity to the official code (issue 13, items 6-8): IDPT checkpoints, LST's pruned init, UniPT's anchor."""
import warnings

import pytest
import torch

import petl_vision as pv
from petl_vision.methods.idpt import load_official_idpt_checkpoint
from petl_vision.models.point_mae import CheckpointError, PointTransformer, load_official_checkpoint

# ----------------------------------------------------------------------------- IDPT (item 6)
POINT = dict(num_classes=5, num_group=8, group_size=8, dim=32, depth=3, num_heads=2)
OFFICIAL_GENERATOR = {"edge.0": "conv1", "edge.1": "conv2", "edge.2": "conv3", "fuse": "conv5"}


def trained_idpt(seed):
    torch.manual_seed(seed)
    model = pv.apply(PointTransformer(**POINT), "idpt", k=4)
    with torch.no_grad():  # make every tensor distinct from a fresh init, BatchNorm statistics included
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    return model.eval()


def official_idpt_layout(model):
    """The state dict of an IDPT fine-tuned model under the official names (saved from DataParallel)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("petl.idpt.generator."):
            module, _, rest = key[len("petl.idpt.generator."):].partition(".")
            if module == "edge":
                index, _, rest = rest.partition(".")
                module = f"edge.{index}"
            name = OFFICIAL_GENERATOR[module]
            out[f"module.blocks.cls.{name}.{rest}"] = value
            if rest.startswith("1."):  # the official BatchNorms are also registered as bn1, bn2, bn3, bn5
                out[f"module.blocks.cls.bn{name[-1]}.{rest[2:]}"] = value
        elif key == "petl.idpt.prompt_pos":
            out["module.prompt_pos"] = value
        elif key.startswith("blocks."):
            out["module.blocks." + key] = value
        else:
            out["module." + key.replace("head.", "cls_head_finetune.", 1)] = value
    return {"base_model": out, "epoch": 300, "metrics": {"acc": 93.1}}


def test_idpt_official_checkpoint_reproduces_logits(tmp_path):
    source = trained_idpt(1)
    layout = official_idpt_layout(source)
    assert "module.blocks.cls.bn5.running_var" in layout["base_model"]
    assert layout["base_model"]["module.cls_head_finetune.0.weight"].shape == (256, 3 * 32)
    path = tmp_path / "idpt_finetuned.pth"
    torch.save(layout, path)
    target = trained_idpt(2)
    x = torch.randn(4, 64, 3, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(target(x), source(x))
    report = load_official_idpt_checkpoint(target, path)
    assert torch.equal(target(x), source(x))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert report["skipped"] == [] and report["missing"] == []
    assert "petl.idpt.prompt_pos" in report["loaded"] and "petl.idpt.generator.fuse.1.running_mean" in report["loaded"]

    # the plain Point-MAE loader no longer drops the IDPT tensors silently
    plain = trained_idpt(3)
    with pytest.warns(UserWarning, match="load_official_idpt_checkpoint"):
        skipped = load_official_checkpoint(plain, path)["skipped"]
    assert "module.prompt_pos" in skipped and "module.blocks.cls.conv1.0.weight" in skipped


def test_idpt_official_checkpoint_errors(tmp_path):
    source = trained_idpt(1)
    layout = official_idpt_layout(source)
    cases = {
        "no_prompt_pos": (lambda sd: sd.pop("module.prompt_pos"), "no 'prompt_pos'"),
        "no_generator": (lambda sd: sd.pop("module.blocks.cls.conv2.0.weight"), r"missing generator tensors \['edge.1.0.weight'\]"),
        "light": (lambda sd: sd.__setitem__("module.blocks.cls.conv4.0.weight", torch.zeros(1)), r"does not know.*conv4"),
        "alias": (lambda sd: sd.__setitem__("module.blocks.cls.bn1.weight", torch.zeros(32)), "bn1.weight differs"),
        "no_head": (lambda sd: [sd.pop(k) for k in list(sd) if "cls_head_finetune" in k], r"96-input head.*head\.0\.weight"),
    }
    for name, (edit, message) in cases.items():
        sd = dict(layout["base_model"])
        edit(sd)
        torch.save({"base_model": sd}, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=message):
            load_official_idpt_checkpoint(trained_idpt(2), tmp_path / f"{name}.pth")
    with pytest.raises(ValueError, match="apply IDPT to the model first"):
        load_official_idpt_checkpoint(PointTransformer(**POINT), tmp_path / "alias.pth")
