#!/usr/bin/env bash
# Creates .venv (if needed) and installs jaxsr with its test extras, pinned by constraints.txt.
# Usage: bash scripts/setup.sh            (CPU; on TPU/GPU see docs/launch.md for the jax wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
