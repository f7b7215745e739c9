#!/usr/bin/env bash
# Prepares one Cloud TPU VM (run it on every worker of a pod slice, e.g. through launch_tpu_pod.sh --setup):
# a virtualenv with jaxsr and the TPU build of JAX, pinned by constraints.txt so every worker runs the same stack.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/tpu_setup.sh [--venv DIR] [--python PY] [--no-constraints] [--dry-run] [--help]

Creates DIR (default .venv in the checkout) and installs jaxsr with "jax[tpu]" into it.
  --venv DIR         virtualenv to create or update (default: .venv)
  --python PY        interpreter that creates it (default: python3; jaxsr needs >= 3.11)
  --no-constraints   take the newest "jax[tpu]" instead of the version pinned in constraints.txt
  --dry-run          print the commands instead of running them
USAGE
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

DRY_RUN=0 VENV=.venv PY=python3 CONSTRAINTS=(-c constraints.txt)
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || { echo "tpu_setup.sh: --venv needs a directory" >&2; exit 2; }; VENV=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || { echo "tpu_setup.sh: --python needs an interpreter" >&2; exit 2; }; PY=$2; shift 2 ;;
    --no-constraints) CONSTRAINTS=(); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "tpu_setup.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

run() {
  if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@"; fi
}

cd "$(dirname "$0")/.."
if [ "$DRY_RUN" = 1 ]; then echo "cd $(pwd)"; fi
if [ ! -x "$VENV/bin/python" ] || [ "$DRY_RUN" = 1 ]; then
  run "$PY" -m venv "$VENV"
fi
run "$VENV/bin/python" -m pip install --quiet --upgrade pip
# libtpu comes with the jax[tpu] extra from PyPI; the constraints pin jax/jaxlib to the tested version.
run "$VENV/bin/python" -m pip install --quiet --upgrade "${CONSTRAINTS[@]}" -e . "jax[tpu]"
# Only the version: touching the devices here would wait for the other workers of a pod slice.
run "$VENV/bin/python" -c "import jax, jaxsr; print('jax', jax.__version__, 'ready in $VENV')"
