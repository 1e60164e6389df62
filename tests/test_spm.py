"""SPM membranes: targets, counts (SD 1.4), merge, files, diffusers LoRA export, plugin, Facilitated Transport."""
import copy
import math

import pytest
import safetensors
import torch
import torch.nn.functional as F
from diffusers import Transformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from conftest import perturb_trainable as perturb
from test_sara import one_thread, tiny_pipeline, tiny_unet, unet_inputs  # noqa: F401  (one_thread: module-wide fixture)
from torch import nn

import petl_vision as pv
from petl_vision.diffusers import spm_format
from petl_vision.diffusers.spm import disabled, list_loaded, load_spm, set_transport, set_weights, transport_strengths, unload
from petl_vision.methods import spm as spm_method

# Stable Diffusion 1.4's unet/config.json (CompVis/stable-diffusion-v1-4).
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)


def transformer_layers(unet):
    """Official key -> layer, found independently of the library: Linear/Conv2d inside Transformer2DModel."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            for child, layer in module.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    out["lora_unet_" + f"{name}.{child}".replace(".", "_")] = layer
    return out


def write_official(path, unet, prompts, seed, scale=0.3):
    """An SPM file in the official layout, written by hand: random down/up, alpha 1.0, official metadata."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, layer in transformer_layers(unet).items():
        conv = isinstance(layer, nn.Conv2d)
        down = (1, layer.in_channels, *layer.kernel_size) if conv else (1, layer.in_features)
        up = (layer.out_channels, 1, 1, 1) if conv else (layer.out_features, 1)
        tensors[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * scale
        tensors[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * scale
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(tensors, path, {"prompts": prompts, "rank": "1", "alpha": "1.0"})
    return path


def add_official(unet, files_and_strengths, official=False):
    """A copy of `unet` with the membranes folded in by hand: W += c U D (faithful) or the key-by-key sum."""
    unet = copy.deepcopy(unet)
    tensors = [(load_file(f), c) for f, c in files_and_strengths]
    with torch.no_grad():
        for key, layer in transformer_layers(unet).items():
            downs = [t[f"{key}.lora_down.weight"].flatten(1) for t, _ in tensors]
            ups = [t[f"{key}.lora_up.weight"].flatten(1) for t, _ in tensors]
            cs = [c for _, c in tensors]
            if official:
                delta = sum(c * u for c, u in zip(cs, ups)) @ sum(c * d for c, d in zip(cs, downs))
            else:
                delta = sum(c * u @ d for c, u, d in zip(cs, ups, downs))
            layer.weight += delta.reshape(layer.weight.shape)
    return unet


def run(unet, batch=None):
    with torch.no_grad():
        return unet(*(batch or unet_inputs())).sample


def sample(pipe, prompt="a cat", **kw):
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0)) | kw
    return pipe(prompt, **kw).images


def encode(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, pipe.text_encoder(ids)[0]


def expected_strength(pipe, prompt, concept):
    """g = max(cos(flat E(prompt), flat E(concept)), |T(prompt) & T(concept)| / |T(concept)|), by hand."""
    (pid, cid), (pe, ce) = zip(*[(i[0], e[0]) for i, e in (encode(pipe, [prompt]), encode(pipe, [concept]))])
    special = {pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id, pipe.tokenizer.unk_token_id}
    tp, tc = set(pid.tolist()) - special, set(cid.tolist()) - special
    return max(F.cosine_similarity(pe.flatten(), ce.flatten(), dim=0).item(), len(tp & tc) / len(tc))


def test_targets_init_and_count():
    class MyLinear(nn.Linear):  # a Linear subclass (as some diffusers versions use) is matched by type
        pass

    unet = tiny_unet()
    old = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q = MyLinear(old.in_features, old.out_features, bias=False)
    base = run(unet)
    layers = transformer_layers(unet)
    assert len(layers) == 48 and list(spm_method.target_layers(unet)) == list(layers)
    pv.apply(unet, "spm")
    formula = sum((l.in_channels * math.prod(l.kernel_size) + l.out_channels) if isinstance(l, nn.Conv2d) else l.in_features + l.out_features
                  for l in layers.values())
    assert pv.summary(unet).trainable == pv.summary(unet).by_method["spm"] == formula == 2816
    membranes = unet.petl.spm.membranes["default"]
    for key, layer in layers.items():
        fan_in = membranes[key].lora_down.weight[0].numel()
        assert membranes[key].lora_down.weight.abs().max() <= 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5))
        assert torch.all(membranes[key].lora_up.weight == 0) and membranes[key].alpha.item() == 1.0
    assert torch.equal(run(unet), base)  # up = 0: the membrane starts closed
    assert all(not p.requires_grad for n, p in unet.named_parameters() if not n.startswith("petl."))


