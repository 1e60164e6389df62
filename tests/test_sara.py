"""SaRA: sparse selection, sparse training, regulariser, progressive re-selection, files, diffusers plugin."""
import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import petl_vision as pv
import petl_vision.diffusers  # noqa: F401  (pv.diffusers)
from petl_vision.methods import sara


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and the CI machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def write_tokenizer(directory):
    """A byte-level CLIP BPE vocabulary (no merges) as vocab.json + merges.txt."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(chars)})
    vocab.update({c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


def tiny_pipeline(tmp_path, seed=0):
    """A StableDiffusionPipeline small enough for CPU tests: 16x16 images, 8x8 latents."""
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tokenizer_files")), model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, sample_size=16,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=tiny_unet(seed), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def run(unet):
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def weights(model):
    """Host tensor name -> current value (parametrized tensors read through `original`)."""
    return {k.replace("parametrizations.", "").replace(".original", ""): v.detach().clone()
            for k, v in model.state_dict().items() if not k.startswith("petl.")}


def train(unet, steps=3, lr=1e-2, seed=0):
    """AdamW steps on the noise-prediction loss plus SaRA's regulariser; returns the optimizer."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    g, g_rank = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    unet.train()
    for step in range(steps):
        x, t, c = unet_inputs(step)
        loss = torch.nn.functional.mse_loss(unet(x, t, c).sample, torch.randn(x.shape, generator=g))
        (loss + sara.regularization_loss(unet, generator=g_rank)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_selection_counts():
    unet = tiny_unet()
    params = dict(unet.named_parameters())
    pv.apply(unet, "sara", threshold=1e-2)
    deltas = sara.sara_module(unet).deltas()
    expected = {n: int((p.abs() < 1e-2).sum()) for n, p in params.items() if (p.abs() < 1e-2).any()}
    assert {n: d.values.numel() for n, d in deltas.items()} == expected
    assert pv.summary(unet).trainable == sum(expected.values())
    for name, delta in deltas.items():  # indices: the sorted positions with |W| < t
        assert torch.equal(delta.indices.long(), torch.nonzero(params[name].detach().reshape(-1).abs() < 1e-2).squeeze(1))

    unet = tiny_unet()
    pv.apply(unet, "sara", fraction=0.1, module_types=("Linear",), target_params=r"attn\d\.to_q")
    deltas = sara.sara_module(unet).deltas()
    to_q = [n for n, m in tiny_unet().named_modules() if n.endswith(("attn1.to_q", "attn2.to_q"))]
    assert sorted(deltas) == sorted(f"{n}.weight" for n in to_q)
    assert all(d.values.numel() == round(0.1 * d.base.new_zeros(d.shape).numel()) for d in deltas.values())
    with pytest.raises(pv.UnsupportedHostError, match="selects no entry"):
        pv.apply(tiny_unet(), "sara", threshold=1e-12, target_params=r"to_q\.weight$")


def test_only_selected_entries_change_and_state_is_sparse():
    unet = tiny_unet()
    before = weights(unet)
    pv.apply(unet, "sara", threshold=1e-2)
    deltas = sara.sara_module(unet).deltas()
    optimizer = train(unet)
    after = weights(unet)
    assert after.keys() == before.keys()
    changed = 0
    for name, value in after.items():
        if name in deltas:
            mask = torch.zeros(value.numel(), dtype=torch.bool)
            mask[deltas[name].indices.long()] = True
            assert torch.equal(value.reshape(-1)[~mask], before[name].reshape(-1)[~mask])  # bit-identical
            assert torch.equal(value.reshape(-1)[mask], deltas[name].values.detach())
            changed += int((value.reshape(-1)[mask] != before[name].reshape(-1)[mask]).sum())
        else:
            assert torch.equal(value, before[name])
    assert changed > 0.9 * sum(d.values.numel() for d in deltas.values())
    # Gradients and Adam's moments hold exactly the selected entries; host tensors have none.
    params = [p for p in unet.parameters() if p.requires_grad]
    assert sorted(p.numel() for p in params) == sorted(d.values.numel() for d in deltas.values())
    for delta in deltas.values():
        state = optimizer.state[delta.values]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (delta.values.numel(),)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


@pytest.mark.parametrize("host", ["unet"])
def test_regularizer_changes_training(host):
    def final(**overrides):
        unet = pv.apply(tiny_unet(), "sara", threshold=1e-2, rank_min_dim=0, **overrides)
        train(unet, steps=2)
        return run(unet)

    plain = final(rank_weight=0.0)
    regularised = final(rank_weight=1.0)
    defect = final(rank_weight=1.0, official_regularizer_defect=True)
    assert torch.equal(defect, plain)  # the official defect: the term has no effect
    assert not torch.allclose(regularised, plain)
    unet = pv.apply(tiny_unet(), "sara", threshold=1e-2, rank_min_dim=0, rank_weight=1.0)
    with torch.no_grad():
        delta = next(iter(sara.sara_module(unet).deltas().values()))
        assert sara.regularization_loss(pv.apply(tiny_unet(), "sara", rank_min_dim=10**6)).item() == 0.0
    loss = sara.regularization_loss(unet)
    assert loss.item() == 0.0 and loss.requires_grad  # zero update at the start, but a gradient path
    assert delta.values.numel() > 0


def test_progressive_reselection_keeps_values_and_state():
    unet = pv.apply(tiny_unet(), "sara", fraction=0.05)
    optimizer = train(unet, steps=1, lr=0.0)  # Adam state, but no value moves across the selection boundary
    deltas = sara.sara_module(unet).deltas()
    name, delta = max(deltas.items(), key=lambda kv: kv[1].values.numel())
    old_idx, old_values = delta.indices.clone(), delta.values.detach().clone()
    old_avg = optimizer.state[delta.values]["exp_avg"].clone()
    with torch.no_grad():  # these entries "became effective": they must leave the selection
        delta.values[:3] = 10.0
    grown = old_idx[:3].long()
    out_before = run(unet)

    totals = sara.reselect(unet, optimizer)
    assert torch.equal(run(unet), out_before)  # re-selection itself changes no weight
    new_idx = delta.indices.long()
    assert not torch.isin(grown, new_idx).any() and torch.equal(delta.fixed_indices.long().sort().values, grown)
    assert torch.equal(delta.fixed_values, torch.full((3,), 10.0))
    kept = torch.isin(new_idx, old_idx.long())
    assert int(kept.sum()) == old_idx.numel() - 3 and new_idx.numel() == old_idx.numel()  # 3 new entries
    pos = torch.searchsorted(old_idx.long(), new_idx[kept])
    assert torch.equal(delta.values.detach()[kept], old_values[pos])
    state = optimizer.state[delta.values]
    assert torch.equal(state["exp_avg"][kept], old_avg[pos]) and torch.all(state["exp_avg"][~kept] == 0)
    assert totals == {"selected": sum(d.values.numel() for d in deltas.values()), "kept": totals["selected"] - 3, "fixed": 3}
    # Training goes on with the same optimizer; the fixed entries keep their values.
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    x, t, c = unet_inputs(5)
    unet(x, t, c).sample.square().mean().backward()
    optimizer.step()
    assert torch.equal(weights(unet)[name].reshape(-1)[grown], torch.full((3,), 10.0))


def test_progressive_step():
    unet = pv.apply(tiny_unet(), "sara")
    assert sara.reselect_step(unet, 5005) == 2502  # half of training (paper)
    unet = pv.apply(tiny_unet(), "sara", progressive_fraction=None)
    assert sara.reselect_step(unet, 5005) is None  # unset: never re-selects; the official code crashes here
    train(unet, steps=1)
    assert sara.reselect_step(pv.apply(tiny_unet(), "sara", progressive_step=7), 100) == 7


def test_save_load_merge_and_resume(tmp_path):
    unet = pv.apply(tiny_unet(), "sara", fraction=0.05)
    optimizer = train(unet, steps=2)
    with torch.no_grad():
        next(iter(sara.sara_module(unet).deltas().values())).values[:2] = 5.0
    sara.reselect(unet, optimizer)  # so the file also holds fixed entries
    train(unet, steps=1)
    unet.eval()
    expected = run(unet)
    pv.save_adapter(unet, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "petl_adapter.json").read_text())
    assert meta["methods"][0]["config"]["fraction"] == 0.05
    assert any(k.endswith(".fixed_values") and v[0] > 0 for k, v in meta["tensors"].items())

    fresh = pv.load_adapter(tiny_unet(), tmp_path / "a")
    assert torch.equal(run(fresh), expected)
    assert pv.summary(fresh).trainable == pv.summary(unet).trainable
    with pytest.raises(pv.AdapterMismatchError, match="other base weights"):
        pv.load_adapter(tiny_unet(seed=1), tmp_path / "a")

    # Resume from a full state_dict (accelerate checkpoints) on a fresh selection of other sizes.
    resumed = pv.apply(tiny_unet(), "sara", fraction=0.05)
    resumed.load_state_dict(unet.state_dict())
    assert torch.equal(run(resumed), expected)

    keys = list(tiny_unet().state_dict())
    copied = pv.merge(copy.deepcopy(unet))  # the trainer's save_merged: the original keeps working
    assert torch.equal(run(unet), expected) and torch.equal(run(copied), expected)
    merged = pv.merge(unet)
    assert type(merged) is UNet2DConditionModel and list(merged.state_dict()) == keys
    plain = tiny_unet()
    plain.load_state_dict(merged.state_dict())
    torch.testing.assert_close(run(plain), expected, atol=1e-5, rtol=1e-5)


