#!/usr/bin/env bash
# Starts this node's jaxsr process of a multi-node GPU run: run it on every node with the same --nodes and
# --coordinator and that node's --node-rank. It appends the distributed.* config overrides that
# jaxsr/distributed.py passes to jax.distributed.initialize; each process drives all GPUs of its node.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/launch_gpu.sh --nodes N --node-rank R --coordinator HOST:PORT [--venv DIR] [--dry-run]
                             -- jaxsr COMMAND [--config FILE] [key=value ...]

  --nodes N              number of nodes (processes), N >= 1
  --node-rank R          this node's rank, 0 <= R < N; rank 0 hosts the coordinator
  --coordinator H:P      address of node 0 that every node can reach, e.g. 10.0.0.1:12355
  --venv DIR             virtualenv whose bin/ goes first on PATH (default: .venv in the checkout, if present)
  --dry-run              print the command instead of running it

Appends distributed.coordinator_address=H:P distributed.num_processes=N distributed.process_id=R to the
command, so put any key=value overrides last. Sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 unless already set
(the share of GPU memory `jaxsr plan` assumes usable).
USAGE
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

NODES="" RANK="" COORD="" VENV="$(cd "$(dirname "$0")/.." && pwd)/.venv" DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes|--node-rank|--coordinator|--venv)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in --nodes) NODES=$2 ;; --node-rank) RANK=$2 ;; --coordinator) COORD=$2 ;; --venv) VENV=$2 ;; esac
      shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (put the command to run after --)" ;;
  esac
done
[ -n "$NODES" ] || die "missing --nodes N"
[ -n "$RANK" ] || die "missing --node-rank R"
[ -n "$COORD" ] || die "missing --coordinator HOST:PORT"
if ! [[ $NODES =~ ^[0-9]+$ ]] || [ "$NODES" -lt 1 ]; then die "--nodes must be a positive integer, got '$NODES'"; fi
if ! [[ $RANK =~ ^[0-9]+$ ]] || [ "$RANK" -ge "$NODES" ]; then
  die "--node-rank must be an integer in [0, $NODES), got '$RANK'"
fi
[[ $COORD =~ ^[^[:space:]]+:[0-9]+$ ]] || die "--coordinator must look like HOST:PORT, got '$COORD'"
[ $# -gt 0 ] || die "missing the command to run after -- (e.g. -- jaxsr run --config FILE)"

cmd=("$@" "distributed.coordinator_address=$COORD" "distributed.num_processes=$NODES" "distributed.process_id=$RANK")
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
if [ -d "$VENV/bin" ]; then export PATH="$VENV/bin:$PATH"; fi
if [ "$DRY_RUN" = 1 ]; then
  show "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION" "${cmd[@]}"
else
  exec "${cmd[@]}"
fi
