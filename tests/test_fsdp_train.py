"""scripts/train_classifier.py under FSDP2 on 2 gloo processes (issue #15), launched as
`accelerate launch --config_file configs/accelerate/fsdp.yaml` would on GPUs: torchrun with Accelerate's
FSDP environment (on CPU, Accelerate itself has no FSDP; the trainer shards the host per block itself).

One global batch of 8 = 4 per process; the single-process reference trains with batch_size=8."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import petl_vision as pv
from petl_vision.core.io import adapter_state_dict
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "train_classifier.py"
FSDP_ENV = {"ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block", "OMP_NUM_THREADS": "1"}
CONFIG = """model: vit_tiny_patch16_224
pretrained: false
model_kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}
epochs: 2
batch_size: 4
progress: false
clip_grad_norm: 1.0
sched: {warmup_epochs: 1}
data: {kind: imagefolder, root: images, augment: false}
method: {name: ssf}
"""
# Over the run's 6 AdamW steps the sums of 2 processes and of one differ in float rounding only.
TOL = 1e-4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """images/ (3 classes of 8 train / 2 val 32x32 PNGs) and tiny.yaml."""
    root = tmp_path_factory.mktemp("fsdp_train")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in range(3):
            (root / "images" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((32, 32, 3)) * 60 + 90 * c).astype(np.uint8)
                Image.fromarray(pixels).save(root / "images" / split / f"c{c}" / f"{i}.png")
    (root / "tiny.yaml").write_text(CONFIG)
    return root


def run(workdir, args, processes=2, script=SCRIPT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if processes > 1:
        env.update(FSDP_ENV)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(workdir):
    """{name: output folder} of: single (1 process, batch 8), sharded (2 processes, batch 4 each, merge=true)."""
    run(workdir, ["--config", "tiny.yaml", "--output-dir", "single", "batch_size=8", "merge=true"], processes=1)
    stdout = run(workdir, ["--config", "tiny.yaml", "--output-dir", "sharded", "merge=true"])
    return {"single": workdir / "single", "sharded": workdir / "sharded", "stdout": stdout}


def assert_adapter_gives_merged_outputs(folder) -> None:
    """folder/adapter loaded onto the runs' host gives folder/merged.safetensors' outputs."""
    host = pv.load_adapter(_host(), folder / "adapter").eval()
    merged = _host().eval()
    merged.load_state_dict(load_file(folder / "merged.safetensors"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(host(x), merged(x), atol=1e-5)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b) and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_sharded_run_trains_the_single_process_adapter(runs):
    sharded, single = load_file(runs["sharded"] / "adapter" / "adapter.safetensors"), load_file(runs["single"] / "adapter" / "adapter.safetensors")
    assert max_diff(sharded, single) <= TOL
    init = adapter_state_dict(pv.apply(_host(), "ssf"))
    assert max((sharded[k].float() - v.float()).abs().max().item() for k, v in init.items() if k in sharded) > 1e-3  # it trained


def _host(workdir=None):
    """The host the runs train: built from tiny.yaml after seeding, as `train` builds it (3 classes)."""
    from accelerate.utils import set_seed

    from petl_vision.train import load_config
    from petl_vision.train.model import build_model

    cfg = load_config(None, ["model=vit_tiny_patch16_224", "pretrained=false",
                             "model_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"])
    set_seed(cfg.seed)
    model = build_model(cfg)
    model.reset_classifier(3)
    return model


def test_sharded_run_saves_once_a_loadable_adapter_and_a_merged_model(runs):
    folder = runs["sharded"]
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == sorted(p.name for p in (runs["single"] / "adapter").iterdir())
    assert runs["stdout"].count("done:") == 1  # the script reports once, from the main process
    assert_adapter_gives_merged_outputs(folder)
    assert max_diff(load_file(folder / "merged.safetensors"), load_file(runs["single"] / "merged.safetensors")) <= TOL


def test_sharded_checkpoints_hold_each_process_shards(runs):
    ckpt = runs["sharded"] / "checkpoints" / "epoch_2"
    names = sorted(p.name for p in ckpt.iterdir())
    assert "state_0.safetensors" in names and "state_1.safetensors" in names and "state.safetensors" not in names
    shards = [load_file(ckpt / f"state_{r}.safetensors") for r in (0, 1)]
    whole = load_file(runs["single"] / "checkpoints" / "epoch_2" / "state.safetensors")
    name = "model/blocks.0.attn.qkv.scale"
    assert [shards[r][f"state_{r}/{name}"].shape[0] for r in (0, 1)] == [48, 48] and whole[f"state/{name}"].shape[0] == 96
    assert torch.allclose(torch.cat([shards[0][f"state_0/{name}"], shards[1][f"state_1/{name}"]]), whole[f"state/{name}"], atol=TOL)


STOP_AFTER_EPOCH_1 = """import sys
from petl_vision.train import load_config, train
from petl_vision.train.cli import leave_process_group
train(load_config("tiny.yaml", [f"output_dir={sys.argv[1]}"]), stop_after_epoch=1)
leave_process_group()
"""


def test_sharded_resume_continues_exactly(runs, workdir):
    script = workdir / "stop_after_epoch_1.py"
    script.write_text(STOP_AFTER_EPOCH_1)
    run(workdir, ["resumed"], script=script)
    assert (workdir / "resumed" / "checkpoints" / "epoch_1" / "state_1.json").is_file()
    assert not (workdir / "resumed" / "adapter").exists()
    run(workdir, ["--config", "tiny.yaml", "--output-dir", "resumed", "merge=true", "--resume"])
    resumed = load_file(workdir / "resumed" / "adapter" / "adapter.safetensors")
    assert max_diff(resumed, load_file(runs["sharded"] / "adapter" / "adapter.safetensors")) == 0.0


def test_sharded_checkpoint_refuses_a_single_process_resume(runs, workdir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny.yaml", "--output-dir", "sharded", "--resume"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "2 processes" in proc.stderr


def other_trainer_args(kind: str, tmp_path) -> tuple[str, list[str]]:
    """(script, arguments) of a tiny 2-epoch run: CLIP mask tuning with gradient dropout and its score
    penalty (open_clip resblocks; no augmentation, so that 1 and 2 processes see the same images) or
    Point-MAE IDPT."""
    if kind == "clip":
        from test_clip_train import CONFIG as CLIP_CONFIG, tiny_run_overrides
        return "train_clip.py", ["--config", str(CLIP_CONFIG), *tiny_run_overrides(tmp_path, "petl-tiny-clip-fsdp"), "data.augment=false"]
    from test_point_train import RUNS, TINY_DATA
    return "train_pointcloud.py", ["--config", str(ROOT / "configs" / "pointcloud_synthetic_idpt.yaml"), *TINY_DATA, *RUNS["idpt"]]


@pytest.mark.parametrize("kind", ["clip", "point"])
def test_other_trainers_run_sharded_and_save_once(kind, tmp_path):
    """The CLIP and point-cloud trainers hand their models to the same loop: sharded per open_clip
    resblock / Point-MAE block (found without FSDP_TRANSFORMER_CLS_TO_WRAP), trained, saved once.
    CLIP: equal to the single-process run on the same global batch (3 images per process; 6 on one).
    Point-MAE's BatchNorm normalises each process's half batch, so there the adapter is only checked."""
    script, args = other_trainer_args(kind, tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", **FSDP_ENV}
    env.pop("FSDP_TRANSFORMER_CLS_TO_WRAP")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "scripts" / script), *args, "--output-dir", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("done:") == 1
    saved = load_file(tmp_path / "run" / "adapter" / "adapter.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_2"
    assert (ckpt / "state_0.safetensors").is_file() and (ckpt / "state_1.safetensors").is_file()
    if kind == "clip":
        run(tmp_path, [*args, "batch_size=6", "--output-dir", str(tmp_path / "single")], processes=1,
            script=ROOT / "scripts" / script)
        assert max_diff(saved, load_file(tmp_path / "single" / "adapter" / "adapter.safetensors")) <= TOL


def test_side_network_feature_cache_under_fsdp(workdir):
    """LST under FSDP2: its side network stays whole on every process (averaged like DDP), the backbone
    is sharded; epoch 1 fills one shared feature cache from both processes, epoch 2 trains from it
    (no backbone). The adapter equals the single-process run's, which uses the cache too."""
    stdout = run(workdir, ["--config", "tiny.yaml", "--output-dir", "lst_sharded", "method.name=lst"])
    assert "feature cache: new" in stdout
    filled = np.load(workdir / "lst_sharded" / "feature_cache" / "filled.npy")
    assert filled.shape == (24,) and filled.all()  # each process wrote its half of the samples
    run(workdir, ["--config", "tiny.yaml", "--output-dir", "lst_single", "method.name=lst", "batch_size=8"], processes=1)
    sharded = load_file(workdir / "lst_sharded" / "adapter" / "adapter.safetensors")
    assert max_diff(sharded, load_file(workdir / "lst_single" / "adapter" / "adapter.safetensors")) <= TOL
