"""SSF on tensors read directly: open_clip's fused attention, MHA out_proj, patch conv, ResNet attention pool."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_trainable
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from test_clip import CLASSES, images, tiny_clip
from torch import nn
from torch.nn.utils import parametrize

import petl_vision as pv
from petl_vision.clip import CLIPClassifier
from petl_vision.methods.ssf import BiasScaleShift, SSFLayer

WIDTH, HIDDEN, LAYERS = 32, 64, 2  # tiny CLIP tower of test_clip: width 32, mlp_ratio 2, 2 blocks


def tiny_tower(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=8, width=WIDTH, layers=LAYERS, heads=2, mlp_ratio=2.0, output_dim=16).eval()


def tiny_resnet_tower(seed=0):
    torch.manual_seed(seed)
    return ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=8).eval()


def test_every_operation_of_the_clip_tower_and_only_ssf_trains():
    clf = pv.apply(CLIPClassifier(tiny_clip(), CLASSES), "ssf")
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    sites = ["visual.conv1", "visual.ln_pre", "visual.ln_post"]
    for i in range(LAYERS):
        block = f"visual.transformer.resblocks.{i}"
        sites += [f"{block}.{m}" for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")]
        sites += [f"{block}.attn.parametrizations.in_proj_bias.0", f"{block}.attn.out_proj.parametrizations.bias.0"]
    assert trainable == {f"{s}.{t}" for s in sites for t in ("scale", "shift")}
    # 2 x channels per site: per block ln_1, in_proj (3 x 32), out_proj, ln_2, c_fc (64), c_proj; conv1, ln_pre, ln_post
    per_block = 2 * (WIDTH + 3 * WIDTH + WIDTH + WIDTH + HIDDEN + WIDTH)
    s = pv.summary(clf)
    assert s.trainable == s.by_method["ssf"] == LAYERS * per_block + 2 * 3 * WIDTH == 1344
    attn = clf.visual.transformer.resblocks[0].attn
    assert parametrize.is_parametrized(attn, "in_proj_weight") and parametrize.is_parametrized(attn.out_proj, "weight")
    clf.train()
    F.cross_entropy(clf(images()), torch.tensor([0, 2])).backward()
    for name, p in clf.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert attn.parametrizations.in_proj_weight.original.grad is None
    assert attn.parametrizations.in_proj_bias[0].scale.grad.abs().sum() > 0


def test_clip_vit_b16_count():
    with torch.device("meta"):
        tower = VisionTransformer(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512)
    pv.apply(tower, "ssf", train_head=False)
    # the timm ViT-B/16 figure (16,896 per block) plus conv1, ln_pre and ln_post
    assert pv.summary(tower).trainable == 12 * 16_896 + 3 * 2 * 768 == 207_360


@pytest.mark.parametrize("kdim", [None, 6])
def test_attention_equals_the_scale_and_shift_of_each_projection(kdim):
    """A fused (or q/k/v-split) MHA under SSF against attention computed by hand."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(), mha.out_proj.bias.normal_()
    if kdim is None:
        wq, wk, wv = mha.in_proj_weight.detach().clone().chunk(3)
    else:
        wq, wk, wv = (getattr(mha, f"{k}_proj_weight").detach().clone() for k in "qkv")
    b_in, w_out, b_out = mha.in_proj_bias.detach().clone(), mha.out_proj.weight.detach().clone(), mha.out_proj.bias.detach().clone()
    pv.apply(mha, "ssf", train_head=False)
    perturb_trainable(mha)
    ssf_in = mha.parametrizations.in_proj_bias[0]
    ssf_out = mha.out_proj.parametrizations.bias[0]
    assert pv.summary(mha).trainable == 2 * 3 * 8 + 2 * 8

    g = torch.Generator().manual_seed(0)
    q_in, kv_in = torch.randn(2, 5, 8, generator=g), torch.randn(2, 4, kdim or 8, generator=g)
    s, t = ssf_in.scale.detach(), ssf_in.shift.detach()
    q, k, v = ((x @ w.T + b) * sc + sh for x, w, b, sc, sh in zip(
        (q_in, kv_in, kv_in), (wq, wk, wv), b_in.chunk(3), s.chunk(3), t.chunk(3)))
    heads = lambda x: x.unflatten(-1, (2, 4)).transpose(1, 2)  # noqa: E731
    attn = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, dim=-1) @ heads(v)
    expected = (attn.transpose(1, 2).flatten(2) @ w_out.T + b_out) * ssf_out.scale.detach() + ssf_out.shift.detach()
    out = mha(q_in, kv_in, kv_in, need_weights=False)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    keys = list(nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim).state_dict())
    merged = pv.merge(mha)
    assert list(merged.state_dict()) == keys and type(merged) is nn.MultiheadAttention
    torch.testing.assert_close(merged(q_in, kv_in, kv_in, need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)


def test_merge_keeps_the_keys_and_folds_the_patch_shift_into_the_position_embedding():
    tower = tiny_tower()
    keys, pos = list(tower.state_dict()), tower.positional_embedding.detach().clone()
    pv.apply(tower, "ssf", train_head=False)
    perturb_trainable(tower)
    x = images()
    expected = tower(x)
    shift = tower.conv1.shift.detach().clone()
    copied = pv.merge(copy.deepcopy(tower))  # merging a deep copy leaves the original working
    torch.testing.assert_close(tower(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(copied(x), expected, atol=1e-5, rtol=1e-5)
    merged = pv.merge(tower)
    assert list(merged.state_dict()) == keys and merged.conv1.bias is None  # no bias created
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert type(merged.transformer.resblocks[0].attn) is nn.MultiheadAttention
    assert torch.equal(merged.positional_embedding[0], pos[0])  # the class token's row is unchanged
    torch.testing.assert_close(merged.positional_embedding[1:], pos[1:] + shift)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    plain = tiny_tower()
    plain.load_state_dict(merged.state_dict())
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


def test_save_load_identical_outputs_on_the_clip_classifier(tmp_path):
    clf = pv.apply(CLIPClassifier(tiny_clip(), CLASSES, train_text=True), "ssf")
    perturb_trainable(clf)
    x = images()
    expected = clf(x)
    pv.save_adapter(clf, tmp_path / "a")
    fresh = pv.load_adapter(CLIPClassifier(tiny_clip(), CLASSES, train_text=True), tmp_path / "a")
    assert torch.equal(fresh(x), expected)
    assert pv.summary(fresh).trainable == pv.summary(clf).trainable == 1344 + 3 * 16  # + the text head


def test_resnet_tower_attention_pool_is_reached():
    """AttentionPool2d reads q/k/v/c_proj weights directly: wrappers there would never run."""
    rn = tiny_resnet_tower()
    keys = list(rn.state_dict())
    pv.apply(rn, "ssf", train_head=False)
    pool = rn.attnpool
    assert not any(isinstance(getattr(pool, n), SSFLayer) for n in ("q_proj", "k_proj", "v_proj", "c_proj"))
    owners = [m for m in pool.modules() if isinstance(m, BiasScaleShift)]
    embed = pool.q_proj.in_features
    assert sum(o.scale.numel() for o in owners) == 3 * embed + 16
    perturb_trainable(rn)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rn.train()
    rn(x).square().sum().backward()
    for name, p in rn.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert all(o.scale.grad.abs().sum() > 0 for o in owners)
    rn.eval()
    expected = rn(x)
    merged = pv.merge(rn)
    assert list(merged.state_dict()) == keys
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_target_modules_and_bias_free_attention():
    tower = pv.apply(tiny_tower(), "ssf", train_head=False, target_modules=r"in_proj$")
    assert pv.summary(tower).trainable == LAYERS * 2 * 3 * WIDTH
    assert not any(isinstance(m, SSFLayer) for m in tower.modules())
    # no bias to carry the shift: a bias-free MHA is left alone, and then there is nothing to follow
    with pytest.raises(pv.UnsupportedHostError, match="found no linear"):
        pv.apply(nn.MultiheadAttention(8, 2, bias=False), "ssf", train_head=False)


def test_open_clip_norms_are_wrapped_without_importing_open_clip():
    """open_clip's LayerNorm (and LayerNormFp32) are recognised by name, so `import petl_vision` does not
    import open_clip (nor transformers): SSF wraps them as it wraps nn.LayerNorm (not as parametrized sites)."""
    import subprocess
    import sys

    from petl_vision.methods.ssf import SSFLayer

    visual = pv.apply(tiny_clip().visual, "ssf", train_head=False)
    norms = [visual.ln_pre, visual.ln_post, *(n for b in visual.transformer.resblocks for n in (b.ln_1, b.ln_2))]
    assert all(isinstance(n, SSFLayer) and type(n.base).__module__ == "open_clip.transformer" for n in norms)
    code = "import sys, petl_vision; print(sorted(m for m in ('open_clip', 'transformers', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
