"""Every script turns a user mistake into one `error: <message>` line on stderr and exit status 2 (issue #12
items 9 and 10); `--debug` / PETL_VISION_DEBUG=1 show the traceback instead.

Each case runs through the script's own main() inside run_cli (the wrapper every script's `__main__` calls);
one case per script also runs as a real subprocess, all of them started at once.
"""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import ROOT, load_script
from PIL import Image
from test_clip import TINY_CFG

from petl_vision.train.cli import error_message, run_cli
from petl_vision.train.config import ConfigError

PYTHON = ROOT / ".venv" / "bin" / "python"
TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def write_png(path, value=0, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def bomb_png(path, side=20_000):
    """A PNG whose header claims side x side pixels (over PIL's decompression-bomb limit) but holds ~nothing."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny inputs: image folders (good, with a bomb, with mismatched classes), configs (good, malformed, binary),
    a file where a folder belongs, a checkpoint that is not one, an SPM file that is not one."""
    root = tmp_path_factory.mktemp("mistakes")
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            write_png(root / "data" / split / name / "0.png", 60 * c)
            write_png(root / "bomb" / split / name / "0.png", 60 * c)
    bomb_png(root / "bomb" / "train" / "cat" / "1.png")
    cfg = {"model": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": TINY_VIT, "epochs": 1, "batch_size": 4,
           "progress": False, "data": {"kind": "imagefolder", "root": str(root / "data")}, "method": "ssf",
           "output_dir": str(root / "runs" / "ok")}
    (root / "tiny.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    clip = {"model": "clip", "pretrained": False, "epochs": 1, "batch_size": 4, "progress": False, "method": "ssf",
            "data": {"root": str(root / "data"), "shots": 1}, "clip": {"model_config": str(root / "clip.json")},
            "output_dir": str(root / "runs" / "clip")}
    (root / "clip.yaml").write_text(json.dumps(clip))
    (root / "malformed.yaml").write_text("epochs: [1\nmodel: x\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "a_file").write_text("not a folder")
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    (root / "clip.json").write_text(json.dumps(TINY_CFG))
    return root


def run_in_process(capsys, script, argv):
    """(exit status, stderr) of scripts/<script>.py's main under run_cli."""
    capsys.readouterr()
    status = run_cli(load_script(script).main, [str(a) for a in argv])
    return status, capsys.readouterr().err


def assert_one_error_line(status, stderr, *fragments):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len([line for line in lines if line.startswith("error:")]) == 1 and lines[-1].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


# (script, argv with {root} for the files fixture, fragments the error line must hold)
CLASSIFIER = ["--config", "{root}/tiny.yaml"]
CASES = {
    # config files
    "malformed yaml": ("train_classifier", ["--config", "{root}/malformed.yaml"], ["malformed.yaml", "not valid YAML", "line 2"]),
    "binary config": ("train_classifier", ["--config", "{root}/binary.yaml"], ["binary.yaml", "not a text file"]),
    "missing config": ("train_classifier", ["--config", "{root}/nope.yaml"], ["nope.yaml", "not found"]),
    # override keys and values
    "unknown key": ("train_classifier", [*CLASSIFIER, "optim.lrate=1"], ["optim.lrate", "valid keys: optim.name, optim.lr"]),
    "negative lr": ("train_classifier", [*CLASSIFIER, "optim.lr=-1e-3"], ["optim.lr", "> 0", "-0.001"]),
    "nan lr": ("train_classifier", [*CLASSIFIER, "optim.lr=.nan"], ["optim.lr", "finite", "nan"]),
    "lr text": ("train_classifier", [*CLASSIFIER, "optim.lr=fast"], ["optim.lr must be float", "'fast'"]),
    "bad betas": ("train_classifier", [*CLASSIFIER, "optim.betas=[0.9, 1.5]"], ["optim.betas", "[0, 1)"]),
    "one beta": ("train_classifier", [*CLASSIFIER, "optim.betas=[0.9]"], ["optim.betas", "two numbers"]),
    "label smoothing > 1": ("train_classifier", [*CLASSIFIER, "label_smoothing=1.5"], ["label_smoothing", "[0, 1]", "1.5"]),
    "mixed precision": ("train_classifier", [*CLASSIFIER, "mixed_precision=fp32"], ["mixed_precision", "no, fp16, bf16", "'fp32'"]),
    "file as output_dir": ("train_classifier", [*CLASSIFIER, "--output-dir", "{root}/a_file"], ["a_file", "is a file"]),
    "resume without config": ("train_classifier", ["--resume"], ["--resume needs --config"]),
    # methods and models
    "unknown method": ("train_classifier", [*CLASSIFIER, "method=loraa"], ["override 'method=loraa'", "unknown method 'loraa'", "lora"]),
    "bad method field": ("train_classifier", [*CLASSIFIER, "method=lora", "method.rank=4"], ["method 'lora'", "rank"]),
    "method does not fit": ("train_classifier", [*CLASSIFIER, "method=spm"], ["spm"]),
    "unknown timm model": ("train_classifier", [*CLASSIFIER, "model=vit_tiny_patch16_2244"], ["vit_tiny_patch16_2244", "not a timm model",
                                                                                             "vit_tiny_patch16_224"]),
    "bad model_kwargs": ("train_classifier", [*CLASSIFIER, "model_kwargs={img_size: 16, depht: 1}"], ["model_kwargs", "depht"]),
    "checkpoint not safetensors": ("train_classifier", [*CLASSIFIER, "checkpoint={root}/garbage.safetensors"],
                                   ["garbage.safetensors", "not a readable weights file"]),
    "missing checkpoint": ("train_classifier", [*CLASSIFIER, "checkpoint={root}/nope.pth"], ["nope.pth", "not found"]),
    # data
    "missing data root": ("train_classifier", [*CLASSIFIER, "data.root={root}/nope"], ["nope", "not found"]),
    "decompression bomb": ("train_classifier", [*CLASSIFIER, "data.root={root}/bomb"], ["1.png", "too large", "MAX_IMAGE_PIXELS"]),
    # the other scripts
    "clip unknown key": ("train_clip", ["--config", "{root}/clip.yaml", "clip.tagg=openai"], ["clip.tagg"]),
    "clip missing data": ("train_clip", ["--config", "{root}/clip.yaml", "data.root={root}/nope"], ["nope", "not found"]),
    "point unknown key": ("train_pointcloud", ["--config", ROOT / "configs/pointcloud_synthetic_idpt.yaml", "data.num_point=8"],
                          ["data.num_point"]),
    "point unknown method": ("train_pointcloud", ["--config", ROOT / "configs/pointcloud_synthetic_idpt.yaml", "method=idtp"],
                             ["override 'method=idtp'", "unknown method 'idtp'"]),
    "point missing data": ("train_pointcloud", ["--config", ROOT / "configs/modelnet40_idpt.yaml", "data.root={root}/nope"], ["nope"]),
    "point bad augment": ("train_pointcloud", ["--config", ROOT / "configs/pointcloud_synthetic_idpt.yaml", "data.augment=[flip]"],
                          ["data.augment", "flip", "rotate"]),
    "diffusion unknown key": ("finetune_diffusion", ["--model", "{root}", "--data", "{root}/data", "optim.lr=0.01"],
                              ["optim.lr=0.01", "unknown key 'optim'", "lr"]),
    "diffusion unknown method": ("finetune_diffusion", ["--data", "{root}/data", "method=vpt"], ["method.name", "sara"]),
    "diffusion nan lr": ("finetune_diffusion", ["lr=nan"], ["lr", "finite"]),
    "diffusion bad betas": ("finetune_diffusion", ["adam_betas=[1, 0.9]"], ["adam_betas", "[0, 1)"]),
    "diffusion missing model": ("finetune_diffusion", ["--model", "{root}/nope", "--data", "{root}/data"], ["nope", "no such folder"]),
    "diffusion not a pipeline": ("finetune_diffusion", ["--model", "{root}/data", "--data", "{root}/data"], ["model_index.json"]),
    "diffusion missing data": ("finetune_diffusion", ["--model", "runwayml/stable-diffusion-v1-5", "--data", "{root}/nope"],
                               ["--data", "nope", "not found"]),
    "erase no concept": ("erase_concept", ["--model", "{root}/nope"], ["concept is empty"]),
    "erase unknown key": ("erase_concept", ["--concept", "x", "steps=3"], ["unknown key 'steps'"]),
    "erase missing model": ("erase_concept", ["--concept", "x", "--model", "{root}/nope"], ["nope", "no such folder"]),
    "erase mixed precision": ("erase_concept", ["--concept", "x", "mixed_precision=fp8"], ["mixed_precision", "'fp8'"]),
    "evaluate missing spm": ("evaluate_erasure", ["--model", "{root}/nope", "--spm", "{root}/nope.safetensors"], ["--spm", "nope.safetensors"]),
    "evaluate missing model": ("evaluate_erasure", ["--model", "{root}/nope", "--spm", "{root}/garbage.safetensors"], ["nope", "no such folder"]),
    "evaluate bad flag": ("evaluate_erasure", ["--model", "x", "--spm", "y", "--steps", "many"], ["--steps", "invalid int", "--help"]),
}


def fill(argv, root):
    return [str(a).replace("{root}", str(root)) for a in argv]


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistake_is_one_line(case, files, capsys):
    script, argv, fragments = CASES[case]
    if script in ("train_classifier", "train_clip", "finetune_diffusion") and "--output-dir" not in argv:
        argv = [*argv, "--output-dir", f"{{root}}/runs/{case.replace(' ', '_')}"]  # a run folder each
    try:
        status, stderr = run_in_process(capsys, script, fill(argv, files))
    except SystemExit as e:  # argparse usage errors exit inside main
        status, stderr = e.code, capsys.readouterr().err
    print(f"{case}: {stderr.strip()}")
    assert_one_error_line(status, stderr, *fragments)


def test_pipeline_mistakes(files, pipeline_dir, capsys):
    """Mistakes found once the pipeline is loaded: an SPM file that is not safetensors, a LoRA that fits no layer."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its float32-modules warning, whose handler may hold an earlier test's stderr
    try:
        pipeline_mistakes(files, pipeline_dir, capsys)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def pipeline_mistakes(files, pipeline_dir, capsys):
    status, stderr = run_in_process(capsys, "evaluate_erasure", [
        "--model", pipeline_dir, "--spm", files / "garbage.safetensors", "--clip-config", files / "clip.json",
        "--clip-pretrained", "none", "--device", "cpu", "--output-dir", files / "eval"])
    assert_one_error_line(status, stderr, "garbage.safetensors")
    status, stderr = run_in_process(capsys, "finetune_diffusion", [
        "--model", pipeline_dir, "--data", files / "data", "--output-dir", files / "ft", "--max-steps", "1",
        "--method", "lora", "method.target_modules=nomatch", "resolution=16"])
    assert_one_error_line(status, stderr, "target_modules='nomatch'", "matches no")


def test_debug_flag_and_environment_show_the_traceback(files, monkeypatch):
    main = load_script("train_classifier").main
    with pytest.raises(ConfigError, match="not valid YAML"):
        run_cli(main, ["--config", str(files / "malformed.yaml"), "--debug"])
    monkeypatch.setenv("PETL_VISION_DEBUG", "1")
    with pytest.raises(ConfigError, match="not valid YAML"):
        run_cli(main, ["--config", str(files / "malformed.yaml")])
    monkeypatch.setenv("PETL_VISION_DEBUG", "0")
    assert run_cli(main, ["--config", str(files / "malformed.yaml")]) == 2


def test_exit_status_of_main_is_kept():
    assert run_cli(lambda argv: 1, []) == 1 and run_cli(lambda argv: {"steps": 3}, []) == 0 and run_cli(lambda argv: None, []) == 0


def test_bugs_are_not_hidden():
    def buggy(argv):
        raise AttributeError("a bug")

    with pytest.raises(AttributeError):
        run_cli(buggy, [])


def test_error_message_is_one_line():
    worker = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 1, in f\n    load_rgb(path)\npetl_vision.data.common.DataError: cannot read image /d/a.png: bad\n')
    assert error_message(ValueError(worker)) == "cannot read image /d/a.png: bad (in DataLoader worker process 0)"
    assert error_message(FileNotFoundError(2, "No such file or directory", "/x/y.pt")) == "No such file or directory: /x/y.pt"
    assert error_message(KeyError("'r' missing in /a/b.json")) == "'r' missing in /a/b.json"
    assert error_message(KeyError("weight")) == "key 'weight' not found (run with --debug for the traceback)"
    assert error_message(ValueError("two\nlines")) == "two; lines"
    from safetensors import SafetensorError
    assert error_message(SafetensorError("header too large")) == "SafetensorError: header too large"


# ----------------------------------------------------------------------------- real processes

SUBPROCESS_CASES = {
    "train_classifier": ["--config", "{root}/malformed.yaml"],
    "train_clip": ["--config", "{root}/clip.yaml", "data.shot=4"],
    "train_pointcloud": ["--config", ROOT / "configs/pointcloud_synthetic_idpt.yaml", "optim.lr=-1"],
    "finetune_diffusion": ["--model", "{root}/nope", "--data", "{root}/data", "--max-steps", "1"],
    "erase_concept": ["--concept", "x", "optim.lr=0.01"],
    "evaluate_erasure": ["--model", "{root}/nope", "--spm", "{root}/garbage.safetensors"],
    "train_classifier --debug": ["--config", "{root}/binary.yaml", "--debug"],
}


@pytest.fixture(scope="module")
def processes(files):
    """All SUBPROCESS_CASES started at once (they mostly import); name -> (status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "PETL_VISION_DEBUG"}
    started = {name: subprocess.Popen([str(PYTHON), str(ROOT / "scripts" / f"{name.split()[0]}.py"), *fill(argv, files)],
                                      cwd=files, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, argv in SUBPROCESS_CASES.items()}
    return {name: (p.wait(timeout=300), p.communicate()[1]) for name, p in started.items()}


@pytest.mark.parametrize("script", [s for s in SUBPROCESS_CASES if "--debug" not in s])
def test_real_script_prints_one_error_line(script, processes):
    status, stderr = processes[script]
    assert_one_error_line(status, stderr)
    assert stderr.strip().count("\n") == 0, stderr  # nothing else on stderr either


def test_real_script_debug_shows_the_traceback(processes):
    status, stderr = processes["train_classifier --debug"]
    assert status == 1 and "Traceback (most recent call last)" in stderr and "ConfigError" in stderr and "binary.yaml" in stderr


def test_python_is_the_project_venv():
    assert PYTHON.is_file(), f"expected the project's virtual environment at {PYTHON}"
    assert sys.version_info >= (3, 10)


def test_a_second_run_into_a_folder_is_refused_until_overwrite(files, capsys):
    main = load_script("train_classifier").main
    argv = ["--config", str(files / "tiny.yaml"), "--output-dir", str(files / "runs" / "twice")]
    assert run_in_process(capsys, "train_classifier", argv)[0] == 0
    status, stderr = run_in_process(capsys, "train_classifier", [*argv, "seed=1"])
    assert_one_error_line(status, stderr, "twice", "--overwrite")
    assert run_cli(main, [*argv, "seed=1", "--overwrite"]) == 0
    assert "seed: 1" in (files / "runs" / "twice" / "config.yaml").read_text()
