"""SPM erasure training (scripts/erase_concept.py) and evaluation (scripts/evaluate_erasure.py) on a tiny pipeline."""
import importlib.util
import json
from pathlib import Path

import pytest
import safetensors
import torch
import torch.nn.functional as F
from conftest import ROOT, load_script
from PIL import Image
from safetensors.torch import load_file
from test_clip import TINY_CFG
from test_sara import one_thread, tiny_pipeline  # noqa: F401  (one_thread: module-wide fixture)

from petl_vision.methods.spm import membranes_disabled
from petl_vision.train.config import ConfigError
from petl_vision.train.erase import anchor_batch, load_erase_config, sample_anchors, train_erasure

# Tiny but complete: 3 DDIM steps for x_t, 16 px (8x8 latents), a learning rate that moves in a few steps.
FAST = ["concept=snoopy", "max_denoising_steps=3", "resolution=16", "dynamic_resolution=false", "lr=0.003", "warmup_steps=0",
        "lr_scheduler=constant", "progress=false"]


def test_config_defaults_are_the_official_recipe():
    cfg = load_erase_config(ROOT / "configs" / "methods" / "spm.yaml", ["concept=snoopy"])
    assert (cfg.rank, cfg.alpha, cfg.max_steps, cfg.batch_size, cfg.lr, cfg.lr_scheduler, cfg.lr_num_cycles, cfg.warmup_steps) == (
        1, 1.0, 3000, 1, 1e-4, "cosine_with_restarts", 3, 500)
    assert (cfg.max_denoising_steps, cfg.sampling_guidance, cfg.erase_guidance, cfg.anchors, cfg.anchor_strength, cfg.surrogate) == (
        30, 3.0, 1.0, 4, 1000.0, "")
    assert load_erase_config(None, ["concept=snoopy"]) == cfg  # the YAML repeats the dataclass defaults
    with pytest.raises(ConfigError, match="concept is empty"):
        load_erase_config(ROOT / "configs" / "methods" / "spm.yaml")
    with pytest.raises(ConfigError, match="unknown key 'steps'"):
        load_erase_config(None, ["concept=x", "steps=3"])


def test_anchor_sampling_follows_the_official_rule():
    target = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    anchors = sample_anchors(target, 64)
    ratio = anchors.flatten(1).norm(dim=1) / target.norm()
    assert anchors.shape == (64, 16, 32) and ratio.min() >= 0.8 and ratio.max() <= 1.2  # U(0.8, 1.2) x the concept's norm
    assert F.cosine_similarity(anchors.flatten(1), target.flatten(1)).abs().max() < 0.2  # random directions
    a, u = anchors[:4], torch.zeros(1, 16, 32)
    assert torch.equal(anchor_batch(a, u, official=False), a)  # the paper: the 4 anchors
    official = anchor_batch(a, u, official=True)  # the official helper's CFG chunk: [u, a_3, u, a_4]
    assert torch.equal(official, torch.stack([u[0], a[2], u[0], a[3]]))


