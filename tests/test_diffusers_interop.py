"""Files diffusers loads: a pv diffusion LoRA through `pipe.load_lora_weights`; SPM / SaRA files that are
garbage, truncated or untrained refused with AdapterFileError naming the file; SPM / SaRA by Hub repo id
from a local Hub cache with HF_HUB_OFFLINE=1."""
import json
import shutil

import pytest
import safetensors
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_sara import one_thread, run, tiny_pipeline, tiny_unet, unet_inputs  # noqa: F401  (one_thread: module-wide fixture)
from test_spm import write_official

import petl_vision as pv
from petl_vision.diffusers import load_sara, load_spm, list_loaded
from petl_vision.train.diffusion import LORA_DEFAULTS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def train_steps(unet, steps=3, lr=1e-2):
    """AdamW steps on a noise-prediction MSE against random targets, so every trainable tensor moves."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(1)
    unet.train()
    for _ in range(steps):
        x, t, ctx = unet_inputs()
        loss = F.mse_loss(unet(x, t, ctx).sample, torch.randn(x.shape, generator=g))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return unet.eval()


def lora_modules(unet):
    return sorted(name for name, m in unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)


def test_diffusion_lora_loads_with_load_lora_weights(tmp_path):
    """The trainer's adapter (lora via peft, alpha != r) -> export -> diffusers' loader: the same UNet outputs."""
    trained = pv.apply(tiny_unet(), "lora", **{**LORA_DEFAULTS, "alpha": 8.0})
    train_steps(trained)
    expected = run(trained)
    adapter = pv.save_adapter(trained, tmp_path / "adapter")  # what finetune_diffusion.py writes

    unet = pv.load_adapter(tiny_unet(), adapter)
    path = pv.diffusers.export_diffusers_lora(unet, adapter)  # beside pv's own files
    assert path == adapter / "pytorch_lora_weights.safetensors"
    modules = lora_modules(trained)
    assert len(modules) == 32  # to_q, to_k, to_v, to_out.0 of 4 transformer blocks x (attn1, attn2)
    with safetensors.safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        up = f.get_tensor(f"unet.{modules[0]}.lora_B.weight")
    assert keys == {f"unet.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    assert (meta["unet.r"], meta["unet.lora_alpha"], meta["unet.target_modules"]) == (4, 4, modules)
    # lora_B carries the scaling alpha / r = 2, so loaders that ignore the metadata agree
    torch.testing.assert_close(up, 2 * trained.get_submodule(modules[0]).lora_B["default"].weight.detach())

    pipe = tiny_pipeline(tmp_path)
    base = run(pipe.unet)
    assert (base - expected).abs().max() > 1e-3  # the LoRA changes the output
    pipe.load_lora_weights(str(adapter))  # the folder: diffusers picks pytorch_lora_weights.safetensors
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}
    torch.testing.assert_close(run(pipe.unet), expected, atol=1e-6, rtol=1e-6)
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe.unet), base)
    # the folder still loads as a pv adapter
    torch.testing.assert_close(run(pv.load_adapter(tiny_unet(), adapter)), expected, atol=0, rtol=0)


def test_export_diffusers_lora_needs_lora(tmp_path):
    with pytest.raises(ValueError, match="holds no petl_vision method; it needs petl_vision's 'lora'"):
        pv.diffusers.export_diffusers_lora(tiny_unet(), tmp_path / "x")
    with pytest.raises(ValueError, match=r"holds \['sara'\]; it needs petl_vision's 'lora'"):
        pv.diffusers.export_diffusers_lora(pv.apply(tiny_unet(), "sara", threshold=1e-2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("official", [False, True])
def test_spm_export_loads_with_load_lora_weights(tmp_path, official):
    """export_lora of two weighted membranes, loaded from a folder by diffusers: the static membranes' outputs;
    diffusers' adapter weight 0.5 is the membranes at half their weights (faithful composition: linear in them)."""
    pipe = tiny_pipeline(tmp_path)
    files = [write_official(tmp_path / f"{n}.safetensors", pipe.unet, n, seed=s) for n, s in (("snoopy", 1), ("mickey", 2))]
    expected = run(load_spm(pipe, files, weights=[0.7, 1.3], transport=False, official=official).unet)
    pv.diffusers.export_lora(pipe, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    other = tiny_pipeline(tmp_path)
    base = run(other.unet)
    other.load_lora_weights(str(tmp_path / "lora"), adapter_name="spm")
    assert (base - expected).abs().max() > 1e-3
    # float32 rounding: official=True sums the membranes key by key, diffusers multiplies the summed factors
    torch.testing.assert_close(run(other.unet), expected, atol=1e-5, rtol=1e-5)
    if not official:
        other.set_adapters("spm", 0.5)
        half = run(load_spm(tiny_pipeline(tmp_path), files, weights=[0.35, 0.65], transport=False).unet)
        torch.testing.assert_close(run(other.unet), half, atol=1e-5, rtol=1e-5)
        assert (half - expected).abs().max() > 1e-4


def official_sara(path, unet, threshold=1e-2, seed=0):
    """An official SaRA checkpoint {'threshold': t, i: values of |W| < t} for every parameter of `unet`."""
    g = torch.Generator().manual_seed(seed)
    ckpt = {"threshold": threshold}
    for i, p in enumerate(unet.parameters()):
        ckpt[i] = torch.randn(int((p.abs() < threshold).sum()), generator=g) * 1e-2
    torch.save(ckpt, path)
    return path


def test_sara_checkpoint_with_only_a_threshold_is_refused(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    base = run(pipe.unet)
    torch.save({"threshold": 1e-2}, tmp_path / "unet.pt")
    with pytest.raises(pv.AdapterFileError, match=r"unet.pt: holds only the threshold 0.01, no trained values"):
        load_sara(pipe, tmp_path / "unet.pt")
    with pytest.raises(pv.AdapterFileError, match=r"unet.pt: holds only the threshold"):
        pv.diffusers.load_official_checkpoint(pipe.unet, tmp_path / "unet.pt")
    assert not hasattr(pipe.unet, "petl") and torch.equal(run(pipe.unet), base)


def _garbage(path):
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _truncated(path, write):
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


SARA_BAD = {
    "garbage.pt": _garbage,
    "truncated.pt": lambda p: _truncated(p, lambda q: official_sara(q, tiny_unet())),
    "tensor.pt": lambda p: torch.save(torch.zeros(3), p),
    "strings.pt": lambda p: torch.save({"threshold": 1e-2, "conv_in.weight": torch.zeros(3)}, p),
    "threshold.pt": lambda p: torch.save({"threshold": "small", 0: torch.zeros(3)}, p),
}
SARA_MESSAGES = {
    "garbage.pt": "not a readable SaRA checkpoint", "truncated.pt": "not a readable SaRA checkpoint",
    "tensor.pt": "holds Tensor", "strings.pt": "key 'conv_in.weight' is not a parameter index",
    "threshold.pt": "'threshold' is 'small'; expected a positive number",
}


SPM_BAD = {
    "garbage.safetensors": _garbage,
    "truncated.safetensors": lambda p: _truncated(p, lambda q: write_official(q, tiny_unet(), "snoopy", seed=1)),
    "garbage.pt": _garbage,
    "list.pt": lambda p: torch.save([torch.zeros(2)], p),
    "shapes.safetensors": lambda p: save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4),
                                               "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, p),
}
SPM_MESSAGES = {
    "garbage.safetensors": "not a readable safetensors SPM file (SafetensorError",
    "truncated.safetensors": "not a readable safetensors SPM file (SafetensorError",
    "garbage.pt": "not a readable torch SPM file", "list.pt": "holds a list, not a state dict",
    "shapes.safetensors": "lora_unet_x has lora_down [1, 4] and lora_up [4, 2]",
}


BAD_FILES = [(load_sara, name, SARA_BAD[name], SARA_MESSAGES[name]) for name in sorted(SARA_BAD)] + [
    (load_spm, name, SPM_BAD[name], SPM_MESSAGES[name]) for name in sorted(SPM_BAD)]


@pytest.mark.parametrize("load,name,write,message", BAD_FILES, ids=[f"{load.__name__}-{name}" for load, name, _, _ in BAD_FILES])
def test_bad_files_name_the_file(tmp_path, load, name, write, message):
    pipe = tiny_pipeline(tmp_path)
    path = tmp_path / name
    write(path)
    with pytest.raises(pv.AdapterFileError) as info:
        load(pipe, path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert not hasattr(pipe.unet, "petl")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face Hub cache in tmp_path, offline: put(repo_id, {name: source file}) adds a snapshot."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id, files):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        for name, source in files.items():
            shutil.copy(source, snapshot / name)
        return snapshot

    return put


def test_load_spm_and_sara_by_repo_id_offline(tmp_path, hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)  # repo ids are relative paths: none of them exists here
    pipe = tiny_pipeline(tmp_path)
    spm_file = write_official(tmp_path / "snoopy.safetensors", pipe.unet, "snoopy", seed=1)
    hub_cache("user/erase-snoopy", {"snoopy.safetensors": spm_file})
    local = run(load_spm(tiny_pipeline(tmp_path), spm_file, transport=False).unet)
    load_spm(pipe, "user/erase-snoopy", transport=False)
    assert [m["name"] for m in list_loaded(pipe)] == ["snoopy"]
    torch.testing.assert_close(run(pipe.unet), local, atol=0, rtol=0)

    trained = train_steps(pv.apply(tiny_unet(), "sara", threshold=1e-2), steps=2)
    pv.save_adapter(trained, tmp_path / "sara")
    hub_cache("user/sd-sara", {f.name: f for f in (tmp_path / "sara").iterdir()})
    ckpt = official_sara(tmp_path / "unet.pt", tiny_unet())
    hub_cache("user/sara-official", {"unet.pt": ckpt})
    for source, kwargs, local in [("user/sd-sara", {}, tmp_path / "sara"),
                                  ("user/sara-official", {"weight_name": "unet.pt"}, ckpt)]:
        by_id = run(load_sara(tiny_pipeline(tmp_path), source, **kwargs).unet)
        assert torch.equal(by_id, run(load_sara(tiny_pipeline(tmp_path), local).unet))
        assert not torch.equal(by_id, run(tiny_unet()))

    with pytest.raises(FileNotFoundError, match="user/missing: no local file or folder.*HF_HUB_OFFLINE is set"):
        load_spm(pipe, "user/missing", transport=False)
    with pytest.raises(FileNotFoundError, match="user/missing"):
        load_sara(tiny_pipeline(tmp_path), "user/missing")
