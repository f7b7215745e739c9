#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU pod slice at once (gcloud ... ssh --worker=all).
# No addresses are passed: jaxsr/distributed.py lets jax.distributed.initialize() detect the slice itself.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--workdir DIR] [--setup] [--dry-run]
                                 -- COMMAND [ARG ...]

Runs COMMAND in DIR (default: jaxsr, relative to the home directory) with DIR/.venv activated on all workers.
  --tpu NAME     TPU VM name (gcloud compute tpus tpu-vm list)
  --zone ZONE    its zone, e.g. us-east5-a
  --project P    Google Cloud project (default: gcloud's configured project)
  --workdir DIR  the jaxsr checkout on the workers (default: jaxsr)
  --setup        first run scripts/tpu_setup.sh on every worker (COMMAND is then optional)
  --tpu-flags F  LIBTPU_INIT_ARGS for COMMAND (default: jaxsr's, scripts/lib.sh JAXSR_TPU_FLAGS: async collectives
                 fused with compute, as MaxText runs; "" passes none)
  --dry-run      print the gcloud commands instead of running them

Example:
  scripts/launch_tpu_pod.sh --tpu my-v5p-128 --zone us-east5-a -- jaxsr run --config configs/paper_llama2_70b.yaml
USAGE
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

TPU="" ZONE="" PROJECT="" WORKDIR=jaxsr SETUP=0 DRY_RUN=0 TPU_FLAGS=$JAXSR_TPU_FLAGS
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu|--zone|--project|--workdir|--tpu-flags)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --tpu) TPU=$2 ;; --zone) ZONE=$2 ;; --project) PROJECT=$2 ;; --workdir) WORKDIR=$2 ;; --tpu-flags) TPU_FLAGS=$2 ;;
      esac
      shift 2 ;;
    --setup) SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (put the command to run after --)" ;;
  esac
done
[ -n "$TPU" ] || die "missing --tpu NAME"
[ -n "$ZONE" ] || die "missing --zone ZONE"
[ $# -gt 0 ] || [ "$SETUP" = 1 ] || die "missing the command to run after -- (e.g. -- jaxsr run --config FILE)"

gcloud_ssh() {  # $1: the remote shell command
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE")
  if [ -n "$PROJECT" ]; then cmd+=(--project "$PROJECT"); fi
  cmd+=(--worker=all --command "$1")
  if [ "$DRY_RUN" = 1 ]; then show "${cmd[@]}"; else "${cmd[@]}"; fi
}

if [ "$SETUP" = 1 ]; then
  gcloud_ssh "cd $(show "$WORKDIR") && bash scripts/tpu_setup.sh"
fi
if [ $# -gt 0 ]; then
  flags=""
  if [ -n "$TPU_FLAGS" ]; then flags="export LIBTPU_INIT_ARGS=$(show "$TPU_FLAGS") && "; fi
  gcloud_ssh "cd $(show "$WORKDIR") && . .venv/bin/activate && $flags$(show "$@")"
fi
