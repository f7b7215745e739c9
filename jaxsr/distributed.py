"""Multi-process runs: start-up, who writes, barriers, host <-> global arrays, and failing together.

Every process runs the same program over one global mesh. The rules the rest of jaxsr follows:

* Inputs: every process reads the same files and builds the same host batch (deterministic and cheap next to
  the model); `global_array` hands each process's devices only their own slice of it.
* Outputs: a batch-sharded result is gathered with `to_host` (a collective: every process calls it, in the
  same order), so every process holds the whole result and takes the same decisions from it.
* Writing: only process 0 writes datasets, JSON, reports and metrics (`is_primary`); the others wait at a
  `barrier` before they read what it wrote. Orbax checkpoints are saved and restored by all processes together.
* Failure: an exception on one process ends that process at once (`exit_on_error`) rather than letting a normal
  exit wait for the others, who wait for it in a collective: their next collective fails and they exit too,
  printing its error. A process that dies silently (SIGKILL, lost host) is noticed by JAX's coordination
  service after `distributed.heartbeat_timeout` seconds, which then stops the others (at once when process 0,
  which hosts the service, is the one that died).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)

# Auto-initialise only where jax.distributed can configure itself: a TPU VM or pod (TPU chips attached, or the
# variables GKE / multi-slice jobs set; JAX reads the rest from the TPU metadata) or a SLURM / Open MPI job.
# Elsewhere (a laptop, CI, a CPU host with libtpu installed to compile for TPUs) jaxsr does not call it.
# TPU_ACCELERATOR_TYPE is not one: a CPU host compiling for TPUs may set it to quiet libtpu, and pods that set it
# also set TPU_WORKER_HOSTNAMES.
TPU_POD_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID",
                    "MEGASCALE_COORDINATOR_ADDRESS")
CLUSTER_ENV_VARS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x), as jax._src.hardware_utils lists them.
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


class DistributedSetupError(ValueError):
    """A multi-process set-up that cannot work: unreachable coordinator, mesh or batch that does not fit."""


# --- start-up ---------------------------------------------------------------------------------------------------

def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(f"distributed.coordinator_address={address!r} must look like HOST:PORT "
                                    f"(e.g. 10.0.0.1:12355)")
    return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, timeout: float) -> float:
    """Polls HOST:PORT until it accepts a TCP connection; returns the seconds left of `timeout`.

    jax.distributed.initialize aborts the whole process (a C++ fatal error, no Python exception) when it
    cannot reach the coordinator in time, so processes other than 0 check it here first and fail clearly.
    """
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    last = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedSetupError(
                f"could not reach the coordinator at distributed.coordinator_address={address} within "
                f"distributed.initialization_timeout={timeout:g}s ({last}); start process 0 first (it runs the "
                f"coordinator) and check that the address is reachable from this host")
        try:
            with socket.create_connection((host, port), timeout=min(left, 2.0)):
                return left
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
            time.sleep(min(0.2, max(left, 0)))


def _check_port_free(address: str) -> None:
    """Process 0 runs the coordinator on every interface at the address's port; it must be free here."""
    _, port = _split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise DistributedSetupError(
                f"process 0 runs the coordinator at distributed.coordinator_address={address}, but port {port} "
                f"cannot be bound on this host ({e}); choose a free port") from None


def initialize(section) -> None:
    """Explicit when distributed.coordinator_address is set; otherwise JAX's auto-detection where `auto_cluster`
    finds a TPU pod, SLURM or Open MPI job, and nothing elsewhere.

    Must run before anything touches a JAX device. `section` is the config's `distributed:` section, whose
    construction already checked process_id against num_processes (config.DistributedSection).
    """
    if section.coordinator_address:
        timeout = float(section.initialization_timeout)
        if section.process_id == 0:
            _check_port_free(section.coordinator_address)
        else:
            timeout = _wait_for_coordinator(section.coordinator_address, timeout)
        jax.distributed.initialize(coordinator_address=section.coordinator_address,
                                   num_processes=section.num_processes, process_id=section.process_id,
                                   initialization_timeout=max(1, int(timeout)),
                                   heartbeat_timeout_seconds=section.heartbeat_timeout)
        log.info("process %d/%d, %d global devices (%d here)", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.local_device_count())
        return
    if auto_cluster() is not None:
        # TPU pod slices, SLURM and Open MPI jobs describe themselves; JAX reads the rest from the environment.
        jax.distributed.initialize(heartbeat_timeout_seconds=section.heartbeat_timeout)


def tpu_chips_attached(pci_devices: str = "/sys/bus/pci/devices") -> int:
    """TPU chips on this host's PCI bus (what JAX's own Cloud TPU start-up counts), read without starting JAX."""
    n = 0
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                n += Path(vendor).with_name("device").read_text().strip() in _TPU_PCI_DEVICES
        except OSError:
            continue
    return n


def auto_cluster(environ=None) -> str | None:
    """The cluster `jax.distributed.initialize()` can configure itself from here: "tpu", "slurm_mpi" or None.

    Decided from what a pod sets (TPU chips attached, or TPU_POD_ENV_VARS) and never from the installed packages:
    libtpu on a CPU host (installed to compile for TPU topologies, `jaxsr plan --compile`) changes nothing.
    JAX_PLATFORMS without "tpu" (e.g. `cpu`) rules TPUs out, as it does for JAX's backends.
    """
    environ = os.environ if environ is None else environ
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if ((not platforms or "tpu" in platforms)
            and (any(environ.get(v) for v in TPU_POD_ENV_VARS) or tpu_chips_attached())):
        return "tpu"
    if any(environ.get(v) for v in CLUSTER_ENV_VARS):
        return "slurm_mpi"
    return None


