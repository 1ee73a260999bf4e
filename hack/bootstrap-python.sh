#!/usr/bin/env bash
# Creates the project's virtualenv and installs the package with its dev tools.
# Usage: hack/bootstrap-python.sh VENV PYTHON [bench]
# Versions come from requirements/dev.txt (pinned with hashes by hack/lock.py, the same pins the
# images install); the project itself is then installed editable without touching them, built by
# the pinned setuptools of requirements/build.txt. The bench group is not pinned (make bench only).
# The pip cache lives outside the checkout (PIP_CACHE_DIR or ~/.cache/pip), so reinstalls are fast.
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
extra=${3:-}
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtualenv $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
echo "==> installing the pinned dependencies (requirements/dev.txt) into $venv"
"$venv/bin/python" -m pip install -q --require-hashes -r requirements/dev.txt -r requirements/build.txt
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
if [ "$extra" = bench ]; then
  "$venv/bin/python" -m pip install -q --group bench
fi
touch "$venv/.installed"
