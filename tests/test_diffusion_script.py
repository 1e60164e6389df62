"""scripts/finetune_diffusion.py on a tiny offline pipeline and a generated captioned image folder."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script
from PIL import Image
from safetensors.torch import load_file
from test_sara import one_thread, tiny_pipeline  # noqa: F401  (one_thread: module-wide fixture)

import petl_vision as pv
from petl_vision.data.captions import CaptionedImageFolder, read_captions
from petl_vision.data.common import DataError
from petl_vision.train.diffusion import ConfigError, load_diffusion_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """4 images of 20x20: two captioned in metadata.jsonl (one with two captions), two by .txt files."""
    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "img0.png", "text": "a red square"}) + "\n"
        + json.dumps({"file_name": "img1.png", "text": ["a blue square", "a square"]}) + "\n"
    )
    (root / "img2.txt").write_text("a green square\n")
    (root / "img3.txt").write_text("noise")
    return root


def test_captioned_folder(data_dir, tmp_path):
    samples = read_captions(data_dir)
    assert [(p.name, c) for p, c in samples] == [
        ("img0.png", ["a red square"]), ("img1.png", ["a blue square", "a square"]),
        ("img2.png", ["a green square"]), ("img3.png", ["noise"]),
    ]
    image, caption = CaptionedImageFolder(data_dir, caption_prefix="Barbie style, ")[2]
    assert caption == "Barbie style, a green square" and image.size == (20, 20)
    (tmp_path / "x.png").write_bytes((data_dir / "img0.png").read_bytes())
    with pytest.raises(DataError, match=r"no caption for \['x.png'\]"):
        read_captions(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "y.png", "text": "a"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:1: image 'y.png' not found"):
        read_captions(tmp_path)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key 'steps'"):
        load_diffusion_config(None, ["steps=3"])
    with pytest.raises(ConfigError, match="method.name must be one of"):
        load_diffusion_config(None, ["method=vpt"])
    with pytest.raises(ConfigError, match="SaRAConfig has no field"):
        load_diffusion_config(None, ["method.thresh=1"])
    cfg = load_diffusion_config(ROOT / "configs" / "sd15_sara.yaml", ["max_steps=10"])
    assert cfg.method.name == "sara" and cfg.method.overrides["threshold"] == 2e-3 and cfg.max_steps == 10


def run_script(pipeline_dir, data_dir, out, *extra):
    return load_script("finetune_diffusion").main([
        "--model", str(pipeline_dir), "--data", str(data_dir), "--output-dir", str(out), "--no-progress",
        "resolution=16", "batch_size=2", "checkpoint_every=2", "seed=0", "lr=0.01", *extra,
    ])


def test_three_steps_sara_with_validation_and_resume(pipeline_dir, data_dir, tmp_path):
    result = run_script(pipeline_dir, data_dir, tmp_path / "run", "--max-steps", "3", "validation_prompt=a square",
                        "validation_every=2", "num_validation_images=1", "validation_inference_steps=2",
                        "method.threshold=0.01", "method.progressive_step=2", "method.rank_min_dim=8")
    out = tmp_path / "run"
    assert result["steps"] == 3 and len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000002_0.png", "step_000003_0.png"]
    adapter = load_file(out / "adapter" / "adapter.safetensors")
    assert any(k.endswith("fixed_indices") and v.numel() for k, v in adapter.items())  # re-selected at step 2
    unet = pv.load_adapter(tiny_pipeline(tmp_path).unet, out / "adapter")
    x = (torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 32))
    with torch.no_grad():
        expected = result["unet"].eval()(*x).sample
        assert torch.equal(unet(*x).sample, expected)

    # Interrupted after step 2, then resumed: the same adapter as the uninterrupted run.
    from petl_vision.train.diffusion import train_diffusion

    cfg = load_diffusion_config(None, [f"model={pipeline_dir}", f"data={data_dir}", f"output_dir={tmp_path / 'cut'}", "progress=false",
                                       "resolution=16", "batch_size=2", "checkpoint_every=2", "seed=0", "lr=0.01", "max_steps=3",
                                       "method.threshold=0.01", "method.progressive_step=2", "method.rank_min_dim=8"])
    assert train_diffusion(cfg, stop_after_step=2)["adapter_dir"] is None
    resumed = run_script(pipeline_dir, data_dir, tmp_path / "cut", "--max-steps", "3", "--resume", "method.threshold=0.01",
                         "method.progressive_step=2", "method.rank_min_dim=8")
    assert resumed["losses"] == result["losses"][2:]
    again = load_file(tmp_path / "cut" / "adapter" / "adapter.safetensors")
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)


def test_sara_regulariser_and_reselection_run_through_the_method_hooks(pipeline_dir, data_dir, tmp_path, monkeypatch):
    from petl_vision.methods.sara import SaRA

    calls = []

    def spy(hook):
        original = getattr(SaRA, hook).__func__

        def wrapped(cls, model, config, *args):
            calls.append((hook, *args[-2:]) if hook == "on_step" else (hook,))
            return original(cls, model, config, *args)
        monkeypatch.setattr(SaRA, hook, classmethod(wrapped))

    spy("extra_loss")
    spy("on_step")
    sara_args = ["--max-steps", "2", "method.threshold=0.01", "method.progressive_step=1", "method.rank_min_dim=8",
                 "method.rank_weight=10"]
    result = run_script(pipeline_dir, data_dir, tmp_path / "reg", *sara_args)
    assert calls == [("extra_loss",), ("on_step", 1, 2), ("extra_loss",), ("on_step", 2, 2)]
    adapter = load_file(tmp_path / "reg" / "adapter" / "adapter.safetensors")
    assert any(k.endswith("fixed_indices") and v.numel() for k, v in adapter.items())  # re-selected after step 1
    # The same run with the official defect: same regulariser value and random draws, but no gradient from it.
    defect = run_script(pipeline_dir, data_dir, tmp_path / "defect", *sara_args, "method.official_regularizer_defect=true")
    assert defect["losses"][0] == result["losses"][0]  # same first batch and weights
    values = load_file(tmp_path / "defect" / "adapter" / "adapter.safetensors")
    assert values.keys() == adapter.keys()
    assert any(not torch.equal(adapter[k], values[k]) for k in adapter if k.endswith("values"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_other_methods(pipeline_dir, data_dir, tmp_path, method):
    result = run_script(pipeline_dir, data_dir, tmp_path, "--method", method, "--max-steps", "1")
    assert result["steps"] == 1
    if method == "lora":
        tensors = load_file(tmp_path / "adapter" / "adapter.safetensors")
        assert tensors and all("lora_" in k for k in tensors)
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)  # diffusers' loader reads the same folder
        sample = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, pipe.unet.config.cross_attention_dim))
        before = pipe.unet(*sample).sample
        pipe.load_lora_weights(tmp_path / "adapter")
        expected = pv.load_adapter(UNet2DConditionModel.from_pretrained(pipeline_dir / "unet"), tmp_path / "adapter")
        torch.testing.assert_close(pipe.unet(*sample).sample, expected(*sample).sample, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before, expected(*sample).sample)
    else:
        from diffusers import UNet2DConditionModel

        UNet2DConditionModel.from_pretrained(tmp_path / "unet")


def test_unet_conditioning_check():
    """SD 1.x / 2.x and SDXL-style UNets train; erase_concept refuses SDXL; other conditioning is refused."""
    from diffusers import UNet2DConditionModel

    from petl_vision.train.config import ConfigError
    from petl_vision.train.diffusion import check_text_conditioned

    common = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    check_text_conditioned(UNet2DConditionModel(**common), "sd")  # SD 1.x / 2.x: accepted
    sdxl = UNet2DConditionModel(**common, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=80)
    check_text_conditioned(sdxl, "sdxl-dir")  # SDXL: accepted by finetune_diffusion
    with pytest.raises(ConfigError, match="sdxl-dir: the UNet needs conditioning besides text states.*text_time.*1.x / 2.x"):
        check_text_conditioned(sdxl, "sdxl-dir", sdxl=False)
    with pytest.raises(ConfigError, match="class-dir: the UNet needs conditioning besides text states.*class_embed_type"):
        check_text_conditioned(UNet2DConditionModel(**common, class_embed_type="timestep"), "class-dir")


xformers_installed = pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")


@xformers_installed
def test_attention_xformers_not_installed_and_bad_value(pipeline_dir, data_dir, tmp_path, capsys, monkeypatch):
    """attention=xformers without xformers: one `error:` line before the pipeline loads or anything is written
    (in-process and as a real subprocess); a bad value: one line naming the key and the accepted values."""
    from petl_vision.train import diffusion
    from petl_vision.train.cli import run_cli

    monkeypatch.setattr(diffusion, "load_components", lambda cfg: pytest.fail("the pipeline was loaded"))
    argv = ["--model", str(pipeline_dir), "--data", str(data_dir), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    main = load_script("finetune_diffusion").main
    assert run_cli(main, [*argv, "attention=xformers"]) == 2
    assert capsys.readouterr().err == "error: attention=xformers: xformers is not installed; pip install xformers or use attention=sdpa\n"
    assert not (tmp_path / "run").exists()
    assert run_cli(main, [*argv, "attention=flash"]) == 2
    assert capsys.readouterr().err == ("error: override 'attention=flash': attention must be one of sdpa, xformers, default, "
                                       "got 'flash'\n")
    (tmp_path / "c.yaml").write_text("attention: xformers2\n")
    assert run_cli(main, [*argv, "--config", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'c.yaml'}: attention must be one of sdpa, xformers, default, got 'xformers2'\n"

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune_diffusion.py"), *argv, "attention=xformers"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == "error: attention=xformers: xformers is not installed; pip install xformers or use attention=sdpa"
    assert not (tmp_path / "run").exists()


def test_attention_default_trains_as_sdpa(pipeline_dir, data_dir, tmp_path):
    """attention=default (diffusers' AttnProcessor) gives the losses and adapter of the default sdpa (AttnProcessor2_0)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    runs = {a: run_script(pipeline_dir, data_dir, tmp_path / a, "--max-steps", "2", f"attention={a}", "method.threshold=0.01")
            for a in ("sdpa", "default")}
    assert {type(p) for p in runs["sdpa"]["unet"].attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in runs["default"]["unet"].attn_processors.values()} == {AttnProcessor}
    np.testing.assert_allclose(runs["default"]["losses"], runs["sdpa"]["losses"], rtol=1e-5, atol=1e-6)
    a, b = (load_file(tmp_path / name / "adapter" / "adapter.safetensors") for name in ("sdpa", "default"))
    # Adam moves entries by about lr (1e-2) whatever their gradient's size: allow 1% of a step for rounding
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=0) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("values"))  # something was trained