def is_multiprocess() -> bool:
    """Whether this is one of several processes (safe to call before JAX's backends start: then False)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; the only process of a single-process run)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here until every one has arrived (a no-op with one process).

    `name` must be the same on every process at the same point; a mismatch is an error naming it.
    """
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_json(obj):
    """Process 0's `obj` (anything JSON can hold) on every process."""
    if not is_multiprocess():
        return obj
    from jax.experimental import multihost_utils

    data = json.dumps(obj).encode() if is_primary() else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    # Padded to a power of two so that few buffer shapes get compiled.
    buf_N = np.zeros(max(64, 1 << (n - 1).bit_length()), np.uint8)
    if is_primary():
        buf_N[:n] = np.frombuffer(data, np.uint8)
    buf_N = multihost_utils.broadcast_one_to_all(buf_N)
    return json.loads(bytes(np.asarray(buf_N)[:n]).decode())


# --- arrays -------------------------------------------------------------------------------------------------------

def global_array(x: np.ndarray, sharding) -> jax.Array:
    """The global array whose value is `x`, the same host array on every process.

    The callback runs only for this process's devices, so each process transfers only its own slice.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _leaf_to_host(x):
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    # A collective (an identity with a replicated output): every process must call it at the same point.
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree):
    """Numpy copies of a pytree of (possibly multi-process sharded) arrays, whole on every process."""
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.tree.map(np.asarray, jax.device_get(tree))  # one transfer for the whole tree
    return jax.tree.map(_leaf_to_host, tree)


# --- checks before compilation ------------------------------------------------------------------------------------

def progress(total: int, *, initial: int = 0, desc: str, unit: str):
    """A tqdm bar on process 0's terminal. Off when stderr is not a terminal (a pod job's log file gets jaxsr's
    stage lines instead of bar redraws) and on the other processes."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if is_primary() else True,
                dynamic_ncols=True)


def batch_groups(mesh) -> int:
    """How many processes hold different rows of a batch sharded over (data, fsdp): 1 in a single process."""
    from .model.sharding import batch_multiple, batch_sharding

    m = batch_multiple(mesh)
    rows: dict[int, set] = {}
    for device, idx in batch_sharding(mesh).devices_indices_map((m,)).items():
        rows.setdefault(device.process_index, set()).add(idx[0].indices(m))
    return len({frozenset(r) for r in rows.values()})


def check_batches(sections: dict, mesh) -> None:
    """Every process that holds its own rows of a training micro-batch must get at least one real row.

    `sections`: {"sft": TrainSection, "dpo": TrainSection}. A micro-batch smaller than that would leave some
    processes computing padding only, which in a multi-host run is a mistake in the config, not a layout.
    """
    groups = batch_groups(mesh)
    if groups <= 1:
        return
    for name, sec in sections.items():
        rows = sec.batch_size // sec.grad_accum
        if rows < groups:
            raise DistributedSetupError(
                f"{name}.batch_size={sec.batch_size} / {name}.grad_accum={sec.grad_accum} = {rows} rows per "
                f"micro-batch cannot be split across the {groups} processes that hold different batch rows "
                f"(mesh {dict(mesh.shape)} over {jax.process_count()} processes x {jax.local_device_count()} "
                f"devices); use at least {groups} rows per micro-batch (a multiple of {groups} avoids padding)")


# --- failing together ---------------------------------------------------------------------------------------------

def exit_on_error(message: str, code: int) -> None:
    """Ends this process now with `message` on stderr, skipping Python's exit handlers.

    A normal exit would run JAX's shutdown, which waits at a barrier for the other processes while they wait
    in a collective for this one. `os._exit` drops the connections instead: the others' next collective fails,
    or the coordination service stops them (see the module docstring). The message is also posted to the
    coordinator, so that the others can print the error that stopped them.
    """
    me = f"[process {jax.process_index()}/{jax.process_count()}]"
    print(f"{me} {message}", file=sys.stderr, flush=True)
    # Process 0 hosts the coordinator, whose end stops the others at once: it gives them a moment to report
    # (the same error, when all failed alike) and exit on their own.
    for pid, text in _exchange_errors(message, wait_for_others=is_primary()):
        print(f"{me} error reported by process {pid}: {text}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.shutdown()
    os._exit(code)


def _exchange_errors(message: str, *, wait_for_others: bool, timeout: float = 2.0) -> list[tuple[str, str]]:
    """Posts this process's error to the coordinator's key-value store and returns the others' errors, after
    waiting up to `timeout` for all of them when `wait_for_others`. Best effort: nothing when the store is gone."""
    import threading

    from jax._src import distributed as jax_distributed

    client = getattr(jax_distributed.global_state, "client", None)
    if client is None:
        return []
    mine = str(jax.process_index())
    found: list[tuple[str, str]] = []

    def talk():
        try:
            client.key_value_set(f"jaxsr/error/{mine}", message)
            deadline = time.monotonic() + timeout
            while True:
                others = [(k.rsplit("/", 1)[-1], v) for k, v in client.key_value_dir_get("jaxsr/error/")]
                others = [(pid, v) for pid, v in others if pid != mine]
                if not wait_for_others or len(others) >= jax.process_count() - 1 or time.monotonic() > deadline:
                    found[:] = sorted(others)
                    return
                time.sleep(0.1)
        except Exception:  # noqa: BLE001  (the store may be gone with process 0)
            pass

    t = threading.Thread(target=talk, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return list(found)
