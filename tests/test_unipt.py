"""UniPT: no backbone in the backward pass, parameter counts, the official forward formula."""
import pytest
import timm
import torch
from conftest import TOKEN_HOSTS, input_for, make_host
from test_lst import assert_backbone_out_of_backward, hidden_states

import petl_vision as pv
from petl_vision.methods.unipt import l1norm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("host", TOKEN_HOSTS)
def test_backbone_takes_no_part_in_backward(host):
    model = pv.apply(make_host(host), "unipt")
    out = assert_backbone_out_of_backward(model, input_for(host))
    assert out.shape == (2, 5)


def unipt_count(D, f, L, C):
    """Trainable parameters written out: L + 1 layer projections, anchor projection, one shared
    gate Linear(d -> 1), up-projection, head."""
    d = D // f
    head = D * C + C if C else 0
    return (L + 1) * (D * d + d) + (D * d + d) + (d + 1) + (d * D + D) + head


@pytest.mark.parametrize("reduction", [2, 4])
def test_trainable_count_tiny(reduction):
    model = pv.apply(make_host("vit"), "unipt", reduction=reduction)
    s = pv.summary(model)
    assert s.trainable == s.by_method["unipt"] == unipt_count(32, reduction, 2, 5)
    assert not any(p.requires_grad for p in model.head.parameters())  # the host's head is unused


def test_trainable_count_vit_b():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    pv.apply(model, "unipt")
    assert pv.summary(model).trainable == unipt_count(768, 2, 12, 100) == 4_507_109


def reference_unipt(side, hidden, raw_anchor, cls):
    """The official Our_tuning_for_transformer forward, written out for one query token."""
    anchor = side.anchor(raw_anchor)  # (B, d)
    merged, confidence = [], []
    for layer, t in zip(side.layers, hidden):
        x = layer(t)  # (B, N, d)
        weights = torch.relu(torch.bmm(anchor[:, None], x.transpose(1, 2)))  # (B, 1, N)
        weights = weights / weights.abs().sum(-1, keepdim=True).clamp(min=1e-6)
        merged.append(torch.bmm(weights, x)[:, 0] + cls(x))
        confidence.append(side.gate(anchor * x.mean(1)))
    norm = torch.softmax(torch.cat(confidence, dim=1), dim=1)
    fused = sum(norm[:, i:i + 1] * m for i, m in enumerate(merged))
    return side.head(raw_anchor + side.upsample(fused))


@pytest.mark.parametrize("host", ["vit", "vit_reg_avg"])
def test_forward_is_the_official_formula(host):
    model = pv.apply(make_host(host), "unipt")
    side = model.petl.unipt
    with torch.no_grad():
        for p in side.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = input_for(host)
    hs = hidden_states(model, x)
    raw_anchor = model.forward_head(model.norm(hs[-1]), pre_logits=True)  # the host's final pooled feature
    n = model.num_prefix_tokens
    cls = (lambda t: t[:, 0]) if host == "vit" else (lambda t: t[:, n:].mean(1))
    torch.testing.assert_close(model(x), reference_unipt(side, hs, raw_anchor, cls))
    assert len(side.layers) == len(model.blocks) + 1


def test_l1norm_of_zero_attention_is_zero():
    out = l1norm(torch.relu(-torch.ones(2, 5)), dim=-1, eps=1e-6)
    assert torch.equal(out, torch.zeros(2, 5))
    torch.testing.assert_close(l1norm(torch.tensor([[1.0, 3.0]]), dim=-1, eps=1e-6), torch.tensor([[0.25, 0.75]]))


def test_errors():
    with pytest.raises(pv.UnsupportedHostError, match="unipt.*token-based host.*ConvNeXt"):
        pv.apply(make_host("convnext"), "unipt")
    with pytest.raises(ValueError, match="reduction=3 must divide the anchor width 32"):
        pv.apply(make_host("vit"), "unipt", reduction=3)
    with pytest.raises(pv.MergeError, match="unipt"):
        pv.merge(pv.apply(make_host("vit"), "unipt"))


def test_on_the_clip_classifier_starts_from_zero_shot():
    from test_clip import CLASSES, images, tiny_clip

    from petl_vision.clip import CLIPClassifier

    x = images()
    with torch.no_grad():
        zero_shot = CLIPClassifier(tiny_clip(), CLASSES)(x)
    clf = pv.apply(CLIPClassifier(tiny_clip(), CLASSES), "unipt")
    assert_backbone_out_of_backward(clf, x)
    # raw anchor = the normalised image embedding (width 16): a zero up-projection gives zero-shot logits
    with torch.no_grad():
        clf.petl.unipt.upsample[1].weight.zero_()
        clf.petl.unipt.upsample[1].bias.zero_()
        torch.testing.assert_close(clf(x), zero_shot)
    d, E, C = 16 // 2, 16, 3
    assert pv.summary(clf).trainable == 3 * (32 * d + d) + (E * d + d) + (d + 1) + (d * E + E) + E * C
