"""Regularized Mask Tuning: straight-through mask, threshold, merge, SSF composition, R-AMT terms."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import input_for, make_host
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.nn.utils import parametrize

import petl_vision as pv
from petl_vision.methods import mask_tuning as mt


def tiny_tower(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16).eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def set_scores(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in mt.masks(model):
            m.score.copy_(0.01 + std * torch.randn(m.score.shape, generator=g))


def test_defaults_are_the_official_recipe():
    c = pv.MaskTuningConfig()
    assert (c.score_init, c.threshold, c.reg_weight, c.grad_dropout_lambda, c.kl_temperature) == (1e-2, 5e-3, 1e-4, 0.3, 1.0)
    assert c.grad_dropout and not c.mask_mlp and not c.train_head
    with pytest.raises(ValueError, match="grad_dropout_lambda must be in"):
        pv.MaskTuningConfig(grad_dropout_lambda=1.5)


class NormOnly(nn.Module):
    """A model with nothing mask tuning masks (a bare nn.Sequential is refused by pv.apply itself)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(x)


def test_default_targets_on_open_clip_and_timm():
    tower_names = [n for n, _, _ in mt.find_targets(tiny_tower())]
    assert tower_names == ["conv1.weight"] + [
        f"transformer.resblocks.{i}.attn.{w}" for i in range(2) for w in ("in_proj_weight", "out_proj.weight")
    ]
    with_mlp = [n for n, _, _ in mt.find_targets(tiny_tower(), mask_mlp=True)]
    assert len(with_mlp) == 9 and "transformer.resblocks.1.mlp.c_proj.weight" in with_mlp
    vit_names = [n for n, _, _ in mt.find_targets(make_host("vit"))]
    assert vit_names == ["patch_embed.proj.weight"] + [f"blocks.{i}.attn.{w}.weight" for i in range(2) for w in ("qkv", "proj")]
    resnet = [n for n, m, _ in mt.find_targets(make_host("resnet"))]
    assert resnet and all(isinstance(m, nn.Conv2d) for _, m, _ in mt.find_targets(make_host("resnet")))
    with pytest.raises(pv.UnsupportedHostError, match="found no attention projection or convolution"):
        pv.apply(NormOnly(), "mask_tuning")
    with pytest.raises(pv.UnsupportedHostError, match="matches no weight"):
        pv.apply(tiny_tower(), "mask_tuning", target_params="nothing_here")


def test_threshold_semantics_and_initial_identity():
    tower = tiny_tower()
    x = images()
    expected = tower(x)
    pv.apply(tower, "mask_tuning")
    assert mt.masked_fraction(tower) == 0.0
    torch.testing.assert_close(tower(x), expected, rtol=0, atol=0)  # every score 1e-2 > 5e-3: mask of ones
    mask = mt.masks(tower)[0][1]
    with torch.no_grad():
        mask.score.view(-1)[:3] = torch.tensor([5e-3 - 1e-6, 5e-3, 5e-3 + 1e-6])
    assert mask.mask().view(-1)[:4].tolist() == [0.0, 0.0, 1.0, 1.0]  # kept only where score > threshold
    masked_weight = tower.conv1.weight.view(-1)
    original = tower.conv1.parametrizations.weight.original.view(-1)
    assert masked_weight[:2].tolist() == [0.0, 0.0] and masked_weight[2] == original[2]
    assert mt.mask_counts(tower) == (2, sum(m.score.numel() for _, m in mt.masks(tower)))


def test_straight_through_gradient():
    class OneConv(nn.Module):  # pv.apply refuses a bare nn.Sequential (no forward of its own to hook)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    model = OneConv()
    pv.apply(model, "mask_tuning")
    mask = mt.masks(model)[0][1]
    set_scores(model)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    model.conv(x).square().sum().backward()
    weight = model.conv.parametrizations.weight.original.detach()
    w_eff = (weight * (mask.score > 5e-3)).requires_grad_(True)
    F.conv2d(x, w_eff, model.conv.bias).square().sum().backward()
    torch.testing.assert_close(mask.score.grad, w_eff.grad * weight)  # d mask / d score = 1


