"""HST: pyramid shapes, meta-token layout, trainable set, gradients, save/load, ViT-B count."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_host

import petl_vision as pv
from petl_vision.methods.hst import STRIDES, feature_pyramid, stage_groups
from petl_vision.models.point_mae import PointTransformer
from petl_vision.train.config import load_config

DEPTH, DIM, NUM_CLASSES = 4, 32, 5


def tiny_vit(img_size=64, patch_size=8, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=patch_size, embed_dim=DIM,
        depth=DEPTH, num_heads=2, num_classes=NUM_CLASSES, **kwargs,
    ).eval()


def images(size=(64, 64), batch=2, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def side_count(widths, groups, vit_dim, in_chans=3, mlp_ratio=4):
    """Trainable parameters of the side network (stem, embeds, bridges, meta norms, blocks, norms)."""
    total, prev = 0, in_chans
    for i, (d, n) in enumerate(zip(widths, groups)):
        embed = (9 * prev * d + 2 * d + 4 * d * d + d) if i == 0 else (9 * prev * d + d)  # conv(+BN+conv)
        block = 2 * d + 3 * (d * d + d) + (d * d + d) + 2 * d + (d * mlp_ratio * d + mlp_ratio * d) + (mlp_ratio * d * d + d)
        total += embed + 2 * d + (vit_dim * d + d) + n * 2 * d + n * block + 2 * d
        prev = d
    return total


@pytest.mark.parametrize("size,patch", [((64, 64), 8), ((32, 64), (4, 8)), ((96, 64), 16)])
def test_pyramid_strides_and_widths(size, patch):
    model = pv.apply(tiny_vit(img_size=size, patch_size=patch), "hst")
    pyramid = feature_pyramid(model, images(size))
    assert [tuple(f.shape) for f in pyramid] == [(2, c, size[0] // s, size[1] // s) for c, s in zip((32, 48, 64, 72), STRIDES)]
    assert STRIDES == (4, 8, 16, 32)
    assert model(images(size)).shape == (2, NUM_CLASSES)


def test_pyramid_widths_follow_the_config():
    narrow = pv.apply(tiny_vit(img_size=32), "hst", widths=(8, 16, 24, 40), num_heads=(1, 2, 3, 5))
    assert [tuple(f.shape[1:]) for f in feature_pyramid(narrow, images((32, 32)))] == [(8, 8, 8), (16, 4, 4), (24, 2, 2), (40, 1, 1)]


def test_meta_tokens_enter_and_leave_each_block():
    model = tiny_vit(reg_tokens=2)  # prefix: CLS + 2 registers
    n_tokens, n_prefix = 3 + 8 * 8, 3
    outer_in, outer_out, inner_in, inner_out = [], [], [], []
    for block in model.blocks:  # hooks registered before HST see the host's layout
        block.register_forward_pre_hook(lambda m, a: outer_in.append(a[0]))
        block.register_forward_hook(lambda m, a, o: outer_out.append(o))
    pv.apply(model, "hst")
    hst = model.petl.hst
    for block in model.blocks:  # hooks registered after HST see the meta token inside the block
        block.register_forward_pre_hook(lambda m, a: inner_in.append(a[0]))
        block.register_forward_hook(lambda m, a, o: inner_out.append(o))
    recorded = {}
    side_forward = hst.side_forward
    hst.side_forward = lambda image, metas, maps: recorded.update(metas=metas, maps=maps) or side_forward(image, metas, maps)

    model(images())
    assert [x.shape[1] for x in outer_in] == [n_tokens] * DEPTH
    assert [x.shape[1] for x in inner_in] == [n_tokens + 1] * DEPTH  # meta token inside the block
    assert [x.shape[1] for x in outer_out] == [n_tokens + 1] * DEPTH  # raw block output
    # removed after the block; the last block's at the final norm's input (see HSTNetwork.remove)
    assert [x.shape[1] for x in inner_out] == [n_tokens] * (DEPTH - 1) + [n_tokens + 1]
    for i in range(DEPTH):
        assert torch.equal(inner_in[i][:, 0], hst.meta_tokens[i].expand(2, -1))  # prepended before CLS
        assert torch.equal(inner_in[i][:, 1:], outer_in[i])
        assert torch.equal(recorded["metas"][i], outer_out[i][:, 0])
        assert torch.equal(recorded["maps"][i], outer_out[i][:, 1 + n_prefix:])  # patch tokens only
        assert torch.equal(inner_out[i], outer_out[i][:, 1:] if i < DEPTH - 1 else outer_out[i])
    assert hst._run is None  # nothing kept after the forward
    assert model.forward_features(images()).shape == (2, n_tokens, DIM) and hst._run is None


def test_trainable_set_and_count():
    model = pv.apply(tiny_vit(), "hst")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {f"blocks.{i}.norm{k}.{w}" for i in range(DEPTH) for k in (1, 2) for w in ("weight", "bias")}
    hst = {n for n, _ in model.named_parameters() if n.startswith("petl.hst.")}
    assert trainable == hst | norms
    assert "petl.hst.meta_tokens" in hst and not model.head.weight.requires_grad
    groups = [1, 1, 1, 1]
    expected = DEPTH * DIM + side_count((32, 48, 64, 72), groups, DIM) + (72 * NUM_CLASSES + NUM_CLASSES) + DEPTH * 4 * DIM
    assert pv.summary(model).trainable == pv.summary(model).by_method["hst"] == expected

    no_norms = pv.apply(tiny_vit(), "hst", train_block_norms=False, num_classes=7)
    assert {n for n, p in no_norms.named_parameters() if p.requires_grad} == hst
    assert pv.summary(no_norms).trainable == expected - DEPTH * 4 * DIM + 2 * 73  # 7 classes instead of 5
    assert no_norms(images()).shape == (2, 7)
    pooled = pv.apply(tiny_vit(), "hst", num_classes=0)
    assert pooled(images()).shape == (2, 72)
    features_host = tiny_vit()
    features_host.reset_classifier(0)  # host head is an Identity: HST returns pooled features too
    assert pv.apply(features_host, "hst")(images()).shape == (2, 72)


def test_gradients_reach_meta_tokens_through_the_backbone():
    model = pv.apply(tiny_vit(), "hst")
    model.train()
    reached = []
    for i, block in enumerate(model.blocks):  # (the block's own output is replaced by HST's hooks)
        block.attn.register_full_backward_hook(lambda m, gi, go, i=i: reached.append(i))
    model(images()).square().mean().backward()
    assert sorted(reached) == list(range(DEPTH))  # every block takes part in the backward pass
    grad = model.petl.hst.meta_tokens.grad
    assert grad is not None and (grad.abs().sum(dim=1) > 0).all()
    # every meta token reaches the loss only through its block: frozen weights get no gradient
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert model.blocks[0].attn.qkv.weight.grad is None and model.patch_embed.proj.weight.grad is None


def test_save_load_round_trip(tmp_path):
    model = pv.apply(tiny_vit(), "hst")
    model.train()
    for seed in range(2):  # move the BatchNorm statistics away from their init
        model(images(seed=seed))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    expected, pyramid = model(images()), feature_pyramid(model, images())
    pv.save_adapter(model, tmp_path / "hst")
    fresh = pv.load_adapter(tiny_vit(), tmp_path / "hst")
    assert torch.equal(fresh(images()), expected)
    assert all(torch.equal(a, b) for a, b in zip(feature_pyramid(fresh, images()), pyramid))
    assert torch.equal(fresh.petl.hst.fc_norm.running_mean, model.petl.hst.fc_norm.running_mean)
    assert fresh.petl.hst.fc_norm.num_batches_tracked.item() == 2
    with pytest.raises(pv.MergeError, match="'hst'"):
        pv.merge(model)


def test_head_batchnorm_follows_the_model_mode(tmp_path):
    """fc_norm is a plain BatchNorm1d(affine=False): its statistics update while the model trains."""
    model = pv.apply(tiny_vit(), "hst")
    norm = model.petl.hst.fc_norm
    assert type(norm) is torch.nn.BatchNorm1d and not norm.affine and norm.eps == 1e-6 and norm.momentum == 0.1
    pooled = []
    norm.register_forward_hook(lambda m, a, o: pooled.append((a[0], o)))
    model.train()
    assert norm.training
    model(images(batch=4))
    (x, out), = pooled
    mean, var = x.mean(0), x.var(0, unbiased=False)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + 1e-6))  # batch statistics
    torch.testing.assert_close(norm.running_mean, 0.1 * mean)
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * x.var(0, unbiased=True))
    assert norm.num_batches_tracked.item() == 1
    model.eval()
    model(images(batch=4))
    assert not norm.training and norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(pooled[1][1], (pooled[1][0] - norm.running_mean) / torch.sqrt(norm.running_var + 1e-6))
    # the adapter keys of the former AffineFreeBatchNorm (same buffers, same names): older adapters still load
    pv.save_adapter(model, tmp_path / "hst")
    saved = json.loads((tmp_path / "hst" / "petl_adapter.json").read_text())["tensors"]
    assert sorted(k for k in saved if k.startswith("petl.hst.fc_norm.")) == [
        "petl.hst.fc_norm.num_batches_tracked", "petl.hst.fc_norm.running_mean", "petl.hst.fc_norm.running_var"]


def test_bridge_then_resize_equals_official_resize_then_bridge():
    g = torch.Generator().manual_seed(0)
    bridge = torch.nn.Linear(DIM, 8)
    vit = torch.randn(2, DIM, 4, 6, generator=g)
    for size in [(16, 24), (4, 6), (2, 3), (3, 5)]:
        official = bridge(F.interpolate(vit, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2))
        ours = F.interpolate(bridge(vit.flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(2, (4, 6)), size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(ours.flatten(2).transpose(1, 2), official)


def test_meta_token_init_bound():
    model = pv.apply(tiny_vit(), "hst")
    bound = math.sqrt(6 / (DIM + DIM))  # xavier_uniform of a (1, 1, D) token
    tokens = model.petl.hst.meta_tokens
    assert tokens.shape == (DEPTH, DIM) and bound * 0.9 < tokens.abs().max() <= bound


def test_stage_groups_and_config_errors():
    assert stage_groups(12) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]  # official block_indices 2/5/8/11
    assert stage_groups(4) == [[0], [1], [2], [3]]
    assert stage_groups(14) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]
    assert stage_groups(12, (1, 3, 7, 11)) == [[0, 1], [2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="must end at the last block, 11"):
        stage_groups(12, (2, 5, 8, 10))
    with pytest.raises(ValueError, match="needs 4 values"):
        pv.HSTConfig(widths=(32, 48, 64))
    with pytest.raises(ValueError, match=r"multiple of its num_heads.*\(48, 5\)"):
        pv.HSTConfig(num_heads=(2, 5, 8, 12))
    with pytest.raises(ValueError, match="increasing"):
        pv.HSTConfig(block_indices=(2, 2, 8, 11))
    model = pv.apply(tiny_vit(), "hst", block_indices=(0, 1, 2, 3))
    assert model(images()).shape == (2, NUM_CLASSES)


def test_unsupported_hosts_are_left_untouched():
    for host, message in [("vit", "at least 4 blocks.*has 2"), ("resnet", "token-based host; got ResNet")]:
        model = make_host(host)
        with pytest.raises(pv.UnsupportedHostError, match=message):
            pv.apply(model, "hst")
        assert not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())
    points = PointTransformer(num_classes=5, num_group=4, group_size=4, dim=32, depth=4, num_heads=2)
    with pytest.raises(pv.UnsupportedHostError, match="image token host.*PointTransformer has no Conv2d"):
        pv.apply(points, "hst")
    assert not hasattr(points, "petl")
    model = pv.apply(tiny_vit(), "vpt")
    with pytest.raises(pv.UnsupportedHostError, match="'hst' cannot be combined with 'vpt'"):
        pv.apply(model, "hst")
    with pytest.raises(ValueError, match="no HST applied"):
        feature_pyramid(model, images())


def test_method_config_file():
    config = load_config(Path(__file__).parents[1] / "configs" / "methods" / "hst.yaml")
    assert config.method.name == "hst" and config.optim.lr == 1e-2 and config.optim.weight_decay == 5e-4
    assert pv.make_config("hst", **config.method.overrides) == pv.HSTConfig()


def test_vit_b_count():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    pv.apply(model, "hst")
    meta_tokens, block_norms, head = 12 * 768, 12 * 2 * 2 * 768, 72 * 100 + 100
    side = side_count((32, 48, 64, 72), [3, 3, 3, 3], 768)
    assert side == 718_760
    assert pv.summary(model).trainable == meta_tokens + side + head + block_norms == 772_140


def test_hst_on_the_open_clip_visual_tower():
    """HST runs on a CLIP classifier through the open_clip host: logits, pyramid, gradients."""
    import copy

    from open_clip.model import CLIP
    from test_clip import CLASSES, TINY_CFG, images

    from petl_vision.clip import CLIPClassifier

    cfg = copy.deepcopy(TINY_CFG)
    cfg["vision_cfg"]["layers"] = 4
    torch.manual_seed(0)
    clf = CLIPClassifier(CLIP(**cfg).eval(), CLASSES)
    pv.apply(clf, "hst", widths=(8, 8, 8, 8), num_heads=(1, 1, 1, 1), num_classes=3)
    x = images()
    logits = clf(x)
    assert logits.shape == (2, 3)
    logits.square().sum().backward()
    for name, p in clf.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert any("ln_1" in n for n, p in clf.named_parameters() if p.requires_grad)  # block norms train
    pyramid = feature_pyramid(clf, x)
    assert [tuple(f.shape) for f in pyramid] == [(2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2), (2, 8, 1, 1)]


def test_dynamic_img_pad_sizes_not_divisible_by_the_patch():
    model = pv.apply(tiny_vit(dynamic_img_size=True, dynamic_img_pad=True), "hst")
    for size in (64, 68, 76):  # 68, 76: padded up to 9 and 10 patches
        pyramid = feature_pyramid(model, images((size, size)))
        assert [tuple(p.shape[-2:]) for p in pyramid] == [(math.ceil(size / s),) * 2 for s in STRIDES]
        assert all(torch.isfinite(p).all() for p in pyramid)
        logits = model(images((size, size)))
        assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()
