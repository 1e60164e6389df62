"""Every YAML under configs/ parses with the loader of its script, and the recipes hold the numbers
of /work/shared/METHODS.md (and of the official code their headers cite).

Config parsing only: no model is built, nothing is downloaded. A new config must match one of the
patterns of LOADERS (first match wins), or test_every_config_has_a_loader fails naming it.
"""
from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path

import pytest

from petl_vision.train.clip import CLIPTrainConfig, load_clip_config
from petl_vision.train.config import ConfigError, TrainConfig, load_config
from petl_vision.train.diffusion import DiffusionConfig, default_lr, load_diffusion_config
from petl_vision.train.erase import EraseConfig, load_erase_config
from petl_vision.train.pointcloud import PointTrainConfig, load_point_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _erase(path):  # spm.yaml leaves the concept to --concept; the loader refuses an empty one
    return load_erase_config(path, ["concept=snoopy"])


# kind -> (loader, the config type it returns)
KINDS = {
    "classifier": (load_config, TrainConfig),  # scripts/train_classifier.py
    "clip": (load_clip_config, CLIPTrainConfig),  # scripts/train_clip.py
    "point": (load_point_config, PointTrainConfig),  # scripts/train_pointcloud.py
    "diffusion": (load_diffusion_config, DiffusionConfig),  # scripts/finetune_diffusion.py
    "erase": (_erase, EraseConfig),  # scripts/erase_concept.py
}

# file pattern (relative to configs/, fnmatch) -> kind; the first matching pattern wins, so specific
# names come before the catch-all methods/*.yaml. Method recipes go through the loader of the task
# configs that use them as `base:`.
LOADERS = {
    "methods/spm.yaml": "erase",
    "methods/idpt.yaml": "point",
    "methods/p2p.yaml": "point",
    "methods/mask_tuning.yaml": "clip",  # base of clip_fewshot_*.yaml
    "methods/*.yaml": "classifier",  # ssf, vpt_*, hst, lst, unipt, lora, bitfit, full, linear, sara (classifier form)
    "clip_*.yaml": "clip",
    "pointcloud_*.yaml": "point",
    "modelnet40_*.yaml": "point",
    "scanobjectnn_*.yaml": "point",
    "sd*_*.yaml": "diffusion",
    "vtab_*.yaml": "classifier",
    "imagefolder_*.yaml": "classifier",
    "demo_*.yaml": "classifier",
}


def kind_of(rel: str) -> str:
    """The kind of configs/<rel>; LookupError naming the file and the patterns when none matches."""
    for pattern, kind in LOADERS.items():
        if fnmatch.fnmatchcase(rel, pattern):
            return kind
    raise LookupError(
        f"configs/{rel} matches no pattern of LOADERS in tests/test_configs.py ({', '.join(LOADERS)}): "
        f"add a pattern mapping it to one of {', '.join(KINDS)} (the loader of the script that reads it)"
    )


def all_configs() -> list[str]:
    files = sorted({*CONFIGS.rglob("*.yaml"), *CONFIGS.rglob("*.yml")})
    # configs/accelerate/*.yaml are `accelerate launch --config_file` files: tests/test_fsdp.py parses them
    return [p.relative_to(CONFIGS).as_posix() for p in files if p.relative_to(CONFIGS).parts[0] != "accelerate"]


CONFIG_FILES = all_configs()


def load(rel: str):
    loader, _ = KINDS[kind_of(rel)]
    return loader(CONFIGS / rel)


def pick(cfg, dotted: str):
    """cfg.a.b.c, reading dict keys too (method overrides, model_kwargs)."""
    value = cfg
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


# ----------------------------------------------------------------------------- every file


def test_configs_found():
    assert len(CONFIG_FILES) >= 20, CONFIG_FILES
    assert "methods/ssf.yaml" in CONFIG_FILES and "modelnet40_idpt.yaml" in CONFIG_FILES


@pytest.mark.parametrize("rel", CONFIG_FILES)
def test_every_config_has_a_loader(rel):
    try:
        kind_of(rel)
    except LookupError as e:
        pytest.fail(str(e))


