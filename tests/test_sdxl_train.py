"""SDXL in the training scripts: the text conditioning (train/conditioning.py) and scripts/finetune_diffusion.py
on a tiny offline StableDiffusionXLPipeline folder (test_unet_variants.sdxl_pipeline, saved with save_pretrained)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_script
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from test_sara import one_thread, tiny_pipeline  # noqa: F401  (one_thread: module-wide fixture)
from test_unet_variants import host_weights, sdxl_pipeline

import petl_vision as pv
from petl_vision.methods import sara
from petl_vision.methods.spm import membranes_disabled
from petl_vision.train.conditioning import ConditioningError, TextConditioning, is_sdxl
from petl_vision.data.captions import sdxl_image_transform
from petl_vision.train.diffusion import collate_captioned


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    sdxl_pipeline(root).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def sdxl_data(tmp_path_factory):
    """4 captioned images, none square: 20 wide x 30 high (portrait) and 30 x 20 (landscape)."""
    root = tmp_path_factory.mktemp("sdxl_captions")
    rng = np.random.default_rng(0)
    for i in range(4):
        h, w = (30, 20) if i % 2 else (20, 30)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "text": t}) + "\n"
                                                 for i, t in enumerate(["a red square", "a blue circle", "noise", "a green line"])))
    return root


def unet_forward_inputs(conditioning, prompts, size=16):
    states, pooled = conditioning.encode_prompts(prompts)
    time_ids = conditioning.time_ids((size, size), (0, 0), (size, size))
    return states, pooled, time_ids, conditioning.unet_kwargs(states, pooled, time_ids)


def test_sdxl_conditioning_matches_the_pipeline(tmp_path):
    pipe = sdxl_pipeline(tmp_path)
    conditioning = TextConditioning.from_pipeline(pipe)
    assert conditioning.sdxl and is_sdxl(pipe.unet) and len(conditioning.text_encoders) == 2
    prompts = ["a cat", "snoopy playing in the park"]
    with torch.no_grad():
        states, pooled, time_ids, kwargs = unet_forward_inputs(conditioning, prompts)
        # The shapes the UNet expects: states (B, L, cross_attention_dim), text_embeds (B, projection_dim), time_ids (B, 6).
        assert states.shape == (2, 16, pipe.unet.config.cross_attention_dim) == (2, 16, 32)
        assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 32) and kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)
        # diffusers' own SDXL conventions, bit for bit
        expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        assert torch.equal(states, expected) and torch.equal(pooled, expected_pooled)
        expected_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=states.dtype, text_encoder_projection_dim=32)
        assert torch.equal(time_ids, expected_ids)
        out = pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), **kwargs).sample
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    ids = conditioning.time_ids([(30, 20), (20, 30)], [(4, 0), (0, 7)], (16, 16))
    assert ids.tolist() == [[30, 20, 4, 0, 16, 16], [20, 30, 0, 7, 16, 16]]
    with pytest.raises(ConditioningError, match="needs the pooled text embeddings and the time ids"):
        conditioning.unet_kwargs(states)


def test_sd_conditioning_is_the_text_encoders_last_states(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    conditioning = TextConditioning.from_pipeline(pipe)
    assert not conditioning.sdxl
    with torch.no_grad():
        states, pooled = conditioning.encode_prompts(["a cat"])
        ids = pipe.tokenizer(["a cat"], max_length=16, padding="max_length", truncation=True, return_tensors="pt").input_ids
        assert pooled is None and torch.equal(states, pipe.text_encoder(ids)[0])
    assert conditioning.unet_kwargs(states) == {"encoder_hidden_states": states}


def test_sdxl_conditioning_from_a_folder_and_width_checks(sdxl_dir):
    unet = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
    conditioning = TextConditioning.from_pretrained(str(sdxl_dir), unet)
    assert [type(e).__name__ for e in conditioning.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert conditioning.states_dim == 32 and conditioning.projection_dim == 32
    config = dict(unet.config)
    wrong = UNet2DConditionModel.from_config({**config, "projection_class_embeddings_input_dim": 64})
    with pytest.raises(ConditioningError, match="added embedding expects 64 inputs.*give 80"):
        conditioning.check(wrong)
    wrong = UNet2DConditionModel.from_config({**config, "cross_attention_dim": 48})
    with pytest.raises(ConditioningError, match="states of width 32, the UNet's cross-attention expects 48"):
        conditioning.check(wrong)


def test_sdxl_transform_records_original_size_and_crop(sdxl_data):
    image = Image.open(sdxl_data / "img1.png").convert("RGB")  # 20 wide, 30 high -> 16 x 24 after the resize
    x, original, crop = sdxl_image_transform(16, center_crop=True)(image)
    assert x.shape == (3, 16, 16) and original == (30, 20) and crop == (4, 0)
    torch.manual_seed(0)
    tops = {sdxl_image_transform(16)(image)[2] for _ in range(30)}
    assert all(left == 0 and 0 <= top <= 8 for top, left in tops) and len(tops) > 1
    conditioning = TextConditioning.from_pipeline(sdxl_pipeline(sdxl_data.parent / "pipe_for_collate"))
    pixels, batch = collate_captioned([((x, original, crop), "a"), (torch.zeros(3, 16, 16), "b")], conditioning, 16)
    assert pixels.shape == (2, 3, 16, 16) and [i.shape for i in batch["input_ids"]] == [(2, 16), (2, 16)]
    assert batch["time_ids"].tolist() == [[30, 20, 4, 0, 16, 16], [16, 16, 0, 0, 16, 16]]  # no sizes given: resolution, (0, 0)


def run_script(model, data, out, *extra):
    return load_script("finetune_diffusion").main([
        "--model", str(model), "--data", str(data), "--output-dir", str(out), "--no-progress",
        "resolution=16", "batch_size=2", "checkpoint_every=2", "seed=0", "lr=0.01", *extra,
    ])


def test_finetune_sdxl_with_sara(sdxl_dir, sdxl_data, tmp_path, monkeypatch):
    from petl_vision.train import diffusion

    seen = []
    loss_fn = diffusion.noise_prediction_loss

    def spy(unet, vae, conditioning, noise_scheduler, pixels, batch, weight_dtype):
        seen.append(batch["time_ids"].clone())
        return loss_fn(unet, vae, conditioning, noise_scheduler, pixels, batch, weight_dtype)

    monkeypatch.setattr(diffusion, "noise_prediction_loss", spy)
    result = run_script(sdxl_dir, sdxl_data, tmp_path / "run", "--max-steps", "3", "validation_prompt=a square", "validation_every=3",
                        "num_validation_images=1", "validation_inference_steps=2", "method.threshold=0.01", "method.rank_min_dim=8")
    out = tmp_path / "run"
    assert result["steps"] == 3 and len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000003_0.png"]
    # time ids from each image's original size and crop: (h, w) of a 20x30 or 30x20 image, a crop along the long side
    assert len(seen) == 3 and all(t.shape == (2, 6) for t in seen)
    for row in torch.cat(seen).tolist():
        assert row[:2] in ([20, 30], [30, 20]) and row[4:] == [16, 16]
        assert (row[2] == 0 and 0 <= row[3] <= 8) if row[:2] == [20, 30] else (row[3] == 0 and 0 <= row[2] <= 8)

    # Only SaRA's selected entries (current and fixed by the re-selection) moved; every other weight of the UNet is the pipeline's.
    unet = result["unet"]
    before, after = host_weights(UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")), host_weights(unet)
    deltas = sara.sara_module(unet).deltas()
    assert after.keys() == before.keys() and deltas
    moved = 0
    for name, value in after.items():
        if name in deltas:
            mask = torch.zeros(value.numel(), dtype=torch.bool)
            mask[deltas[name].indices.long()] = True
            mask[deltas[name].fixed_indices.long()] = True  # trained before the re-selection at step 1
            assert torch.equal(value.reshape(-1)[~mask], before[name].reshape(-1)[~mask]), name
            moved += int((value.reshape(-1)[mask] != before[name].reshape(-1)[mask]).sum())
        else:
            assert torch.equal(value, before[name]), name
    assert moved > 0

    # The adapter loads onto the pipeline's UNet (and through pv.diffusers.load_sara onto the SDXL pipeline).
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    conditioning = TextConditioning.from_pipeline(pipe)
    with torch.no_grad():
        _, _, _, kwargs = unet_forward_inputs(conditioning, ["a square"])
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
        expected = unet.eval()(x, t, **kwargs).sample
        loaded = pv.load_adapter(UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet"), out / "adapter")
        assert torch.equal(loaded(x, t, **kwargs).sample, expected)
        import petl_vision.diffusers  # noqa: F401

        pv.diffusers.load_sara(pipe, out / "adapter")
        assert torch.equal(pipe.unet(x, t, **kwargs).sample, expected)
    adapter = load_file(out / "adapter" / "adapter.safetensors")
    assert any(k.endswith("values") for k in adapter)

    # Interrupted after step 2, then resumed: the same adapter as the uninterrupted run.
    from petl_vision.train.diffusion import load_diffusion_config, train_diffusion

    monkeypatch.setattr(diffusion, "noise_prediction_loss", loss_fn)
    common = ["resolution=16", "batch_size=2", "checkpoint_every=2", "seed=0", "lr=0.01", "max_steps=3", "method.threshold=0.01",
              "method.rank_min_dim=8"]
    cfg = load_diffusion_config(None, [f"model={sdxl_dir}", f"data={sdxl_data}", f"output_dir={tmp_path / 'cut'}", "progress=false", *common])
    assert train_diffusion(cfg, stop_after_step=2)["adapter_dir"] is None
    resumed = run_script(sdxl_dir, sdxl_data, tmp_path / "cut", "--max-steps", "3", "--resume", "method.threshold=0.01", "method.rank_min_dim=8")
    assert resumed["losses"] == result["losses"][2:]
    again = load_file(tmp_path / "cut" / "adapter" / "adapter.safetensors")
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_sdxl_other_methods(sdxl_dir, sdxl_data, tmp_path, method):
    result = run_script(sdxl_dir, sdxl_data, tmp_path, "--method", method, "--max-steps", "1")
    assert result["steps"] == 1 and np.isfinite(result["losses"][0])
    if method == "full":
        UNet2DConditionModel.from_pretrained(tmp_path / "unet")


def sdxl_noise_predictions(unet, conditioning):
    """As test_spm_train.noise_predictions with SDXL conditioning: eps_spm(x, snoopy) against the erasing
    target eps("") - (eps(snoopy) - eps("")) before / after, and the largest drift of other prompts."""
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([900, 700, 500, 300])
    with torch.no_grad():
        kwargs = {p: unet_forward_inputs(conditioning, [p] * 4)[3] for p in ("snoopy", "", "a red car", "mickey")}
        with membranes_disabled(unet):
            orig = {p: unet(x, t, **k).sample for p, k in kwargs.items()}
        spm = {p: unet(x, t, **k).sample for p, k in kwargs.items()}
    target = orig[""] - (orig["snoopy"] - orig[""])
    before, after = F.mse_loss(orig["snoopy"], target).item(), F.mse_loss(spm["snoopy"], target).item()
    return before, after, max(F.mse_loss(spm[p], orig[p]).item() for p in ("a red car", "mickey"))


def test_erase_concept_on_sdxl(sdxl_dir, tmp_path):
    from test_spm_train import FAST

    from petl_vision.diffusers.spm import load_spm
    from petl_vision.train.erase import load_erase_config, train_erasure

    common = [f"model={sdxl_dir}", "max_steps=10", "checkpoint_every=100", *FAST]
    result = train_erasure(load_erase_config(None, [f"output_dir={tmp_path / 'la'}", *common]))
    assert len(result["losses"]) == 10 and all(np.isfinite(v) for step in result["losses"] for v in step.values())
    assert all(step["anchor"] > 0 for step in result["losses"][1:])  # the anchors ran (0 at step 1: the membrane starts closed)
    conditioning = TextConditioning.from_pipeline(sdxl_pipeline(tmp_path))
    before, after, drift = sdxl_noise_predictions(result["unet"], conditioning)
    # Moved towards the target (by 5% in 10 steps: on this tiny SDXL the anchoring term dominates), others stay put.
    assert after < 0.97 * before and drift < 0.01 * before
    plain = train_erasure(load_erase_config(None, [f"output_dir={tmp_path / 'plain'}", "latent_anchoring=false", *common]))
    _, after_plain, drift_plain = sdxl_noise_predictions(plain["unet"], conditioning)
    assert after_plain < 0.8 * before and drift_plain > 20 * drift  # without anchoring: erases faster, drifts far more
    # the official file loads onto the SDXL pipeline and gives the trained UNet's predictions
    pipe = load_spm(sdxl_pipeline(tmp_path), result["spm_file"], transport=False)
    with torch.no_grad():
        kwargs = unet_forward_inputs(conditioning, ["snoopy"])[3]
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        torch.testing.assert_close(pipe.unet(x, t, **kwargs).sample, result["unet"](x, t, **kwargs).sample, atol=1e-5, rtol=1e-5)
