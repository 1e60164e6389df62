"""SPM, SaRA and LoRA on the UNet2DConditionModel layouts users have, beyond the SD 1.x one of test_sara.

Tiny random UNets of every layout: SD 2.x (linear projections, per-block head dims, upcast attention),
SDXL (several transformer layers per block, text_time added conditioning), per-block cross-attention
dims, encoder_hid_dim, class embeddings, no mid block, channels_last. Plus the pipeline plugins on SD 2.x-
and SDXL-style pipelines, next to a diffusers LoRA (loaded and unloaded in either order, fused), and
the layouts SPM refuses.
"""
import copy

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from conftest import perturb_trainable as perturb
from test_sara import one_thread, tiny_pipeline, write_tokenizer  # noqa: F401  (one_thread: module-wide fixture)
from test_spm import transformer_layers, write_official
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import petl_vision as pv
import petl_vision.diffusers  # noqa: F401  (pv.diffusers)
from petl_vision.diffusers import evaluate, spm_format
from petl_vision.diffusers.spm import disabled, load_spm, transport_strengths, unload
from petl_vision.methods import sara
from petl_vision.methods import spm as spm_method

# pipe.load_lora_weights after SaRA: peft's config-derived targets also name-match SaRA's mirror tree
# (petl.sara.<layer path>); peft injects from the state dict alone and only warns about the difference.
pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")

BASE = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), use_linear_projection=True, attention_head_dim=(2, 4),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
LAYOUTS = {
    "sd1": {},
    "sd2": dict(use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True),
    "sdxl": SDXL,
    "cross_attention_dim_list": dict(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                                     cross_attention_dim=(32, 32)),
    "encoder_hid_dim": dict(encoder_hid_dim=24),
    "class_embed": dict(class_embed_type="timestep"),
    "no_mid_block": dict(mid_block_type=None),
    "channels_last": {},
}
# Target layers by hand: a Transformer2DModel has proj_in, proj_out and, per BasicTransformerBlock, attn1 and
# attn2 (to_q, to_k, to_v, to_out.0) and ff (net.0.proj, net.2): 2 + 10 per transformer layer.
#   sd1 and alike: 4 Transformer2DModels (down 1, mid 1, up 2) of 1 layer       -> 4 * 12 = 48
#   sdxl: down 1 x 2 layers, mid 1 x 2 (the last block's count), up 2 x 2 layers -> 4 * 2 + 8 * 10 = 88
#   cross_attention_dim_list: down 2, mid 1, up 4 Transformer2DModels            -> 7 * 12 = 84
#   no_mid_block: down 1, up 2                                                  -> 3 * 12 = 36
TARGETS = {"sdxl": 88, "cross_attention_dim_list": 84, "no_mid_block": 36}


def build(layout, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**BASE, **LAYOUTS[layout]}).eval()
    return unet.to(memory_format=torch.channels_last) if layout == "channels_last" else unet


def inputs(unet, seed=0):
    """(args, kwargs) of a UNet forward on a batch of 2: the extra conditioning its layout needs."""
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    context = config.encoder_hid_dim or 32
    x = torch.randn(2, 4, 8, 8, generator=g)
    if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
        x = x.to(memory_format=torch.channels_last)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    if config.class_embed_type == "timestep":
        kwargs["class_labels"] = torch.tensor([3, 700])
    return (x, torch.tensor([10, 500]), torch.randn(2, 5, context, generator=g)), kwargs


def run(unet, seed=0):
    args, kwargs = inputs(unet, seed)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def frozen(model):
    """Every parameter frozen: F.linear takes other kernels for a weight that requires grad (even under
    no_grad), so bit-for-bit comparisons need the same flags on both sides."""
    return model.requires_grad_(False)


def host_weights(model):
    """Host tensor name -> value, read through SaRA's parametrizations and peft's base_layer."""
    return {k.replace("parametrizations.", "").replace(".original", "").replace(".base_layer", ""): v.detach().clone()
            for k, v in model.state_dict().items() if not k.startswith("petl.") and "lora_" not in k}


