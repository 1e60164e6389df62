"""LoRA on convolutions (peft's Conv2d LoRA): placement switch, counts, merge, save/load."""
import pytest
import torch
from conftest import input_for, make_host, perturb_trainable
from torch import nn

import petl_vision as pv
from petl_vision.methods.lora import _is_plain_conv


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def conv_formula(model, r):
    """r * (in * kh * kw + out) over the ungrouped nn.Conv2d layers of a fresh host."""
    convs = [m for m in model.modules() if _is_plain_conv(m)]
    return len(convs), sum(r * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels) for m in convs)


@pytest.mark.parametrize("host", ["resnet", "convnext"])
def test_count_and_peft_shapes_on_cnns(host):
    fresh = make_host(host)
    num_convs, lora = conv_formula(fresh, r=2)
    head = sum(p.numel() for p in fresh.get_classifier().parameters())
    model = pv.apply(make_host(host), "lora", r=2)
    layers = lora_layers(model)
    assert len(layers) == num_convs > 0
    assert pv.summary(model).trainable == lora + head
    for name, layer in layers.items():
        base = layer.get_base_layer()
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        assert a.weight.shape == (2, base.in_channels, *base.kernel_size) and b.weight.shape == (base.out_channels, 2, 1, 1)
        assert (a.stride, a.padding) == (base.stride, base.padding), name
    if host == "convnext":  # depthwise 7x7 convs (groups = channels) are left alone
        depthwise = [m for m in model.modules() if type(m) is nn.Conv2d and m.groups > 1]
        assert depthwise and all(layer.get_base_layer().groups == 1 for layer in layers.values())
    # resnet10t (stem_width 8): deep stem 3->6->8->16, then per stage conv1, conv2 (3x3) and a 1x1 downsample
    if host == "resnet":
        assert lora == 2 * ((27 + 6) + (54 + 8) + (72 + 16)  # stem
                            + (144 + 8) + (72 + 8) + (16 + 8)  # layer1: 16 -> 8
                            + (72 + 16) + (144 + 16) + (8 + 16)  # layer2: 8 -> 16
                            + (144 + 24) + (216 + 24) + (16 + 24)  # layer3: 16 -> 24
                            + (216 + 32) + (288 + 32) + (24 + 32)) == 3566  # layer4: 24 -> 32


def test_merge_and_save_load_on_resnet(tmp_path):
    x = input_for("resnet")
    plain_out = make_host("resnet")(x)
    keys = list(make_host("resnet").state_dict())
    model = pv.apply(make_host("resnet"), "lora", r=2)
    perturb_trainable(model)
    before = model(x)
    assert (before - plain_out).abs().max() > 1e-2  # the conv updates (and the head) change the output
    pv.save_adapter(model, tmp_path / "a")
    fresh = pv.load_adapter(make_host("resnet"), tmp_path / "a")
    assert torch.equal(fresh(x), before)
    merged = pv.merge(model)
    assert type(merged.layer1[0].conv1) is nn.Conv2d and list(merged.state_dict()) == keys
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)
    plain = make_host("resnet")
    plain.load_state_dict(merged.state_dict())
    torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=1e-5)


def test_include_conv_switch():
    vit = pv.apply(make_host("vit"), "lora", r=2)  # default: the ViT keeps linear-only LoRA
    linears = 2 * 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))  # 2 blocks: qkv, proj, fc1, fc2
    head = 32 * 5 + 5
    assert "patch_embed.proj" not in lora_layers(vit) and pv.summary(vit).trainable == linears + head
    with_conv = pv.apply(make_host("vit"), "lora", r=2, include_conv=True)
    assert "patch_embed.proj" in lora_layers(with_conv)
    assert pv.summary(with_conv).trainable == linears + head + 2 * (3 * 8 * 8 + 32)
    resnet = make_host("resnet")
    with pytest.raises(pv.UnsupportedHostError, match="include_conv=False matches no nn.Linear of ResNet"):
        pv.apply(resnet, "lora", include_conv=False)
    assert not hasattr(resnet, "petl") and not lora_layers(resnet) and all(p.requires_grad for p in resnet.parameters())
    only_stem = pv.apply(make_host("resnet"), "lora", r=2, target_modules=r"^conv1\.")
    assert sorted(lora_layers(only_stem)) == ["conv1.0", "conv1.3", "conv1.6"]  # exact names, not suffixes


def test_open_clip_attention_pool_projections_are_not_wrapped():
    """open_clip's ResNet attention pool reads q/k/v/c_proj weights directly: LoRA there would never run."""
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(0)
    tower = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=8).eval()
    pv.apply(tower, "lora", r=2, train_head=False)
    layers = lora_layers(tower)
    assert layers and not any(name.startswith("attnpool") for name in layers)
    perturb_trainable(tower)
    tower.train()
    tower(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for name, p in tower.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