def test_merge_bakes_the_mask_into_fused_attention():
    tower = tiny_tower()
    keys = list(tower.state_dict())
    pv.apply(tower, "mask_tuning")
    set_scores(tower)
    x = images()
    expected = tower(x)
    masks = {n: (m.score > m.threshold).clone() for n, m in mt.masks(tower)}
    assert 0.2 < mt.masked_fraction(tower) < 0.8
    copied = pv.merge(copy.deepcopy(tower))  # merging a deep copy leaves the original working
    torch.testing.assert_close(tower(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(copied(x), expected, atol=1e-5, rtol=1e-5)
    merged = pv.merge(tower)
    assert list(merged.state_dict()) == keys and not hasattr(merged, "petl")
    assert type(merged.conv1) is nn.Conv2d and type(merged.transformer.resblocks[0].attn) is nn.MultiheadAttention
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    in_proj = merged.transformer.resblocks[0].attn.in_proj_weight
    assert torch.all(in_proj[~masks["transformer.resblocks.0.attn.in_proj_weight"]] == 0)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    plain = tiny_tower()
    plain.load_state_dict(merged.state_dict())
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


def test_composes_with_ssf_train_both_and_merge():
    model = make_host("vit")
    x = input_for("vit")
    pv.apply(model, "ssf")
    pv.apply(model, "mask_tuning")
    s = pv.summary(model)
    assert s.added["mask_tuning"] == 32 * 3 * 8 * 8 + 2 * (96 * 32 + 32 * 32)  # patch conv + 2 x (qkv + proj)
    assert s.trainable == s.by_method["ssf"] + s.by_method["mask_tuning"]
    set_scores(model)
    model.train()
    model(x).sum().backward()
    assert model.blocks[0].attn.qkv.scale.grad is not None  # SSF after the masked qkv
    assert model.blocks[0].attn.qkv.base.parametrizations.weight[0].score.grad is not None
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    model.eval()
    expected = model(x)
    merged = pv.merge(model)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    assert list(merged.state_dict()) == list(make_host("vit").state_dict())


def perturb_ssf(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale" in name or "shift" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_after_ssf_on_open_clip_masks_the_same_weights_and_merges():
    alone = tiny_tower()
    pv.apply(alone, "mask_tuning")
    both = tiny_tower()
    pv.apply(both, "ssf", train_head=False)
    assert [n for n, _, _ in mt.find_targets(both, target_params="in_proj")] == [
        f"transformer.resblocks.{i}.attn.in_proj_weight" for i in range(2)]  # not the parametrizations' own tensors
    pv.apply(both, "mask_tuning")
    names = [n for n, _ in mt.masks(alone)]
    assert len(names) == 5  # conv1 + 2 x (in_proj_weight, out_proj.weight)
    assert sorted(names) == sorted(n.replace(".base", "") for n, _ in mt.masks(both))  # conv1 is SSF-wrapped
    assert pv.summary(both).added["mask_tuning"] == pv.summary(alone).added["mask_tuning"]
    attn = both.transformer.resblocks[0].attn
    assert [type(p).__name__ for p in attn.parametrizations.in_proj_weight] == ["RowScale", "BinaryMask"]
    assert [type(p).__name__ for p in attn.out_proj.parametrizations.weight] == ["RowScale", "BinaryMask"]
    set_scores(both)
    perturb_ssf(both)
    x = images()
    expected = both(x)
    masks = {n: (m.score > m.threshold) for n, m in mt.masks(both)}
    w, scale = attn.parametrizations.in_proj_weight.original, attn.parametrizations.in_proj_bias[0].scale
    hand = w * scale[:, None] * masks["transformer.resblocks.0.attn.in_proj_weight"]
    torch.testing.assert_close(attn.in_proj_weight, hand, rtol=0, atol=0)
    both.train()
    both(x).sum().backward()
    assert attn.parametrizations.in_proj_weight[1].score.grad.abs().sum() > 0  # both train
    assert attn.parametrizations.in_proj_bias[0].scale.grad.abs().sum() > 0
    both.eval()
    merged = pv.merge(both)
    assert list(merged.state_dict()) == list(tiny_tower().state_dict())
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert torch.equal(merged.transformer.resblocks[0].attn.in_proj_weight, hand)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_deepcopy_keeps_the_ssf_wrapper_of_a_masked_layer():
    model = make_host("vit")
    pv.apply(model, "ssf")
    pv.apply(model, "mask_tuning")
    assert type(copy.deepcopy(model).blocks[0].attn.qkv) is type(model.blocks[0].attn.qkv)


def test_after_ssf_on_the_attention_equals_a_hand_made_tower():
    tower = tiny_tower()
    pv.apply(tower, "ssf", target_modules=r"attn", train_head=False)  # only the fused in-projection and out_proj
    pv.apply(tower, "mask_tuning")
    set_scores(tower)
    perturb_ssf(tower)
    masks = {n: (m.score > m.threshold).float() for n, m in mt.masks(tower)}
    hand = tiny_tower()
    with torch.no_grad():
        hand.conv1.weight.mul_(masks["conv1.weight"])
        for i, (block, ref) in enumerate(zip(hand.transformer.resblocks, tower.transformer.resblocks)):
            p = ref.attn.parametrizations
            s, t = p.in_proj_bias[0].scale, p.in_proj_bias[0].shift
            block.attn.in_proj_weight.mul_(s[:, None] * masks[f"transformer.resblocks.{i}.attn.in_proj_weight"])
            block.attn.in_proj_bias.mul_(s).add_(t)
            q = ref.attn.out_proj.parametrizations
            s, t = q.bias[0].scale, q.bias[0].shift
            block.attn.out_proj.weight.mul_(s[:, None] * masks[f"transformer.resblocks.{i}.attn.out_proj.weight"])
            block.attn.out_proj.bias.mul_(s).add_(t)
    x = images()
    torch.testing.assert_close(tower(x), hand(x), atol=1e-5, rtol=1e-5)


def test_gradient_dropout_formula_on_hand_made_gradients():
    a = torch.tensor([1.0, 1.0, 1.0, -2.0, 0.5])
    b = torch.tensor([1.0, -3.0, -1.0, 1.0, 0.0])
    u = torch.tensor([0.9, 0.2, 0.6, 0.5, 0.99])
    # P = (sign(a) (a + b) / (|a| + |b|) + 1) / 2: same sign -> 1; a=1,b=-3 -> 0.25; a=1,b=-1 -> 0.5; a=-2,b=1 -> 2/3
    p = torch.tensor([1.0, 0.25, 0.5, (1 / 3 + 1) / 2, 1.0])
    torch.testing.assert_close((torch.sign(a) * (a + b) / (a.abs() + b.abs() + 1e-8) + 1) / 2, p)
    assert torch.equal(mt.gradient_dropout(a, b, 0.0, u), a)  # lambda 0: the CE gradient unchanged
    keep = (p > u).float()
    assert keep.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(mt.gradient_dropout(a, b, 1.0, u), keep * a)  # lambda 1: kept or dropped
    torch.testing.assert_close(mt.gradient_dropout(a, b, 0.3, u), (0.7 + 0.3 * keep) * a)


def test_gradient_dropout_backward_matches_the_formula():
    tower = tiny_tower()
    teacher = copy.deepcopy(tower)
    pv.apply(tower, "mask_tuning")
    set_scores(tower, std=0.02)
    params = [p for p in tower.parameters() if p.requires_grad]
    x, target = images(), torch.tensor([1, 3])
    loss_fn = lambda: F.cross_entropy(tower(x), target) + mt.regularization_loss(tower)  # noqa: E731
    kl_fn = lambda: mt.kl_to_teacher(tower(x), teacher(x).detach())  # noqa: E731
    a = torch.autograd.grad(loss_fn(), params)
    b = torch.autograd.grad(kl_fn(), params)
    g = torch.Generator().manual_seed(7)
    expected = [mt.gradient_dropout(ai, bi, 0.3, generator=g) for ai, bi in zip(a, b)]
    logits = tower(x)
    loss = F.cross_entropy(logits, target) + mt.regularization_loss(tower)
    kl = mt.kl_to_teacher(logits, teacher(x).detach())
    mt.gradient_dropout_backward(params, loss, kl, 0.3, generator=torch.Generator().manual_seed(7))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)


def test_regularization_and_kl_terms():
    tower = pv.apply(tiny_tower(), "mask_tuning")
    sizes = [m.score.numel() for _, m in mt.masks(tower)]
    expected = 1e-4 * sum(0.01 * n ** 0.5 for n in sizes)  # unsquared L2 norm per score tensor, summed
    torch.testing.assert_close(mt.regularization_loss(tower), torch.tensor(expected))
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5)
    official = -(F.softmax(t / 2.0, -1) * F.log_softmax(s / 2.0, -1)).sum(1).mean() * 4.0
    torch.testing.assert_close(torch.autograd.grad(mt.kl_to_teacher(s, t, 2.0), s)[0], torch.autograd.grad(official, s)[0])
    assert mt.kl_to_teacher(t, t) < 1e-6


def test_data_driven_selection_keeps_the_largest_squared_gradients():
    model = make_host("vit")
    batches = [(input_for("vit"), torch.tensor([0, 3])), (input_for("vit") * 2, torch.tensor([1, 1]))]
    ranked = mt.rank_by_gradient(model, batches)
    candidates = mt.find_targets(model, mask_mlp=True)
    params = [getattr(m, a) for _, m, a in candidates]
    for p in params:
        p.requires_grad_(True)
    totals = {n: 0.0 for n, _, _ in candidates}
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        for (n, _, _), g in zip(candidates, grads):
            totals[n] += float(g.pow(2).sum())
    assert [n for n, _ in ranked] == sorted(totals, key=lambda n: -totals[n])
    assert all(abs(v - totals[n]) <= 1e-6 * max(totals[n], 1e-12) for n, v in ranked)
    top = sorted(totals, key=lambda n: -totals[n])[:3]  # 30% of 9 candidates -> 3
    pattern = mt.select_by_gradient(make_host("vit"), batches, fraction=0.3)
    fresh = pv.apply(make_host("vit"), "mask_tuning", target_params=pattern)
    assert sorted(n for n, _ in mt.masks(fresh)) == sorted(top)


def test_vit_b16_default_targets_and_count():
    with torch.device("meta"):
        tower = VisionTransformer(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512)
    pv.apply(tower, "mask_tuning")
    names = [n for n, _ in mt.masks(tower)]
    assert names[0] == "conv1.weight" and len(names) == 1 + 12 * 2
    expected = 768 * 3 * 16 * 16 + 12 * (3 * 768 * 768 + 768 * 768)  # patch conv + 12 x (in_proj + out_proj)
    s = pv.summary(tower)
    print(s, "\n ", pv.get_method("mask_tuning").summary_note(tower, pv.MaskTuningConfig()))
    assert expected == 28_901_376 and s.trainable == s.by_method["mask_tuning"] == expected
    assert f"{expected:,}" in str(s)
    assert "25 weight tensors, 28,901,376 weights" in pv.get_method("mask_tuning").summary_note(tower, pv.MaskTuningConfig())


def test_training_hooks_call_the_r_amt_terms():
    from petl_vision.core.registry import TrainStep

    tower = tiny_tower()
    teacher = copy.deepcopy(tower).eval()
    pv.apply(tower, "mask_tuning", reg_weight=0.5, grad_dropout_lambda=1.0)
    set_scores(tower, std=0.02)
    method, config = pv.get_method("mask_tuning"), mt.applied_config(tower)
    torch.testing.assert_close(method.extra_loss(tower, config), mt.regularization_loss(tower, 0.5))
    assert method.owns_backward(config) and not method.owns_backward(pv.make_config("mask_tuning", grad_dropout=False))
    assert method.epoch_metrics(tower, config) == {"masked_fraction": mt.masked_fraction(tower)} and mt.masked_fraction(tower) > 0
    params = [p for p in tower.parameters() if p.requires_grad]
    x, target = images(), torch.tensor([1, 3])

    def loss_and_logits():
        logits = tower(x)
        return F.cross_entropy(logits, target) + mt.regularization_loss(tower), logits

    loss, logits = loss_and_logits()  # expected: gradient_dropout_backward seeded by (seed, step)
    kl = mt.kl_to_teacher(logits, teacher(x).detach())
    mt.gradient_dropout_backward(params, loss, kl, 1.0, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2))
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss, logits = loss_and_logits()
    step = TrainStep(inputs=x, outputs=logits, step=2, seed=5, backward=lambda value, **kw: value.backward(**kw), reference=teacher)
    method.backward(tower, config, loss, step)
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e)
    plain = [g.clone() for g in torch.autograd.grad(loss_and_logits()[0], params)]
    assert any(not torch.equal(g, e) for g, e in zip(plain, expected))  # lambda 1 dropped some entries


