"""Fidelity to the official code (issue 13): SSF's official placement, VPT's prompt dropout and
projection init, P2P's official trainable set and loss, mask tuning's per-micro-batch noise."""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import petl_vision as pv
from petl_vision.core.errors import MergeError
from petl_vision.methods.ssf import SSFLayer


def ssf_count(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith((".scale", ".shift")))


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


# ----------------------------------------------------------------------------- SSF


@pytest.mark.parametrize("name, default, official", [
    ("swin_base_patch4_window7_224", 278_016, 267_264),
    ("convnext_base", 260_608, 255_232),
])
def test_ssf_official_counts_on_swin_and_convnext(name, default, official):
    assert ssf_count(pv.apply(meta_model(name), pv.SSFConfig())) == default
    model = pv.apply(meta_model(name), pv.SSFConfig(official=True))
    assert ssf_count(model) == official
    assert not any(isinstance(m, SSFLayer) for n, m in model.named_modules() if "downsample" in n)
    extra = {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith((".scale", ".shift"))}
    if name == "convnext_base":  # head.norm trains; the last SSF acts before pooling, none in the head
        assert extra == {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}
        assert isinstance(model.norm_pre, SSFLayer) and model.norm_pre.scale.numel() == 1024
        assert not any(isinstance(m, SSFLayer) for m in model.head.modules())
        assert pv.summary(model).trainable == official + 2 * 1024 + 1024 * 1000 + 1000
    else:
        assert extra == {"head.fc.weight", "head.fc.bias"}


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2).eval()


def test_ssf_official_changes_nothing_on_vit():
    x = torch.randn(2, 3, 32, 32)
    out = []
    for official in (False, True):
        torch.manual_seed(0)
        model = tiny_vit()
        torch.manual_seed(1)
        pv.apply(model, pv.SSFConfig(official=official))
        out.append(({n: p.shape for n, p in model.named_parameters() if p.requires_grad}, model(x)))
    assert out[0][0] == out[1][0] and len(out[0][0]) == 2 * (1 + 2 * 6 + 1) + 2
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0)


def tiny_convnext():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)).eval()


def test_ssf_official_convnext_scales_the_features_before_pooling_and_refuses_merge():
    model = pv.apply(tiny_convnext(), pv.SSFConfig(official=True))
    layer = model.norm_pre
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        layer.shift.normal_()
    x = torch.randn(2, 3, 32, 32)
    features = model.stages(model.stem(x))
    expected = features * layer.scale.view(1, -1, 1, 1) + layer.shift.view(1, -1, 1, 1)
    torch.testing.assert_close(model.forward_features(x), expected)
    torch.testing.assert_close(model(x), model.forward_head(expected))
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 3])).backward()
    assert model.head.norm.weight.grad.abs().sum() > 0 and layer.scale.grad.abs().sum() > 0
    with pytest.raises(MergeError, match="official=False"):
        pv.merge(model)
    assert isinstance(model.norm_pre, SSFLayer)  # nothing changed


