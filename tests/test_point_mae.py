"""The Point-MAE transformer: forward, VPT through the token-host interface, official checkpoints."""
import pytest
import torch

import petl_vision as pv
from petl_vision.models.point_mae import CheckpointError, PointBlock, PointTransformer, load_official_checkpoint, official_to_ours

TINY = dict(num_classes=5, num_group=8, group_size=8, dim=32, depth=2, num_heads=2)


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return PointTransformer(**{**TINY, **kwargs}).eval()


def clouds(b=3, n=64, seed=0):
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))


def test_forward_and_structure():
    model = tiny()
    assert model(clouds()).shape == (3, 5)
    tokens = model.forward_features(clouds())
    assert tokens.shape == (3, 1 + 8, 32)
    assert all(isinstance(b, PointBlock) for b in model.blocks)
    assert model.head[0].in_features == 2 * 32  # [CLS, max-pool]


def test_block_gives_inserted_tokens_position_zero():
    block = tiny().blocks[0]
    x, pos = torch.randn(2, 1 + 3 + 4, 32), torch.randn(2, 1 + 4, 32)
    full = torch.cat([pos[:, :1], torch.zeros(2, 3, 32), pos[:, 1:]], dim=1)
    assert torch.equal(block(x, pos=pos), block(x + full))


def test_vpt_runs_on_point_transformer(tmp_path):
    model = pv.apply(tiny(), "vpt", num_prompts=3, deep=True)
    assert pv.summary(model).added["vpt"] == 2 * 3 * 32
    model.train()
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1]), with_kwargs=True)
    out = model(clouds())
    assert out.shape == (3, 5) and seen == [1 + 3 + 8]
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"petl.vpt.prompts"} | {f"head.{n}" for n, _ in model.head.named_parameters()}
    model.eval()
    x = clouds(seed=1)
    expected = model(x)
    pv.save_adapter(model, tmp_path / "vpt")
    assert torch.equal(pv.load_adapter(tiny(), tmp_path / "vpt")(x), expected)


def official_layout(model, kind):
    """The model's weights under the key names of an official checkpoint file."""
    sd = model.state_dict()
    out = {}
    for key, value in sd.items():
        official = key.replace("blocks.", "blocks.blocks.", 1) if key.startswith("blocks.") else key
        if kind == "pretrain":  # Point-MAE pre-training: encoder under MAE_encoder, no CLS, no head
            if key.startswith(("cls_", "head.")):
                continue
            out[f"MAE_encoder.{official}"] = value
        elif kind == "finetune":  # Point-MAE fine-tuned, saved from DataParallel
            out["module." + official.replace("head.", "cls_head_finetune.", 1)] = value
        else:  # Point-BERT: transformer_q (with reduce_dim) and a momentum encoder transformer_k
            if key.startswith("head."):
                continue
            out[f"transformer_q.{official}"] = value
            out[f"transformer_k.{official}"] = torch.zeros_like(value)
    if kind == "pretrain":
        out.update({"mask_token": torch.zeros(1, 1, 32), "MAE_decoder.norm.weight": torch.ones(32), "decoder_pos_embed.0.weight": torch.zeros(128, 3)})
    if kind == "bert":
        out["dvae.encoder.first_conv.0.weight"] = torch.zeros(1)
    return {"base_model": out, "epoch": 300, "optimizer": {"state": {}, "param_groups": []}}


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "bert"])
def test_official_checkpoint_loader(kind, tmp_path):
    extra = {"encoder_dims": 16} if kind == "bert" else {}
    source = tiny(seed=1, **extra)
    path = tmp_path / f"{kind}.pth"
    torch.save(official_layout(source, kind), path)
    target = tiny(seed=2, **extra)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_official_checkpoint(target, path)
    kept = ("cls_", "head.") if kind == "pretrain" else ("head.",) if kind == "bert" else ()
    for key, value in target.state_dict().items():
        expected = before[key] if kept and key.startswith(kept) else source.state_dict()[key]
        assert torch.equal(value, expected), key
    assert set(report["missing"]) == {k for k in before if kept and k.startswith(kept)}
    if kind == "finetune":
        x = clouds()
        assert torch.equal(target(x), source(x))
    if kind == "bert":
        assert isinstance(target.reduce_dim, torch.nn.Linear) and any(k.startswith("transformer_k.") for k in report["skipped"])


def test_key_mapping():
    assert official_to_ours("module.MAE_encoder.blocks.blocks.3.attn.qkv.weight") == "blocks.3.attn.qkv.weight"
    assert official_to_ours("base_model.cls_head_finetune.8.bias") == "head.8.bias"
    assert official_to_ours("transformer_q.encoder.second_conv.3.weight") == "encoder.second_conv.3.weight"


class NotATensor:
    pass


def test_loader_refuses_pickle_and_mismatches(tmp_path):
    model = tiny()
    path = tmp_path / "evil.pth"
    torch.save({"base_model": {}, "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*pickle"):
        load_official_checkpoint(model, path)
    wrong = official_layout(tiny(dim=48, num_heads=2), "pretrain")
    torch.save(wrong, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"wide\.pth.*shape mismatch.*MAE_encoder"):
        load_official_checkpoint(model, tmp_path / "wide.pth")
    partial = official_layout(model, "pretrain")
    del partial["base_model"]["MAE_encoder.norm.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing \['norm.weight'\]"):
        load_official_checkpoint(model, tmp_path / "partial.pth")
    torch.save({"state_dict": {"x": 1}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no 'base_model'"):
        load_official_checkpoint(model, tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official_checkpoint(model, tmp_path / "missing.pth")
