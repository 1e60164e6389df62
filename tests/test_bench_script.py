"""scripts/benchmark.py as a user meets it: every --help example runs (at tiny size), every mistake is
one `error:` line with a non-zero exit (a traceback only with --debug or PETL_VISION_DEBUG=1)."""
import dataclasses
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, load_script

import petl_vision as pv

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
        "--num-classes", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def script():
    return load_script("benchmark")


def help_examples(doc: str) -> list[list[str]]:
    """The argument lists of the `python scripts/benchmark.py ...` lines of the help text (comments dropped)."""
    examples = []
    for line in doc.splitlines():
        line = line.strip()
        if line.startswith("python scripts/benchmark.py"):
            examples.append(shlex.split(line, comments=True)[2:])
    return examples


def shrink(opts, out_dir):
    """The example's options at a size a CPU test runs in seconds: tiny models, one step, in this process."""
    changes = dict(batch_size=2, steps=1, warmup=0, device="cpu", out_dir=str(out_dir), isolate=False, num_classes=5)
    if opts.workload == "timm-classifier":
        changes["model_kwargs"] = {**opts.model_kwargs, **TINY_VIT}
    else:
        changes["model"] = "tiny-unet"
    if opts.compile:
        changes["compile_backend"] = "aot_eager"  # inductor takes minutes on a CPU
    return dataclasses.replace(opts, **changes)


def test_help_examples_run(script, monkeypatch, tmp_path):
    examples = help_examples(script.__doc__)
    assert len(examples) == 5
    assert "lora.r=4" in script.__doc__ and "lora.rank" not in script.__doc__
    assert "lora.r=4" in script.build_parser().format_help() and "rank" not in script.build_parser().format_help()
    seen = []

    def run_small(opts, log=print):
        seen.append(opts)
        report = script_run(shrink(opts, tmp_path / str(len(seen))), log=lambda _: None)
        failed = [(r["method"], r["error"]) for r in report["methods"] if r["error"]]
        assert not failed, failed
        return report

    script_run = script.run_benchmark
    monkeypatch.setattr(script, "run_benchmark", run_small)
    for argv in examples:
        assert script.main(argv) == 0, argv
    assert len(seen) == len(examples)
    assert seen[1].methods is None and seen[2].compile and seen[3].method_args == {"lora": {"r": 4}}


MISTAKES = [
    (["--methods", "nope"], "error: unknown method 'nope'"),
    (["--model", "vit_nope"], "error: unknown timm model 'vit_nope'"),
    (["--workload", "nope"], "error: unknown workload 'nope'"),
    (["--methods", "lora", "--method-arg", "lora.rank=4"], "error: --method-arg lora.rank: LoRAConfig has no field 'rank'"),
    (["--methods", "lora", "--method-arg", "lora.r=x"], "error: --method-arg lora.r='x': expected int"),
    (["--methods", "lora", "--method-arg", "r=4"], "error: --method-arg 'r=4': expected METHOD.FIELD=VALUE"),
    (["--methods", "lora", "--method-arg", "vpt.num_prompts=3"], "error: --method-arg names method 'vpt', which is not benchmarked"),
    (["--methods", "full", "--batch-size", "0"], "error: --batch-size must be an integer >= 1, got 0"),
    (["--batch-size", "abc"], "error: argument --batch-size: invalid int value: 'abc'"),
    (["--methods", "hst"], "error: method 'hst' needs a ViT with at least 4 blocks"),
    (["--model-kwargs", "[1]"], "error: --model-kwargs must be a JSON object"),
    (["--mixed-precision", "fp32"], "error: argument --mixed-precision: invalid choice: 'fp32'"),
    (["--methods", "full", "--compile", "--compile-backend", "nope"], "error: --compile-backend 'nope'"),
]


def exit_status(script, argv) -> int:
    """script.main's status; usage errors leave argparse through SystemExit."""
    try:
        return script.main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("argv,start", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_mistakes_are_one_error_line(script, capsys, tmp_path, monkeypatch, argv, start):
    monkeypatch.delenv("PETL_VISION_DEBUG", raising=False)
    assert exit_status(script, [*TINY, "--out-dir", str(tmp_path / "out"), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(start), err
    assert not (tmp_path / "out").exists()


def test_arguments_become_options(script):
    opts = script.parse_args(["--methods", "floor,full", "ssf", "--model-kwargs", '{"img_size": 32}', "--method-arg", "vpt.num_prompts=3",
                              "--compile", "--compile-backend", "aot_eager", "--in-process", "--method-timeout", "30"])
    assert opts.methods == ["floor", "full", "ssf"] and opts.model_kwargs == {"img_size": 32}
    assert opts.method_args == {"vpt": {"num_prompts": 3}} and opts.device == "auto" and opts.out_dir is None
    assert opts.compile and opts.compile_backend == "aot_eager" and not opts.isolate and opts.method_timeout == 30.0
    defaults = script.parse_args([])
    assert defaults.methods is None and defaults.compile is False and defaults.isolate and defaults.warmup == 3


def test_debug_shows_the_traceback(script, monkeypatch, tmp_path):
    monkeypatch.delenv("PETL_VISION_DEBUG", raising=False)
    with pytest.raises(pv.UnknownMethodError):
        script.main([*TINY, "--methods", "nope", "--debug"])
    monkeypatch.setenv("PETL_VISION_DEBUG", "1")
    with pytest.raises(pv.UnknownMethodError):
        script.main([*TINY, "--methods", "nope"])
    monkeypatch.setenv("PETL_VISION_DEBUG", "0")
    assert script.main([*TINY, "--methods", "nope"]) == 2


def test_the_real_script_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PETL_VISION_DEBUG": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *TINY, "--methods", "full,nope"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: unknown method 'nope'") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
