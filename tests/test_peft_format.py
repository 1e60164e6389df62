"""peft interop: pv's LoRA folders load with peft.PeftModel, folders peft wrote load with pv."""
import json

import pytest
import safetensors.torch
import torch
from conftest import input_for, make_host, perturb_trainable
from peft import LoraConfig, PeftModel, get_peft_model

import petl_vision as pv

pytestmark = pytest.mark.usefixtures("one_thread")


def outputs(model, host="vit"):
    with torch.no_grad():
        return model(input_for(host))


@pytest.mark.parametrize("host, overrides", [
    ("vit", {}),
    ("vit", {"train_head": False, "r": 4, "alpha": 16.0}),
    ("resnet", {}),  # conv LoRA (peft's Conv2d layer)
])
def test_pv_lora_loads_with_peft(tmp_path, host, overrides):
    model = perturb_trainable(pv.apply(make_host(host), "lora", **overrides)).eval()
    pv.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == model.petl.applied[0].config.r
    assert config["modules_to_save"] == (["fc"] if host == "resnet" else ["head"] if overrides.get("train_head", True) else None)
    keys = safetensors.torch.load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in keys)
    assert sum(k.endswith("lora_A.weight") for k in keys) == sum(k.endswith("lora_A.default.weight") for k in pv.core.io.adapter_state_dict(model))
    peft_model = PeftModel.from_pretrained(make_host(host), tmp_path / "a").eval()
    expected = outputs(model, host)
    assert not torch.allclose(outputs(make_host(host), host), expected, atol=1e-3)  # the adapter changes the outputs
    torch.testing.assert_close(outputs(peft_model, host), expected, rtol=0, atol=1e-6)


def test_lora_with_linear_probe_is_written_for_peft(tmp_path):
    model = pv.apply(make_host("vit"), "lora", train_head=False)
    perturb_trainable(pv.apply(model, "linear")).eval()
    pv.save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(make_host("vit"), tmp_path / "a").eval()
    torch.testing.assert_close(outputs(peft_model), outputs(model), rtol=0, atol=1e-6)


def test_no_peft_files_when_peft_cannot_represent_it(tmp_path):
    lora = perturb_trainable(pv.apply(make_host("vit"), "lora"))
    pv.save_adapter(lora, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    for method in ["bitfit", "ssf"]:  # bias training / scale-shift: peft's LoRA has no place for them
        model = perturb_trainable(pv.apply(pv.apply(make_host("vit"), method), "lora")).eval()
        pv.save_adapter(model, tmp_path / "a")  # over the LoRA-only folder: its peft files go
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "adapter.safetensors", "petl_adapter.json"]
        torch.testing.assert_close(outputs(pv.load_adapter(make_host("vit"), tmp_path / "a")), outputs(model), rtol=0, atol=0)


def peft_written(tmp_path, **config):
    host = make_host("vit")
    model = get_peft_model(host, LoraConfig(**config))
    perturb_trainable(model).eval()
    model.save_pretrained(tmp_path / "peft")
    return outputs(model), tmp_path / "peft"


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"]),
    dict(r=2, lora_alpha=2, target_modules=r".*\.attn\.(qkv|proj)"),
])
def test_pv_loads_folders_peft_wrote(tmp_path, config):
    expected, directory = peft_written(tmp_path, **config)
    model = pv.load_adapter(make_host("vit"), directory)
    torch.testing.assert_close(outputs(model), expected, rtol=0, atol=1e-6)
    lora = model.petl.applied[0].config
    assert (lora.r, lora.alpha, lora.train_head) == (config["r"], config["lora_alpha"], "modules_to_save" in config)
    assert pv.summary(model).trainable == sum(v.numel() for v in safetensors.torch.load_file(directory / "adapter_model.safetensors").values())


def test_peft_options_pv_cannot_follow_are_named(tmp_path):
    _, directory = peft_written(tmp_path, r=4, lora_alpha=8, target_modules=["qkv"])
    config = json.loads((directory / "adapter_config.json").read_text())
    for field, value in [("use_dora", True), ("rank_pattern", {"qkv": 2}), ("peft_type", "IA3")]:
        bad = {**config, field: value}
        (directory / "adapter_config.json").write_text(json.dumps(bad))
        model = make_host("vit")
        with pytest.raises(pv.AdapterFileError, match=f"adapter_config.json: field '{field}' is"):
            pv.load_adapter(model, directory)
        assert not hasattr(model, "petl")
    (directory / "adapter_config.json").write_text(json.dumps({**config, "r": "four"}))
    with pytest.raises(pv.AdapterFileError, match="adapter_config.json: method 'lora': field 'r' must be an integer, got 'four'"):
        pv.load_adapter(make_host("vit"), directory)


def test_peft_folder_for_another_backbone(tmp_path):
    _, directory = peft_written(tmp_path, r=4, lora_alpha=8, target_modules=["qkv"])
    with pytest.raises(pv.AdapterMismatchError, match="adapter_model.safetensors: the saved methods do not fit this model: lora: target_modules=.* matches no nn.Linear or nn.Conv2d of ResNet"):
        pv.load_adapter(make_host("resnet"), directory)
