#!/usr/bin/env bash
# Creates .venv (if needed) and installs jaxsr with its test extras, pinned by constraints.txt.
# Usage: bash scripts/setup.sh            (CPU; on TPU/GPU see docs/launch.md for the jax wheel)
# On Linux x86_64 it also installs the tpu extra (libtpu, ~700 MB, the only platform PyPI has it for): with it
# `jaxsr plan --compile` compiles for TPU topologies on this host (docs/launch.md section 5) and the tests check
# those compiles; libtpu on a machine without TPUs changes nothing else. JAXSR_SETUP_TPU=0 leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
EXTRAS="test"
if [ "${JAXSR_SETUP_TPU:-1}" != 0 ] && [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
  EXTRAS="test,tpu"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]"
