"""Run folders, complete-only and pickle-free resume, NaN stops, and a schedule independent of the process count."""
import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
import timm
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_diffusion_script import data_dir  # noqa: F401  (fixture)
from test_spm_train import FAST

from petl_vision.train import load_config, train
from petl_vision.train.checkpoint import CheckpointError, check_finite, complete_checkpoints
from petl_vision.train import diffusion
from petl_vision.train.demo import run_demo
from petl_vision.train.diffusion import load_diffusion_config, train_diffusion
from petl_vision.train.erase import load_erase_config, train_erasure
from petl_vision.train.tracking import MetricsLog

BASE = ["model=tiny", "pretrained=false", "batch_size=4", "sched.warmup_epochs=1", "progress=false", "method.name=ssf", "optim.lr=0.01"]


def tiny_model():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=3, drop_rate=0.0)


def tiny_data(n=24):
    """(train, eval, 3): 16x16 images whose mean brightness is the class."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 3, 16, 16, generator=g) * 0.3 + labels[:, None, None, None].float()
    ds = torch.utils.data.TensorDataset(images, labels)
    return ds, torch.utils.data.TensorDataset(images[:6], labels[:6]), 3


def run(out, *extra, resume=None, stop=None, overwrite=False, seed=0, edit=None):
    """A tiny SSF run (model and data given) into `out`; `edit(model)` before training."""
    cfg = load_config(None, [*BASE, f"output_dir={out}", f"seed={seed}", *extra])
    torch.manual_seed(cfg.seed)
    model = tiny_model()
    if edit is not None:
        edit(model)
    return train(cfg, resume, stop, model=model, data=tiny_data(), overwrite=overwrite)


def trainable(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def run_ids(out):
    return {json.loads((p / "run.json").read_text())["run_id"] for p in (out / "checkpoints").iterdir()}


def test_output_dir_of_another_run_is_refused_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "run"
    run(out, "epochs=2")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match=f"output_dir {out} already holds another run.*--overwrite"):
        run(out, "epochs=1", seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1", "epoch_2"]

    result = run(out, "epochs=1", "keep_checkpoints=1", overwrite=True, seed=1)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]  # not appended to the old run's lines
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1"]
    assert run_ids(out) == {json.loads((out / "run.json").read_text())["run_id"]} and result["adapter_dir"]
    (tmp_path / "file").write_text("x")
    with pytest.raises((FileExistsError, ValueError), match="is a file"):  # the config or the trainer
        run(tmp_path / "file", "epochs=1")


def test_pruning_touches_only_this_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert run(out, "epochs=3", "keep_checkpoints=1", stop=1)["stopped_early"]
    foreign = out / "checkpoints" / "epoch_0"  # another run's checkpoint that happens to be here
    foreign.mkdir()
    (foreign / "run.json").write_text(json.dumps({"run_id": "someone-else"}))
    run(out, "epochs=3", "keep_checkpoints=1", resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0", "epoch_3"]


def test_failed_start_writes_nothing(tmp_path):
    missing = tmp_path / "no_such_data"
    cfg = load_config(None, [*BASE, "model=vit_tiny_patch16_224", "model_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                             "data.kind=imagefolder", f"data.root={missing}", f"output_dir={tmp_path / 'out'}", "epochs=1"])
    with pytest.raises(Exception, match="no_such_data"):
        train(cfg)
    assert not (tmp_path / "out").exists()
    # A resume with another configuration fails before config.yaml of the run is touched.
    out = tmp_path / "run"
    run(out, "epochs=2", stop=1)
    before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="another run configuration.*optim.lr"):
        run(out, "epochs=2", "optim.lr=0.5", resume=True)
    assert (out / "config.yaml").read_text() == before


def test_resume_uses_the_latest_complete_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    full = run(tmp_path / "full", "epochs=3", "grad_accum_steps=2")
    run(tmp_path / "cut", "epochs=3", "grad_accum_steps=2", stop=2)
    ckpts = tmp_path / "cut" / "checkpoints"
    (ckpts / "epoch_2" / "complete.json").unlink()  # killed while saving epoch 2
    assert complete_checkpoints(ckpts, "epoch") == [ckpts / "epoch_1"]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        run(tmp_path / "cut", "epochs=3", "grad_accum_steps=2", resume=ckpts / "epoch_2")
    resumed = run(tmp_path / "cut", "epochs=3", "grad_accum_steps=2", resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [2, 3]
    want, got = trainable(full["model"]), trainable(resumed["model"])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # The checkpoint holds the trainable state and buffers, not the frozen backbone.
    state = load_file(str(ckpts / "epoch_3" / "state.safetensors"))
    model_keys = {k.split("/", 2)[2] for k in state if k.startswith("state/model/")}
    frozen = {k for k, p in full["model"].named_parameters() if not p.requires_grad}
    assert model_keys == set(want) and not model_keys & frozen
    # A truncated file is refused with its name.
    (ckpts / "epoch_3" / "state.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="state.safetensors is missing or differs"):
        run(tmp_path / "cut", "epochs=3", "grad_accum_steps=2", resume=ckpts / "epoch_3")


class Payload:
    """Unpickling this makes the folder `path` (what a crafted checkpoint would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_resume_never_unpickles(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.is_dir()  # the payload is live

    pwned = tmp_path / "pwned"
    full = run(tmp_path / "full", "epochs=2")
    run(tmp_path / "cut", "epochs=2", stop=1)
    ckpt = tmp_path / "cut" / "checkpoints" / "epoch_1"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "sampler.bin", "pytorch_model.bin"):
        torch.save({"x": Payload(pwned)}, ckpt / name)
    resumed = run(tmp_path / "cut", "epochs=2", resume=True)  # works without reading them
    assert not pwned.exists()
    want, got = trainable(full["model"]), trainable(resumed["model"])
    assert all(torch.equal(want[k], got[k]) for k in want)

    # An Accelerate-style folder (pickles, no completion marker) is refused, not loaded.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (legacy / name).write_bytes(pickle.dumps(Payload(pwned)))
    with pytest.raises(CheckpointError, match="pickle files are not loaded"):
        run(tmp_path / "fresh", "epochs=2", resume=legacy)
    assert not pwned.exists() and not (tmp_path / "fresh").exists()


def valid_json_lines(path):
    def refuse(constant):
        raise ValueError(f"{path}: bare {constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_nan_loss_stops_training_without_an_adapter(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2 \(epoch 1\); lower optim.lr \(now 1e\+10\) or set clip"):
        run(out, "epochs=3", "optim.lr=1e10", "merge=true")
    assert not (out / "adapter").exists() and not (out / "merged.safetensors").exists()

    calls = []

    def nan_from_step_8(model):  # 6 batches an epoch: the 8th forward is epoch 2's second step
        def hook(module, args, output):
            calls.extend([1] if module.training else [])
            return output * float("nan") if module.training and len(calls) >= 8 else output
        model.register_forward_hook(hook)

    out = tmp_path / "later"
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 8 \(epoch 2\)"):
        run(out, "epochs=3", "merge=true", edit=nan_from_step_8)
    assert not (out / "adapter").exists() and not (out / "merged.safetensors").exists()
    assert [r["epoch"] for r in valid_json_lines(out / "metrics.jsonl")] == [1]
    log = MetricsLog(tmp_path / "log")
    (tmp_path / "log").mkdir()
    log.log({"epoch": 1, "train_loss": float("nan"), "top1": float("inf"), "lr": 0.1})
    assert valid_json_lines(tmp_path / "log" / "metrics.jsonl") == [{"epoch": 1, "train_loss": None, "top1": None, "lr": 0.1}]
    with pytest.raises(FloatingPointError, match=r"loss is inf at step 7 \(epoch 2\); lower x"):
        check_finite(torch.tensor(float("inf")), 7, "epoch 2", "lower x")
    check_finite(torch.tensor(1.0), 7, "epoch 2", "lower x")


def test_demo_refuses_resume(tmp_path):
    with pytest.raises(ValueError, match="--resume needs --config"):
        run_demo(tmp_path / "demo", resume=True)
    assert not (tmp_path / "demo").exists()


def test_diffusion_trainers_refuse_folders_stop_on_nan_and_resume_safely(pipeline_dir, data_dir, tmp_path, monkeypatch):  # noqa: F811
    common = [f"model={pipeline_dir}", f"data={data_dir}", "resolution=16", "batch_size=2", "checkpoint_every=1", "seed=0",
              "method.name=lora", "progress=false"]
    out = tmp_path / "ft"
    cfg = load_diffusion_config(None, [*common, f"output_dir={out}", "max_steps=2", "lr=0.01"])
    train_diffusion(cfg, stop_after_step=1)
    with pytest.raises(FileExistsError, match="already holds another run"):
        train_diffusion(load_diffusion_config(None, [*common, f"output_dir={out}", "max_steps=2", "lr=0.02"]))
    with pytest.raises(CheckpointError, match="differs in: lr"):
        train_diffusion(load_diffusion_config(None, [*common, f"output_dir={out}", "max_steps=2", "lr=0.02"]), resume=True)
    torch.save(Payload(tmp_path / "pwned"), out / "checkpoints" / "step_1" / "custom_checkpoint_0.pkl")
    memory = recorder()
    monkeypatch.setattr(diffusion, "check_trackers", lambda log_with: [memory])
    done = train_diffusion(cfg, resume=True)
    assert done["steps"] == 2 and done["adapter_dir"] and not (tmp_path / "pwned").exists()
    assert [(step, sorted(v)) for step, v in memory.logs] == [(2, ["train/loss", "train/lr"])] and memory.config["lr"] == 0.01
    monkeypatch.undo()
    assert [r["step"] for r in valid_json_lines(out / "metrics.jsonl")] == [1, 2]

    nan = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+; lower lr \(now 1e\+20\)"):
        train_diffusion(load_diffusion_config(None, [*common, f"output_dir={nan}", "max_steps=6", "lr=1e20", "method.name=full",
                                                     "max_grad_norm=null"]))
    assert not (nan / "adapter").exists() and not (nan / "unet").exists()
    valid_json_lines(nan / "metrics.jsonl")

    erase = [f"model={pipeline_dir}", "anchors=2", *FAST[1:]]
    spm = tmp_path / "spm"
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+; lower lr"):
        train_erasure(load_erase_config(None, [*erase, "concept=snoopy", f"output_dir={spm}", "max_steps=6", "lr=1e20"]))
    assert not list(spm.glob("*.safetensors"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_erasure(load_erase_config(None, [*erase, "concept=snoopy", f"output_dir={spm}", "max_steps=1"]))
    result = train_erasure(load_erase_config(None, [*erase, "concept=snoopy", f"output_dir={spm}", "max_steps=1", "overwrite=true"]))
    assert result["spm_file"] and [r["step"] for r in valid_json_lines(spm / "metrics.jsonl")] == [1]


WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_run_safety import run
result = run({out!r}, "epochs=2", "batch_size={batch}", "sched.warmup_epochs=1", "sched.min_lr=1e-4", "optim.lr=0.05")
if result["adapter_dir"]:
    torch.save({{k: v for k, v in result["model"].state_dict().items()}}, {out!r} + "/final.pt")
"""


def test_two_processes_give_the_one_process_weights(tmp_path):
    """Data parallel on 2 CPU processes (gloo) under warm-up + cosine: the same adapter as 1 process with the same global batch."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path / "two"), batch=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}  # as `accelerate launch --cpu`
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    one = run(tmp_path / "one", "epochs=2", "batch_size=4", "sched.warmup_epochs=1", "sched.min_lr=1e-4", "optim.lr=0.05")
    state = one["model"].state_dict()
    moved = [k for k, p in one["model"].named_parameters() if p.requires_grad]
    a, b = torch.cat([two[k].flatten() for k in moved]), torch.cat([state[k].flatten() for k in moved])
    assert len(moved) > 10 and (a - b).norm() / b.norm() < 1e-4, ((a - b).norm() / b.norm()).item()


def recorder():
    """An Accelerate tracker that keeps what it is given."""
    from accelerate.tracking import GeneralTracker

    class Memory(GeneralTracker):
        name, requires_logging_directory, main_process_only = "memory", False, True

        def __init__(self):
            super().__init__()
            self.config, self.logs, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logs.append((step, dict(values)))

        def finish(self):
            self.finished = True

    return Memory()


def test_trackers_get_per_step_loss_and_lr_and_a_missing_one_is_named(tmp_path):
    with pytest.raises(ImportError, match="log_with=tensorboard: the tensorboard tracker is not installed .pip install tensorboard"):
        train(load_config(None, [*BASE, f"output_dir={tmp_path / 'tb'}"]), model=tiny_model(), data=tiny_data(), log_with="tensorboard")
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        train(load_config(None, [*BASE, f"output_dir={tmp_path / 'tb'}"]), model=tiny_model(), data=tiny_data(), log_with="tensorbord")
    assert not (tmp_path / "tb").exists()
    memory = recorder()
    cfg = load_config(None, [*BASE, f"output_dir={tmp_path / 'run'}", "epochs=2"])
    result = train(cfg, model=tiny_model(), data=tiny_data(), log_with=[memory])
    steps = [(step, values) for step, values in memory.logs if "train/loss" in values]
    assert [s for s, _ in steps] == list(range(1, 13))  # 24 images / 4 a batch = 6 steps an epoch
    lrs = [v["train/lr"] for _, v in steps]
    assert lrs[0] == pytest.approx(0.01 / 6 * 2) and max(lrs) == pytest.approx(0.01)  # warm-up to the base lr over epoch 1
    epochs = [values for _, values in memory.logs if "epoch/top1" in values]
    assert [e["epoch/epoch"] for e in epochs] == [1, 2] and epochs[-1]["epoch/top1"] == result["metrics"]["top1"]
    assert memory.config["optim.lr"] == 0.01 and memory.config["method.name"] == "ssf" and memory.finished
