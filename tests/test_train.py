"""Training: config loading and overrides, a 2-epoch run, and exact resume."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from petl_vision.train import ConfigError, TrainConfig, build_scheduler, load_config, train
from petl_vision.train.config import SchedConfig

TINY = [
    "model=vit_tiny_patch16_224",
    "pretrained=false",
    "model_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "epochs=2",
    "batch_size=4",
    "sched.warmup_epochs=1",
    "progress=false",
]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """train/ and val/ with 3 classes of 6 (train) / 2 (val) 32x32 PNGs whose brightness is the class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((32, 32, 3)) * 60 + 90 * c).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


def tiny_config(image_root, output_dir, *extra):
    return load_config(None, [*TINY, "data.kind=imagefolder", f"data.root={image_root}", f"output_dir={output_dir}", *extra])


def trainable_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_two_epoch_run(image_root, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(image_root, out, "method.name=ssf", "merge=true"))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    last = json.loads(lines[-1])
    assert last["epoch"] == 2 and 0.0 <= last["top1"] <= 100.0 and "top5" not in last  # 3 classes
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "adapter" / "petl_adapter.json").is_file()
    assert (out / "checkpoints" / "epoch_2").is_dir() and (out / "checkpoints" / "epoch_1").is_dir()
    assert result["merged_path"] and (out / "merged.safetensors").is_file()
    saved = load_file(out / "adapter" / "adapter.safetensors")
    assert saved and result["trainable_params"] < result["total_params"]


def test_resume_matches_uninterrupted(image_root, tmp_path):
    extra = ("method.name=ssf", "grad_accum_steps=2", "clip_grad_norm=1.0", "data.augment=true", "keep_checkpoints=1")
    full = train(tiny_config(image_root, tmp_path / "a", *extra))
    first = train(tiny_config(image_root, tmp_path / "b", *extra), stop_after_epoch=1)
    assert first["stopped_early"] and first["adapter_dir"] is None
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["epoch_1"]
    resumed = train(tiny_config(image_root, tmp_path / "b", *extra), resume=True)
    want, got = trainable_state(full["model"]), trainable_state(resumed["model"])
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2
    assert resumed["metrics"]["top1"] == full["metrics"]["top1"]


@pytest.mark.parametrize("method", ["lst", "unipt"])
def test_side_network_feature_cache_gives_the_same_training(image_root, tmp_path, method):
    """Epoch 2 trains from the on-disk feature cache; losses equal a run without the cache."""
    extra = (f"method.name={method}", "data.augment=false")
    cached = train(tiny_config(image_root, tmp_path / "cached", *extra))
    plain = train(tiny_config(image_root, tmp_path / "plain", *extra, "feature_cache=false"))
    assert (tmp_path / "cached" / "feature_cache").is_dir() and not (tmp_path / "plain" / "feature_cache").exists()
    for a, b in zip(cached["history"], plain["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=2e-3)


def test_lst_fisher_init_runs_from_the_training_data(image_root, tmp_path):
    from petl_vision.methods import lst

    result = train(tiny_config(image_root, tmp_path / "fisher", "method.name=lst", "method.init=fisher", "epochs=1"))
    assert not lst.needs_data_init(result["model"])


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "recipe.yaml").write_text(
        "method: {name: vpt, num_prompts: 5}\noptim: {name: sgd, lr: 1e-2, lr_scaling: linear256}\nepochs: 7\n"
    )
    (tmp_path / "task.yaml").write_text("base: methods/recipe.yaml\nepochs: 3\noptim: {weight_decay: 0}\n")
    cfg = load_config(tmp_path / "task.yaml", ["optim.lr=0.5", "method.num_prompts=50", "data.kind=vtab", "clip_grad_norm=null"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.epochs, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == (3, "sgd", 0.5, 0.0)
    assert cfg.method.name == "vpt" and cfg.method.overrides == {"num_prompts": 50}
    assert cfg.data.kind == "vtab" and cfg.clip_grad_norm is None
    assert load_config(tmp_path / "task.yaml").optim.lr == 0.01  # PyYAML reads 1e-2 as a string
    # a different method drops the base's method fields
    assert load_config(tmp_path / "task.yaml", ["method.name=ssf"]).method.overrides == {}


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*optim\.lr"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'epoch'.*epochs"):
        load_config(None, ["epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'learning_rate'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="optim.lr must be float"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="num_prompt"):
        load_config(None, ["method.name=vpt", "method.num_prompt=3"])
    with pytest.raises(ConfigError, match="optim.name must be one of"):
        load_config(None, ["optim.name=adam"])


def test_cosine_warmup_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SchedConfig(warmup_epochs=1, min_lr=0.0), epochs=3, steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.05


def test_demo_variants_and_cli(tmp_path):

    from petl_vision.train.demo import DEMO_CONFIG, VARIANTS, format_table

    methods = []
    for sub, recipe, identity in VARIANTS:
        cfg = load_config(DEMO_CONFIG, [*recipe, "checkpoint=x.safetensors", "epochs=1", *identity])
        methods.append((cfg.method.name, cfg.pretrained, cfg.epochs, cfg.data.kind, cfg.model))
    assert [m[:2] for m in methods] == [("ssf", True), ("linear", True), ("full", False)]
    assert all(m[2:] == (1, "digits", "demo_vit") for m in methods)
    table = format_table([{"name": "ssf, pretrained", "trainable": 10, "total": 1000, "top1": 91.5, "seconds": 3.0}])
    assert "91.50%" in table and "1.00%" in table

    from petl_vision.train.cli import parse_training_args, training_parser

    parser = training_parser("test", "config")
    args, overrides = parse_training_args(parser, ["--config", "c.yaml", "--resume", "epochs=3", "optim.lr=0.1"])
    assert args.resume is True and overrides == ["epochs=3", "optim.lr=0.1"]
    args, overrides = parse_training_args(parser, ["--config", "c.yaml", "--resume", "runs/x", "--merge", "--output-dir", "o", "--no-progress"])
    assert args.resume == "runs/x" and overrides == ["merge=true", "progress=false", "output_dir=o"]
    _, overrides = parse_training_args(parser, ["--config", "c.yaml", "--mixed-precision", "bf16", "--output-dir", "o"], output_dir=False)
    assert overrides == ["mixed_precision=bf16"]
