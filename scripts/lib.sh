# Shared by the launch scripts (sourced, not run): printing commands and failing on bad arguments.
# shellcheck shell=bash

# Prints a command as a shell would read it back (single-quoting words with special characters).
show() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./=:@,+%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# A bad argument: the message, a hint, exit status 2.
die() { echo "$(basename "$0"): $*" >&2; echo "Try --help." >&2; exit 2; }

# XLA:TPU flags for the jaxsr programs on a pod slice, as MaxText sets them for its TPU runs (LIBTPU_INIT_ARGS):
# async collectives fused with compute (the FSDP all-gathers of the next layer overlap this layer's matmuls),
# and the data-parallel all-reduce optimisation. libtpu refuses an unknown flag at start, so
# tests/test_launch_scripts.py compiles with these (with libtpu installed) to keep them valid for the pinned jax.
# shellcheck disable=SC2034  # used by the scripts that source this file
JAXSR_TPU_FLAGS="--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true \
--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true"