def noise_predictions(unet, pipe):
    """eps_spm(x, snoopy), the erasing target eps("") - (eps(snoopy) - eps("")), and anchor-prompt drift."""
    def embed(p):
        ids = pipe.tokenizer([p] * 4, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([900, 700, 500, 300])
    with torch.no_grad():
        e = {p: embed(p) for p in ("snoopy", "", "a red car", "mickey")}
        with membranes_disabled(unet):
            orig = {p: unet(x, t, v).sample for p, v in e.items()}
        spm = {p: unet(x, t, v).sample for p, v in e.items()}
    target = orig[""] - (orig["snoopy"] - orig[""])
    before, after = F.mse_loss(orig["snoopy"], target).item(), F.mse_loss(spm["snoopy"], target).item()
    drift = max(F.mse_loss(spm[p], orig[p]).item() for p in ("a red car", "mickey"))
    return before, after, drift


def test_erasure_moves_the_concept_to_its_surrogate(pipeline_dir, tmp_path):
    cfg = load_erase_config(None, [f"model={pipeline_dir}", f"output_dir={tmp_path}", "max_steps=10", "checkpoint_every=100", *FAST])
    result = train_erasure(cfg)
    pipe = tiny_pipeline(tmp_path)
    before, after, drift = noise_predictions(result["unet"], pipe)
    assert after < 0.95 * before  # the concept's prediction moved towards eps("") - (eps(c) - eps(""))
    assert drift < 0.01 * before  # other prompts stay close to the original (latent anchoring)
    plain = train_erasure(load_erase_config(None, [f"model={pipeline_dir}", f"output_dir={tmp_path / 'plain'}", "max_steps=10",
                                                   "checkpoint_every=100", "latent_anchoring=false", *FAST]))
    _, after_plain, drift_plain = noise_predictions(plain["unet"], pipe)
    assert after_plain < after and drift_plain > 20 * drift  # without anchoring: erases faster, drifts far more
    assert result["trainable_params"] == 2816 and len(result["losses"]) == 10
    with safetensors.safe_open(result["spm_file"], framework="pt") as f:
        assert Path(result["spm_file"]).name == "snoopy_last.safetensors"
        assert f.metadata() == {"prompts": "snoopy", "rank": "1", "alpha": "1.0"}


def test_script_checkpoints_and_exact_resume(pipeline_dir, tmp_path):
    erase = load_script("erase_concept").main
    common = [f"model={pipeline_dir}", "checkpoint_every=2", "anchors=2", *FAST[1:]]
    full = erase(["--concept", "snoopy", "--max-steps", "3", "--output-dir", str(tmp_path / "full"), "--no-progress", *common])
    out = tmp_path / "full"
    assert full["steps"] == 3 and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert (out / "snoopy_2steps.safetensors").is_file() and (out / "snoopy_last.safetensors").is_file()

    cfg = load_erase_config(None, [f"output_dir={tmp_path / 'cut'}", "max_steps=3", "concept=snoopy", *common])
    assert train_erasure(cfg, stop_after_step=2)["spm_file"] is None
    resumed = erase(["--concept", "snoopy", "--max-steps", "3", "--output-dir", str(tmp_path / "cut"), "--resume", *common])
    assert resumed["losses"] == full["losses"][2:]
    a, b = load_file(out / "snoopy_last.safetensors"), load_file(tmp_path / "cut" / "snoopy_last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_script(pipeline_dir, tmp_path):
    pipe = tiny_pipeline(tmp_path)
    from test_spm import write_official

    spm_file = write_official(tmp_path / "snoopy.safetensors", pipe.unet, "snoopy", seed=1)
    (tmp_path / "petl-tiny-clip-spm.json").write_text(json.dumps(TINY_CFG))
    result = load_script("evaluate_erasure").main([
        "--model", str(pipeline_dir), "--spm", str(spm_file), "--erased", "snoopy", "--preserved", "a red car",
        "--num-images", "2", "--steps", "2", "--height", "16", "--width", "16", "--clip-config", str(tmp_path / "petl-tiny-clip-spm.json"),
        "--clip-pretrained", "none", "--device", "cpu", "--output-dir", str(tmp_path / "eval"),
    ])
    rows = {r["concept"]: r for r in result["concepts"]}
    assert [r["kind"] for r in result["concepts"]] == ["erased", "preserved"]
    for row in rows.values():
        assert all(0 <= row[k] <= 2.5 for k in ("clip_before", "clip_after")) and all(row[k] in (0.0, 0.5, 1.0) for k in ("cer_before", "cer_after"))
    assert rows["snoopy"]["noise_gap"] > 0 and rows["snoopy"]["clip_before"] != rows["snoopy"]["clip_after"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| snoopy | erased |" in report and "| a red car | preserved |" in report and "![before / after](grid.png)" in report
    assert Image.open(tmp_path / "eval" / "grid.png").size == (2 * 2 * 16 + 4, 2 * 16)
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["concepts"] == result["concepts"]


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_attention_choice(pipeline_dir, tmp_path, capsys, monkeypatch):
    """attention=default trains the membrane of the default sdpa; attention=xformers without xformers is one
    `error:` line before anything is loaded or written; a bad value names the key and the accepted values."""
    from diffusers.models.attention_processor import AttnProcessor

    from petl_vision.train import erase
    from petl_vision.train.cli import run_cli

    main = load_script("erase_concept").main
    argv = ["--max-steps", "2", f"model={pipeline_dir}", "anchors=2", *FAST]
    runs = {a: main([*argv, "--output-dir", str(tmp_path / a), f"attention={a}"]) for a in ("sdpa", "default")}
    assert {type(p) for p in runs["default"]["unet"].attn_processors.values()} == {AttnProcessor}
    losses = {a: [step[k] for step in r["losses"] for k in ("loss", "erase", "anchor")] for a, r in runs.items()}
    assert losses["default"] == pytest.approx(losses["sdpa"], rel=1e-5, abs=1e-9) and losses["sdpa"][-1] > 0
    a, b = (load_file(tmp_path / n / "snoopy_last.safetensors") for n in ("sdpa", "default"))
    # Adam's first steps move every entry by about lr (3e-3) whatever its gradient's size: the processors' rounding
    # of near-zero gradients shows up as up to ~1e-4 / 3e-3 of a step
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=2e-4, rtol=0) for k in a)

    monkeypatch.setattr(erase, "load_parts", lambda cfg: pytest.fail("the pipeline was loaded"))
    capsys.readouterr()
    assert run_cli(main, [*argv, "--output-dir", str(tmp_path / "x"), "attention=xformers"]) == 2
    assert capsys.readouterr().err == "error: attention=xformers: xformers is not installed; pip install xformers or use attention=sdpa\n"
    assert not (tmp_path / "x").exists()
    assert run_cli(main, [*argv, "attention=xformer"]) == 2
    assert capsys.readouterr().err == "error: override 'attention=xformer': attention must be one of sdpa, xformers, default, got 'xformer'\n"
