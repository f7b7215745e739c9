#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU pod slice at once (gcloud ... ssh --worker=all), or, with
# --slices N, on every worker of the N slices of a multi-slice job at once, each slice with its Megascale variables.
# No JAX addresses are passed: jaxsr/distributed.py lets jax.distributed.initialize() detect the slice(s) itself.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--workdir DIR] [--slices N]
                                 [--megascale-port PORT] [--setup] [--dry-run] -- COMMAND [ARG ...]

Runs COMMAND in DIR (default: jaxsr, relative to the home directory) with DIR/.venv activated on all workers.
  --tpu NAME     TPU VM name (gcloud compute tpus tpu-vm list); with --slices, the node prefix of the slices
  --zone ZONE    its zone, e.g. us-east5-a
  --project P    Google Cloud project (default: gcloud's configured project)
  --workdir DIR  the jaxsr checkout on the workers (default: jaxsr)
  --slices N     a multi-slice job of N slices, the TPU VMs NAME-0 .. NAME-(N-1) (gcloud compute tpus
                 queued-resources create QR --node-count N --node-prefix NAME): COMMAND runs on every worker of
                 every slice at once, with MEGASCALE_COORDINATOR_ADDRESS (NAME-0 worker 0's internal IP:PORT),
                 MEGASCALE_NUM_SLICES=N, MEGASCALE_SLICE_ID (0 .. N-1) and MEGASCALE_PORT exported; waits for all
                 slices and exits non-zero, naming the slice, if any failed
  --megascale-port PORT
                 the Megascale coordinator's port with --slices (default: 8080)
  --setup        first run scripts/tpu_setup.sh on every worker (COMMAND is then optional)
  --tpu-flags F  LIBTPU_INIT_ARGS for COMMAND (default: jaxsr's, scripts/lib.sh JAXSR_TPU_FLAGS: async collectives
                 fused with compute, as MaxText runs; "" passes none)
  --dry-run      print the gcloud commands instead of running them (with --slices, the internal IP is shown as
                 a placeholder after the describe command that looks it up)

Examples:
  scripts/launch_tpu_pod.sh --tpu my-v5p-128 --zone us-east5-a -- jaxsr run --config configs/paper_llama2_70b.yaml
  scripts/launch_tpu_pod.sh --tpu my-ms --slices 2 --zone us-east5-a -- \
      jaxsr run --config configs/paper_llama2_70b.yaml mesh.data=2 model.remat=full
USAGE
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

TPU="" ZONE="" PROJECT="" WORKDIR=jaxsr SETUP=0 DRY_RUN=0 TPU_FLAGS=$JAXSR_TPU_FLAGS SLICES=0 MS_PORT=8080 MULTI=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu|--zone|--project|--workdir|--tpu-flags|--slices|--megascale-port)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --tpu) TPU=$2 ;; --zone) ZONE=$2 ;; --project) PROJECT=$2 ;; --workdir) WORKDIR=$2 ;; --tpu-flags) TPU_FLAGS=$2 ;;
        --slices) SLICES=$2 MULTI=1 ;; --megascale-port) MS_PORT=$2 ;;
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
if [ "$MULTI" = 1 ]; then
  if ! [[ $SLICES =~ ^[0-9]{1,4}$ ]] || [ "$((10#$SLICES))" -lt 1 ]; then
    die "--slices must be a positive integer (the queued resource's --node-count), got '$SLICES'"
  fi
  SLICES=$((10#$SLICES))
fi
if ! [[ $MS_PORT =~ ^[0-9]{1,5}$ ]] || [ "$((10#$MS_PORT))" -lt 1 ] || [ "$((10#$MS_PORT))" -gt 65535 ]; then
  die "--megascale-port must be a port number (1-65535), got '$MS_PORT'"
fi
MS_PORT=$((10#$MS_PORT))
[ $# -gt 0 ] || [ "$SETUP" = 1 ] || die "missing the command to run after -- (e.g. -- jaxsr run --config FILE)"

# Where gcloud finds the TPU VMs: --zone and, when given, --project.
location=(--zone "$ZONE")
if [ -n "$PROJECT" ]; then location+=(--project "$PROJECT"); fi

gcloud_ssh() {  # $1: the TPU VM, $2: the remote shell command, run on all its workers
  local cmd=(gcloud compute tpus tpu-vm ssh "$1" "${location[@]}" --worker=all --command "$2")
  if [ "$DRY_RUN" = 1 ]; then show "${cmd[@]}"; else "${cmd[@]}"; fi
}

remote_command() {  # $1: the exports before the command ("" for none); the rest: the command
  local exports=$1 flags=""
  shift
  if [ -n "$TPU_FLAGS" ]; then flags="export LIBTPU_INIT_ARGS=$(show "$TPU_FLAGS") && "; fi
  echo "cd $(show "$WORKDIR") && . .venv/bin/activate && $flags$exports$(show "$@")"
}

if [ "$MULTI" = 0 ]; then  # one slice: one gcloud command for all its workers
  if [ "$SETUP" = 1 ]; then gcloud_ssh "$TPU" "cd $(show "$WORKDIR") && bash scripts/tpu_setup.sh"; fi
  if [ $# -gt 0 ]; then gcloud_ssh "$TPU" "$(remote_command "" "$@")"; fi
  exit 0
fi

# --- several slices: NAME-0 .. NAME-(N-1), one gcloud command per slice, all at once ------------------------------

labelled() {  # $1: a label; the rest: a command whose output lines are printed as "[label] line"; its exit status
  local label=$1 rc=0
  shift
  "$@" 2>&1 | while IFS= read -r line || [ -n "$line" ]; do printf '[%s] %s\n' "$label" "$line"; done || rc=$?
  return "$rc"
}

pids=()
# Each slice's gcloud runs as a job of its own (its own process group), so that an interrupt stops all of them.
set -m
stop_slices() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  echo "$(basename "$0"): interrupted: stopped the gcloud sessions of the $SLICES slices" >&2
  exit 130
}
trap stop_slices INT TERM

on_every_slice() {  # $1: what runs ("setup" or "command"); $2: a function printing slice $i's remote command
  local i rc failed=() first=0
  if [ "$DRY_RUN" = 1 ]; then
    for ((i = 0; i < SLICES; i++)); do gcloud_ssh "$TPU-$i" "$("$2" "$i")"; done
    return 0
  fi
  pids=()
  for ((i = 0; i < SLICES; i++)); do
    labelled "slice $i" gcloud_ssh "$TPU-$i" "$("$2" "$i")" </dev/null &
    pids+=("$!")
  done
  for ((i = 0; i < SLICES; i++)); do
    rc=0
    wait "${pids[$i]}" || rc=$?
    if [ "$rc" != 0 ]; then
      echo "$(basename "$0"): $1 failed on slice $i ($TPU-$i): gcloud exit status $rc" >&2
      failed+=("$i")
      if [ "$first" = 0 ]; then first=$rc; fi
    fi
  done
  pids=()
  if [ "$first" != 0 ]; then
    echo "$(basename "$0"): $1 failed on slice(s) ${failed[*]} of $SLICES; exit status $first" \
      "(slice ${failed[0]}'s)" >&2
    exit "$first"
  fi
}

setup_command() { echo "cd $(show "$WORKDIR") && bash scripts/tpu_setup.sh"; }

# The Megascale coordinator runs on slice 0's worker 0; every worker of every slice gets its internal address.
COORD_IP=""
slice_command() {  # $1: the slice id
  remote_command "$(show export "MEGASCALE_COORDINATOR_ADDRESS=$COORD_IP:$MS_PORT" "MEGASCALE_NUM_SLICES=$SLICES" \
    "MEGASCALE_SLICE_ID=$1" "MEGASCALE_PORT=$MS_PORT") && " "${COMMAND[@]}"
}

if [ "$SETUP" = 1 ]; then on_every_slice setup setup_command; fi
if [ $# -gt 0 ]; then
  COMMAND=("$@")
  describe=(gcloud compute tpus tpu-vm describe "$TPU-0" "${location[@]}"
            "--format=value(networkEndpoints[0].ipAddress)")
  if [ "$DRY_RUN" = 1 ]; then
    show "${describe[@]}"
    COORD_IP="<$TPU-0-worker-0-ip>"
  else
    COORD_IP=$("${describe[@]}") || { echo "$(basename "$0"): could not look up $TPU-0's internal IP" >&2; exit 1; }
    COORD_IP=${COORD_IP%%[[:space:]]*}
    [ -n "$COORD_IP" ] || { echo "$(basename "$0"): $TPU-0 has no network endpoint (is it READY?)" >&2; exit 1; }
  fi
  on_every_slice command slice_command
fi
