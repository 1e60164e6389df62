"""SPM and SaRA on a tiny UNet whose attention processors are swapped (diffusers' AttnProcessor,
AttnProcessor2_0, set_default_attn_processor, fused QKV): the same outputs before and after the swap,
before and after loading, and unload restores the original UNet exactly."""
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from test_sara import one_thread, tiny_pipeline, tiny_unet, train, unet_inputs  # noqa: F401  (one_thread: module-wide fixture)
from test_spm import sample, write_official

import petl_vision as pv
from petl_vision.core.errors import UnsupportedHostError
from petl_vision.diffusers.spm import load_spm, unload

# name -> (swap, the processor class every attention layer then has)
SWAPS = {
    "AttnProcessor": (lambda unet: unet.set_attn_processor(AttnProcessor()), AttnProcessor),
    "AttnProcessor2_0": (lambda unet: unet.set_attn_processor(AttnProcessor2_0()), AttnProcessor2_0),
    "set_default_attn_processor": (lambda unet: unet.set_default_attn_processor(), AttnProcessor),
}
TOL = dict(atol=1e-5, rtol=1e-5)


def swap(unet, name):
    set_processors, cls = SWAPS[name]
    set_processors(unet)
    assert {type(p) for p in unet.attn_processors.values()} == {cls}


def outputs(pipe):
    """(UNet output on fixed inputs (2, 4, 8, 8), 2-step pipeline latents for "a cat" (1, 4, 2, 2))."""
    with torch.no_grad():
        return pipe.unet(*unet_inputs()).sample, sample(pipe)


def assert_close(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def host_state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def assert_restored(pipe, state, base):
    """The UNet after unload: its original tensors, no petl state, and (on diffusers' default processors) the
    original outputs bit for bit."""
    assert not hasattr(pipe.unet, "petl")
    restored = pipe.unet.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], v) for k, v in state.items())
    swap(pipe.unet, "AttnProcessor2_0")
    got = outputs(pipe)
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])


def spm_files(tmp_path, unet):
    return [write_official(tmp_path / "a.safetensors", unet, "a cat", seed=1),
            write_official(tmp_path / "b.safetensors", unet, "snoopy", seed=2)]


def sara_adapter(tmp_path):
    trained = pv.apply(tiny_unet(), "sara", threshold=1e-2)
    train(trained, steps=2, lr=5e-2)
    return pv.save_adapter(trained, tmp_path / "sara")


@pytest.mark.parametrize("name", list(SWAPS))
@pytest.mark.parametrize("plugin", ["spm", "sara"])
def test_outputs_do_not_depend_on_the_processors(tmp_path, plugin, name):
    pipe = tiny_pipeline(tmp_path)
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}  # diffusers' default on torch 2
    state, base = host_state(pipe.unet), outputs(pipe)
    source = spm_files(tmp_path, pipe.unet) if plugin == "spm" else sara_adapter(tmp_path)

    def load():
        load_spm(pipe, source) if plugin == "spm" else pv.diffusers.load_sara(pipe, source)

    def remove():
        unload(pipe) if plugin == "spm" else pv.diffusers.unload_sara(pipe)

    swap(pipe.unet, name)  # swapped before loading
    assert_close(outputs(pipe), base)
    load()
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {SWAPS[name][1]}  # the plugin keeps them
    loaded = outputs(pipe)
    assert (loaded[0] - base[0]).abs().max() > 1e-2 and (loaded[1] - base[1]).abs().max() > 1e-2  # the plugin acts
    remove()
    assert_close(outputs(pipe), base)
    assert_restored(pipe, state, base)

    load()  # loaded on the default processors, swapped after loading
    assert_close(outputs(pipe), loaded)
    swap(pipe.unet, name)
    assert_close(outputs(pipe), loaded)
    swap(pipe.unet, "AttnProcessor2_0")
    assert_close(outputs(pipe), loaded)
    swap(pipe.unet, name)
    remove()  # unloaded while swapped
    assert_close(outputs(pipe), base)
    assert_restored(pipe, state, base)