def test_official_checkpoint(tmp_path):
    base = tiny_unet()
    t = 1e-2
    g = torch.Generator().manual_seed(0)
    ckpt = {"threshold": t}
    for i, p in enumerate(base.parameters()):
        ckpt[i] = torch.randn(int((p.abs() < t).sum()), generator=g) * 1e-3
    torch.save(ckpt, tmp_path / "unet.pt")
    before = weights(base)
    unet = pv.diffusers.load_official_checkpoint(tiny_unet(), tmp_path / "unet.pt")
    after = weights(unet)
    for i, (name, p) in enumerate(tiny_unet().named_parameters()):
        mask = (p.abs() < t).reshape(-1)
        assert torch.equal(after[name].reshape(-1)[mask], ckpt[i])
        assert torch.equal(after[name].reshape(-1)[~mask], before[name].reshape(-1)[~mask])
    ckpt[3] = torch.zeros(ckpt[3].numel() + 1)
    torch.save(ckpt, tmp_path / "bad.pt")
    model = tiny_unet()
    with pytest.raises(pv.AdapterMismatchError, match=r"bad.pt: entry 3 .* holds \d+ values"):
        pv.diffusers.load_official_checkpoint(model, tmp_path / "bad.pt")
    assert not hasattr(model, "petl") and torch.equal(run(model), run(tiny_unet()))


