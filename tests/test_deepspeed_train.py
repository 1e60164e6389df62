"""scripts/train_classifier.py under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (issue #15), launched
with `accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml` as on GPUs, in fp32
(`--mixed_precision no`; the configs' bf16 trains the weights in bf16, not comparable to one process).
On CPU the trainer hands Accelerate the gloo backend (petl_vision.train.deepspeed_support).

One global batch of 8 = 4 per process; the single-process reference trains with batch_size=8.
Skipped when deepspeed is not installed."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import test_fsdp_train
from conftest import ROOT

import petl_vision as pv
from petl_vision.core.io import adapter_state_dict

workdir = test_fsdp_train.workdir  # the fixture: images/ and tiny.yaml
_host, max_diff = test_fsdp_train._host, test_fsdp_train.max_diff

pytest.importorskip("deepspeed")

SCRIPT = ROOT / "scripts" / "train_classifier.py"
CONFIGS = ROOT / "configs" / "accelerate"
# Over the run's 6 AdamW steps the sums of 2 processes and of one differ in float rounding only (seen: 3e-5).
TOL = 1e-4


def launch(workdir, args, stage=None, check=True, script=SCRIPT):
    """`script` (scripts/train_classifier.py) under `accelerate launch` with deepspeed_zero<stage>.yaml (fp32),
    or on one process (stage None). Returns the finished process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    if stage is None:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"deepspeed_zero{stage}.yaml"),
               "--mixed_precision", "no", "--main_process_port", "0", str(script), *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=150, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


STOP_AFTER_EPOCH_1 = """import sys
from petl_vision.train import load_config, train
from petl_vision.train.cli import leave_process_group
train(load_config("tiny.yaml", [f"output_dir={sys.argv[1]}", *sys.argv[2:]]), stop_after_epoch=1)
leave_process_group()
"""


@pytest.fixture(scope="module")
def runs(workdir):
    """{name: output folder}: single (1 process, batch 8), zero2 (clip_grad_norm 1.0 as tiny.yaml), single_clip
    and zero3 (clip_grad_norm 0.1: the run's value, not DeepSpeed's default 1.0, clips). zero3 stops after
    epoch 1 and is resumed for epoch 2."""
    base = ["--config", "tiny.yaml", "merge=true"]
    launch(workdir, [*base, "--output-dir", "ds_single", "batch_size=8"])
    launch(workdir, [*base, "--output-dir", "ds_single_clip", "batch_size=8", "clip_grad_norm=0.1"])
    (workdir / "ds_stop_after_epoch_1.py").write_text(STOP_AFTER_EPOCH_1)
    stdout = {2: launch(workdir, [*base, "--output-dir", "zero2"], stage=2).stdout}
    launch(workdir, ["zero3", "clip_grad_norm=0.1"], stage=3, script=workdir / "ds_stop_after_epoch_1.py")
    stopped = sorted(p.name for p in (workdir / "zero3").iterdir())
    stdout[3] = launch(workdir, [*base, "--output-dir", "zero3", "clip_grad_norm=0.1", "--resume"], stage=3).stdout
    return {"single": workdir / "ds_single", "single_clip": workdir / "ds_single_clip", 2: workdir / "zero2",
            3: workdir / "zero3", "stdout": stdout, "stopped": stopped}


def adapter(folder):
    return load_file(folder / "adapter" / "adapter.safetensors")


@pytest.mark.parametrize("stage,reference", [(2, "single"), (3, "single_clip")])
def test_zero_run_trains_the_single_process_adapter(runs, stage, reference):
    trained, single = adapter(runs[stage]), adapter(runs[reference])
    assert max_diff(trained, single) <= TOL
    assert max_diff(trained, adapter(runs["single" if reference == "single_clip" else "single_clip"])) > 1e-3  # clipped alike
    init = adapter_state_dict(pv.apply(_host(), "ssf"))
    assert max((trained[k].float() - v.float()).abs().max().item() for k, v in init.items() if k in trained) > 1e-3  # it trained


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_saves_once_a_loadable_adapter_and_a_merged_model(runs, stage):
    folder = runs[stage]
    assert runs["stdout"][stage].count("done:") == 1
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == sorted(p.name for p in (runs["single"] / "adapter").iterdir())
    assert "1,635 of 33,859" in (folder / "adapter" / "README.md").read_text()  # whole counts, also under ZeRO-3
    test_fsdp_train.assert_adapter_gives_merged_outputs(folder)


def test_zero3_resumed_run_continues_from_its_checkpoint(runs):
    """The zero3 run stopped after epoch 1 (no adapter yet) and was resumed: its adapter still equals the
    uninterrupted single-process run (the fp32 partitions and Adam states were restored; a resume that lost
    them differs by more). An exact comparison with an uninterrupted ZeRO run (0.0) was done by hand."""
    assert "adapter" not in runs["stopped"]
    assert "resumed from" in runs["stdout"][3]
    ckpt = runs[3] / "checkpoints" / "epoch_1"
    assert {"zero_0.safetensors", "zero_1.safetensors", "state.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert max_diff(adapter(runs[3]), adapter(runs["single_clip"])) <= TOL


def test_zero_checkpoint_holds_the_trained_tensors_and_refuses_another_launch(runs, workdir):
    ckpt = runs[2] / "checkpoints" / "epoch_2"
    saved = load_file(ckpt / "state.safetensors")
    name = "blocks.0.attn.qkv.scale"
    assert torch.allclose(saved[f"state/model/{name}"], adapter(runs[2])[name], atol=0)
    halves = [load_file(ckpt / f"zero_{r}.safetensors") for r in (0, 1)]
    fp32 = [sum(v.numel() for k, v in h.items() if k.startswith(f"zero_{r}/fp32/")) for r, h in enumerate(halves)]
    assert fp32[0] == fp32[1] and 1635 <= 2 * fp32[0] < 1635 + 64  # each process: half of the 1,635 masters (padded)
    proc = launch(workdir, ["--config", "tiny.yaml", "--output-dir", "zero2", "--resume"], check=False)  # one process
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "DeepSpeed ZeRO-2" in proc.stderr and "no DeepSpeed" in proc.stderr, proc.stderr[-2000:]
