#!/usr/bin/env bash
# The suite at the oldest versions pyproject.toml accepts: a fresh venv installed from constraints-min.txt
# (previous minor releases of timm, diffusers, transformers, accelerate, ...), a check that pip installed
# every pinned version as written (nothing up- or downgraded), `pip check`, then pytest.
#
#   scripts/check_min_versions.sh                    # install (~5 min) + the whole suite (~20 min on 2 busy CPU cores)
#   scripts/check_min_versions.sh tests/test_lst.py  # pytest arguments select a subset
#   PV_MIN_VENV=/tmp/venv-min scripts/check_min_versions.sh   # where the venv goes (default build/venv-min;
#                                                              # reused when present, PV_FRESH=1 rebuilds it)
#
# Not part of .ci/run (CI stays under 20 minutes); run it when a lower bound in pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PV_MIN_VENV:-build/venv-min}
constraints=${PV_CONSTRAINTS:-constraints-min.txt}
if [[ ! -x "$venv/bin/python" || -n "${PV_FRESH:-}" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet -e ".[dev]" -c "$constraints"
"$venv/bin/python" - "$constraints" <<'PY'
import re, sys
from importlib.metadata import version

pins = [re.split(r"\s*==\s*", line.split("#")[0].strip()) for line in open(sys.argv[1])]
wrong = [f"{name} {version(name)} (pinned {want})" for name, want in (p for p in pins if len(p) == 2)
         if version(name).split("+")[0] != want]
if wrong:
    sys.exit(f"{sys.argv[1]}: installed versions differ from the pins: {', '.join(wrong)}")
print(f"{sys.argv[1]}: every pinned version installed as written")
PY
"$venv/bin/pip" check
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