def test_diffusers_plugin(tmp_path):
    pipe = tiny_pipeline(tmp_path)

    def sample():
        return pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    base = sample()
    trained = pv.apply(tiny_unet(), "sara", threshold=1e-2)
    train(trained, steps=2, lr=5e-2)
    pv.save_adapter(trained, tmp_path / "sara")

    assert pv.diffusers.load_sara(pipe, tmp_path / "sara") is pipe
    with_sara = sample()
    assert not torch.allclose(with_sara, base)
    trained.eval()
    assert torch.equal(run(pipe.unet), run(trained))
    with pytest.raises(ValueError, match="unload_sara"):
        pv.diffusers.load_sara(pipe, tmp_path / "sara")
    pv.diffusers.unload_sara(pipe)
    assert type(pipe.unet) is UNet2DConditionModel and not hasattr(pipe.unet, "petl")
    assert torch.equal(sample(), base)  # base weights back, bit for bit
    pv.diffusers.unload_sara(pipe)  # no-op

    torch.save({"threshold": 1e-2, 0: torch.zeros(int((pipe.unet.conv_in.weight.abs() < 1e-2).sum()))}, tmp_path / "o.pt")
    pv.diffusers.load_sara(pipe, tmp_path / "o.pt")
    assert torch.all(weights(pipe.unet)["conv_in.weight"].reshape(-1)[pipe.unet.petl.sara.conv_in.weight.indices.long()] == 0)
    pv.diffusers.unload_sara(pipe)
    assert torch.equal(sample(), base)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pv.diffusers.load_sara(pipe, tmp_path / "nowhere")