def train(unet, steps=2, lr=1e-2, regularise=False):
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    unet.train()
    for step in range(steps):
        args, kwargs = inputs(unet, step + 1)
        loss = unet(*args, **kwargs).sample.square().mean()
        (loss + sara.regularization_loss(unet) if regularise else loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    unet.eval()
    return optimizer


# ----------------------------------------------------------------------------- SPM, SaRA, LoRA per layout


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_spm_on_layout(tmp_path, layout):
    unet = build(layout)
    base = run(unet)
    layers = transformer_layers(unet)
    assert len(layers) == TARGETS.get(layout, 48) and list(spm_method.target_layers(unet)) == list(layers)
    pv.apply(unet, "spm")
    size = {nn.Linear: lambda l: l.in_features + l.out_features, nn.Conv2d: lambda l: l.in_channels * l.kernel_size[0] * l.kernel_size[1] + l.out_channels}
    assert pv.summary(unet).trainable == sum(size[type(l)](l) for l in layers.values())
    assert torch.equal(run(unet), base)  # lora_up = 0: closed
    perturb(unet)
    unet.train()
    args, kwargs = inputs(unet)
    unet(*args, **kwargs).sample.square().mean().backward()
    membranes = unet.petl.spm.membranes["default"]
    assert all(m.lora_down.weight.grad.abs().sum() > 0 and m.lora_up.weight.grad.abs().sum() > 0 for m in membranes.values())
    frozen(unet.eval())
    expected = run(unet)
    assert not torch.allclose(expected, base, atol=1e-3)

    # official file: keys of the hand enumeration, round trip bit for bit
    path = spm_format.save_spm(unet, tmp_path / "concept.safetensors")
    assert sorted(load_file(path)) == sorted(f"{k}.{s}" for k in layers for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    loaded = load_spm(build(layout), path, transport=False)
    assert torch.equal(run(loaded), expected)
    # diffusers LoRA export, loaded by diffusers' own adapter loader on a bare UNet
    lora = load_file(spm_format.export_lora(unet, tmp_path / "lora.safetensors"))
    assert sorted(lora) == sorted(f"unet.{n}.lora_{ab}.weight" for n, m in unet.named_modules() if m in set(layers.values()) for ab in "AB")
    other = build(layout)
    other.load_lora_adapter(lora, prefix="unet", adapter_name="membrane")
    torch.testing.assert_close(run(frozen(other)), expected, atol=1e-5, rtol=1e-5)
    # merge equals unmerged; unload gives back the UNet bit for bit
    merged = pv.merge(unet)
    assert type(merged) is UNet2DConditionModel and not hasattr(merged, "petl")
    torch.testing.assert_close(run(merged), expected, atol=1e-5, rtol=1e-5)
    if layout == "channels_last":
        assert all(l.weight.is_contiguous(memory_format=torch.channels_last) for l in layers.values() if isinstance(l, nn.Conv2d))
    unload(loaded)
    assert torch.equal(run(loaded), base) and not hasattr(loaded, "petl")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sara_on_layout(tmp_path, layout):
    unet = build(layout)
    before, base = host_weights(unet), run(unet)
    pv.apply(unet, "sara", threshold=1e-2, rank_min_dim=0)
    deltas = sara.sara_module(unet).deltas()
    optimizer = train(unet, regularise=True)
    after = host_weights(unet)
    assert after.keys() == before.keys()
    for name, value in after.items():  # only the selected entries move
        if name in deltas:
            mask = torch.zeros(value.numel(), dtype=torch.bool)
            mask[deltas[name].indices.long()] = True
            assert torch.equal(value.reshape(-1)[~mask], before[name].reshape(-1)[~mask]), name
            assert torch.equal(value.reshape(-1)[mask], deltas[name].values.detach()), name
        else:
            assert torch.equal(value, before[name]), name
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert sorted(p.numel() for p in trainable) == sorted(d.values.numel() for d in deltas.values())
    assert all(optimizer.state[d.values]["exp_avg"].shape == d.values.shape for d in deltas.values())
    pv.save_adapter(unet, tmp_path / "sara")
    frozen(unet)
    expected = run(unet)
    assert not torch.allclose(expected, base, atol=1e-4)

    fresh = pv.load_adapter(build(layout), tmp_path / "sara")
    assert torch.equal(run(frozen(fresh)), expected)
    merged = pv.merge(copy.deepcopy(unet))
    merged_weights = host_weights(merged)
    assert merged_weights.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in merged_weights.items())
    assert torch.equal(run(frozen(merged)), expected)
    if layout == "channels_last":
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in merged.parameters() if p.dim() == 4)
    sara.unload(fresh)
    assert torch.equal(run(fresh), base) and all(torch.equal(v, before[k]) for k, v in host_weights(fresh).items())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_on_layout(tmp_path, layout):
    unet = pv.apply(build(layout), "lora", train_head=False)
    names = [n for n, m in unet.named_modules() if hasattr(m, "lora_A")]
    assert names and all(isinstance(unet.get_submodule(n).get_base_layer(), nn.Linear) for n in names)  # UNets: linears only
    train(unet, lr=5e-2)
    pv.save_adapter(unet, tmp_path / "lora")
    frozen(unet)
    expected = run(unet)
    assert not torch.allclose(expected, run(build(layout)), atol=1e-4)
    assert torch.equal(run(frozen(pv.load_adapter(build(layout), tmp_path / "lora"))), expected)
    merged = pv.merge(unet)
    assert type(merged) is UNet2DConditionModel and list(merged.state_dict()) == list(build(layout).state_dict())
    torch.testing.assert_close(run(merged), expected, atol=1e-5, rtol=1e-5)


