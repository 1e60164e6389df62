"""Fidelity to the official code (issue 13, items 6-8): IDPT checkpoints, LST's pruned init, UniPT's anchor."""

import pytest
import torch

import petl_vision as pv
from petl_vision.methods.idpt import load_official_idpt_checkpoint
from petl_vision.models.point_mae import CheckpointError, PointTransformer, load_official_checkpoint

# ----------------------------------------------------------------------------- IDPT (item 6)
POINT = dict(num_classes=5, num_group=8, group_size=8, dim=32, depth=3, num_heads=2)
OFFICIAL_GENERATOR = {"edge.0": "conv1", "edge.1": "conv2", "edge.2": "conv3", "fuse": "conv5"}


def trained_idpt(seed):
    torch.manual_seed(seed)
    model = pv.apply(PointTransformer(**POINT), "idpt", k=4)
    with torch.no_grad():  # make every tensor distinct from a fresh init, BatchNorm statistics included
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    return model.eval()


def official_idpt_layout(model):
    """The state dict of an IDPT fine-tuned model under the official names (saved from DataParallel)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("petl.idpt.generator."):
            module, _, rest = key[len("petl.idpt.generator."):].partition(".")
            if module == "edge":
                index, _, rest = rest.partition(".")
                module = f"edge.{index}"
            name = OFFICIAL_GENERATOR[module]
            out[f"module.blocks.cls.{name}.{rest}"] = value
            if rest.startswith("1."):  # the official BatchNorms are also registered as bn1, bn2, bn3, bn5
                out[f"module.blocks.cls.bn{name[-1]}.{rest[2:]}"] = value
        elif key == "petl.idpt.prompt_pos":
            out["module.prompt_pos"] = value
        elif key.startswith("blocks."):
            out["module.blocks." + key] = value
        else:
            out["module." + key.replace("head.", "cls_head_finetune.", 1)] = value
    return {"base_model": out, "epoch": 300, "metrics": {"acc": 93.1}}


def test_idpt_official_checkpoint_reproduces_logits(tmp_path):
    source = trained_idpt(1)
    layout = official_idpt_layout(source)
    assert "module.blocks.cls.bn5.running_var" in layout["base_model"]
    assert layout["base_model"]["module.cls_head_finetune.0.weight"].shape == (256, 3 * 32)
    path = tmp_path / "idpt_finetuned.pth"
    torch.save(layout, path)
    target = trained_idpt(2)
    x = torch.randn(4, 64, 3, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(target(x), source(x))
    report = load_official_idpt_checkpoint(target, path)
    assert torch.equal(target(x), source(x))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert report["skipped"] == [] and report["missing"] == []
    assert "petl.idpt.prompt_pos" in report["loaded"] and "petl.idpt.generator.fuse.1.running_mean" in report["loaded"]

    # the plain Point-MAE loader no longer drops the IDPT tensors silently
    plain = trained_idpt(3)
    with pytest.warns(UserWarning, match="load_official_idpt_checkpoint"):
        skipped = load_official_checkpoint(plain, path)["skipped"]
    assert "module.prompt_pos" in skipped and "module.blocks.cls.conv1.0.weight" in skipped


def test_idpt_official_checkpoint_errors(tmp_path):
    source = trained_idpt(1)
    layout = official_idpt_layout(source)
    cases = {
        "no_prompt_pos": (lambda sd: sd.pop("module.prompt_pos"), "no 'prompt_pos'"),
        "no_generator": (lambda sd: sd.pop("module.blocks.cls.conv2.0.weight"), r"missing generator tensors \['edge.1.0.weight'\]"),
        "light": (lambda sd: sd.__setitem__("module.blocks.cls.conv4.0.weight", torch.zeros(1)), r"does not know.*conv4"),
        "alias": (lambda sd: sd.__setitem__("module.blocks.cls.bn1.weight", torch.zeros(32)), "bn1.weight differs"),
        "no_head": (lambda sd: [sd.pop(k) for k in list(sd) if "cls_head_finetune" in k], r"96-input head.*head\.0\.weight"),
    }
    for name, (edit, message) in cases.items():
        sd = dict(layout["base_model"])
        edit(sd)
        torch.save({"base_model": sd}, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=message):
            load_official_idpt_checkpoint(trained_idpt(2), tmp_path / f"{name}.pth")
    with pytest.raises(ValueError, match="apply IDPT to the model first"):
        load_official_idpt_checkpoint(PointTransformer(**POINT), tmp_path / "alias.pth")


# ----------------------------------------------------------------------------- LST (item 7)
def lst_host(seed=0):
    from conftest import make_host

    model = make_host("vit", seed)  # timm ViT, width 32, 2 heads
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # distinct norm weights, so channel choices show
                p.copy_(1 + torch.randn(p.shape, generator=g))
    return model


def keep_largest(score, k):
    """Indices of the k largest entries, in increasing order (the official `select_weights` keeps the order)."""
    order = sorted(range(len(score)), key=lambda i: -float(score[i]))[:k]
    return torch.tensor(sorted(order))


def test_lst_official_pruning_keeps_a_row_set_per_linear():
    import copy

    host = lst_host()
    model = pv.apply(copy.deepcopy(host), "lst", init="magnitude", official=True)
    side, D, d, hidden = model.petl.lst, 32, 4, 16
    imp = lambda w: w.detach().abs()  # noqa: E731  (magnitude: the official importance is the weight itself)
    prev = keep_largest(imp(host.patch_embed.proj.weight).reshape(D, -1).sum(1), d)
    sets = [prev]
    for src, dst in zip(host.blocks, side.blocks):
        torch.testing.assert_close(dst.norm1.weight, src.norm1.weight[prev], rtol=0, atol=0)
        q, k, v = (imp(w)[:, prev] for w in src.attn.qkv.weight.chunk(3))
        rows = keep_largest((q * k * v).sum(1), d)
        for part in range(3):  # q, k and v keep the same rows, chosen by the product of the three importances
            expected = src.attn.qkv.weight[part * D + rows][:, prev]
            torch.testing.assert_close(dst.attn.qkv.weight[part * d:(part + 1) * d], expected, rtol=0, atol=0)
        new = keep_largest(imp(src.attn.proj.weight)[:, rows].sum(1), d)
        torch.testing.assert_close(dst.attn.proj.weight, src.attn.proj.weight[new][:, rows], rtol=0, atol=0)
        torch.testing.assert_close(dst.attn.proj.bias, src.attn.proj.bias[new], rtol=0, atol=0)
        torch.testing.assert_close(dst.norm2.weight, src.norm2.weight[new], rtol=0, atol=0)
        h = keep_largest(imp(src.mlp.fc1.weight)[:, new].sum(1), hidden)
        torch.testing.assert_close(dst.mlp.fc1.weight, src.mlp.fc1.weight[h][:, new], rtol=0, atol=0)
        prev = keep_largest(imp(src.mlp.fc2.weight)[:, h].sum(1), d)
        torch.testing.assert_close(dst.mlp.fc2.weight, src.mlp.fc2.weight[prev][:, h], rtol=0, atol=0)
        sets += [new, prev]
    torch.testing.assert_close(side.norm.weight, host.norm.weight[prev], rtol=0, atol=0)
    # the kept residual set changes along the chain (ours keeps one set everywhere)
    assert len({tuple(s.tolist()) for s in sets}) > 1
    ours = pv.apply(copy.deepcopy(host), "lst", init="magnitude").petl.lst
    assert not torch.equal(ours.blocks[0].attn.qkv.weight, side.blocks[0].attn.qkv.weight)


def test_lst_fisher_is_the_empirical_fisher():
    import copy

    import torch.nn.functional as F

    from petl_vision.methods.lst import fisher_scores

    host = lst_host()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 5, (3,), generator=g)) for _ in range(3)]
    model = pv.apply(copy.deepcopy(host), "lst", init="fisher", fisher_batches=2)
    scores = fisher_scores(model, batches, num_batches=2)
    names = {id(p): n for n, p in model.named_parameters()}
    reference = dict(copy.deepcopy(host).eval().named_parameters())
    per_sample = {n: torch.zeros_like(p) for n, p in reference.items()}
    batch_mean = {n: torch.zeros_like(p) for n, p in reference.items()}
    plain = copy.deepcopy(host).eval()
    for x, y in batches[:2]:  # brute force: each sample alone, its squared gradient summed
        for i in range(len(x)):
            grads = torch.autograd.grad(F.cross_entropy(plain(x[i:i + 1]), y[i:i + 1]), list(plain.parameters()), allow_unused=True)
            for (n, _), gr in zip(plain.named_parameters(), grads):
                if gr is not None:
                    per_sample[n] += gr.pow(2)
        grads = torch.autograd.grad(F.cross_entropy(plain(x), y), list(plain.parameters()), allow_unused=True)
        for (n, _), gr in zip(plain.named_parameters(), grads):
            if gr is not None:
                batch_mean[n] += gr.pow(2)
    assert len(scores) == 2 * 12 + 2 + 1  # 12 tensors per block (2 blocks), the final norm, the patch embedding
    for pid, score in scores.items():
        name = names[pid]
        torch.testing.assert_close(score, per_sample[name], rtol=1e-4, atol=1e-10)
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(per_sample[qkv], batch_mean[qkv], rtol=0.1)  # the old importance was not the Fisher


# ----------------------------------------------------------------------------- UniPT (item 8)
def randomize(side):
    with torch.no_grad():
        for p in side.parameters():
            p.add_(0.2 * torch.randn_like(p))


def test_unipt_anchor_is_read_before_the_head_dropout():
    import timm

    torch.manual_seed(0)
    host = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                             num_heads=2, num_classes=5, drop_rate=0.9)  # drop_rate: timm's head dropout only
    model = pv.apply(host, "unipt")
    randomize(model.petl.unipt)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = model.eval()(x)
    torch.manual_seed(1)
    out = model.train()(x)  # the host's head dropout runs (on the discarded host head) but the anchor is not dropped
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_unipt_clip_anchor_is_the_unnormalised_embedding():
    from test_clip import CLASSES, images, tiny_clip
    from test_unipt import reference_unipt

    from petl_vision.clip import CLIPClassifier
    from petl_vision.methods._side import side_features

    clf = pv.apply(CLIPClassifier(tiny_clip(), CLASSES), "unipt")
    side = clf.petl.unipt
    randomize(side)
    x = images()
    with torch.no_grad():
        raw = clf.visual(x)  # ln_post(CLS) @ proj, not normalised
        features = side_features(clf, x)
        torch.testing.assert_close(features["pooled"], raw, rtol=0, atol=0)
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(x)))
        hidden = list(features["hidden"].unbind(1))
        out = clf(x)
    # the official formula on the raw embedding, then CLIP's normalisation before the zero-shot head
    head = side.head
    side.head = torch.nn.Identity()
    try:
        with torch.no_grad():
            embedding = reference_unipt(side, hidden, raw, lambda t: t[:, 0])
    finally:
        side.head = head
    torch.testing.assert_close(out, head(torch.nn.functional.normalize(embedding, dim=-1)))


@pytest.mark.parametrize("official", [False, True])
def test_unipt_no_cls_host_token_zero_when_official(official):
    from conftest import input_for, make_host
    from test_lst import hidden_states
    from test_unipt import reference_unipt

    model = pv.apply(make_host("vit_reg_avg"), "unipt", official=official)  # no CLS: 2 registers, average pool
    side = model.petl.unipt
    randomize(side)
    x = input_for("vit_reg_avg")
    hs = hidden_states(model, x)
    n = model.num_prefix_tokens
    with torch.no_grad():
        if official:  # token 0 of the last block through the host's norms (norm, fc_norm); token 0 of every layer
            raw, cls = model.fc_norm(model.norm(hs[-1][:, 0])), (lambda t: t[:, 0])
        else:  # the pooled feature (mean of the patch tokens) and the patch-token mean of every layer
            raw, cls = model.forward_head(model.norm(hs[-1]), pre_logits=True), (lambda t: t[:, n:].mean(1))
        torch.testing.assert_close(model(x), reference_unipt(side, hs, raw, cls))


def test_create_point_mae_keeps_the_report(tmp_path):
    from petl_vision.models.point_mae import create_point_mae

    source = trained_idpt(1)
    path = tmp_path / "idpt.pth"
    torch.save(official_idpt_layout(source), path)
    config = {k: v for k, v in POINT.items() if k != "num_classes"}
    with pytest.warns(UserWarning, match="IDPT fine-tuned checkpoint"):
        model = create_point_mae(5, checkpoint=path, **config)
    report = model.checkpoint_report
    assert "module.prompt_pos" in report["skipped"] and "cls_token" in report["loaded"]
    assert any(k.startswith("module.cls_head_finetune.0.weight") for k in report["skipped"])  # the 3D-input head
