"""scripts/gpu_benchmark.sh's plumbing, run as its TINY=1 dry run on the CPU (the real run needs an H200)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_benchmark.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")


def run_script(out_dir, **env):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out_dir), "TINY": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    assert "pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl" in text
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64" in text


def test_tiny_vit_section_writes_results_and_targets(tmp_path):
    proc = run_script(tmp_path, SECTIONS="vit", VIT_METHODS="floor,full,ssf", BUDGET_S="500")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "summary.md", "vit.json", "vit.png"]
    report = json.loads((tmp_path / "vit.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["floor", "full", "ssf"]
    assert all(m["error"] is None for m in report["methods"])
    assert report["args"]["mixed_precision"] == "bf16" and report["args"]["workload"] == "timm-classifier"
    summary = (tmp_path / "summary.md").read_text()
    assert "## vit\n" in summary and "| floor |" in summary and "## Issue #14 targets (ratios)" in summary
    assert "ssf train_step_ms / full:" in summary and "lst peak_train_memory_mib / full: not measured" in summary
    assert "vpt train_step_ms / full: not measured" in summary


def test_sections_past_the_budget_are_skipped(tmp_path):
    proc = run_script(tmp_path, SECTIONS="vit unet", BUDGET_S="10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== vit: skipped" in proc.stdout and "== unet: skipped" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "summary.md"]
