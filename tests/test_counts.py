"""Parameter counts against the formulas in METHODS.md, on the real ViT-B/16 architecture.

The model is built on the meta device: the architecture is real, no memory or init time is spent.
"""
import pytest
import timm
import torch

import petl_vision as pv


def vit_b(num_classes=0):
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes)


def test_ssf_vit_b_count():
    model = pv.apply(vit_b(), "ssf")
    s = pv.summary(model)
    assert s.trainable == s.by_method["ssf"] == s.added["ssf"] == 205_824 == 12 * 16_896 + 2 * 1_536
    per_block = sum(p.numel() for n, p in model.blocks[0].named_parameters() if p.requires_grad)
    assert per_block == 16_896


@pytest.mark.parametrize("num_prompts", [1, 10, 50])
def test_vpt_vit_b_counts(num_prompts):
    deep = pv.apply(vit_b(), pv.VPTConfig(num_prompts=num_prompts, deep=True))
    assert pv.summary(deep).trainable == 12 * num_prompts * 768
    shallow = pv.apply(vit_b(), pv.VPTConfig(num_prompts=num_prompts, deep=False))
    assert pv.summary(shallow).trainable == num_prompts * 768


def test_vpt_init_bound_vit_b():
    model = vit_b().to_empty(device="cpu")
    pv.apply(model, "vpt", num_prompts=50)
    assert pv.methods.vpt.init_bound((16, 16), 768) == pytest.approx(0.0625)
    prompts = model.petl.vpt.prompts
    assert prompts.abs().max() <= 0.0625 and prompts.abs().max() > 0.06  # uniform fills the bound


def test_head_and_baseline_counts():
    head = 768 * 100 + 100
    for method, expected in [("linear", head), ("ssf", 205_824 + head), ("vpt", 12 * 10 * 768 + head)]:
        model = pv.apply(vit_b(num_classes=100), method)
        assert pv.summary(model).trainable == expected, method
    model = pv.apply(vit_b(num_classes=100), "bitfit")
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith("head"))
    assert pv.summary(model).trainable == biases + head
    model = pv.apply(vit_b(num_classes=100), "lora", r=4)
    # r * (in + out) for every linear of every block: qkv 768->2304, proj 768->768, fc1 768->3072, fc2 3072->768
    lora = 12 * 4 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    assert pv.summary(model).trainable == lora + head