def test_ssf_official_convnext_adapter_round_trip(tmp_path):
    model = pv.apply(tiny_convnext(), pv.SSFConfig(official=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # head.norm too
    pv.save_adapter(model, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pv.load_adapter(tiny_convnext(), tmp_path).eval()(x), model(x), rtol=0, atol=0)


def test_ssf_official_swin_merges():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, img_size=32, window_size=4,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2)).eval()
    pv.apply(model, pv.SSFConfig(official=True))
    assert not any(isinstance(m, SSFLayer) for m in model.layers[1].downsample.modules())
    assert isinstance(model.layers[1].blocks[0].norm1, SSFLayer)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    merged = pv.merge(model)
    assert not any(isinstance(m, SSFLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- VPT


def test_vpt_prompt_dropout_draws_one_mask_per_sample():
    model = pv.apply(tiny_vit(), "vpt", num_prompts=6, dropout=0.5).train()
    vpt = model.petl.vpt
    torch.manual_seed(0)
    prompts = vpt.layer_prompts(0, 4)
    assert prompts.shape == (4, 6, 32)
    dropped = prompts == 0
    assert 0.3 < dropped.float().mean() < 0.7
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[2], dropped[3])
    kept = ~dropped
    torch.testing.assert_close(prompts[kept], (2 * vpt.prompts[0].expand(4, -1, -1))[kept])  # 1 / (1 - p) on kept entries
    model.eval()
    assert torch.equal(vpt.layer_prompts(0, 4), vpt.prompts[0].expand(4, -1, -1))


def test_vpt_projection_bias_keeps_the_linear_default_init():
    torch.manual_seed(0)
    model = pv.apply(tiny_vit(), "vpt", num_prompts=4, project_dim=16)
    bias = model.petl.vpt.proj.bias
    assert bias.shape == (32,) and bias.abs().min() > 0 and bias.abs().max() <= 1 / 16 ** 0.5  # U(-1/sqrt(16), 1/sqrt(16))
    assert bias.std() > 0.05  # U(-0.25, 0.25) has std 0.144


# ----------------------------------------------------------------------------- P2P


def p2p_trainable(name, **config):
    model = pv.apply(meta_model(name, num_classes=40), pv.P2PConfig(**config))
    return model, {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("petl.")}


def test_p2p_official_trainable_set_on_resnet50():
    model, default = p2p_trainable("resnet50")
    assert pv.summary(model).trainable == 218_763
    model, official = p2p_trainable("resnet50", official=True)
    assert pv.summary(model).trainable == 211_083
    assert default - official == {f"layer{i}.0.downsample.1.{t}" for i in range(1, 5) for t in ("weight", "bias")}
    assert all("bn" in n or n.startswith("fc.") for n in official)


def test_p2p_official_cls_token_only_for_vit_names():
    _, default = p2p_trainable("deit_base_patch16_224")
    _, official = p2p_trainable("deit_base_patch16_224", official=True)
    assert default - official == {"cls_token"} and "norm.weight" in official
    _, official_vit = p2p_trainable("vit_base_patch16_224", official=True)
    assert "cls_token" in official_vit


def test_p2p_official_label_smoothing_equals_the_official_loss():
    from petl_vision.methods.p2p import official_label_smoothing

    torch.manual_seed(0)
    logits, target, eps, c = torch.randn(6, 40), torch.randint(0, 40, (6,)), 0.2, 40
    one_hot = F.one_hot(target, c).float()
    official = -((one_hot * (1 - eps) + (1 - one_hot) * eps / (c - 1)) * F.log_softmax(logits, 1)).sum(1).mean()
    s = official_label_smoothing(eps, c)
    assert s == pytest.approx(0.2 * 40 / 39)
    torch.testing.assert_close(F.cross_entropy(logits, target, label_smoothing=s), official)
    assert not torch.allclose(F.cross_entropy(logits, target, label_smoothing=eps), official)
    with pytest.raises(ValueError, match="num_classes"):
        official_label_smoothing(eps, 1)


def test_p2p_official_run_uses_the_official_label_smoothing(tmp_path):
    import yaml

    from petl_vision.train.pointcloud import load_point_config, train_pointcloud

    overrides = ["data.num_points=64", "data.samples_per_class=1", "data.eval_samples_per_class=1", "epochs=1",
                 "batch_size=8", "eval_batch_size=8", "sched.warmup_epochs=0", "progress=false",
                 "model_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", "method.k=4",
                 "method.test_views=1", "method.graph_dim=16", "method.official=true", f"output_dir={tmp_path}"]
    cfg = load_point_config(Path(__file__).resolve().parents[1] / "configs" / "pointcloud_synthetic_p2p.yaml", overrides)
    assert cfg.train.label_smoothing == 0.2
    result = train_pointcloud(cfg)
    record = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert record["label_smoothing"] == pytest.approx(0.2 * 8 / 7)  # 8 synthetic classes
    assert result["model"].cls_token.requires_grad  # 'vit' in vit_tiny_patch16_224


def test_unmergeable_ssf_refuses_before_a_later_method_is_merged():
    """can_merge asks each application (official SSF on ConvNeXt cannot fold), and merge refuses before
    merging anything: the LoRA applied after SSF stays unmerged too."""
    model = pv.apply(tiny_convnext(), pv.SSFConfig(official=True))
    pv.apply(model, "lora", include_conv=True)
    assert not pv.can_merge(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="'ssf'.*official=False"):
        pv.merge(model)
    assert model.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert pv.can_merge(pv.apply(tiny_convnext(), "ssf"))
