"""timm families beyond conftest's HOSTS, each built tiny (pretrained=False, 32x32 inputs).

Every image method on every model either works (finite outputs, gradients exactly on the trainable
tensors, frozen BatchNorm statistics fixed, the adapter changes the output, save -> load identical,
merge exact) or is refused at apply time with an UnsupportedHostError naming the method. Then
regression tests for what this sweep found broken.
"""
import pytest
import timm
import torch
from conftest import perturb_trainable
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

import petl_vision as pv

pytestmark = pytest.mark.usefixtures("one_thread")

_VIT = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)

ZOO = {
    # layer scale (init_values), no_embed_class: a timm VisionTransformer
    "deit3": lambda: timm.create_model("deit3_small_patch16_224", depth=4, **_VIT),
    # no class token, attention-pool head (global_pool="map")
    "vit_siglip": lambda: timm.create_model("vit_base_patch16_siglip_224", depth=4, **_VIT),
    # rotary embeddings; qkv read as F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))
    "eva02": lambda: timm.create_model("eva02_tiny_patch14_224", depth=2, **_VIT),
    # relative position bias table; the same split qkv bias
    "beit": lambda: timm.create_model("beit_base_patch16_224", depth=2, **_VIT),
    # cosine attention, res-post-norm, continuous position-bias MLP with ReLU(inplace=True), split qkv bias
    "swinv2": lambda: timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, patch_size=4, window_size=4,
                                        embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5),
    # BatchNormAct2d, depthwise convs, squeeze-excite
    "efficientnet": lambda: timm.create_model("test_efficientnet", pretrained=False, num_classes=5),
    # hard-swish, SE with hard-sigmoid gate, BatchNormAct2d, a conv head with bias
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5),
    # ResMLP: linear token mixing on transposed tokens, Affine norms
    "resmlp": lambda: MlpMixer(img_size=32, patch_size=8, embed_dim=32, num_blocks=2, num_classes=5, mlp_ratio=4,
                               block_layer=ResBlock, norm_layer=Affine),
}
TOKEN_ZOO = {"deit3", "vit_siglip"}  # timm VisionTransformers: the token-host methods run on them
TOKEN_METHODS = {"vpt", "hst", "lst", "unipt", "moment_probing"}


def image_methods():
    return [m for m in pv.list_methods() if pv.get_method(m).input_kind == "image"]


