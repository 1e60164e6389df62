"""save_adapter / load_adapter: file layout, atomicity, and one clear error per bad input."""
import json

import pytest
import safetensors.torch
import timm
import torch
from conftest import input_for, make_host

import petl_vision as pv
from petl_vision.core import io


@pytest.fixture
def saved(tmp_path):
    model = pv.apply(make_host("vit"), "ssf")
    with torch.no_grad():
        model.blocks[0].norm1.scale.add_(1.0)
    pv.save_adapter(model, tmp_path / "ssf")
    return model, tmp_path / "ssf"


def untouched(model):
    return not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())


def test_files_and_contents(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    meta = json.loads((directory / "adapter_config.json").read_text())
    assert [m["name"] for m in meta["methods"]] == ["ssf"] and meta["methods"][0]["config"]["init_std"] == 0.02
    assert meta["host"]["class"] == "timm.models.vision_transformer.VisionTransformer"
    tensors = safetensors.torch.load_file(directory / "adapter.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable == set(meta["tensors"])


def test_wrong_backbone(saved):
    _, directory = saved
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5)
    with pytest.raises(pv.AdapterMismatchError, match=r"adapter_config.json: adapter was trained on a different backbone.*shape"):
        pv.load_adapter(other, directory)
    assert untouched(other)
    with pytest.raises(pv.AdapterMismatchError, match=r"class timm.models.resnet.ResNet"):
        pv.load_adapter(make_host("resnet"), directory)
    more_classes = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    with pytest.raises(pv.AdapterMismatchError, match=r"head.weight: \[7, 32\] vs \[5, 32\]"):
        pv.load_adapter(more_classes, directory)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter.safetensors"])
def test_missing_file(saved, name):
    _, directory = saved
    (directory / name).unlink()
    model = make_host("vit")
    with pytest.raises(FileNotFoundError, match=f"{name}: no such file"):
        pv.load_adapter(model, directory)
    assert untouched(model)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pv.load_adapter(make_host("vit"), tmp_path / "nowhere")


def test_truncated_weights(saved):
    _, directory = saved
    path = directory / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    model = make_host("vit")
    with pytest.raises(pv.AdapterFileError, match="adapter.safetensors: contents do not match the sha256"):
        pv.load_adapter(model, directory)
    assert untouched(model)


def test_corrupt_weights_with_matching_checksum(saved):
    _, directory = saved
    path = directory / "adapter.safetensors"
    path.write_bytes(b"\x00garbage" * 4)
    meta = json.loads((directory / "adapter_config.json").read_text())
    meta["sha256"] = io._sha256(path)
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(pv.AdapterFileError, match="adapter.safetensors: not a readable safetensors file"):
        pv.load_adapter(make_host("vit"), directory)


def test_corrupt_config(saved):
    _, directory = saved
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(pv.AdapterFileError, match="adapter_config.json: not valid JSON"):
        pv.load_adapter(make_host("vit"), directory)
    (directory / "adapter_config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(pv.AdapterFileError, match="adapter_config.json: not a petl_vision adapter config"):
        pv.load_adapter(make_host("vit"), directory)


@pytest.mark.parametrize("edit, error, match", [
    (lambda method: method.update(name="magic"), pv.AdapterFileError,
     "adapter_config.json: unknown method 'magic'; registered methods"),
    # The file's tensors disagree with what the methods create (fewer SSF layers).
    (lambda method: method["config"].update(target_modules="norm"), pv.AdapterMismatchError,
     "adapter.safetensors: tensors do not fit.*unexpected"),
], ids=["unknown_method_in_config", "tensors_not_matching_methods"])
def test_bad_method_entry_fails_before_touching_the_model(saved, edit, error, match):
    _, directory = saved
    meta = json.loads((directory / "adapter_config.json").read_text())
    edit(meta["methods"][0])
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    model = make_host("vit")
    with pytest.raises(error, match=match):
        pv.load_adapter(model, directory)
    assert untouched(model)


def test_load_onto_adapted_model_is_refused(saved):
    _, directory = saved
    with pytest.raises(ValueError, match="already has methods"):
        pv.load_adapter(pv.apply(make_host("vit"), "linear"), directory)


def test_interrupted_save_keeps_previous_adapter(saved, monkeypatch):
    model, directory = saved
    x = input_for("vit")
    expected = model(x)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half-written")
        raise KeyboardInterrupt

    with torch.no_grad():
        model.blocks[0].norm1.scale.add_(5.0)
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pv.save_adapter(model, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert torch.equal(pv.load_adapter(make_host("vit"), directory)(x), expected)


def test_save_without_methods_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="call pv.apply first"):
        pv.save_adapter(make_host("vit"), tmp_path)


def test_vpt_and_lora_round_trip(tmp_path):
    for method in ["vpt", "lora"]:
        model = pv.apply(make_host("vit"), method)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)
        pv.save_adapter(model, tmp_path / method)
        fresh = pv.load_adapter(make_host("vit"), tmp_path / method)
        assert torch.equal(fresh(input_for("vit")), model(input_for("vit")))