def test_sd14_parameter_count():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
    pv.apply(unet, "spm")
    layers = transformer_layers(unet)
    # Per Transformer2DModel of width C (cross-attention 768, GEGLU 8C / 4C):
    # proj_in, proj_out 2C each; attn1 4 x 2C; attn2 q, out 2C, k, v C + 768; ff 9C + 5C  ->  32 C + 1536.
    widths = [m.proj_in.in_channels for m in unet.modules() if isinstance(m, Transformer2DModel)]
    assert sorted(widths) == [320] * 5 + [640] * 5 + [1280] * 6 and len(layers) == 16 * 12
    assert pv.summary(unet).trainable == sum(32 * c + 1536 for c in widths) == 423_936  # "about 424k" (1.7 MB fp32)


def test_unsupported_hosts():
    from conftest import make_host

    for model, message in ((make_host("vit"), "spm.*needs a diffusers UNet2DConditionModel.*got"), (nn.Sequential(nn.Linear(4, 4)), "Sequential")):
        with pytest.raises(pv.UnsupportedHostError, match=message):
            pv.apply(model, "spm")
        assert not hasattr(model, "petl")
    with pytest.raises(ValueError, match="membranes: invalid names"):
        pv.SPMConfig(membranes=("a.b",))


@pytest.mark.parametrize("official", [False, True])
def test_gradients_save_load_merge(tmp_path, official):
    unet = perturb(pv.apply(tiny_unet(), "spm", membranes=("a", "b"), prompts=("snoopy", "mickey"), official_transport=official))
    unet.train()
    unet(*unet_inputs()).sample.square().mean().backward()
    for name, p in unet.named_parameters():
        assert (p.grad is not None) == p.requires_grad == name.startswith("petl.spm."), name
    unet.eval()
    expected = run(unet)
    pv.save_adapter(unet, tmp_path / "a")
    fresh = pv.load_adapter(tiny_unet(), tmp_path / "a")
    assert torch.equal(run(fresh), expected) and fresh.petl.spm.config.prompts == ("snoopy", "mickey")
    by_hand = {}
    for name in ("a", "b"):
        save_file({k: v.detach() for k, v in spm_format.membrane_state_dict(unet, name).items()}, tmp_path / f"{name}.safetensors")
        by_hand[name] = tmp_path / f"{name}.safetensors"
    reference = add_official(tiny_unet(), [(by_hand["a"], 1.0), (by_hand["b"], 1.0)], official)
    torch.testing.assert_close(run(reference), expected, atol=1e-5, rtol=1e-5)
    merged = pv.merge(unet)
    assert type(merged) is UNet2DConditionModel and not hasattr(merged, "petl")
    assert list(merged.state_dict()) == list(tiny_unet().state_dict())
    torch.testing.assert_close(run(merged), expected, atol=1e-5, rtol=1e-5)


