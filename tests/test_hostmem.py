"""jaxsr.hostmem: with the allocator tuned, XLA:CPU's per-call working memory is reused instead of faulted in anew."""

import os
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
from jaxsr.hostmem import tune_allocator
applied = tune_allocator()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 4096), jnp.float32)
# Matmul outputs and operands XLA keeps in one large temporary buffer per call; a scalar result.
f = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ jnp.cos(x)).sum())
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x).block_until_ready()
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
    # Default glibc: the temporary buffer is a fresh mmap each call, every page faulted in (measured ~278k
    # 4 KiB pages per call); tuned, it comes back from the heap (measured 0 to 6k).
    assert default > 50_000
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
