"""Hub: adapters load by repo id from huggingface_hub's cache (offline), push_to_hub, model cards."""
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import ROOT, input_for, make_host, perturb_trainable
from huggingface_hub import constants

import petl_vision as pv
from petl_vision.core import hub
from petl_vision.core.model_card import base_model_info

SHA = "0123456789abcdef0123456789abcdef01234567"


def outputs(model):
    with torch.no_grad():
        return model(input_for("vit"))


def hub_snapshot(cache: Path, repo_id: str, folder: Path, sha: str = SHA) -> Path:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo at commit `sha` (main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF_HUB_CACHE with HF_HUB_OFFLINE=1 (huggingface_hub reads both at import)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def saved(tmp_path):
    model = perturb_trainable(pv.apply(make_host("vit"), "ssf")).eval()
    pv.save_adapter(model, tmp_path / "adapter", metrics={"val_acc": 0.875, "epochs": 3})
    return model, tmp_path / "adapter"


def test_load_by_repo_id_from_the_offline_cache(saved, offline_cache, tmp_path, monkeypatch):
    model, folder = saved
    hub_snapshot(offline_cache, "user/ssf-vit", folder)
    monkeypatch.chdir(tmp_path)
    expected = outputs(model)
    assert torch.equal(outputs(pv.load_adapter(make_host("vit"), "user/ssf-vit")), expected)
    assert torch.equal(outputs(pv.load_adapter(make_host("vit"), "user/ssf-vit", revision=SHA)), expected)
    with pytest.raises(FileNotFoundError, match="user/ssf-vit: no local file or folder of that name, and Hub repo 'user/ssf-vit' "
                                                "at revision 'v2' could not be fetched \\(HF_HUB_OFFLINE is set"):
        pv.load_adapter(make_host("vit"), "user/ssf-vit", revision="v2")
    with pytest.raises(FileNotFoundError, match="Hub repo 'user/missing' could not be fetched"):
        pv.load_adapter(make_host("vit"), "user/missing")


def test_a_local_path_always_wins(saved, offline_cache, tmp_path, monkeypatch):
    model, folder = saved
    other = perturb_trainable(pv.apply(make_host("vit"), "ssf"), seed=5).eval()
    hub_snapshot(offline_cache, "user/ssf-vit", folder)
    monkeypatch.chdir(tmp_path)
    pv.save_adapter(other, tmp_path / "user" / "ssf-vit")  # a local folder named like the repo
    assert torch.equal(outputs(pv.load_adapter(make_host("vit"), "user/ssf-vit")), outputs(other))
    assert not torch.equal(outputs(other), outputs(model))


def test_resolve_file(tmp_path, offline_cache, monkeypatch):
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "spm.safetensors").write_bytes(b"local")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "spm.safetensors").write_bytes(b"hub")
    hub_snapshot(offline_cache, "user/erase-dog", tmp_path / "snap")
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_file("spm", "spm.safetensors") == Path("spm/spm.safetensors")
    assert hub.resolve_file("spm/spm.safetensors") == Path("spm/spm.safetensors")
    assert hub.resolve_file("user/erase-dog", "spm.safetensors").read_bytes() == b"hub"
    assert hub.resolve_file("user/erase-dog", "spm.safetensors", revision=SHA).read_bytes() == b"hub"
    with pytest.raises(FileNotFoundError, match="'other.safetensors' of Hub repo 'user/erase-dog' could not be fetched"):
        hub.resolve_file("user/erase-dog", "other.safetensors")
    with pytest.raises(FileNotFoundError, match="spm/nope.safetensors: no such file in the folder spm"):
        hub.resolve_file("spm", "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing: no such file or folder \\(nor a Hub repo id"):
        hub.resolve_file("./nothing", "x")
    assert [hub.is_repo_id(s) for s in ["user/repo", "spm", "./x", "a/b/c", "../x", "user/re--po"]] == [True, False, False, False, False, False]


def test_hub_cache_and_offline_mode_from_the_environment(saved, tmp_path):
    """The real environment variables, read by huggingface_hub at import in a fresh process."""
    model, folder = saved
    cache = tmp_path / "env_cache"
    hub_snapshot(cache, "user/ssf-vit", folder)
    torch.save(outputs(model), tmp_path / "expected.pt")
    assert not torch.allclose(outputs(make_host("vit")), outputs(model), atol=1e-3)
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); from conftest import make_host, input_for; import petl_vision as pv\n"
        "m = pv.load_adapter(make_host('vit'), 'user/ssf-vit')\n"
        f"torch.testing.assert_close(m(input_for('vit')), torch.load({str(tmp_path / 'expected.pt')!r}), rtol=0, atol=1e-6)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


