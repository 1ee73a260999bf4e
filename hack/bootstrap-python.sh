#!/usr/bin/env bash
# Creates the project's virtualenv and installs the package with its dev tools.
# Usage: hack/bootstrap-python.sh VENV PYTHON [bench]
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
groups=(--group dev)
[ "$extra" = bench ] && groups+=(--group bench)
echo "==> installing dsm and its dev tools into $venv"
"$venv/bin/python" -m pip install -q -e '.[operator]' "${groups[@]}"
touch "$venv/.installed"
