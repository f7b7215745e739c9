"""jaxsr.hostmem: with the allocator tuned, XLA:CPU's per-call working memory is reused instead of faulted in anew."""

import os
import subprocess
import sys

import pytest

# A (8192 x 16) @ (16 x 8192) product: one 256 MiB float32 result per call, above glibc's largest dynamic mmap
# threshold (32 MiB on 64-bit), so default glibc maps it fresh and faults in all its pages on every call, whatever
# the machine; the FLOPs are few, so the page faults are what the test sees. A scalar result.
N, INNER = 8192, 16
RESULT_PAGES = N * N * 4 // 4096

CHILD = rf"""
import resource, sys
from jaxsr.hostmem import tune_allocator
applied = tune_allocator()
import jax, jax.numpy as jnp
a = jnp.ones(({N}, {INNER}), jnp.float32)
f = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())
for _ in range(3):
    f(a).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(a).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def faults_per_call(tuning: str) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAXSR_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", float(faults)


def test_tuned_allocator_reuses_xla_working_memory():
    applied, tuned = faults_per_call("1")
    if not applied:
        pytest.skip("not glibc on Linux: tune_allocator is a no-op here")
    off, default = faults_per_call("0")
    assert not off  # JAXSR_MALLOC_TUNING=0 turns it off
    # Default glibc: the product is a fresh mmap each call, every page faulted in (measured 65540 4 KiB pages per
    # call against 65536 in the product); tuned, it comes back from the heap (measured 0 to 1).
    assert default > 0.9 * RESULT_PAGES, (default, RESULT_PAGES)
    assert tuned < 0.05 * default, (tuned, default)


def test_the_allocator_tuning_is_for_cpu_only(tmp_path):
    from jaxsr.hostmem import runs_on_cpu

    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio" / "vfio").touch()  # the control node every Linux with vfio has: not a TPU
    assert runs_on_cpu({}, str(dev))
    assert runs_on_cpu({"JAX_PLATFORMS": "cpu"}, str(dev)) and not runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"}, str(dev))
    for node in ("accel0", "nvidia0", "vfio/0"):
        d = tmp_path / node.replace("/", "_")
        (d / node).parent.mkdir(parents=True, exist_ok=True)
        (d / node).touch()
        assert not runs_on_cpu({}, str(d)), node
        assert runs_on_cpu({"JAX_PLATFORMS": "cpu"}, str(d)), node  # an explicit CPU run on an accelerator host
