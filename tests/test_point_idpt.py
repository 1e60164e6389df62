"""IDPT: trainable count at the official architecture, frozen BatchNorm statistics, prompt placement."""
import pytest
import timm
import torch

import petl_vision as pv
from petl_vision.models.point_mae import PointTransformer, create_point_mae

TINY = dict(num_classes=5, num_group=8, group_size=8, dim=32, depth=3, num_heads=2)


def tiny(seed=0):
    torch.manual_seed(seed)
    return PointTransformer(**TINY).eval()


def clouds(b=4, n=64, seed=0):
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))


def idpt_count(dim, classes, hidden=256):
    """Trainable IDPT parameters by the formula: generator + head + CLS token/position + prompt position."""
    edge = 2 * dim * dim + 2 * dim  # 1x1 conv 2D -> D without bias, BatchNorm
    generator = 3 * edge + 3 * dim * dim + 2 * dim  # three EdgeConvs, conv1d 3D -> D, BatchNorm
    head = (3 * dim * hidden + hidden) + 2 * hidden + (hidden * hidden + hidden) + 2 * hidden + (hidden * classes + classes)
    return generator + head + 2 * dim + dim


@pytest.mark.parametrize("official", [False, True])
def test_trainable_count_at_official_architecture(official):
    with torch.device("meta"):
        model = create_point_mae(40)  # 12 blocks, dim 384, 6 heads, 64 x 32 groups
    pv.apply(model, pv.IDPTConfig(official=official))
    s = pv.summary(model)
    expected = idpt_count(384, 40) - (384 if official else 0)  # official: the prompt position is not trained
    assert s.trainable == s.by_method["idpt"] == expected == (1_703_208 if official else 1_703_592)
    assert 0.07 < s.trainable / s.total < 0.075  # "about 1.7M, 7% of 22M"


def bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


@pytest.mark.parametrize("official", [False, True])
def test_frozen_tokenizer_batchnorm_after_a_training_step(official):
    model = pv.apply(tiny(), "idpt", k=4, official=official)
    tokenizer, generator = bn_stats(model.encoder), bn_stats(model.petl.idpt.generator)
    prompt_pos = model.petl.idpt.prompt_pos.detach().clone()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(clouds()).logsumexp(dim=1).mean().backward()
    optimizer.step()
    after = bn_stats(model.encoder)
    unchanged = all(torch.equal(after[n], tokenizer[n]) for n in tokenizer)
    assert unchanged != official  # ours keeps the frozen tokenizer in eval mode; the official code lets it drift
    assert all(not torch.equal(bn_stats(model.petl.idpt.generator)[n], generator[n]) for n in generator)  # trained
    assert torch.equal(model.petl.idpt.prompt_pos, prompt_pos) == official  # the prompt position trains (ours)
    assert isinstance(model.petl.idpt.prompt_pos, torch.nn.Parameter) != official


def test_prompt_placement_and_gradients():
    model = pv.apply(tiny(), "idpt", k=4)  # prompt at the input of the last block (2 of 0..2)
    lengths = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, a, k: lengths.append((a[0].shape[1], k["pos"].shape[1])), with_kwargs=True)
    model.train()
    out = model(clouds())
    assert out.shape == (4, 5) and lengths == [(9, 9), (9, 9), (10, 10)]
    assert model.head[0].in_features == 3 * 32  # [CLS, prompt, max-pool of patches]
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    trainable = {n.split(".")[0] if not n.startswith("petl") else ".".join(n.split(".")[:3]) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"cls_token", "cls_pos", "head", "petl.idpt.generator", "petl.idpt.prompt_pos"}

    early = pv.apply(tiny(), "idpt", k=4, prompt_layer=1)
    lengths.clear()
    for block in early.blocks:
        block.register_forward_pre_hook(lambda m, a, k: lengths.append(a[0].shape[1]), with_kwargs=True)
    early(clouds())
    assert lengths == [9, 10, 10]  # hooks added after IDPT's see its prompt from block 1 on


def test_head_reads_cls_prompt_and_max_pool():
    model = pv.apply(tiny(), "idpt", k=4)
    tokens = model.forward_features(clouds())
    assert tokens.shape == (4, 1 + 1 + 8, 32)
    features = model.forward_head(tokens, pre_logits=True)
    assert torch.equal(features, torch.cat([tokens[:, 0], tokens[:, 1], tokens[:, 2:].amax(1)], dim=1))


def test_save_load_and_errors(tmp_path):
    model = pv.apply(tiny(), "idpt", k=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = clouds(seed=3)
    expected = model(x)
    pv.save_adapter(model, tmp_path / "idpt")
    assert torch.equal(pv.load_adapter(tiny(), tmp_path / "idpt")(x), expected)
    with pytest.raises(pv.UnsupportedHostError, match="idpt.*PointTransformer"):
        pv.apply(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), "idpt")
    with pytest.raises(ValueError, match="k=20 exceeds the 8 patch tokens"):
        pv.apply(tiny(), "idpt")
    with pytest.raises(pv.MergeError, match="idpt"):
        pv.merge(model)