def test_official_format_round_trip(tmp_path):
    trained = perturb(pv.apply(tiny_unet(), "spm", prompts=("snoopy",)))
    path = spm_format.save_spm(trained, tmp_path / "snoopy.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"prompts": "snoopy", "rank": "1", "alpha": "1.0"}
    tensors = load_file(path)
    keys = transformer_layers(tiny_unet())
    assert sorted(tensors) == sorted(f"{k}.{s}" for k in keys for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert all(torch.equal(tensors[k], v) for k, v in spm_format.membrane_state_dict(trained).items())

    pipe = tiny_pipeline(tmp_path)
    load_spm(pipe, path, transport=False)
    again = spm_format.save_spm(pipe, tmp_path / "again.safetensors")
    loaded = load_file(again)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safetensors.safe_open(again, framework="pt") as f:
        assert f.metadata() == {"prompts": "snoopy", "rank": "1", "alpha": "1.0"}
    assert torch.equal(run(pipe.unet), run(trained.eval()))

    # A file in the official layout, written by hand, loads into the right layers.
    hand = write_official(tmp_path / "hand.safetensors", pipe.unet, "snoopy,charlie brown", seed=5)
    unload(pipe)
    load_spm(pipe, hand, transport=False)
    assert list_loaded(pipe)[0] | {"params": 0} == {"name": "hand", "prompts": "snoopy,charlie brown", "weight": 1.0, "rank": 1,
                                                    "params": 0, "active": True, "transport": False}
    torch.testing.assert_close(run(pipe.unet), run(add_official(tiny_pipeline(tmp_path).unet, [(hand, 1.0)])), atol=1e-5, rtol=1e-5)
    unload(pipe)

    fewer = UNet2DConditionModel.from_config({**tiny_unet().config, "down_block_types": ("DownBlock2D", "DownBlock2D")})
    with pytest.raises(ValueError, match=r"hand.safetensors: does not fit this UNet2DConditionModel: missing 0 layers .*unexpected 12"):
        load_spm(fewer, hand, transport=False)
    other = UNet2DConditionModel.from_config({**tiny_unet().config, "block_out_channels": (16, 24)})
    with pytest.raises(ValueError, match=r"hand.safetensors: lora_unet_mid_block_attentions_0_\w+.lora_\w+.weight has shape .*32.*needs .*24"):
        load_spm(other, hand, transport=False)
    bare = tiny_unet()
    with pytest.raises(ValueError, match="a bare UNet takes transport=False"):
        load_spm(bare, hand)
    save_file({"lora_te_text_model.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "te.safetensors")
    with pytest.raises(ValueError, match=r"te.safetensors: keys \['lora_te_text_model.lora_down.weight'\] are not SPM keys"):
        load_spm(pipe, tmp_path / "te.safetensors")
    assert not any(hasattr(m, "petl") for m in (other, bare, fewer, pipe.unet))


@pytest.mark.parametrize("official", [False, True])
def test_diffusers_lora_export_matches_static_membranes(tmp_path, official):
    pipe = tiny_pipeline(tmp_path)
    a = write_official(tmp_path / "a.safetensors", pipe.unet, "snoopy", seed=1)
    b = write_official(tmp_path / "b.safetensors", pipe.unet, "mickey", seed=2)
    load_spm(pipe, [a, b], weights=[0.7, 1.3], transport=False, official=official)
    expected = run(pipe.unet)
    torch.testing.assert_close(expected, run(add_official(tiny_unet(), [(a, 0.7), (b, 1.3)], official)), atol=1e-5, rtol=1e-5)
    lora = spm_format.export_lora(pipe, tmp_path / "lora.safetensors")
    other = tiny_pipeline(tmp_path)
    other.load_lora_weights(str(lora))  # diffusers' own loader (peft)
    torch.testing.assert_close(run(other.unet), expected, atol=1e-5, rtol=1e-5)  # peft's LoRA sums in another order


def test_unload_disabled_weights(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    hooks = len(pipe.text_encoder._forward_hooks), len(pipe.unet._forward_pre_hooks)
    base, base_unet = sample(pipe), run(pipe.unet)
    a = write_official(tmp_path / "a.safetensors", pipe.unet, "snoopy", seed=1)
    b = write_official(tmp_path / "b.safetensors", pipe.unet, "mickey", seed=2)
    load_spm(pipe, [a, b])
    assert "encode_prompt" in pipe.__dict__ and [m["name"] for m in list_loaded(pipe)] == ["a", "b"]
    with_both = sample(pipe)
    assert not torch.allclose(with_both, base)
    with disabled(pipe):
        assert torch.equal(sample(pipe), base)
    with disabled(pipe, "b"):
        only_a = sample(pipe)
    with pytest.raises(ValueError, match="'a' is already loaded"):
        load_spm(pipe, a)
    set_weights(pipe, {"a": 0.0, "b": 0.0})
    assert torch.equal(sample(pipe), base)  # weight 0 adds exact zeros
    set_weights(pipe, 1.0)
    assert torch.equal(sample(pipe), with_both)
    unload(pipe, "b")
    assert [m["name"] for m in list_loaded(pipe)] == ["a"] and pipe.unet.petl.spm.config.prompts == ("snoopy",)
    torch.testing.assert_close(sample(pipe), only_a, atol=1e-6, rtol=1e-6)
    unload(pipe)
    assert torch.equal(sample(pipe), base) and torch.equal(run(pipe.unet), base_unet)  # bit for bit
    assert not hasattr(pipe.unet, "petl") and "encode_prompt" not in pipe.__dict__ and "maybe_free_model_hooks" not in pipe.__dict__
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags and list_loaded(pipe) == []
    assert (len(pipe.text_encoder._forward_hooks), len(pipe.unet._forward_pre_hooks)) == hooks
    unload(pipe)  # no-op


def test_transport_per_sample_strengths(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    concept = write_official(tmp_path / "snoopy.safetensors", pipe.unet, "snoopy", seed=1)
    load_spm(pipe, concept)
    prompts = ["snoopy", "a red car"]
    g = [expected_strength(pipe, p, "snoopy") for p in prompts]
    assert g[0] == pytest.approx(1.0) and g[1] < 0.95

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mixed = sample(pipe, prompts, latents=latents)
    torch.testing.assert_close(transport_strengths(pipe)["snoopy"], torch.tensor(g), atol=1e-5, rtol=0)
    assert pipe.unet.petl.spm.strengths is None  # cleared at the end of the call: direct UNet calls are static
    for i, prompt in enumerate(prompts):  # each sample of the mixed batch got its own strength
        alone = sample(pipe, prompt, latents=latents[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    set_transport(pipe, False)
    static = sample(pipe, prompts, latents=latents)
    assert torch.allclose(static[:1], mixed[:1], atol=1e-5) and not torch.allclose(static[1:], mixed[1:], atol=1e-4)
    set_weights(pipe, g[1])
    torch.testing.assert_close(sample(pipe, prompts[1], latents=latents[1:]), mixed[1:], atol=1e-5, rtol=1e-5)
    set_weights(pipe, 1.0)
    set_transport(pipe, True)

    sample(pipe, prompts, num_images_per_prompt=2, latents=latents.repeat_interleave(2, 0))
    torch.testing.assert_close(transport_strengths(pipe)["snoopy"], torch.tensor(g).repeat_interleave(2), atol=1e-5, rtol=0)
    _, embeds = encode(pipe, prompts)  # prompt_embeds= calls: the cosine term only
    pipe(prompt_embeds=embeds, num_inference_steps=1, height=16, width=16, output_type="latent")
    _, concept_embeds = encode(pipe, ["snoopy"])
    cos = F.cosine_similarity(embeds.flatten(1), concept_embeds.flatten(1)).tolist()
    torch.testing.assert_close(transport_strengths(pipe)["snoopy"], torch.tensor(cos), atol=1e-5, rtol=0)


@pytest.mark.parametrize("official", [False, True])
def test_transport_official_and_faithful_composition(tmp_path, official):
    pipe = tiny_pipeline(tmp_path)
    a = write_official(tmp_path / "a.safetensors", pipe.unet, "snoopy", seed=1)
    b = write_official(tmp_path / "b.safetensors", pipe.unet, "a red car,mickey", seed=2)
    load_spm(pipe, [a, b], weights=[0.5, 1.0], official=official)
    prompt = "snoopy and a dog"
    ga = expected_strength(pipe, prompt, "snoopy")  # 1: every token of "snoopy" is in the prompt
    gb = max(expected_strength(pipe, prompt, c) for c in ("a red car", "mickey"))  # a membrane's g: max over its prompts
    assert ga == 1.0 and 0 < gb < 1
    states = pipe.encode_prompt(prompt, "cpu", 1, False)[0]  # sets the strengths, as inside pipe(...)
    torch.testing.assert_close(transport_strengths(pipe)["b"], torch.tensor([gb]), atol=1e-5, rtol=0)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    out = run(pipe.unet, (x, t, states.expand(2, -1, -1)))
    pipe.unet.petl.spm.strengths = None
    # official: every tensor of a membrane times c = weight * g, summed key by key (c^2, cross terms);
    # faithful: each membrane's update times c once.
    batch = (x, t, states.expand(2, -1, -1))
    reference = add_official(tiny_unet(), [(a, 0.5 * ga), (b, gb)], official)
    torch.testing.assert_close(out, run(reference, batch), atol=1e-5, rtol=1e-5)
    other_form = add_official(tiny_unet(), [(a, 0.5 * ga), (b, gb)], not official)
    assert (out - run(other_form, batch)).abs().max() > 1e-2


@pytest.mark.parametrize("official", [False, True])
def test_official_composition_takes_the_first_files_alpha(tmp_path, official):
    """Files of different alpha: each membrane's own alpha, or (official) the first file's for all."""
    unet = tiny_unet()
    a = write_official(tmp_path / "a.safetensors", unet, "snoopy", seed=1)
    b = write_official(tmp_path / "b.safetensors", unet, "mickey", seed=2)
    tensors = load_file(b)
    save_file({k: torch.tensor(4.0) if k.endswith(".alpha") else v for k, v in tensors.items()}, tmp_path / "b4.safetensors",
              {"prompts": "mickey", "rank": "1", "alpha": "4.0"})
    save_file({k: v * 4 if k.endswith("lora_up.weight") else v for k, v in tensors.items()}, tmp_path / "b_up4.safetensors")
    load_spm(unet, [a, tmp_path / "b4.safetensors"], official=official, transport=False)
    # official: alpha 1 (a's) for both, so b4 acts as b; ours: b4's alpha 4 scales its update, as b's up x 4.
    expected = add_official(tiny_unet(), [(a, 1.0), (b if official else tmp_path / "b_up4.safetensors", 1.0)], official)
    torch.testing.assert_close(run(unet), run(expected), atol=1e-5, rtol=1e-5)


def test_deepcopy_after_a_training_forward():
    """A copy (and pv.merge of a copy) right after a training step: the per-forward state and caches,
    which hold that forward's graph tensors, are left behind (deepcopy refused non-leaf tensors)."""
    unet = perturb(pv.apply(tiny_unet(), "spm", membranes=("a", "b"), prompts=("snoopy", "mickey"))).train()
    set_weights(unet, {"a": 0.5})  # a static weight: the layers' scaled up-projections are graph tensors
    unet(*unet_inputs()).sample.square().mean().backward()
    assert unet.petl.spm.run is not None
    twin = copy.deepcopy(unet).eval()
    assert twin.petl.spm.run is None and twin.petl.spm._cache == {}
    torch.testing.assert_close(run(twin), run(unet.eval()), atol=0, rtol=0)
    torch.testing.assert_close(run(pv.merge(copy.deepcopy(unet))), run(unet), atol=1e-5, rtol=1e-5)