def test_unknown_config_name_is_reported():
    with pytest.raises(LookupError, match=r"configs/brand_new\.yaml matches no pattern of LOADERS"):
        kind_of("brand_new.yaml")
    assert kind_of("methods/ssf.yaml") == "classifier" and kind_of("methods/spm.yaml") == "erase"
    assert kind_of("methods/idpt.yaml") == "point" and kind_of("scanobjectnn_idpt.yaml") == "point"


@pytest.mark.parametrize("rel", CONFIG_FILES)
def test_config_parses_with_its_loader(rel):
    kind = kind_of(rel)
    cfg = load(rel)
    assert isinstance(cfg, KINDS[kind][1]), (rel, type(cfg))
    train = cfg.train if kind in ("clip", "point") else cfg
    assert train.output_dir and train.output_dir.startswith("runs/"), (rel, train.output_dir)
    if kind in ("classifier", "clip", "point"):
        assert train.method.name and train.epochs >= 1 and train.batch_size >= 1 and train.optim.lr > 0
    if kind == "point":
        assert cfg.data.num_points >= 1


def test_a_broken_config_fails_to_parse(tmp_path):
    """The parse test can fail: an unknown key or a bad value in a config is a ConfigError."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS / 'methods' / 'idpt.yaml'}\ndata: {{kind: modelnet40, num_pointz: 1024}}\n")
    with pytest.raises(ConfigError, match=r"data\.num_pointz"):
        load_point_config(bad)
    bad.write_text(f"base: {CONFIGS / 'methods' / 'ssf.yaml'}\noptim: {{lr: fast}}\n")
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(bad)


def test_configs_named_in_docs_exist():
    """Every configs/....yaml that a script, module docstring or the README names is a real file."""
    sources = [*sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "petl_vision").rglob("*.py"))]
    sources += [p for p in (ROOT / "README.md",) if p.is_file()]
    named = {}
    for path in sources:
        for ref in re.findall(r"configs/[\w./-]+?\.ya?ml", path.read_text(encoding="utf-8")):
            named.setdefault(ref, path.relative_to(ROOT).as_posix())
    assert "configs/modelnet40_idpt.yaml" in named  # scripts/train_pointcloud.py's example
    missing = {ref: where for ref, where in named.items() if not (ROOT / ref).is_file()}
    assert not missing, f"configs named but absent: {missing}"


# ----------------------------------------------------------------------------- recipe numbers

SARA_LR = 1e-3 * math.exp(-350 * 2e-3)  # the official SaRA rule at threshold 2e-3 (4.966e-4)

# configs/<rel> -> {dotted field of the loaded config: expected value}. Method recipes against
# METHODS.md; task configs check what they inherit from their recipe plus their own task numbers.
EXPECTED = {
    "methods/ssf.yaml": {  # METHODS.md SSF: AdamW, batch 32, 100 epochs, 10 warm-up, cosine, lr 5e-3, wd 5e-5, no aug
        "method.name": "ssf", "method.overrides.init_std": 0.02, "optim.name": "adamw", "optim.lr": 5e-3,
        "optim.weight_decay": 5e-5, "sched.name": "cosine", "sched.warmup_epochs": 10, "epochs": 100,
        "batch_size": 32, "data.augment": False, "label_smoothing": 0.0,
    },
    "methods/vpt_deep.yaml": {  # METHODS.md VPT: SGD momentum 0.9, cosine, 100 epochs, lr / 256 * batch
        "method.name": "vpt", "method.overrides.deep": True, "method.overrides.num_prompts": 10,
        "method.overrides.dropout": 0.0, "optim.name": "sgd", "optim.momentum": 0.9, "optim.lr_scaling": "linear256",
        "optim.lr": 2.5, "optim.weight_decay": 1e-4, "sched.name": "cosine", "sched.warmup_epochs": 10,
        "epochs": 100, "batch_size": 128, "data.augment": False,
    },
    "methods/vpt_shallow.yaml": {  # the deep recipe (base: vpt_deep.yaml), prompts at the input only
        "method.name": "vpt", "method.overrides.deep": False, "method.overrides.num_prompts": 10,
        "optim.name": "sgd", "optim.momentum": 0.9, "optim.lr_scaling": "linear256", "epochs": 100, "batch_size": 128,
    },
    "methods/hst.yaml": {  # METHODS.md HST: AdamW lr 1e-2, wd 5e-4, batch 32, 100 epochs, 10 warm-up
        "method.name": "hst", "method.overrides.widths": [32, 48, 64, 72], "method.overrides.num_heads": [2, 4, 8, 12],
        "method.overrides.train_block_norms": True, "optim.name": "adamw", "optim.lr": 1e-2,
        "optim.weight_decay": 5e-4, "sched.warmup_epochs": 10, "epochs": 100, "batch_size": 32, "data.augment": False,
    },
    "methods/lst.yaml": {  # METHODS.md LST: r = 8, g = sigmoid(alpha / 0.1), alpha 0, Fisher pruning init
        "method.name": "lst", "method.overrides.reduction": 8, "method.overrides.gate_temperature": 0.1,
        "method.overrides.gate_init": 0.0, "method.overrides.init": "fisher", "method.overrides.layers": None,
        "optim.name": "adamw", "optim.lr": 3e-3, "epochs": 100, "batch_size": 32, "data.augment": False,
    },
    "methods/unipt.yaml": {
        "method.name": "unipt", "method.overrides.reduction": 2, "method.overrides.eps": 1e-6,
        "optim.name": "adamw", "optim.lr": 1e-3, "epochs": 100, "batch_size": 32, "data.augment": False,
    },
    "methods/mask_tuning.yaml": {  # METHODS.md R-AMT: Adam lr 8e-5, 30 epochs, cosine, batch 32, crop (0.5, 1)
        "train.method.name": "mask_tuning", "train.method.overrides.score_init": 1e-2,
        "train.method.overrides.threshold": 5e-3, "train.method.overrides.mask_mlp": False,
        "train.method.overrides.reg_weight": 1e-4, "train.method.overrides.grad_dropout": True,
        "train.method.overrides.grad_dropout_lambda": 0.3, "train.method.overrides.kl_temperature": 1.0,
        "train.optim.name": "adamw", "train.optim.lr": 8e-5, "train.optim.weight_decay": 0.0,
        "train.sched.name": "cosine", "train.sched.warmup_epochs": 0, "train.epochs": 30, "train.batch_size": 32,
        "data.augment": True, "data.crop_scale": [0.5, 1.0], "data.shots": 16,
    },
    "methods/sara.yaml": {  # METHODS.md SaRA: |W| < 2e-3, nuclear norm 5e-4, re-selection at half
        "method.name": "sara", "method.overrides.threshold": 2e-3, "method.overrides.rank_weight": 5e-4,
        "method.overrides.progressive_fraction": 0.5, "optim.name": "adamw", "optim.lr": pytest.approx(SARA_LR, rel=1e-3),
        "optim.weight_decay": 1e-2, "sched.name": "cosine",
    },
    "methods/spm.yaml": {  # METHODS.md SPM: SD 1.4, rank 1 alpha 1, 3000 steps, batch 1, lr 1e-4, ...
        "model": "CompVis/stable-diffusion-v1-4", "rank": 1, "alpha": 1.0, "max_steps": 3000, "batch_size": 1,
        "lr": 1e-4, "lr_scheduler": "cosine_with_restarts", "warmup_steps": 500, "max_denoising_steps": 30,
        "sampling_guidance": 3.0, "erase_guidance": 1.0, "surrogate": "", "latent_anchoring": True,
        "anchors": 4, "anchor_strength": 1000.0, "concept": "snoopy",
    },
    "methods/idpt.yaml": {  # METHODS.md IDPT: AdamW lr 5e-4, wd 0.05, cosine 300 epochs, 10 warm-up, batch 32
        "train.model": "point_mae", "train.method.name": "idpt", "train.method.overrides.k": 20,
        "train.method.overrides.prompt_layer": -1, "train.method.overrides.official": False,
        "train.optim.name": "adamw", "train.optim.lr": 5e-4, "train.optim.weight_decay": 0.05,
        "train.sched.name": "cosine", "train.sched.warmup_epochs": 10, "train.epochs": 300,
        "train.batch_size": 32, "train.clip_grad_norm": 10.0,
    },
    "methods/p2p.yaml": {  # METHODS.md P2P: k 32, label smoothing 0.2, AdamW lr 5e-4, 300 epochs, batch 64, 40 views
        "train.method.name": "p2p", "train.method.overrides.k": 32, "train.method.overrides.test_views": 40,
        "train.method.overrides.obj_size": 0, "train.optim.name": "adamw", "train.optim.lr": 5e-4,
        "train.optim.weight_decay": 0.05, "train.sched.warmup_epochs": 0, "train.epochs": 300,
        "train.batch_size": 64, "train.label_smoothing": 0.2,
    },
    "methods/full.yaml": {
        "method.name": "full", "optim.name": "adamw", "optim.lr_scaling": "linear256", "sched.warmup_epochs": 5,
        "epochs": 100, "batch_size": 384,
    },
    "methods/linear.yaml": {
        "method.name": "linear", "optim.name": "sgd", "optim.lr_scaling": "linear256", "optim.momentum": 0.9,
        "epochs": 100, "batch_size": 1024,
    },
    "methods/bitfit.yaml": {"method.name": "bitfit", "optim.lr": 5e-3, "optim.weight_decay": 5e-5, "epochs": 100},
    "methods/lora.yaml": {"method.name": "lora", "method.overrides.r": 8, "method.overrides.alpha": 8.0, "optim.lr": 1e-3},
    # ---- task configs
    "modelnet40_idpt.yaml": {  # METHODS.md IDPT: 1024-point ModelNet40, 64 groups x 32
        "train.model": "point_mae", "train.checkpoint": "ckpts/pretrain.pth",
        "train.model_kwargs": {"num_group": 64, "group_size": 32}, "train.method.name": "idpt",
        "train.method.overrides.k": 20, "train.method.overrides.prompt_layer": -1,
        "train.optim.lr": 5e-4, "train.optim.weight_decay": 0.05, "train.epochs": 300,
        "train.sched.warmup_epochs": 10, "train.batch_size": 32, "train.clip_grad_norm": 10.0,
        "data.kind": "modelnet40", "data.num_points": 1024, "data.augment": ["scale_translate"],
    },
    "scanobjectnn_idpt.yaml": {  # METHODS.md IDPT: 2048-point ScanObjectNN, 128 groups x 32, PB_T50_RS
        "train.model": "point_mae", "train.checkpoint": "ckpts/pretrain.pth",
        "train.model_kwargs": {"num_group": 128, "group_size": 32}, "train.method.name": "idpt",
        "train.optim.lr": 5e-4, "train.optim.weight_decay": 0.05, "train.epochs": 300,
        "train.sched.warmup_epochs": 10, "train.batch_size": 32, "train.clip_grad_norm": 10.0,
        "data.kind": "scanobjectnn", "data.variant": "pb_t50_rs", "data.num_points": 2048, "data.augment": ["rotate"],
    },
    "modelnet40_p2p.yaml": {  # METHODS.md P2P: obj_size 224 on ModelNet40, timm image model, pretrained
        "train.model": "resnet50.tv_in1k", "train.pretrained": True, "train.method.name": "p2p",
        "train.method.overrides.obj_size": 224, "train.method.overrides.k": 32, "train.method.overrides.test_views": 40,
        "train.label_smoothing": 0.2, "train.optim.name": "adamw", "train.optim.lr": 5e-4, "train.epochs": 300,
        "train.batch_size": 64, "data.kind": "modelnet40", "data.num_points": 4096,
    },
    "pointcloud_synthetic_idpt.yaml": {
        "train.method.name": "idpt", "train.optim.weight_decay": 0.05, "train.clip_grad_norm": 10.0,
        "train.pretrained": False, "data.kind": "synthetic",
    },
    "pointcloud_synthetic_p2p.yaml": {
        "train.method.name": "p2p", "train.label_smoothing": 0.2, "train.pretrained": False, "data.kind": "synthetic",
    },
    "sd15_sara.yaml": {  # METHODS.md SaRA official recipe: SD 1.5, 512 px, batch 4, 5005 steps, cosine
        "model": "runwayml/stable-diffusion-v1-5", "method.name": "sara", "method.overrides.threshold": 2e-3,
        "method.overrides.rank_weight": 5e-4, "method.overrides.progressive_step": 2500,
        "max_grad_norm": 0.0, "resolution": 512, "batch_size": 4, "max_steps": 5005, "lr": None, "lr_scheduler": "cosine",
        "warmup_steps": 0, "weight_decay": 1e-2,
    },
    "vtab_cifar100_ssf.yaml": {
        "model": "vit_base_patch16_224.augreg_in21k", "num_classes": 100, "method.name": "ssf", "optim.lr": 5e-3,
        "optim.weight_decay": 5e-5, "epochs": 100, "batch_size": 32, "data.kind": "vtab", "data.task": "cifar",
    },
    "vtab_cifar100_vpt_deep.yaml": {
        "model": "vit_base_patch16_224.orig_in21k", "num_classes": 100, "method.name": "vpt",
        "method.overrides.deep": True, "optim.name": "sgd", "epochs": 100, "data.kind": "vtab",
    },
    "clip_fewshot_oxford_pets.yaml": {  # the generic R-AMT recipe
        "train.model": "ViT-B-16", "train.method.name": "mask_tuning", "train.method.overrides.grad_dropout_lambda": 0.3,
        "train.optim.lr": 8e-5, "train.epochs": 30, "data.shots": 16, "clip.tag": "openai",
    },
    "clip_fewshot_imagenet.yaml": {  # METHODS.md R-AMT: lambda 1.0 for ImageNet; lr / epochs of the official imagenet file
        "train.method.name": "mask_tuning", "train.method.overrides.grad_dropout_lambda": 1.0,
        "train.method.overrides.threshold": 5e-3, "train.optim.lr": 3e-5, "train.epochs": 10, "data.shots": 16,
    },
    "imagefolder_example.yaml": {"method.name": "ssf", "optim.lr": 5e-3, "epochs": 30, "sched.warmup_epochs": 3},
    "demo_digits.yaml": {"model": "demo_vit", "method.name": "ssf", "data.kind": "digits", "epochs": 3},
}


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_recipe_values(rel):
    assert rel in CONFIG_FILES, f"configs/{rel} is listed in EXPECTED but does not exist"
    cfg = load(rel)
    wrong = {}
    for key, expected in EXPECTED[rel].items():
        actual = pick(cfg, key)
        same_type = isinstance(actual, bool) == isinstance(expected, bool)  # True is not 1
        if not (same_type and actual == expected):
            wrong[key] = (actual, expected)
    assert not wrong, f"configs/{rel}: (actual, expected) {wrong}"


def test_sara_lr_rule():
    """sd15_sara.yaml leaves lr to the official rule; methods/sara.yaml writes its value out."""
    cfg = load("sd15_sara.yaml")
    assert default_lr(cfg) == pytest.approx(SARA_LR, rel=1e-9)
    assert load("methods/sara.yaml").optim.lr == pytest.approx(default_lr(cfg), rel=1e-3)


def test_point_group_layout_covers_the_cloud():
    """Point-MAE groups: 64 x 32 over 1024 points and 128 x 32 over 2048 (2 x coverage, as in METHODS.md)."""
    for rel in ("modelnet40_idpt.yaml", "scanobjectnn_idpt.yaml"):
        cfg = load(rel)
        kw = cfg.train.model_kwargs
        assert kw["num_group"] * kw["group_size"] == 2 * cfg.data.num_points, rel


def test_overrides_reach_new_point_configs():
    """The documented command lines work: data.root and checkpoint overrides land in the config."""
    cfg = load_point_config(CONFIGS / "scanobjectnn_idpt.yaml",
                            ["data.root=/d/h5_files", "data.variant=obj_bg", "checkpoint=/c/pretrain.pth"])
    assert (cfg.data.root, cfg.data.variant, cfg.train.checkpoint) == ("/d/h5_files", "obj_bg", "/c/pretrain.pth")
    assert cfg.data.num_points == 2048 and cfg.train.optim.lr == 5e-4
    with pytest.raises(ConfigError, match=r"data\.variant"):
        load_point_config(CONFIGS / "scanobjectnn_idpt.yaml", ["data.variant=[1]"])
