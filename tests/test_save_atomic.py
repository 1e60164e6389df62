"""pv.save_adapter over an existing adapter: any interruption leaves exactly the old or the new one,
and concurrent saves (threads, processes) never fail."""
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import input_for, make_host, perturb_trainable

import petl_vision as pv
from petl_vision.core import io

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupted(BaseException):
    """Raised by the patched steps (a BaseException, like KeyboardInterrupt)."""


@pytest.fixture(scope="module")
def models():
    """Two adapters of the same method and host (old, new) and their outputs on one batch."""
    old = perturb_trainable(pv.apply(make_host("vit"), "lora"), seed=1)
    new = perturb_trainable(pv.apply(make_host("vit"), "lora"), seed=2)
    x = input_for("vit")
    with torch.no_grad():
        return old, new, x, old(x), new(x)


def loads_as(directory, x):
    with torch.no_grad():
        return pv.load_adapter(make_host("vit"), directory)(x)


def which(directory, models):
    """'old' or 'new': the adapter the folder loads as (exactly); fails otherwise."""
    _, _, x, y_old, y_new = models
    y = loads_as(directory, x)
    if torch.equal(y, y_old):
        return "old"
    assert torch.equal(y, y_new), "the folder loads as neither the old nor the new adapter"
    return "new"


class StepCounter:
    """Patches every write / fsync / rename the save makes; raises Interrupted at step `fail_at`."""

    def __init__(self, monkeypatch, fail_at=None):
        self.steps, self.fail_at = [], fail_at
        for owner, name in [(os, "replace"), (os, "fsync"), (safetensors.torch, "save_file"), (Path, "write_text")]:
            monkeypatch.setattr(owner, name, self.wrap(name, getattr(owner, name)))

    def wrap(self, name, real):
        def step(*args, **kwargs):
            self.steps.append(name)
            if len(self.steps) - 1 == self.fail_at:
                if name == "save_file":  # half a file on disk, then the interruption
                    Path(args[1]).write_bytes(b"half-written")
                elif name == "write_text":
                    Path.write_bytes(args[0], b"half-written")
                raise Interrupted(f"step {len(self.steps) - 1}: {name}")
            return real(*args, **kwargs)
        return step


def test_interruption_at_every_step_leaves_old_or_new(models, tmp_path, monkeypatch):
    old, new, *_ = models
    counter = StepCounter(monkeypatch)
    pv.save_adapter(old, tmp_path / "probe")
    steps = list(counter.steps)
    commit = steps.index("replace")  # the first rename: adapter.safetensors
    assert len(steps) >= 10 and steps[:commit] == ["save_file", "fsync"]
    monkeypatch.undo()
    for i, name in enumerate(steps):
        directory = tmp_path / f"step{i}"
        pv.save_adapter(old, directory)
        with monkeypatch.context() as patch:
            StepCounter(patch, fail_at=i)
            with pytest.raises(Interrupted):
                pv.save_adapter(new, directory)
        assert which(directory, models) == ("old" if i <= commit else "new"), f"step {i} ({name})"
        assert not list(directory.glob(".*.tmp")), f"step {i} ({name}) left a temporary file"
        pv.save_adapter(new, directory)  # the next save completes the folder
        assert which(directory, models) == "new"


def _save_forever(directory, old, new, seed):
    """Child process (forked: the models are the parent's): alternate saving two adapters until killed."""
    torch.set_num_threads(1)
    for i in range(10**6):
        pv.save_adapter(new if (i + seed) % 2 else old, directory)


def test_kill_9_at_random_points(models, tmp_path):
    old, new, *_ = models
    directory = tmp_path / "killed"
    pv.save_adapter(old, directory)
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    seen = set()
    for iteration in range(6):
        child = context.Process(target=_save_forever, args=(directory, old, new, iteration))
        child.start()
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        seen.add(which(directory, models))
    assert seen <= {"old", "new"}
    pv.save_adapter(old, directory)  # leftover temporary files never block a save
    assert which(directory, models) == "old"


def test_concurrent_saves_from_threads(models, tmp_path):
    old, new, *_ = models
    errors = []

    def save(i):
        try:
            for _ in range(3):
                pv.save_adapter(new if i % 2 else old, tmp_path / "shared")
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert which(tmp_path / "shared", models) in ("old", "new")
    assert not list((tmp_path / "shared").glob(".*.tmp"))


def _save_n(directory, model, n, failures):
    torch.set_num_threads(1)
    try:
        for _ in range(n):
            pv.save_adapter(model, directory)
    except BaseException:  # noqa: BLE001
        failures.value += 1
        raise


def test_concurrent_saves_from_processes(models, tmp_path):
    old, new, *_ = models
    context = multiprocessing.get_context("fork")
    failures = context.Value("i", 0)
    procs = [context.Process(target=_save_n, args=(tmp_path / "shared", (old, new)[i % 2], 3, failures)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0] and failures.value == 0
    assert which(tmp_path / "shared", models) in ("old", "new")


def test_stale_temporary_files_are_removed(models, tmp_path):
    old, *_ = models
    directory = tmp_path / "a"
    pv.save_adapter(old, directory)
    stale, fresh = directory / ".adapter.safetensors.1-2-dead.tmp", directory / ".adapter.safetensors.3-4-busy.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * io._STALE_TMP_SECONDS,) * 2)
    pv.save_adapter(old, directory)
    assert not stale.exists() and fresh.exists()  # a file another writer may still be writing stays