class FakeApi:
    """Stands in for huggingface_hub.HfApi (no network): records calls and the uploaded files."""

    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, branch, exist_ok=False):
        FakeApi.calls.append(("create_branch", repo_id, branch, exist_ok))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        FakeApi.calls.append(("upload_folder", repo_id, files, kwargs))
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{SHA}")


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_push_to_hub(fake_api, tmp_path, offline_cache):
    model = perturb_trainable(pv.apply(make_host("vit"), "lora")).eval()
    url = pv.push_to_hub(model, "user/lora-vit", metrics={"val_acc": 0.5}, private=True, revision="dev", token="t")
    assert url == f"https://huggingface.co/user/lora-vit/commit/{SHA}"
    (_, repo, private, exist_ok), branch, (_, repo2, files, kwargs) = fake_api.calls
    assert (repo, private, exist_ok, repo2) == ("user/lora-vit", True, True, "user/lora-vit")
    assert branch == ("create_branch", "user/lora-vit", "dev", True)
    assert sorted(files) == ["README.md", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors", "petl_adapter.json"]
    assert kwargs["revision"] == "dev" and kwargs["ignore_patterns"] == [".*"]
    card = files["README.md"].decode()
    assert 'pv.load_adapter(model, "user/lora-vit")' in card and 'PeftModel.from_pretrained(model, "user/lora-vit")' in card
    assert "| val_acc | 0.5 |" in card
    # what was uploaded loads back by repo id
    upload = tmp_path / "uploaded"
    upload.mkdir()
    for name, data in files.items():
        (upload / name).write_bytes(data)
    hub_snapshot(offline_cache, "user/lora-vit", upload)
    assert torch.equal(outputs(pv.load_adapter(make_host("vit"), "user/lora-vit")), outputs(model))


def test_save_adapter_with_push_to_hub(fake_api, saved, tmp_path):
    model, _ = saved
    pv.save_adapter(model, tmp_path / "b", push_to_hub="user/ssf-vit", commit_message="epoch 3")
    (_, repo, *_), (_, _, files, kwargs) = fake_api.calls
    assert repo == "user/ssf-vit" and kwargs["commit_message"] == "epoch 3"
    assert sorted(files) == sorted(p.name for p in (tmp_path / "b").iterdir())


def test_model_card_names_the_base_model(saved):
    _, folder = saved
    card = (folder / "README.md").read_text()
    assert "base_model: timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in card
    assert "- Base model: timm `vit_tiny_patch16_224` (tag `augreg_in21k_ft_in1k`)" in card
    assert "- Method(s): `ssf`" in card
    trainable = pv.summary(pv.load_adapter(make_host("vit"), folder)).trainable
    assert f"- Trainable parameters: {trainable:,} of " in card
    assert "| val_acc | 0.875 |" in card and "| epochs | 3 |" in card
    assert 'timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True' in card


def test_base_model_of_diffusers_and_given_names(tmp_path):
    class UNet(torch.nn.Module):  # stands in for a diffusers model: its config records where it came from
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(_name_or_path="stabilityai/sd-turbo")
            self.block = torch.nn.Sequential(torch.nn.Linear(4, 4))

    assert base_model_info(UNet()) == {"library": "test_hub", "name": "stabilityai/sd-turbo", "hf_hub_id": "stabilityai/sd-turbo"}
    assert base_model_info(torch.nn.Linear(2, 2)) is None
    model = perturb_trainable(pv.apply(make_host("vit"), "ssf"))
    pv.save_adapter(model, tmp_path / "a", base_model="org/my-vit")
    meta = pv.core.io.read_adapter(tmp_path / "a" / "adapter.safetensors")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "base_model: org/my-vit" in card and "org/my-vit" in (tmp_path / "a" / "petl_adapter.json").read_text()
    assert meta[1]["class"] == "timm.models.vision_transformer.VisionTransformer"


def test_hub_arguments_without_a_repo_are_refused(saved, tmp_path):
    model, _ = saved
    with pytest.raises(TypeError, match=r"save_adapter: unexpected argument\(s\) \['private'\]; with push_to_hub="):
        pv.save_adapter(model, tmp_path / "c", private=True)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['privat'\]"):
        pv.save_adapter(model, tmp_path / "c", push_to_hub="user/x", privat=True)
    assert not (tmp_path / "c").exists()