def test_spm_full_size_counts():
    """Trainable counts of the real SD 2.1 and SDXL UNets (meta device), against the count by hand."""
    sd21 = dict(sample_size=96, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True)
    sdxl = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280), layers_per_block=2,
                transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        unets = {name: pv.apply(UNet2DConditionModel(**config), "spm") for name, config in (("sd21", sd21), ("sdxl", sdxl))}
    # Rank 1, width C, cross-attention dim X: proj_in / proj_out (Linear C -> C) 2C each; per transformer layer
    # attn1 4 x 2C, attn2 to_q, to_out 2C, to_k, to_v C + X, GEGLU ff 9C + 5C -> 4C + layers * (28C + 2X).
    # SD 2.1: 16 Transformer2DModels of 1 layer: 5 at 320, 5 at 640, 6 at 1280 (X = 1024).
    assert pv.summary(unets["sd21"]).trainable == sum(n * (32 * c + 2048) for n, c in ((5, 320), (5, 640), (6, 1280))) == 432_128
    # SDXL: at 640, 2 down + 3 up Transformer2DModels of 2 layers; at 1280, 2 down + 1 mid + 3 up of 10 (X = 2048).
    assert sum(p.numel() for n, p in unets["sdxl"].named_parameters() if not n.startswith("petl.")) == 2_567_463_684  # SDXL's UNet
    expected = 5 * (4 * 640 + 2 * (28 * 640 + 4096)) + 6 * (4 * 1280 + 10 * (28 * 1280 + 4096))
    assert pv.summary(unets["sdxl"]).trainable == expected == 2_659_840
    assert len(unets["sdxl"].petl.spm.layers) == 11 * 2 + 70 * 10


# ----------------------------------------------------------------------------- pipelines


def sd2_pipeline(tmp_path, seed=0):
    """The tiny SD pipeline of test_sara with an SD 2.x-style UNet."""
    pipe = tiny_pipeline(tmp_path, seed)
    pipe.register_modules(unet=frozen(build("sd2", seed)))
    return pipe


def sdxl_pipeline(tmp_path, seed=0):
    """A StableDiffusionXLPipeline small enough for CPU tests: two text encoders of width 16 (-> 32)."""
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tokenizer_files")), model_max_length=16)
    torch.manual_seed(seed)
    kw = dict(intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=16,
              bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**kw)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **kw)).eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=frozen(build("sdxl", seed)), scheduler=scheduler,
    )