def make(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model, with its zero-initialised tensors (layer scale 1e-6, Swin V2's res-post-norm
    weights, zero-init last BN) made random, so every branch contributes and gets gradients."""
    torch.manual_seed(seed)
    model = ZOO[name]().eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and p.abs().max() < 1e-3:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Equal up to float error relative to the magnitude of the outputs."""
    return float((a - b).abs().max()) <= tol * (1.0 + float(b.abs().max()))


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("method", image_methods())
def test_zoo(method, name, tmp_path):
    model = make(name)
    x = image()
    if method in TOKEN_METHODS and name not in TOKEN_ZOO:
        with pytest.raises(pv.UnsupportedHostError, match=method):
            pv.apply(model, method)
        assert not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())
        return
    with torch.no_grad():
        plain = model(x)
    original_keys = list(model.state_dict())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    pv.apply(model, method)

    model.train()
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"trainable {n} got no gradient (does its layer run?)"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    if method != "full":
        state = model.state_dict()
        drifted = [k for k, v in stats.items() if not torch.equal(state[k], v)]
        assert not drifted, f"frozen norm statistics changed in training: {drifted[:3]}"
    s = pv.summary(model)
    assert s.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0

    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert not close(expected, plain, 1e-6), "the trained tensors do not change the output"
    pv.save_adapter(model, tmp_path / "a")
    loaded = pv.load_adapter(make(name), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    if not pv.can_merge(model):
        with pytest.raises(pv.MergeError, match=method):
            pv.merge(model)
        return
    merged = pv.merge(model)
    assert type(merged) is type(make(name)) and not hasattr(merged, "petl")
    with torch.no_grad():
        assert close(merged(x), expected)
    keys = list(merged.state_dict())
    # SSF's shift after a bias-free nn.Linear becomes that linear's new bias; nothing else may change
    added = [k for k in keys if k not in original_keys]
    assert [k for k in original_keys if k in keys] == original_keys
    assert all(k.endswith(".bias") and isinstance(merged.get_submodule(k[:-5]), torch.nn.Linear) for k in added), added
    if not added:
        fresh = make(name)
        fresh.load_state_dict(merged.state_dict())
        with torch.no_grad():
            assert close(fresh(x), expected)


# ----------------------------------------------------------------- regressions found by the sweep


@pytest.mark.parametrize("name", ["beit", "eva02", "swinv2"])
def test_lora_adapts_a_qkv_read_as_weight(name):
    """Beit/Eva/Swin V2 compute F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias)): peft's layer on
    qkv was never called (no gradient to its LoRA, and merge then changed the outputs)."""
    model = make(name)
    attns = [m for m in model.modules() if hasattr(m, "q_bias") and m.q_bias is not None]
    assert attns and not any(a.qkv_bias_separate for a in attns)
    pv.apply(model, "lora")
    assert all(a.qkv_bias_separate for a in attns)  # the attention now calls its qkv layer
    perturb_trainable(model)
    x = image()
    out = model(x)
    out.square().mean().backward()
    assert all(a.qkv.lora_B["default"].weight.grad.abs().sum() > 0 for a in attns)
    with torch.no_grad():
        expected = model(x)
        merged = pv.merge(model)
        assert close(merged(x), expected)
    assert not any(a.qkv_bias_separate for a in attns) and all(type(a.qkv) is torch.nn.Linear for a in attns)
    assert not any(hasattr(a, "_petl_lora_qkv_bias_separate") for a in attns)


@pytest.mark.parametrize("name", ["beit", "eva02"])
def test_ssf_leaves_a_qkv_read_as_weight_alone(name):
    """SSF's wrapper on such a qkv never ran (its scale and shift got no gradient) and merge folded
    them in anyway, changing the outputs; that qkv has no bias tensor to carry a shift, so SSF skips it."""
    from petl_vision.methods.ssf import SSFLayer

    model = make(name)
    pv.apply(model, "ssf")
    assert not any(n.endswith("attn.qkv") for n, m in model.named_modules() if isinstance(m, SSFLayer))
    assert any(n.endswith("attn.proj") for n, m in model.named_modules() if isinstance(m, SSFLayer))


def test_ssf_before_an_in_place_activation():
    """Swin V2's position-bias MLP runs ReLU(inplace=True) on its first Linear's output: SSF's
    output-saving ScaleShift there made backward fail ("modified by an inplace operation")."""
    from petl_vision.methods.ssf import SSFLayer

    model = make("swinv2")
    pv.apply(model, "ssf")
    cpb = model.layers[0].blocks[0].attn.cpb_mlp
    assert isinstance(cpb[0], SSFLayer) and not cpb[0].save_output
    assert model.layers[0].blocks[0].attn.proj.save_output  # elsewhere the memory saving stays on
    model.train()
    model(image()).sum().backward()
    assert cpb[0].scale.grad is not None


def test_ssf_after_norm_act_layers():
    """EfficientNet's norms are BatchNormAct2d (norm + activation): SSF used to skip all of them and
    adapt only the squeeze-excite convs. Now each gets SSF on its affine (before the activation),
    stays in eval mode while training, and merges back into its weight and bias."""
    from timm.layers import BatchNormAct2d

    model = make("efficientnet")
    norms = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    pv.apply(model, "ssf")
    for bn in norms:
        assert [type(p).__name__ for p in bn.parametrizations.bias] == ["BiasScaleShift"]
        assert [type(p).__name__ for p in bn.parametrizations.weight] == ["RowScale"]
    ssf_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier"))
    assert ssf_params >= 2 * sum(bn.num_features for bn in norms)
    model.train()
    model(image()).sum().backward()
    assert all(not bn.training for bn in norms)  # frozen statistics, although the parametrization trains
    assert all(bn.parametrizations.bias[0].shift.grad is not None for bn in norms)


def test_vpt_deep_intermediates_have_the_host_layout():
    """timm's forward_intermediates reshapes each block output to (B, D, gh, gw): deep VPT's prompts
    stayed in those outputs, giving (B, D * (N + P) / N, gh, gw) garbage. Same logits as before."""
    model = make("deit3")
    host_final, host_inter = model.forward_intermediates(image())
    pv.apply(model, "vpt", num_prompts=3)
    perturb_trainable(model)
    final, inter = model.forward_intermediates(image())
    assert [t.shape for t in inter] == [t.shape for t in host_inter] and final.shape == host_final.shape

    # the logits of the original formulation: one prompt set per block, replaced before each block
    prompts = model.petl.vpt.prompts
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(image()))
        n = model.num_prefix_tokens
        x = torch.cat([x[:, :n], prompts[0].expand(2, -1, -1), x[:, n:]], dim=1)
        for i, block in enumerate(model.blocks):
            if i:
                x = torch.cat([x[:, :n], prompts[i].expand(2, -1, -1), x[:, n + 3:]], dim=1)
            x = type(block).forward(block, x)  # no hooks
        x = torch.cat([x[:, :n], x[:, n + 3:]], dim=1)
        reference = model.forward_head(model.norm(x))
        assert torch.allclose(model(image()), reference, atol=1e-6)


def test_hst_refuses_patch_dropout():
    """HST reads every patch token as a map: with patch dropout it crashed in the training forward."""
    model = timm.create_model("vit_small_patch16_224", depth=4, patch_drop_rate=0.25, **_VIT)
    with pytest.raises(pv.UnsupportedHostError, match="patch_drop_rate"):
        pv.apply(model, "hst")
    assert not hasattr(model, "petl")


def test_linear_refuses_a_head_without_parameters():
    """num_classes=0 (an Identity head): 'linear' used to apply with nothing to train."""
    with pytest.raises(pv.UnsupportedHostError, match="linear.*num_classes > 0"):
        pv.apply(timm.create_model("vit_small_patch16_224", depth=2, **dict(_VIT, num_classes=0)), "linear")


def test_vpt_refuses_after_hst():
    """'hst' refused a model with 'vpt'; the other order was accepted and crashed in the forward."""
    model = make("deit3")
    pv.apply(model, "hst")
    with pytest.raises(pv.UnsupportedHostError, match="'vpt' cannot be combined with 'hst'"):
        pv.apply(model, "vpt")
    assert model.petl.method_names == ["hst"]


@pytest.mark.parametrize("first,second", [("lst", "unipt"), ("unipt", "moment_probing"), ("moment_probing", "hst"), ("hst", "lst")])
def test_one_output_replacing_method(first, second):
    """Each of these replaces the model's output with its own network: stacked, only the last one's
    output remained and the first one's parameters silently got no gradient."""
    model = make("deit3")
    pv.apply(model, first)
    with pytest.raises(pv.UnsupportedHostError, match=f"{second!r} replaces the model's output.*{first!r}"):
        pv.apply(model, second)
    assert model.petl.method_names == [first]
