"""Multi-process start-up: jax.distributed.initialize from config keys, or automatically where JAX detects a cluster."""

from __future__ import annotations

import importlib.util
import logging
import os

import jax

log = logging.getLogger(__name__)

# Auto-initialise only where jax.distributed can configure itself: a TPU VM (libtpu installed; JAX reads the pod
# layout from the TPU metadata) or a cluster that sets one of these. Elsewhere (a laptop, CI) we do not call it.
CLUSTER_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                    "OMPI_COMM_WORLD_SIZE")


def initialize(section) -> None:
    """Explicit when distributed.coordinator_address is set; otherwise JAX's auto-detection on TPU pods only."""
    if section.coordinator_address:
        if not 0 <= section.process_id < section.num_processes:
            raise ValueError(f"distributed.process_id={section.process_id} must be in [0, {section.num_processes}) "
                             f"(distributed.num_processes={section.num_processes})")
        jax.distributed.initialize(coordinator_address=section.coordinator_address,
                                   num_processes=section.num_processes, process_id=section.process_id,
                                   initialization_timeout=section.initialization_timeout)
        log.info("process %d/%d, %d global devices", jax.process_index(), jax.process_count(), jax.device_count())
        return
    if any(os.environ.get(v) for v in CLUSTER_ENV_VARS) or importlib.util.find_spec("libtpu") is not None:
        # TPU pod slices, SLURM and Open MPI jobs describe themselves; JAX reads the rest from the environment.
        jax.distributed.initialize()
