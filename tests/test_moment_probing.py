"""Moment Probing (MP) and MP+ (PSRP): counts, the official forward, frozen backbone, save/load, errors."""
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import ROOT, TOKEN_HOSTS, input_for, make_host, perturb_trainable
from test_lst import assert_backbone_out_of_backward, hidden_states

import petl_vision as pv
from petl_vision.methods.moment_probing import moment_features

pytestmark = pytest.mark.usefixtures("one_thread")


def mp_count(D, C, L, h=512, H=4, psrp=False, r=16):
    """Trainable parameters written out: projection D -> h, one LayerNorm(h / H), two bias-free
    3x3 convolutions with H - 1 channels, Linear(D -> C) on the pooled feature, Linear(F -> C) on
    the moments (F = (H - 1) s^2, s the side after the convolutions); PSRP: L x (D r + 2 r D)."""
    d = h // H
    s = ((d - 3) // 2 + 1 - 3) // 2 + 1
    count = (D * h + h) + 2 * d + 2 * (H - 1) ** 2 * 9 + (D * C + C) + ((H - 1) * s * s * C + C)
    return count + (L * 3 * D * r if psrp else 0)


def test_feature_length():
    assert moment_features(512, 4) == 2883 == 3 * 31 * 31  # the official classifier2 input
    assert moment_features(64, 4) == 3 * 3 * 3 and moment_features(96, 3) == 2 * 7 * 7  # 16 -> 7 -> 3; 32 -> 15 -> 7


@pytest.mark.parametrize("hidden,heads,psrp", [(512, 4, False), (64, 4, True), (96, 3, False), (32, 2, True)])
def test_trainable_count_tiny(hidden, heads, psrp):
    model = pv.apply(make_host("vit"), "moment_probing", hidden_dim=hidden, num_heads=heads, psrp=psrp)
    s = pv.summary(model)
    assert s.trainable == s.by_method["moment_probing"] == mp_count(32, 5, 2, hidden, heads, psrp)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("petl."))


def test_trainable_count_vit_b():
    counts = []
    for psrp in (False, True):
        with torch.device("meta"):
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)
        pv.apply(model, "moment_probing", psrp=psrp)
        counts.append(pv.summary(model).trainable)
    assert counts == [mp_count(768, 1000, 12), mp_count(768, 1000, 12, psrp=True)] == [4_047_146, 4_489_514]


@pytest.mark.parametrize("host", TOKEN_HOSTS)
def test_backbone_takes_no_part_in_backward(host):
    model = pv.apply(make_host(host), "moment_probing")
    out = assert_backbone_out_of_backward(model, input_for(host))
    assert out.shape == (2, 5)


