"""Host allocator settings that keep XLA:CPU from page-faulting its working memory in on every step.

XLA:CPU allocates each execution's temporary buffer (900 MB for a DPO step of a 30M-parameter model at
8 pairs x 192 tokens) with posix_memalign from a worker thread. glibc serves a request that large from
a fresh mmap in that thread's arena and unmaps it when freed, so every step touches ~230k new pages
(a minor fault and a zeroed page each) before it can compute: ~9% of that step on a 2-core CPU. With
one arena, no mmap and no trimming, the buffer is carved from the main heap and reused as is.

`tune_allocator()` applies this with mallopt (glibc only) and must run before JAX starts its thread pools
(before the first computation) to take full effect. The `jaxsr` command and the benchmark scripts call it;
JAXSR_MALLOC_TUNING=0 turns it off. The cost: the process keeps its peak heap instead of returning freed
memory to the system, and its threads share one malloc arena.

It is for XLA:CPU only: on a TPU VM or a GPU host the step's buffers live on the device, and one arena for all host
threads would only slow the input pipeline and the checkpoint writers. `runs_on_cpu()` decides before JAX starts,
from JAX_PLATFORMS when set, else from the accelerator device files (/dev/accel*, /dev/vfio/* on TPU VMs,
/dev/nvidia* on GPU hosts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))

_applied: bool | None = None


def runs_on_cpu(environ=None, dev: str = "/dev") -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS' first platform when set, else no accelerator device file."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    root = __import__("pathlib").Path(dev)
    accel = [*root.glob("accel[0-9]*"), *root.glob("nvidia[0-9]*")]
    vfio = [p for p in root.glob("vfio/*") if p.name != "vfio"]  # /dev/vfio/vfio is the control node alone
    return not (accel or vfio)


def tune_allocator() -> bool:
    """Sets glibc's malloc to one arena, no mmap and no trimming; True when applied (once per process).

    A no-op returning False off Linux, without glibc, with JAXSR_MALLOC_TUNING=0, or when JAX will run on an
    accelerator (`runs_on_cpu`).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("JAXSR_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux") or not runs_on_cpu():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: another libc's mallopt takes other parameter numbers
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    if not _applied:
        log.debug("mallopt refused a setting; the host allocator keeps its defaults for the rest")
    return _applied
