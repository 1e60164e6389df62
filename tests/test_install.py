"""Installation: pyproject's tested ranges agree with constraints.txt (newest tested) and constraints-min.txt
(oldest tested); the README's quick-start commands use them and .ci/run runs the README's test command;
a missing optional package is one line naming its extra."""
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# the builds on this machine (pip's cap): both constraints files must keep them, never another build
LOCAL_BUILDS = {"torch": "2.14.1", "torchvision": "0.29.1"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path) -> dict[str, str]:
    """{package: version} of the `name==version` lines of a constraints file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"{path.name}: {line!r} is not name==version"
            out[canonical(name.strip())] = version.strip()
    return out


def requirements(extras=("dev",)) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return reqs + [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]


def readme_command(pattern: str) -> str:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if re.match(pattern, line)]
    assert len(lines) == 1, f"README.md: {len(lines)} lines match {pattern!r}"
    return lines[0]


def test_pyproject_ranges_match_both_constraints_files():
    newest, oldest = pins(ROOT / "constraints.txt"), pins(ROOT / "constraints-min.txt")
    for name, version in LOCAL_BUILDS.items():
        assert newest[name] == oldest[name] == version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = ("dev", "demo", "bench", "pointcloud")
    checked = 0
    for req in requirements(extras):
        name = canonical(req.name)
        assert not any(s.operator == "==" for s in req.specifier), f"pyproject.toml pins {req}: use a tested range"
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert lower, f"pyproject.toml: {req} has no lower bound"
        assert oldest[name] == lower[0], f"{name}: lower bound {lower[0]} but constraints-min.txt tests {oldest[name]}"
        assert req.specifier.contains(newest[name]), f"{name}: constraints.txt's {newest[name]} is outside {req}"
        assert Version(newest[name]) >= Version(oldest[name])
        checked += 1
    assert checked >= 18 and set(project["optional-dependencies"]) >= {"tensorboard", "bench", "demo", "pointcloud", "dev"}
    # the previous minor releases of the four libraries a user's stack most often fixes
    previous = {"timm": "1.0.30", "diffusers": "0.41.0", "transformers": "5.23.0", "accelerate": "1.14.0"}
    assert {k: oldest[k] for k in previous} == previous
    assert Version(oldest["timm"]) >= Version("1.0.21")  # LST: timm's Block takes device= from 1.0.21


def test_ci_runs_the_readme_test_command():
    test_command = readme_command(r"python3 -m venv .*-m pytest")
    assert test_command == 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" -c constraints.txt && .venv/bin/python -m pytest -q'
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, cwd=ROOT)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == test_command


def test_readme_demo_command_installs_the_demo_extra():
    demo = readme_command(r"python3 -m venv .*scripts/train_classifier\.py")
    assert '-e ".[demo]" -c constraints.txt' in demo


def test_missing_scikit_learn_is_one_line_naming_the_extra(tmp_path):
    """The digits demo without scikit-learn: exit status 2 and one `error:` line telling which extra to install."""
    code = ("import runpy, sys; sys.modules['sklearn'] = None; "
            f"sys.argv = ['train_classifier.py', '--output-dir', {str(tmp_path / 'demo')!r}]; "
            f"runpy.run_path({str(ROOT / 'scripts' / 'train_classifier.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ['error: the digits demo needs scikit-learn (the "demo" extra): pip install -e ".[demo]" or pip install scikit-learn']
    assert "Traceback" not in done.stderr
