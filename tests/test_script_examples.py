"""Every example command of every script's --help runs (issue #16): the examples are read from the
scripts' docstrings, their data and model paths swapped for tiny ones built here, and tiny-size
key=value overrides appended (a 16 px ViT, one epoch or step, a tiny CLIP / Point-MAE / pipeline).
`accelerate launch` examples run as plain python; fp16 (GPU only) runs as bf16 on CPU.
"""
import json
import re
import shlex

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT, load_script
from PIL import Image
from test_clip import TINY_CFG, tiny_clip
from test_point_mae import official_layout
from test_sara import one_thread  # noqa: F401  (one_thread: module-wide fixture)

SCRIPTS = ("train_classifier", "train_clip", "train_pointcloud", "finetune_diffusion", "erase_concept", "evaluate_erasure")
EXAMPLE = re.compile(r"^\s*(?:accelerate launch|python) scripts/(\w+)\.py(.*)$")


def help_examples(script: str) -> list[list[str]]:
    """The example command lines of scripts/<script>.py's docstring (its --help), as argument lists."""
    text = load_script(script).__doc__.replace("\\\n", " ")
    return [shlex.split(m.group(2), comments=True) for line in text.splitlines() if (m := EXAMPLE.match(line))]


CASES = [(script, i) for script in SCRIPTS for i in range(len(help_examples(script)))]

TINY_VIT = "{img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"
TINY_POINT_MAE = dict(num_group=8, group_size=8, dim=32, depth=2, num_heads=2)
TINY_P2P = ["model=vit_tiny_patch16_224", "pretrained=false", "model_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
            "method.obj_size=32", "method.test_views=2", "eval_batch_size=4"]
TINY_POINTS = ["epochs=1", "batch_size=4", "data.num_points=64", "data.samples_per_class=2", "data.eval_samples_per_class=1", "--no-progress"]
# appended to each example, by script or by config file: the example's own settings stay, its sizes shrink
TINY = {
    "train_classifier": ["model=vit_tiny_patch16_224", "pretrained=false", f"model_kwargs={TINY_VIT}", "epochs=1", "batch_size=64",
                         "--no-progress"],
    "demo": ["epochs=1", "batch_size=128", "data.test_fraction=0.8", "--no-progress"],
    "train_clip": ["model=tinyclip", "clip.model_config=tinyclip.json", "pretrained=false", "epochs=1", "batch_size=8", "--no-progress"],
    "pointcloud_synthetic_idpt": [*TINY_POINTS, "model_kwargs={num_group: 8, group_size: 8, dim: 32, depth: 2, num_heads: 2}"],
    "modelnet40_idpt": [*TINY_POINTS, "model_kwargs={num_group: 8, group_size: 8, dim: 32, depth: 2, num_heads: 2}", "method.k=4"],
    "scanobjectnn_idpt": [*TINY_POINTS, "model_kwargs={num_group: 8, group_size: 8, dim: 32, depth: 2, num_heads: 2}", "method.k=4"],
    "pointcloud_synthetic_p2p": [*TINY_POINTS, *TINY_P2P],
    "modelnet40_p2p": [*TINY_POINTS, *TINY_P2P],
    "finetune_diffusion": ["resolution=16", "batch_size=1", "max_steps=1", "checkpoint_every=1", "validation_inference_steps=1",
                           "num_validation_images=1", "--no-progress"],
    "erase_concept": ["max_steps=1", "checkpoint_every=1", "max_denoising_steps=3", "resolution=16", "dynamic_resolution=false",
                      "warmup_steps=0", "anchors=1", "--no-progress"],
    "evaluate_erasure": ["--steps", "1", "--num-images", "1", "--height", "16", "--width", "16", "--device", "cpu"],
}


def write_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(path)


def write_h5(path, n, points=80, classes=2):
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["data"] = rng.normal(size=(n, points, 3)).astype(np.float32)
        f["label"] = (np.arange(n) % classes).astype(np.int64)[:, None]