def test_sara_training_gradients_do_not_depend_on_the_processors():
    """One SaRA step's gradients (sparse entries) under AttnProcessor equal those under AttnProcessor2_0."""
    grads = {}
    for name in ("AttnProcessor2_0", "AttnProcessor"):
        unet = tiny_unet()
        swap(unet, name)
        pv.apply(unet, "sara", threshold=1e-2)
        x, t, c = unet_inputs()
        unet(x, t, c).sample.square().mean().backward()
        grads[name] = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert grads["AttnProcessor"].keys() == grads["AttnProcessor2_0"].keys() and len(grads["AttnProcessor"]) > 10
    assert any(g.abs().max() > 0 for g in grads["AttnProcessor"].values())
    for n, g in grads["AttnProcessor2_0"].items():
        torch.testing.assert_close(grads["AttnProcessor"][n], g, **TOL)


needs_fusion = pytest.mark.skipif(not hasattr(tiny_unet(), "fuse_qkv_projections"), reason="diffusers without fuse_qkv_projections")


@needs_fusion
def test_spm_refuses_a_fused_unet(tmp_path):
    """unet.fuse_qkv_projections() (FusedAttnProcessor2_0 reads to_qkv / to_kv): load_spm refuses, naming the way
    out, and leaves the UNet as it was."""
    pipe = tiny_pipeline(tmp_path)
    files = spm_files(tmp_path, pipe.unet)
    pipe.unet.fuse_qkv_projections()
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    fused = outputs(pipe)
    with pytest.raises(UnsupportedHostError, match=r"fused .*unfuse_qkv_projections\(\) first"):
        load_spm(pipe, files)
    assert not hasattr(pipe.unet, "petl")
    got = outputs(pipe)
    assert torch.equal(got[0], fused[0]) and torch.equal(got[1], fused[1])
    pipe.unet.unfuse_qkv_projections()
    load_spm(pipe, files)  # unfused: accepted
    assert pipe.unet.petl.spm.membranes.keys() == {"a", "b"}


@needs_fusion
def test_spm_fused_after_loading_is_refused(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    load_spm(pipe, spm_files(tmp_path, pipe.unet))
    loaded = outputs(pipe)
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match="fused after the membranes were loaded.*unfuse_qkv_projections"):
        outputs(pipe)  # the fused copies would run without membranes: refused, not silently wrong
    pipe.unet.unfuse_qkv_projections()
    assert_close(outputs(pipe), loaded)


@needs_fusion
def test_sara_unload_while_fused_restores_the_unet(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    base = outputs(pipe)
    pv.diffusers.load_sara(pipe, sara_adapter(tmp_path))
    loaded = outputs(pipe)
    pipe.unet.fuse_qkv_projections()
    assert_close(outputs(pipe), loaded)  # holds: the fused copies are taken from the SaRA-updated weights
    with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):  # refused before anything changes
        pv.diffusers.unload_sara(pipe)
    assert_close(outputs(pipe), loaded)
    pipe.unet.unfuse_qkv_projections()
    pv.diffusers.unload_sara(pipe)
    assert_close(outputs(pipe), base)


def test_set_attention_choices(monkeypatch):
    """The trainers' `attention`: sdpa -> AttnProcessor2_0, default -> AttnProcessor, xformers -> diffusers'
    enable_xformers_memory_efficient_attention (here with the package and a GPU faked), refused without a GPU."""
    import importlib.util

    from petl_vision.train import diffusion
    from petl_vision.train.config import ConfigError

    unet = tiny_unet()
    diffusion.set_attention(unet, "default")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    diffusion.set_attention(unet, "sdpa")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    with pytest.raises(ConfigError, match="attention must be one of sdpa, xformers, default, got 'flash'"):
        diffusion.set_attention(unet, "flash")

    calls = []
    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", lambda: calls.append("xformers"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="attention=xformers: .* needs a CUDA GPU"):
        diffusion.set_attention(unet, "xformers")
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    diffusion.set_attention(unet, "xformers")
    assert calls == ["xformers"]