@pytest.mark.parametrize("method,args", [("sara", {"threshold": 1e-2}), ("lora", {"train_head": False})])
def test_unet_benchmark_workload(method, args):
    from petl_vision.bench import get_workload, worker
    from petl_vision.bench.unet_workload import PRESETS

    result = worker.measure({
        "workload": "diffusers-unet", "model": "tiny-unet", "model_kwargs": {}, "num_classes": 5, "method": method,
        "method_args": args, "batch_size": 1, "steps": 1, "warmup": 0, "device": "cpu", "mixed_precision": "no", "seed": 0,
        "imports": ["petl_vision.bench.unet_workload"],
    })
    assert result["error"] is None and result["peak_train_memory_mib"] > 0
    assert result["merge_max_abs_diff"] < 1e-5  # both merge exactly
    with torch.device("meta"):
        sd15 = get_workload("diffusers-unet")("sd15-unet").build_model()
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964  # Stable Diffusion 1.5's UNet
    assert PRESETS["sd15-unet-lite"]["block_out_channels"] == (320, 640, 1280, 1280)


def test_training_hooks_regularise_and_reselect_at_the_step(monkeypatch):
    method = pv.get_method("sara")
    unet = pv.apply(tiny_unet(), "sara", threshold=1e-2, rank_min_dim=0, rank_weight=1.0, progressive_fraction=0.3)
    config = sara.sara_module(unet).config
    optimizer = train(unet, steps=1)  # a nonzero update, so the nuclear norm is positive
    torch.manual_seed(3)
    expected = sara.regularization_loss(unet)
    torch.manual_seed(3)  # the hook draws its tensor from the global generator, as the function does
    term = method.extra_loss(unet, config)
    assert term.item() == expected.item() > 0 and term.requires_grad

    calls = []
    monkeypatch.setattr(sara, "reselect", lambda model, opt=None: calls.append((model, opt)) or {"selected": 7})
    for step in range(1, 11):  # 10 steps: 0.3 of them is step 3
        report = method.on_step(unet, config, optimizer, step, 10)
        assert len(calls) == (1 if step >= 3 else 0), step
        assert report == ({"reselection": {"selected": 7}} if step == 3 else None), step
    assert calls == [(unet, optimizer)]


def test_official_reselection_resets_state_and_skips_that_update():
    """official_reselection: re-selected before the progressive step's update (after step at - 1), every
    entry's optimizer state reset, and the update of step `at` skipped; the default keeps state and
    updates."""
    method = pv.get_method("sara")
    results = {}
    for official in (False, True):
        unet = pv.apply(tiny_unet(), "sara", threshold=1e-2, rank_weight=0.0, progressive_step=3, official_reselection=official)
        config = sara.sara_module(unet).config
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        reports, snapshots = [], []
        for step in range(1, 5):
            x, t, c = unet_inputs(step)
            unet(x, t, c).sample.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            reports.append(method.on_step(unet, config, optimizer, step, 4))
            values = [d.values for d in sara.sara_module(unet).deltas().values()]
            snapshots.append([v.detach().clone() for v in values])
            if reports[-1] is not None:
                steps = {optimizer.state[v]["step"].item() if v in optimizer.state else 0 for v in values}
                results[official] = {"at": step, "steps_after_reselection": steps}
        results[official]["skipped"] = all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[1]))
        results[official]["moved_after"] = any(not torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[2]))
    assert results[False]["at"] == 3 and results[True]["at"] == 2
    assert results[False]["steps_after_reselection"] == {0, 3} or results[False]["steps_after_reselection"] == {3}
    assert results[True]["steps_after_reselection"] == {0}  # fresh state for every entry
    assert results[True]["skipped"] and not results[False]["skipped"]  # step 3's update: dropped only officially
    assert results[True]["moved_after"] and results[False]["moved_after"]