def sample(pipe, prompt="a cat", **kw):
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0)) | kw
    return pipe(prompt, **kw).images


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_plugins_on_pipeline(tmp_path, kind):
    make = sd2_pipeline if kind == "sd2" else sdxl_pipeline
    pipe = make(tmp_path)
    base, base_snoopy, base_unet = sample(pipe), sample(pipe, "snoopy"), run(pipe.unet)
    concept = write_official(tmp_path / "snoopy.safetensors", pipe.unet, "snoopy", seed=1)
    load_spm(pipe, concept)  # Facilitated Transport through the pipeline's own encode_prompt
    assert not torch.allclose(sample(pipe, "snoopy"), base_snoopy, atol=1e-4)
    assert transport_strengths(pipe)["snoopy"].tolist() == pytest.approx([1.0])
    with disabled(pipe):
        assert torch.equal(sample(pipe), base)
    if kind == "sdxl":  # the noise gap passes SDXL's pooled text embeddings and time ids (before: a TypeError in the UNet)
        gap = evaluate.noise_gap(pipe, "snoopy", samples=1)
        states, _, pooled, _ = pipe.encode_prompt("snoopy", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        pixels = 8 * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids((pixels, pixels), (0, 0), (pixels, pixels), dtype=states.dtype, text_encoder_projection_dim=32)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(len(evaluate.GAP_TIMESTEPS), 4, 8, 8, generator=g)
        t = torch.tensor(evaluate.GAP_TIMESTEPS)
        cond = dict(added_cond_kwargs={"text_embeds": pooled.expand(len(t), -1), "time_ids": time_ids.expand(len(t), -1)})
        with torch.no_grad():
            with disabled(pipe):
                original = pipe.unet(x, t, states.expand(len(t), -1, -1), **cond).sample
            membrane = pipe.unet(x, t, states.expand(len(t), -1, -1), **cond).sample
        pipe.unet.petl.spm.strengths = None
        assert gap == pytest.approx(((membrane - original).square().mean() / original.square().mean()).item(), rel=1e-4)
    pv.diffusers.set_transport(pipe, False)
    static = run(pipe.unet)
    lora = spm_format.export_lora(pipe, tmp_path / "membrane_lora.safetensors")
    other = make(tmp_path)
    other.load_lora_weights(str(lora))  # diffusers' own pipeline loader
    torch.testing.assert_close(run(other.unet), static, atol=1e-5, rtol=1e-5)
    unload(pipe)
    assert torch.equal(sample(pipe), base) and torch.equal(run(pipe.unet), base_unet) and "encode_prompt" not in pipe.__dict__

    trained = pv.apply(make(tmp_path).unet, "sara", threshold=1e-2)
    train(trained, lr=5e-2)
    pv.save_adapter(trained, tmp_path / "sara")
    pv.diffusers.load_sara(pipe, tmp_path / "sara")
    assert torch.equal(run(frozen(copy.deepcopy(pipe.unet))), run(frozen(trained)))
    assert not torch.allclose(sample(pipe), base, atol=1e-4)
    pv.diffusers.unload_sara(pipe)
    assert torch.equal(sample(pipe), base) and not hasattr(pipe.unet, "petl")


def official_sara_checkpoint(path, unet, threshold=1e-2):
    """An official SaRA checkpoint over every tensor of `unet`: {'threshold': t, i: values of tensor i}."""
    g = torch.Generator().manual_seed(0)
    checkpoint = {"threshold": threshold}
    for i, p in enumerate(unet.parameters()):
        checkpoint[i] = torch.randn(int((p.abs() < threshold).sum()), generator=g) * 1e-3
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """A diffusers LoRA file (an exported membrane), an SPM file, a SaRA adapter and an official SaRA checkpoint."""
    root = tmp_path_factory.mktemp("files")
    pipe = sd2_pipeline(root)
    membrane = write_official(root / "lora_source.safetensors", pipe.unet, "mickey", seed=3)
    load_spm(pipe, membrane, transport=False)
    files = {"lora": str(spm_format.export_lora(pipe, root / "lora.safetensors"))}
    unload(pipe)
    files["spm"] = write_official(root / "snoopy.safetensors", pipe.unet, "snoopy", seed=1)
    trained = pv.apply(sd2_pipeline(root).unet, "sara", threshold=1e-2)
    train(trained, lr=5e-2)
    files["sara"] = pv.save_adapter(trained, root / "sara")
    files["official"] = official_sara_checkpoint(root / "unet.pt", pipe.unet)
    return files


@pytest.mark.parametrize("order", ["lora_first", "plugin_first"])
def test_spm_next_to_diffusers_lora(tmp_path, lora_files, order):
    pipe = sd2_pipeline(tmp_path)
    base = run(pipe.unet)
    plain_keys = list(spm_method.target_layers(pipe.unet))
    reference = sd2_pipeline(tmp_path)  # the membrane folded into the weights, then the LoRA
    pv.merge(load_spm(reference.unet, lora_files["spm"], transport=False))
    reference.load_lora_weights(lora_files["lora"])
    only_lora = sd2_pipeline(tmp_path)
    only_lora.load_lora_weights(lora_files["lora"])
    only_spm = load_spm(sd2_pipeline(tmp_path).unet, lora_files["spm"], transport=False)

    if order == "lora_first":
        pipe.load_lora_weights(lora_files["lora"])
        load_spm(pipe, lora_files["spm"], transport=False)
    else:
        load_spm(pipe, lora_files["spm"], transport=False)
        pipe.load_lora_weights(lora_files["lora"])
    assert list(pipe.unet.petl.spm.layers) == plain_keys  # lora_A / lora_B skipped, base layers under their own keys
    assert all(type(layer) in (nn.Linear, nn.Conv2d) for layer in pipe.unet.petl.spm.layers.values())  # no peft layer
    torch.testing.assert_close(run(pipe.unet), run(reference.unet), atol=1e-5, rtol=1e-5)
    exported = load_file(spm_format.export_lora(pipe, tmp_path / "again.safetensors"))
    assert all(".base_layer" not in k for k in exported) and len(exported) == 2 * len(plain_keys)

    state = copy.deepcopy(pipe)  # unload in the other order on a copy
    unload(pipe)
    torch.testing.assert_close(run(pipe.unet), run(only_lora.unet), atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe.unet), base)
    state.unload_lora_weights()
    assert torch.equal(run(state.unet), run(only_spm))
    unload(state)
    assert torch.equal(run(state.unet), base)


