"""open_clip host, zero-shot head, methods on the CLIP image tower, loading CLIP weights from a file."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

import petl_vision as pv
from petl_vision.clip import CLIPClassifier, default_tokenizer, load_clip, resolve_templates, zero_shot_weights
from petl_vision.hosts import token_host

# A tiny CLIP: image 32, patch 8 (16 patches + CLS), width 32, 2 blocks; text width 32, 2 blocks.
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["cat", "dog", "red car"]


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(**copy.deepcopy(TINY_CFG)).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_token_host_describes_the_visual_tower():
    model = tiny_clip()
    clf = CLIPClassifier(model, CLASSES)
    for target in (model.visual, model, clf):
        host = token_host(target)
        assert host.blocks == list(model.visual.transformer.resblocks)
        assert (host.dim, host.num_prefix_tokens, host.patch_size, host.in_chans) == (32, 1, (8, 8), 3)
        assert host.norm is model.visual.ln_post
        assert host.grid_size((32, 32)) == (4, 4)


def test_batch_first_false_tower_is_switched_with_equal_outputs():
    model = tiny_clip()
    x = images()
    with torch.no_grad():
        expected = model.encode_image(x)
    transformer = model.visual.transformer
    transformer.batch_first = False  # an (L, N, D) tower, as open_clip < 2.23 built them
    for block in transformer.resblocks:
        block.attn.batch_first = False
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), expected)
    token_host(model.visual)
    assert transformer.batch_first and all(b.attn.batch_first for b in transformer.resblocks)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), expected)
    pv.apply(model.visual, "vpt", num_prompts=3, train_head=False)
    assert model.visual(x).shape == (2, 16)


@pytest.mark.parametrize("method", ["vpt", "ssf", "mask_tuning"])
def test_methods_train_only_their_tensors_on_the_clip_tower(method):
    clf = CLIPClassifier(tiny_clip(), CLASSES)
    pv.apply(clf, method)
    clf.train()
    out = clf(images())
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 2])).backward()
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    for name, p in clf.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    s = pv.summary(clf)
    assert s.trainable == s.by_method[method] == sum(p.numel() for p in clf.parameters() if p.requires_grad)
    if method == "vpt":  # deep: 2 layers x 10 prompts x width 32
        assert trainable == {"petl.vpt.prompts"} and s.trainable == 2 * 10 * 32
    elif method == "ssf":  # open_clip's MLP linears at least (see the report on the rest)
        mlp = {f"visual.transformer.resblocks.{i}.mlp.{fc}.{t}" for i in range(2) for fc in ("c_fc", "c_proj") for t in ("scale", "shift")}
        assert mlp <= trainable
    else:  # conv1 (32 x 3 x 8 x 8) + 2 x (in_proj 96 x 32 + out_proj 32 x 32)
        assert s.trainable == 32 * 3 * 8 * 8 + 2 * (96 * 32 + 32 * 32)
        assert all(n.endswith(".score") for n in trainable)


def test_vpt_on_the_bare_visual_tower():
    model = tiny_clip()
    pv.apply(model.visual, "vpt", num_prompts=4, deep=False, train_head=False)
    out = model.visual(images())
    out.sum().backward()
    assert out.shape == (2, 16) and model.visual.petl.vpt.prompts.grad.shape == (1, 4, 32)
    with pytest.raises(pv.UnsupportedHostError, match="get_classifier"):
        pv.apply(tiny_clip().visual, "vpt")  # the bare tower has no head to train


def test_zero_shot_head_equals_direct_computation():
    model = tiny_clip()
    templates = ("a photo of a {}.", "a drawing of a {}.")
    clf = CLIPClassifier(model, CLASSES, templates=templates)
    tokenizer = default_tokenizer(model)
    with torch.no_grad():
        rows = []
        for name in CLASSES:
            e = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1).mean(0)
            rows.append(e / e.norm())
        expected = torch.stack(rows)
        torch.testing.assert_close(clf.head.weight, expected)
        assert clf.head.weight.shape == (3, 16)
        assert clf.head.logit_scale == model.logit_scale and torch.isclose(clf.head.logit_scale.exp(), torch.tensor(1 / 0.07))
        x = images()
        logits = model.logit_scale.exp() * F.normalize(model.encode_image(x), dim=-1) @ expected.T
        torch.testing.assert_close(clf(x), logits)
    torch.testing.assert_close(zero_shot_weights(model, CLASSES, templates), expected)


def test_text_head_frozen_by_default_and_tunable_with_train_text():
    clf = pv.apply(CLIPClassifier(tiny_clip(), CLASSES), "ssf")
    assert "head.weight" not in dict(clf.named_parameters()) and "head.weight" in clf.state_dict()
    tuned = CLIPClassifier(tiny_clip(), CLASSES, train_text=True)
    pv.apply(tuned, "ssf")  # SSF trains the head (train_head=True): the class embeddings train
    assert tuned.head.weight.requires_grad
    masked = pv.apply(CLIPClassifier(tiny_clip(), CLASSES, train_text=True), "mask_tuning")
    assert not masked.head.weight.requires_grad  # R-AMT keeps the text head fixed


def test_template_errors():
    assert resolve_templates(None) == ("a photo of a {}.",)
    assert resolve_templates("oxford_pets") == ("a photo of a {}, a type of pet.",)
    assert len(resolve_templates("clip_imagenet")) == 80
    with pytest.raises(ValueError, match="unknown template set.*oxford_pets"):
        resolve_templates("pets")
    with pytest.raises(ValueError, match="must be a string containing"):
        resolve_templates(["a photo of a cat"])


def test_save_load_adapter_on_the_clip_classifier(tmp_path):
    clf = pv.apply(CLIPClassifier(tiny_clip(), CLASSES), "mask_tuning")
    with torch.no_grad():
        for p in clf.parameters():
            if p.requires_grad:
                p.normal_(0.01, 0.3)
    x = images()
    expected = clf(x)
    pv.save_adapter(clf, tmp_path / "a")
    fresh = pv.load_adapter(CLIPClassifier(tiny_clip(), CLASSES), tmp_path / "a")
    assert torch.equal(fresh(x), expected)


def test_mask_tuning_on_the_text_tower_by_pattern():
    model = tiny_clip()
    default = pv.apply(tiny_clip(), "mask_tuning")
    assert all(n.startswith("visual.") for n, p in default.named_parameters() if p.requires_grad)
    pattern = r"^transformer\.resblocks\.\d+\.attn\.(in_proj_weight|out_proj\.weight)$"
    tokens = default_tokenizer(model)(["a photo of a cat."])
    x = images()
    with torch.no_grad():
        text, image = model.encode_text(tokens), model.encode_image(x)
    pv.apply(model, "mask_tuning", target_params=pattern)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(names) == 4 and all(n.startswith("transformer.resblocks.") for n in names)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
        assert not torch.allclose(model.encode_text(tokens), text)
        assert torch.equal(model.encode_image(x), image)


def test_load_clip_from_a_local_file(tmp_path):
    config = tmp_path / "petl-tiny-clip-a.json"
    config.write_text(json.dumps(TINY_CFG))
    source = tiny_clip(seed=3)
    ckpt = tmp_path / "weights.pt"
    torch.save(source.state_dict(), ckpt)
    model, tokenizer = load_clip(model_config=config, pretrained=str(ckpt))
    assert type(model) is CLIP and tokenizer(["a cat"]).shape == (1, 16)
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    random_init, _ = load_clip("petl-tiny-clip-a", pretrained=None)
    assert not torch.equal(random_init.visual.conv1.weight, source.visual.conv1.weight)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file .*missing.pt"):
        load_clip(model_config=config, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="model_config: no such file"):
        load_clip(model_config=tmp_path / "nope.json")
