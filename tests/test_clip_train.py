"""Few-shot CLIP training: k-shot sampling, class names, config loading, the script end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script
from PIL import Image
from test_clip import TINY_CFG, tiny_clip

import petl_vision as pv
from petl_vision.clip import CLIPClassifier, few_shot_indices, read_class_names
from petl_vision.data import DataError
from petl_vision.train.clip import load_clip_config
from petl_vision.train.config import ConfigError

CONFIG = ROOT / "configs" / "clip_fewshot_oxford_pets.yaml"
CLASSES = ["golden_retriever", "red_car", "tabby_cat"]


def make_folder(root: Path, per_class: dict[str, int]) -> None:
    """PNG images (40 x 40) whose colour depends on the class, with noise."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((40, 40, 3))
                base[..., c] = 200
                img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")


def run_script(argv):
    return load_script("train_clip").main(argv)


def tiny_run_overrides(tmp_path: Path, arch_name: str) -> list[str]:
    """Overrides of a 2-epoch, 2-shot run of a tiny random CLIP (its config saved as `arch_name`.json)
    on a fresh folder of 3 train and 1 val image per class under `tmp_path`."""
    make_folder(tmp_path / "data", {"train": 3, "val": 1})
    arch = tmp_path / f"{arch_name}.json"
    arch.write_text(json.dumps(TINY_CFG))
    return [f"model={arch.stem}", "pretrained=false", f"clip.model_config={arch}", f"data.root={tmp_path / 'data'}",
            "data.shots=2", "data.templates=default", "epochs=2", "batch_size=3", "optim.lr=1e-2"]


def test_few_shot_indices():
    targets = [0] * 20 + [1] * 20 + [2] * 3
    picked = few_shot_indices(targets, 16, seed=1)
    assert len(picked) == 16 + 16 + 3 and picked == sorted(picked)
    assert [sum(targets[i] == c for i in picked) for c in range(3)] == [16, 16, 3]
    assert picked == few_shot_indices(targets, 16, seed=1) != few_shot_indices(targets, 16, seed=2)
    assert few_shot_indices(targets, 0, seed=1) == list(range(len(targets)))


def test_class_names_file(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("golden retriever\n\nred car\ntabby cat\n")
    assert read_class_names(names, CLASSES) == ["golden retriever", "red car", "tabby cat"]
    with pytest.raises(DataError, match="3 class names for 2 class folders"):
        read_class_names(names, CLASSES[:2])
    with pytest.raises(DataError, match="class names file not found"):
        read_class_names(tmp_path / "missing.txt", CLASSES)


def test_config_loading_and_errors():
    cfg = load_clip_config(CONFIG, ["data.shots=4", "clip.train_text=true", "optim.lr=1e-4", "method.grad_dropout_lambda=1.0"])
    assert (cfg.data.shots, cfg.data.templates, cfg.clip.train_text, cfg.train.optim.lr) == (4, "oxford_pets", True, 1e-4)
    assert cfg.train.method.name == "mask_tuning" and cfg.train.method.overrides["grad_dropout_lambda"] == 1.0
    assert (cfg.train.epochs, cfg.train.optim.weight_decay, cfg.train.sched.warmup_epochs) == (30, 0.0, 0.0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['data.shot'\]"):
        load_clip_config(CONFIG, ["data.shot=4"])
    with pytest.raises(ConfigError, match="data.templates: .*unknown template set"):
        load_clip_config(CONFIG, ["data.templates=pets"])
    with pytest.raises(ConfigError, match="grad_dropout_lambda must be in"):
        load_clip_config(CONFIG, ["method.grad_dropout_lambda=2"])
    for item, message in [("data.shots=many", r"override 'data\.shots=many': data\.shots must be int, got 'many'"),
                          ("clip.train_text=maybe", r"override 'clip\.train_text=maybe': clip\.train_text must be bool"),
                          ("clip.tags=x", r"override 'clip\.tags=x': unknown key\(s\) \['clip\.tags'\]; valid: \['clip\.model_config'"),
                          ("clip.tag.x=1", r"override 'clip\.tag\.x=1': 'clip\.tag' is not a section"),
                          ("optim.lr=fast", r"override 'optim\.lr=fast': optim\.lr must be float")]:
        with pytest.raises(ConfigError, match=message):
            load_clip_config(CONFIG, [item])
    cfg = load_clip_config(None, ["data.templates=['a photo of a {}.']", "data.crop_scale=[0.8, 1]", "clip.model_config="])
    assert (cfg.data.templates, cfg.data.crop_scale, cfg.clip.model_config) == (["a photo of a {}."], [0.8, 1], None)


def test_script_runs_16_shots_end_to_end(tmp_path, capsys):
    make_folder(tmp_path / "data", {"train": 18, "val": 4})
    arch = tmp_path / "petl-tiny-clip-b.json"
    arch.write_text(json.dumps(TINY_CFG))
    ckpt = tmp_path / "clip.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_clip(seed=5).state_dict().items()}, str(ckpt))
    result = run_script([
        "--config", str(CONFIG), "--output-dir", str(tmp_path / "run"), "--merge",
        f"model={arch.stem}", f"checkpoint={ckpt}", f"clip.model_config={arch}", f"data.root={tmp_path / 'data'}",
        "data.templates=default", "epochs=2", "batch_size=16", "eval_batch_size=12", "optim.lr=1e-2",
    ])
    printed = capsys.readouterr().out
    assert "3 classes, 48 training images (16 shots), 12 eval images" in printed
    assert "zero-shot: top1" in printed and "-> tuned top1" in printed and "mask_tuning" in printed
    assert len(result["history"]) == 2 and result["history"][-1]["step"] == 2 * 3  # 48 images / 16
    assert 0.0 <= result["zero_shot"]["top1"] <= 100.0 and 0.0 <= result["metrics"]["top1"] <= 100.0
    assert 0.0 < result["masked_fraction"] < 1.0  # lr 1e-2 on scores starting 5e-3 above the threshold
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "run" / "merged.safetensors").is_file()
    # The saved adapter reproduces the tuned classifier on a fresh CLIP loaded from the same file.
    model, tokenizer = pv.clip.load_clip(model_config=arch, pretrained=str(ckpt))
    fresh = pv.load_adapter(CLIPClassifier(model, [c.replace("_", " ") for c in CLASSES], tokenizer=tokenizer), tmp_path / "run" / "adapter")
    tuned = result["model"].eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), tuned(x))