def test_each_micro_batch_of_an_accumulation_step_draws_fresh_noise():
    """Two backwards at the same optimizer step (gradient accumulation) get different uniform draws:
    seeds seed * 1_000_003 + step, then + 0x9E3779B1; the next step starts again at micro-batch 0."""
    from petl_vision.core.registry import TrainStep

    tower = tiny_tower()
    teacher = copy.deepcopy(tower).eval()
    pv.apply(tower, "mask_tuning", grad_dropout_lambda=1.0)
    set_scores(tower, std=0.02)
    method, config = pv.get_method("mask_tuning"), mt.applied_config(tower)
    params = [p for p in tower.parameters() if p.requires_grad]
    x, target = images(), torch.tensor([1, 3])

    def grads(step=None, seed=None):
        for p in params:
            p.grad = None
        logits = tower(x)
        loss = F.cross_entropy(logits, target)
        if step is not None:
            method.backward(tower, config, loss, TrainStep(x, logits, step, 5, lambda v, **kw: v.backward(**kw), teacher))
        else:
            kl = mt.kl_to_teacher(logits, teacher(x).detach())
            mt.gradient_dropout_backward(params, loss, kl, 1.0, generator=torch.Generator().manual_seed(seed))
        return [p.grad.clone() for p in params]

    first, second, next_step = grads(step=3), grads(step=3), grads(step=4)
    assert any(not torch.equal(a, b) for a, b in zip(first, second))  # same batch, fresh noise
    for got, seed in [(first, 5 * 1_000_003 + 3), (second, 5 * 1_000_003 + 3 + 0x9E3779B1), (next_step, 5 * 1_000_003 + 4)]:
        for g, e in zip(got, grads(seed=seed)):
            assert torch.equal(g, e)


def test_masked_weight_in_the_autocast_dtype_with_exact_gradients():
    """Under bf16 autocast the parametrization yields W * mask in bf16 directly (what the matmul's cast
    would give, bit for bit), and the scores' gradient is exactly grad(W_eff) * W in fp32."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    pv_layer = copy.deepcopy(layer)
    mask = mt.BinaryMask(pv_layer.weight.detach(), 1e-2, 5e-3)
    with torch.no_grad():
        mask.score[::3] = 0.0  # a third of the rows masked off
    parametrize.register_parametrization(pv_layer, "weight", mask)
    pv_layer.requires_grad_(False)
    mask.score.requires_grad_(True)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pv_layer.weight.dtype == torch.bfloat16
        out = pv_layer(x)
    out.float().square().sum().backward()
    keep = (mask.score > 5e-3).float()
    w_eff = (layer.weight.detach() * keep).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, w_eff, layer.bias.detach())
    ref.float().square().sum().backward()
    assert torch.equal(out, ref)
    assert mask.score.grad.dtype == torch.float32
    assert torch.equal(mask.score.grad, w_eff.grad.float() * layer.weight.detach())
    assert pv_layer.weight.dtype == torch.float32  # no autocast: the fp32 masked weight
