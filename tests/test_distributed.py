"""jaxsr.distributed's start-up decision: join a cluster only where one is (TPU pod, SLURM / Open MPI), whatever is
installed. Multi-process runs themselves are tested in tests/test_multiprocess.py."""

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxsr import distributed
from jaxsr.config import load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_VARS = distributed.TPU_POD_ENV_VARS + distributed.CLUSTER_ENV_VARS


@pytest.fixture
def calls(monkeypatch):
    """jax.distributed.initialize recorded instead of run; no cluster variables and no TPU chips unless a test
    sets them; libtpu reported as installed (as on a CPU host that compiles for TPUs)."""
    for v in CLUSTER_VARS + ("JAX_PLATFORMS",):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: 0)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: importlib.machinery.ModuleSpec("libtpu", None) if name == "libtpu"
                        else real_find_spec(name, *a))
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def _start():
    distributed.initialize(load_config(None, []).distributed)


@pytest.mark.parametrize("platforms", [None, "cpu"])
def test_libtpu_installed_on_a_cpu_host_starts_nothing(calls, monkeypatch, platforms):
    assert importlib.util.find_spec("libtpu") is not None  # the fixture's pretence
    if platforms:
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
    _start()
    assert calls == [] and distributed.auto_cluster() is None


@pytest.mark.parametrize("env,chips", [({"TPU_WORKER_HOSTNAMES": "w0,w1"}, 0),                   # GKE
                                       ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, 0),  # multi-slice
                                       ({"TPU_WORKER_ID": "1"}, 0),
                                       ({}, 4),                                                  # a Cloud TPU VM
                                       ({"JAX_PLATFORMS": "tpu,cpu"}, 4)])
def test_a_tpu_pod_starts_auto_initialisation(calls, monkeypatch, env, chips):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: chips)
    _start()
    assert calls == [{"heartbeat_timeout_seconds": 100}] and distributed.auto_cluster() == "tpu"


@pytest.mark.parametrize("chips", [4, 0])
def test_a_multi_slice_worker_as_launched_starts_auto_initialisation(calls, monkeypatch, chips):
    """What scripts/launch_tpu_pod.sh --slices exports on each worker makes a pod (on a TPU VM, and by these variables
    alone when no chip is seen); with JAX_PLATFORMS=cpu (a CPU-only process on such a host) it does not."""
    r = subprocess.run(["bash", str(REPO / "scripts" / "launch_tpu_pod.sh"), "--tpu", "ms", "--zone", "z", "--slices",
                        "2", "--dry-run", "--", "jaxsr", "run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    remote = shlex.split(r.stdout.splitlines()[-1])[-1]  # slice 1's command
    exports = [shlex.split(p) for p in remote.split(" && ")]
    env = dict(w.split("=", 1) for p in exports if p[0] == "export" and p[1].startswith("MEGASCALE_") for w in p[1:])
    assert set(env) == {"MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "MEGASCALE_PORT"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: chips)
    _start()
    assert calls == [{"heartbeat_timeout_seconds": 100}] and distributed.auto_cluster() == "tpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert distributed.auto_cluster() is None


def test_jax_platforms_without_tpu_rules_out_a_tpu_pod_but_not_slurm(calls, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: 4)
    _start()
    assert calls == []
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # a CPU cluster job is still one
    _start()
    assert len(calls) == 1 and distributed.auto_cluster() == "slurm_mpi"


def test_an_explicit_coordinator_is_not_auto_initialisation(calls, monkeypatch):
    monkeypatch.setattr(distributed, "_wait_for_coordinator", lambda address, timeout: timeout)
    section = load_config(None, ["distributed.coordinator_address=127.0.0.1:1", "distributed.num_processes=2",
                                 "distributed.process_id=1"]).distributed
    distributed.initialize(section)
    assert calls[0]["coordinator_address"] == "127.0.0.1:1" and calls[0]["process_id"] == 1


def test_tpu_chips_are_counted_from_the_pci_bus(tmp_path):
    for name, vendor, device in [("0000:00:04.0", "0x1ae0", "0x0063"),   # TPU v5e
                                 ("0000:00:05.0", "0x1ae0", "0x0063"),
                                 ("0000:00:06.0", "0x1ae0", "0x0001"),   # another Google device (a NIC)
                                 ("0000:00:07.0", "0x10de", "0x2330")]:  # an NVIDIA H100
        d = tmp_path / name
        d.mkdir()
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
    assert distributed.tpu_chips_attached(str(tmp_path)) == 2
    assert distributed.tpu_chips_attached(str(tmp_path / "absent")) == 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install jaxsr[tpu])")
@pytest.mark.parametrize("platforms", [None, "cpu"])
def test_with_real_libtpu_a_cpu_process_starts_alone(platforms):
    # What `jaxsr run` does first (distributed.initialize, then the devices), in a process of its own so that the
    # real jax.distributed and libtpu are used. Skipped on a TPU host: there the pod is the point.
    if distributed.tpu_chips_attached():
        pytest.skip("this host has TPU chips")
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS + ("JAX_PLATFORMS",)}
    if platforms:
        env["JAX_PLATFORMS"] = platforms
    code = ("from jaxsr import distributed; from jaxsr.config import load_config; import jax; "
            "distributed.initialize(load_config(None, []).distributed); "
            "print(jax.distributed.is_initialized(), jax.process_count(), jax.devices()[0].platform)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "1", "cpu"]