def test_resume_continues_exactly(tmp_path):
    from petl_vision.methods import mask_tuning as mt
    from petl_vision.train.clip import train_clip

    overrides = tiny_run_overrides(tmp_path, "petl-tiny-clip-c")
    full = train_clip(load_clip_config(CONFIG, overrides + [f"output_dir={tmp_path / 'full'}"]))
    train_clip(load_clip_config(CONFIG, overrides + [f"output_dir={tmp_path / 'part'}"]), stop_after_epoch=1)
    resumed = train_clip(load_clip_config(CONFIG, overrides + [f"output_dir={tmp_path / 'part'}"]), resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [2]
    assert resumed["history"][0]["train_loss"] == full["history"][1]["train_loss"]
    for (name, a), (_, b) in zip(mt.masks(full["model"]), mt.masks(resumed["model"])):
        assert torch.equal(a.score, b.score), name


def test_method_hooks_run_in_the_clip_trainer(tmp_path):
    """Mask tuning's terms come from its training hooks: gradient dropout with lambda 0 trains like no
    dropout, lambda 1 differently; masked_fraction is logged per epoch; the zero-shot baseline is the
    model before any method, whatever the method."""
    import petl_vision.methods.mask_tuning as mt
    from petl_vision.train.clip import train_clip

    base = tiny_run_overrides(tmp_path, "petl-tiny-clip-d")

    def run(name, *extra):
        return train_clip(load_clip_config(CONFIG, base + [f"output_dir={tmp_path / name}", *extra]))

    runs = {name: run(name, *extra) for name, extra in {
        "plain": ["method.grad_dropout=false"], "lam0": ["method.grad_dropout_lambda=0.0"],
        "lam1": ["method.grad_dropout_lambda=1.0"], "ssf": ["method=ssf"]}.items()}
    scores = {name: torch.cat([m.score.detach().flatten() for _, m in mt.masks(r["model"])]) for name, r in runs.items() if name != "ssf"}
    assert torch.equal(scores["lam0"], scores["plain"]) and not torch.equal(scores["lam1"], scores["plain"])
    logged = [json.loads(line) for line in (tmp_path / "lam1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["masked_fraction"] for r in logged][-1] == runs["lam1"]["masked_fraction"] == mt.masked_fraction(runs["lam1"]["model"])
    assert "masked_fraction" not in runs["ssf"]["metrics"] and runs["ssf"]["masked_fraction"] is None
    assert len({json.dumps(r["zero_shot"], sort_keys=True) for r in runs.values()}) == 1