@pytest.mark.parametrize("source", ["sara", "official"])
@pytest.mark.parametrize("order", ["lora_first", "plugin_first"])
def test_sara_next_to_diffusers_lora(tmp_path, lora_files, order, source):
    pipe = sd2_pipeline(tmp_path)
    base = run(pipe.unet)
    reference = pv.diffusers.load_sara(sd2_pipeline(tmp_path), lora_files[source])
    sara_alone = run(frozen(copy.deepcopy(reference.unet)))
    names = sorted(sara.sara_module(reference.unet).deltas())
    pv.merge(reference.unet)  # SaRA folded into the weights, then the LoRA
    reference.load_lora_weights(lora_files["lora"])
    only_lora = sd2_pipeline(tmp_path)
    only_lora.load_lora_weights(lora_files["lora"])

    if order == "lora_first":  # before: the adapter was refused as "a different backbone"; the official
        pipe.load_lora_weights(lora_files["lora"])  # checkpoint's indices shifted onto lora_A / lora_B
        pv.diffusers.load_sara(pipe, lora_files[source])
    else:  # before: load_lora_weights failed ("'Linear' object has no attribute 'parametrizations'")
        pv.diffusers.load_sara(pipe, lora_files[source])
        pipe.load_lora_weights(lora_files["lora"])
    deltas = sara.sara_module(pipe.unet).deltas()
    assert sorted(deltas) == names and not any("lora" in n or "base_layer" in n for n in deltas)
    torch.testing.assert_close(run(frozen(copy.deepcopy(pipe.unet))), run(frozen(copy.deepcopy(reference.unet))), atol=1e-5, rtol=1e-5)
    if order == "lora_first":  # the LoRA is frozen with the host while SaRA is loaded; SaRA's values alone are trainable
        assert pv.summary(pipe.unet).trainable == sum(d.values.numel() for d in deltas.values())

    state, fused = copy.deepcopy(pipe), copy.deepcopy(pipe)  # the other unload order, and fusing, on copies
    pv.diffusers.unload_sara(pipe)
    torch.testing.assert_close(run(frozen(pipe.unet)), run(frozen(only_lora.unet)), atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe.unet), base)
    state.unload_lora_weights()
    torch.testing.assert_close(run(frozen(state.unet)), sara_alone, atol=1e-5, rtol=1e-5)
    pv.diffusers.unload_sara(state)
    assert torch.equal(run(state.unet), base)

    # A fused LoRA would lose its update at SaRA's entries (before: silently, 0.17 off here): refused, nothing lost.
    fused.fuse_lora()
    for call in (lambda: run(fused.unet), lambda: pv.diffusers.unload_sara(fused), lambda: pv.merge(fused.unet)):
        with pytest.raises(RuntimeError, match=r"sara: a LoRA is fused .*pipe.unfuse_lora\(\)"):
            call()
    fused.unfuse_lora()
    torch.testing.assert_close(run(frozen(fused.unet)), run(frozen(reference.unet)), atol=1e-5, rtol=1e-5)
    only_lora.fuse_lora()
    with pytest.raises(ValueError, match=r"load_sara: a LoRA is fused .*unfuse_lora"):
        pv.diffusers.load_sara(only_lora, lora_files[source])