@pytest.fixture(scope="module")
def world(tmp_path_factory, pipeline_dir):
    """The tiny stand-ins for every path the examples name, under one folder (the examples' working directory)."""
    from test_sara import tiny_pipeline
    from test_spm import write_official

    root = tmp_path_factory.mktemp("examples")
    for i in range(4):  # VTAB-1k list layout, image folders with train/ and val/, a captioned folder
        for split, n in (("train800val200", 4), ("test", 2)):
            write_png(root / "vtab-1k/cifar/images" / split / f"{i}.png", 40 * i)
        for name in ("abyssinian", "beagle"):
            write_png(root / "oxford_pets/train" / name / f"{i}.png", 30 * i + (name == "beagle") * 100)
            write_png(root / "oxford_pets/val" / name / f"{i}.png", 30 * i + (name == "beagle") * 100)
        write_png(root / "captions" / f"{i}.png", 50 * i)
        (root / "captions" / f"{i}.txt").write_text(f"a square number {i}")
    for split, n in (("train800val200", 4), ("test", 2)):
        (root / "vtab-1k/cifar" / f"{split}.txt").write_text("".join(f"images/{split}/{i}.png {i % 2}\n" for i in range(n)))
    (root / "tinyclip.json").write_text(json.dumps(TINY_CFG))
    (root / "my_clip.json").write_text(json.dumps(TINY_CFG))
    torch.save(tiny_clip(seed=1).state_dict(), root / "weights.pt")
    torch.save(tiny_clip(seed=2).state_dict(), root / "ViT-B-16.pt")
    # point clouds: ModelNet40 h5 and resampled layouts, ScanObjectNN h5, an official Point-MAE pre-training file
    write_h5(root / "modelnet40_ply_hdf5_2048/ply_data_train0.h5", 8)
    write_h5(root / "modelnet40_ply_hdf5_2048/ply_data_test0.h5", 4)
    for split in ("training", "test"):
        write_h5(root / f"h5_files/main_split/{split}_objectdataset_augmentedrot_scale75.h5", 8 if split == "training" else 4)
    resampled = root / "modelnet40_normal_resampled"
    resampled.mkdir()
    (resampled / "modelnet40_shape_names.txt").write_text("airplane\nbed\n")
    ids = {"train": [f"{c}_000{i}" for c in ("airplane", "bed") for i in (1, 2, 3)], "test": ["airplane_0004", "bed_0004"]}
    for split, names in ids.items():
        (resampled / f"modelnet40_{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            (resampled / name.rsplit("_", 1)[0]).mkdir(exist_ok=True)
            np.savetxt(resampled / name.rsplit("_", 1)[0] / f"{name}.txt", np.random.default_rng(1).normal(size=(80, 6)), delimiter=",")
    from petl_vision.models.point_mae import PointTransformer

    torch.manual_seed(0)
    torch.save(official_layout(PointTransformer(num_classes=2, **TINY_POINT_MAE), "pretrain"), root / "pretrain.pth")
    # SPM files for the evaluation examples
    unet = tiny_pipeline(root / "tok").unet
    (root / "runs/spm").mkdir(parents=True)
    write_official(root / "runs/spm/snoopy_last.safetensors", unet, "snoopy", seed=1)
    write_official(root / "a.safetensors", unet, "a", seed=2)
    write_official(root / "b.safetensors", unet, "b", seed=3)
    paths = {
        "/data/vtab-1k": root / "vtab-1k", "/data/oxford_pets": root / "oxford_pets", "/ckpt/ViT-B-16.pt": root / "ViT-B-16.pt",
        "data/modelnet40_ply_hdf5_2048": root / "modelnet40_ply_hdf5_2048", "data/ScanObjectNN/h5_files": root / "h5_files",
        "data/modelnet40_normal_resampled": resampled, "ckpts/pretrain.pth": root / "pretrain.pth",
        "runwayml/stable-diffusion-v1-5": pipeline_dir, "CompVis/stable-diffusion-v1-4": pipeline_dir, "PIPELINE_DIR": pipeline_dir,
        "data/Barbie": root / "captions", "DIR": root / "captions",
    }
    return root, {k: str(v) for k, v in paths.items()}


# what `...` and CONFIG stand for
ELLIPSIS = {"--model": "PIPELINE_DIR", "--data": "DIR", "--concept": "snoopy", "--config": "CONFIG"}
CONFIG = {"train_classifier": "configs/vtab_cifar100_ssf.yaml", "train_clip": "configs/clip_fewshot_oxford_pets.yaml",
          "train_pointcloud": "configs/pointcloud_synthetic_idpt.yaml"}
DATA_OF_CONFIG = {"configs/vtab_cifar100_ssf.yaml": "/data/vtab-1k", "configs/clip_fewshot_oxford_pets.yaml": "/data/oxford_pets"}


def tiny_command(script: str, example: list[str], paths: dict, index: int) -> list[str]:
    """The example with its placeholders and paths replaced, `...` filled in and the TINY overrides appended."""
    argv = []
    for i, token in enumerate(example):
        if token == "...":
            if i > 0 and example[i - 1] in ELLIPSIS:
                token = ELLIPSIS[example[i - 1]]
            else:
                continue  # "the rest of the command"
        if token == "CONFIG":
            token = CONFIG[script]
        key, sep, value = token.rpartition("=")
        value = "bf16" if value == "fp16" else paths.get(value, value)
        if value.startswith("configs/"):
            value = str(ROOT / value)
        argv.append(f"{key}{sep}{value}")
    if "--config" in argv:
        config = argv[argv.index("--config") + 1]
        relative = config.replace(str(ROOT) + "/", "")
        if relative in DATA_OF_CONFIG and not any(a.startswith("data.root=") for a in argv):
            argv.append(f"data.root={paths[DATA_OF_CONFIG[relative]]}")
        stem = relative.removeprefix("configs/").removesuffix(".yaml")
        argv += TINY.get(stem, TINY.get(script, []))
    else:
        argv += TINY["demo"] if script == "train_classifier" else TINY[script]
    if script == "evaluate_erasure" and "--clip-config" not in argv:
        argv += ["--clip-config", "tinyclip.json", "--clip-pretrained", "none"]
    if script != "evaluate_erasure" and "--output-dir" not in argv:
        argv += ["--output-dir", f"runs/example_{script}_{index}"]
    return argv


@pytest.mark.parametrize("script, index", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_help_example_runs(script, index, world, monkeypatch, capsys, request):
    root, paths = world
    monkeypatch.chdir(root)
    argv = tiny_command(script, help_examples(script)[index], paths, index)
    main = load_script(script).main
    if "--mixed-precision" in argv:  # Accelerate's state is a process-wide singleton, set by the first Accelerator
        AcceleratorState._reset_state(reset_partial_state=True)
        request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    if "--resume" in argv:  # the run to resume first: the same command without --resume
        main([a for a in argv if a != "--resume"])
    result = main(argv)
    out = capsys.readouterr().out
    if script in ("train_classifier", "train_clip", "train_pointcloud", "finetune_diffusion", "erase_concept"):
        assert "done" in out or "top-1" in out, out
    if script in ("finetune_diffusion", "erase_concept"):
        assert result["steps"] == 1
    if script == "evaluate_erasure":
        erased = [c for c in help_examples(script)[index][help_examples(script)[index].index("--erased") + 1:] if not c.startswith("-")]
        assert [r["concept"] for r in result["concepts"] if r["kind"] == "erased"][:1] == erased[:1]


def test_every_script_has_examples():
    assert {s for s, _ in CASES} == set(SCRIPTS)
    assert all("optim." not in " ".join(help_examples(s)[i]) for s, i in CASES if s in ("finetune_diffusion", "erase_concept"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_examples_and_debug(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script(script).main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "--debug" in text and len(help_examples(script)) >= 2
    assert text.count(f"scripts/{script}.py") == len(help_examples(script))
    if script != "evaluate_erasure":
        assert "--overwrite" in text
    if script in ("finetune_diffusion", "erase_concept"):
        assert "optim." not in text  # their configs have no optim section (the old help's example was an unknown key)