def reference_mp(head, tokens, pooled):
    """The official Moment_Probing_ViT forward (near pairs), written out group by group."""
    x = head.proj(tokens[:, head.num_prefix_tokens:])
    B, L, h = x.shape
    groups = x.reshape(B, L, head.num_heads, h // head.num_heads).permute(2, 0, 1, 3)  # H x (B, L, d)

    def centre(z):  # Covariance._remove_mean: adaptive average pooling of the (B, d, L) tensor
        zt = z.transpose(1, 2)
        return (zt - F.adaptive_avg_pool2d(zt, (1, 1))).transpose(1, 2)

    mats = []
    for i in range(head.num_heads - 1):
        a, b = centre(head.norm(groups[i])), centre(head.norm(groups[i + 1]))
        cov = a.transpose(1, 2).bmm(b) / L  # (B, d, d)
        mats.append(F.normalize(cov.unsqueeze(1), dim=2))
    moments = head.convs(torch.cat(mats, dim=1)).view(B, -1)
    return (head.classifier1(pooled) + head.classifier2(moments)) / 2


@pytest.mark.parametrize("host", ["vit", "vit_reg_avg", "deit_distilled"])
def test_forward_is_the_official_formula(host):
    model = pv.apply(make_host(host), "moment_probing", hidden_dim=64)
    perturb_trainable(model)
    x = input_for(host)
    with torch.no_grad():
        tokens = model.norm(hidden_states(model, x)[-1])  # timm's forward_features output
        n = model.num_prefix_tokens
        pooled = model.fc_norm(tokens[:, n:].mean(1)) if host == "vit_reg_avg" else tokens[:, 0]
        expected = reference_mp(model.petl.moment_probing, tokens, pooled)
        torch.testing.assert_close(model(x), expected)


def test_psrp_forward_is_the_official_block():
    """Official Block with tuning_mode='psrp': x += attn; w, b = psrp(x); x += b + (w + 1) * mlp(norm2(x))."""
    model = pv.apply(make_host("vit"), "moment_probing", psrp=True, hidden_dim=64)
    perturb_trainable(model)
    head = model.petl.moment_probing
    x = input_for("vit")
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block, psrp in zip(model.blocks, head.psrp):
            h = h + block.ls1(block.attn(block.norm1(h)))
            a = torch.relu(h @ psrp.down.weight.T)
            w, b = a @ psrp.up_weight.weight.T, a @ psrp.up_bias.weight.T
            h = h + block.ls2(b + (w + 1) * block.mlp.forward(block.norm2.forward(h)))  # .forward: no hooks
        tokens = model.norm(h)
        torch.testing.assert_close(model(x), reference_mp(head, tokens, tokens[:, 0]))


def test_psrp_with_zero_up_projections_is_plain_mp():
    mp = perturb_trainable(pv.apply(make_host("vit"), "moment_probing"))
    plus = pv.apply(make_host("vit"), "moment_probing", psrp=True)
    plus.petl.moment_probing.load_state_dict(mp.petl.moment_probing.state_dict(), strict=False)
    with torch.no_grad():
        for psrp in plus.petl.moment_probing.psrp:
            psrp.up_weight.weight.zero_()
            psrp.up_bias.weight.zero_()
    x = input_for("vit")
    torch.testing.assert_close(plus(x), mp(x))


@pytest.mark.parametrize("host", ["vit", "vit_reg_avg", "deit_distilled"])
def test_psrp_trains_through_the_frozen_backbone(host):
    model = pv.apply(make_host(host), "moment_probing", psrp=True)
    model.train()
    out = model(input_for(host))
    assert all(not b.training for b in model.blocks)  # the frozen host runs in eval mode (no drop path)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("petl."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert len(model.petl.moment_probing.psrp) == len(model.blocks)


def test_init_follows_the_official_code():
    model = pv.apply(make_host("vit"), "moment_probing", psrp=True)
    head = model.petl.moment_probing
    torch.testing.assert_close(head.classifier1.weight, model.head.weight)  # starts as the host's head
    torch.testing.assert_close(head.classifier1.bias, model.head.bias)
    assert head.classifier2.weight.shape == (5, 2883)
    for layer in (head.proj, head.classifier2, *[m for p in head.psrp for m in (p.down, p.up_weight, p.up_bias)]):
        assert abs(layer.weight.std().item() - 0.02) < 0.004, layer  # trunc-normal(0.02)
        assert layer.bias is None or not layer.bias.any()
    assert all(p.bias is None for p in head.psrp for p in (p.down, p.up_weight, p.up_bias))
    assert torch.equal(head.norm.weight, torch.ones(128)) and not head.norm.bias.any()
    assert all(c.bias is None and c.weight.shape == (3, 3, 3, 3) for c in (head.convs[0], head.convs[2]))


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = pv.apply(make_host("vit"), "moment_probing", psrp=True)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_save_load_with_psrp(tmp_path):
    model = perturb_trainable(pv.apply(make_host("vit"), "moment_probing", psrp=True, hidden_dim=64, num_heads=2))
    x = input_for("vit")
    expected = model(x)
    pv.save_adapter(model, tmp_path / "a")
    fresh = pv.load_adapter(make_host("vit"), tmp_path / "a")
    assert torch.equal(fresh(x), expected)
    assert fresh.petl.moment_probing.psrp is not None and pv.summary(fresh).trainable == pv.summary(model).trainable


def test_composes_with_vpt():
    model = pv.apply(make_host("vit"), "vpt", num_prompts=3, train_head=False)
    pv.apply(model, "moment_probing")
    model.train()
    model(input_for("vit")).square().mean().backward()
    assert model.petl.vpt.prompts.grad is not None and model.petl.moment_probing.proj.weight.grad is not None


def test_on_the_clip_classifier():
    from test_clip import CLASSES, images, tiny_clip

    from petl_vision.clip import CLIPClassifier

    clf = pv.apply(CLIPClassifier(tiny_clip(), CLASSES), "moment_probing", psrp=True)
    out = clf(images())
    assert out.shape == (2, len(CLASSES))
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in clf.named_parameters() if n.startswith("petl."))


def test_errors():
    with pytest.raises(pv.UnsupportedHostError, match=r"moment_probing.*token-based host.*ResNet.*supported: timm VisionTransformer"):
        pv.apply(make_host("resnet"), "moment_probing")
    headless = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                 depth=2, num_heads=2, num_classes=0)
    with pytest.raises(pv.UnsupportedHostError, match="moment_probing.*Identity.*num_classes > 0"):
        pv.apply(headless, "moment_probing")
    assert not hasattr(headless, "petl")
    model = pv.apply(make_host("vit"), "moment_probing")
    with pytest.raises(pv.MergeError, match="moment_probing.*second-order moments"):
        pv.merge(model)
    with pytest.raises(ValueError, match="hidden_dim=30 must be a positive multiple of num_heads=4"):
        pv.MomentProbingConfig(hidden_dim=30)
    with pytest.raises(ValueError, match="num_heads must be >= 2"):
        pv.MomentProbingConfig(num_heads=1)
    with pytest.raises(ValueError, match="too small"):
        pv.MomentProbingConfig(hidden_dim=16)
    with pytest.raises(ValueError, match="psrp_dim"):
        pv.MomentProbingConfig(psrp_dim=0)


def test_recipe_yaml_maps_onto_the_config():
    from petl_vision.train.config import load_config

    cfg = load_config(ROOT / "configs" / "methods" / "moment_probing.yaml")
    assert cfg.method.name == "moment_probing"
    assert pv.make_config("moment_probing", **cfg.method.overrides) == pv.MomentProbingConfig()
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-4, 0.05)
    assert (cfg.epochs, cfg.sched.warmup_epochs, cfg.sched.min_lr, cfg.batch_size) == (100, 10, 1e-8, 16)