def test_spm_and_sara_together(tmp_path, lora_files):
    pipe = sd2_pipeline(tmp_path)
    base = run(pipe.unet)
    load_spm(pipe, lora_files["spm"], transport=False)
    with pytest.raises(ValueError, match=r"already has petl_vision methods \['spm'\]; load SaRA first .*load_spm"):
        pv.diffusers.load_sara(pipe, lora_files["sara"])  # before: "call unload_sara(pipe) first"
    unload(pipe)
    pv.diffusers.load_sara(pipe, lora_files["sara"])
    with pytest.raises(ValueError, match="SaRA is already loaded.*unload_sara"):
        pv.diffusers.load_sara(pipe, lora_files["sara"])
    load_spm(pipe, lora_files["spm"], transport=False)
    pv.diffusers.unload_sara(pipe)
    assert torch.equal(run(pipe.unet), run(load_spm(sd2_pipeline(tmp_path).unet, lora_files["spm"], transport=False)))
    unload(pipe)
    assert torch.equal(run(pipe.unet), base) and not hasattr(pipe.unet, "petl")


# ----------------------------------------------------------------------------- what SPM refuses or leaves out


def test_spm_refuses_layouts_it_cannot_cover(tmp_path):
    supported = r"it supports a diffusers UNet2DConditionModel whose cross-attention sits in Transformer2DModel blocks"
    simple_mid = UNet2DConditionModel(**{**BASE, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})
    hand = write_official(tmp_path / "hand.safetensors", simple_mid, "snoopy", seed=1)
    with pytest.raises(pv.UnsupportedHostError, match=r"cross-attention layers outside Transformer2DModel blocks \(mid_block.attentions.0.*" + supported):
        pv.apply(simple_mid, "spm")  # before: membranes on the down / up blocks only, the mid block's text path left open
    with pytest.raises(pv.UnsupportedHostError, match="mid_block.attentions.0"):
        load_spm(simple_mid, hand, transport=False)
    simple = UNet2DConditionModel(**{**BASE, "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
                                     "up_block_types": ("UpBlock2D", "SimpleCrossAttnUpBlock2D"), "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})
    with pytest.raises(pv.UnsupportedHostError, match="found no nn.Linear / nn.Conv2d inside a Transformer2DModel.*" + supported):
        pv.apply(simple, "spm")
    assert not any(hasattr(m, "petl") for m in (simple_mid, simple))

    plain = build("sd1")
    official = write_official(tmp_path / "plain.safetensors", plain, "snoopy", seed=1)
    expected = run(load_spm(build("sd1"), official, transport=False))
    fused = build("sd1")
    fused.fuse_qkv_projections()  # before: to_qkv / to_kv targeted too, the official file "does not fit"
    with pytest.raises(pv.UnsupportedHostError, match=r"fused .*unfuse_qkv_projections\(\) first"):
        load_spm(fused, official, transport=False)
    fused.unfuse_qkv_projections()  # the fused copies stay as modules, unused: not targets
    assert list(spm_method.target_layers(fused)) == list(spm_method.target_layers(plain))
    torch.testing.assert_close(run(load_spm(fused, official, transport=False)), expected, atol=1e-5, rtol=1e-5)


def test_spm_skips_attention_processor_layers(tmp_path):
    """IP-Adapter's processors hold to_k_ip / to_v_ip Linears inside the transformer blocks: not the UNet's own layers."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    unet = build("sd1")
    official = write_official(tmp_path / "plain.safetensors", unet, "snoopy", seed=1)
    plain_keys = list(spm_method.target_layers(unet))
    processors = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.rsplit(".processor", 1)[0])
        processors[name] = (IPAdapterAttnProcessor2_0(attention.to_q.out_features, 32, num_tokens=(4,), scale=0.0)
                            if name.endswith("attn2.processor") else AttnProcessor2_0())
    unet.set_attn_processor(processors)
    assert any("to_k_ip" in n for n, _ in unet.named_modules())
    assert list(spm_method.target_layers(unet)) == plain_keys  # before: 8 more, and the official file "did not fit"
    load_spm(unet, official, transport=False)
    assert len(unet.petl.spm.layers) == len(plain_keys)


def test_noise_gap_refuses_class_conditioned_unets(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.register_modules(unet=build("class_embed"))
    load_spm(pipe, write_official(tmp_path / "snoopy.safetensors", pipe.unet, "snoopy", seed=1), transport=False)
    with pytest.raises(ValueError, match=r"noise_gap: this UNet needs class_labels .*supported: UNets conditioned on the text alone"):
        evaluate.noise_gap(pipe, "snoopy", samples=1)
