"""scripts/tpu_setup.sh, launch_tpu_pod.sh and launch_gpu.sh: usage, dry runs, argument errors, shellcheck."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
NAMES = ["tpu_setup.sh", "launch_tpu_pod.sh", "launch_gpu.sh"]
PAPER = "configs/paper_llama2_70b.yaml"


def sh(name, *args, env=None):
    return subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name", NAMES)
def test_help(name):
    r = sh(name, "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"Usage: scripts/{name}") and "--dry-run" in r.stdout


def test_tpu_setup_dry_run():
    r = sh("tpu_setup.sh", "--dry-run", "--venv", "/opt/venv")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "python3 -m venv /opt/venv" in lines
    assert "/opt/venv/bin/python -m pip install --quiet --upgrade -c constraints.txt -e . 'jax[tpu]'" in lines
    r = sh("tpu_setup.sh", "--dry-run", "--no-constraints")
    assert ".venv/bin/python -m pip install --quiet --upgrade -e . 'jax[tpu]'" in r.stdout.splitlines()


def test_tpu_pod_dry_run():
    r = sh("launch_tpu_pod.sh", "--tpu", "v5p-128", "--zone", "us-east5-a", "--project", "my-proj", "--setup", "--dry-run",
           "--", "jaxsr", "run", "--config", PAPER, "judge.template=it's here")
    assert r.returncode == 0, r.stderr
    setup, run = r.stdout.splitlines()
    base = "gcloud compute tpus tpu-vm ssh v5p-128 --zone us-east5-a --project my-proj --worker=all --command "
    assert setup == base + "'cd jaxsr && bash scripts/tpu_setup.sh'"
    assert run.startswith(base)
    # The remote command, as the workers' shell reads it, keeps every argument intact.
    remote = shlex.split(run)[-1]
    assert remote.startswith("cd jaxsr && . .venv/bin/activate && export LIBTPU_INIT_ARGS=")
    assert shlex.split(remote.split(" && ")[-1]) == ["jaxsr", "run", "--config", PAPER, "judge.template=it's here"]
    assert shlex.split(remote.split(" && ")[2]) == ["export", f"LIBTPU_INIT_ARGS={tpu_flags()}"]
    r = sh("launch_tpu_pod.sh", "--tpu", "t", "--zone", "z", "--tpu-flags", "", "--dry-run", "--", "jaxsr", "plan")
    assert shlex.split(r.stdout)[-1] == "cd jaxsr && . .venv/bin/activate && jaxsr plan"


def tpu_flags() -> str:
    r = subprocess.run(["bash", "-c", f'. "{SCRIPTS / "lib.sh"}" && printf %s "$JAXSR_TPU_FLAGS"'], capture_output=True,
                       text=True)
    return r.stdout


def test_tpu_flags_are_accepted_by_libtpu(tmp_path):
    """libtpu exits at start on an unknown flag: compile a sharded step for v5e:2x2 with the launch flags."""
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jaxsr[tpu]'): flags not checked")
    code = ("import jax, jax.numpy as jnp, numpy as np\n"
            "from jax.experimental import topologies\n"
            "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
            "topo = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2')\n"
            "mesh = Mesh(np.array(topo.devices).reshape(4), ('fsdp',))\n"
            "s = NamedSharding(mesh, P('fsdp', None))\n"
            "w, x = (jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=s) for shape in ((512, 512), (128, 512)))\n"
            "c = jax.jit(jax.grad(lambda w, x: jnp.tanh(x @ w).sum())).lower(w, x).compile()\n"
            "print('compiled', 'all-gather' in c.as_text())\n")
    env = {**os.environ, "LIBTPU_INIT_ARGS": tpu_flags(), "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "compiled True" in r.stdout, r.stderr[-2000:]


def test_tpu_pod_runs_gcloud(tmp_path):
    fake = tmp_path / "gcloud"  # a stand-in that records its argv
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$GCLOUD_LOG"\n')
    fake.chmod(0o755)
    log = tmp_path / "argv"
    r = sh("launch_tpu_pod.sh", "--tpu", "t", "--zone", "z", "--workdir", "src/jaxsr", "--", "jaxsr", "plan",
           env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "GCLOUD_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    argv = log.read_text().splitlines()
    assert argv[:9] == ["compute", "tpus", "tpu-vm", "ssh", "t", "--zone", "z", "--worker=all", "--command"]
    assert argv[9].startswith("cd src/jaxsr && . .venv/bin/activate && export LIBTPU_INIT_ARGS=")
    assert argv[9].endswith(" && jaxsr plan")


def test_gpu_dry_run():
    r = sh("launch_gpu.sh", "--nodes", "4", "--node-rank", "2", "--coordinator", "10.0.0.1:12355", "--dry-run",
           "--", "jaxsr", "run", "--config", PAPER, "dpo.beta=0.2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 jaxsr run --config {PAPER} dpo.beta=0.2 "
                                "distributed.coordinator_address=10.0.0.1:12355 distributed.num_processes=4 "
                                "distributed.process_id=2")


def test_gpu_runs_the_command_with_overrides():
    r = sh("launch_gpu.sh", "--nodes", "2", "--node-rank", "0", "--coordinator", "head:1234", "--",
           sys.executable, "-c", "import os, sys; print(sys.argv[1:], os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])",
           env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("['distributed.coordinator_address=head:1234', 'distributed.num_processes=2', "
                                "'distributed.process_id=0'] 0.8")


@pytest.mark.parametrize("name,args,message", [
    ("launch_tpu_pod.sh", ["--zone", "z", "--", "jaxsr"], "missing --tpu NAME"),
    ("launch_tpu_pod.sh", ["--tpu", "t", "--", "jaxsr"], "missing --zone ZONE"),
    ("launch_tpu_pod.sh", ["--tpu", "t", "--zone", "z"], "missing the command to run after --"),
    ("launch_tpu_pod.sh", ["--tpu", "t", "--zone", "z", "jaxsr"], "unknown argument 'jaxsr'"),
    ("launch_tpu_pod.sh", ["--tpu"], "--tpu needs a value"),
    ("launch_gpu.sh", ["--node-rank", "0", "--coordinator", "h:1", "--", "jaxsr"], "missing --nodes N"),
    ("launch_gpu.sh", ["--nodes", "2", "--coordinator", "h:1", "--", "jaxsr"], "missing --node-rank R"),
    ("launch_gpu.sh", ["--nodes", "2", "--node-rank", "0", "--", "jaxsr"], "missing --coordinator HOST:PORT"),
    ("launch_gpu.sh", ["--nodes", "2", "--node-rank", "2", "--coordinator", "h:1", "--", "jaxsr"], "in [0, 2), got '2'"),
    ("launch_gpu.sh", ["--nodes", "0", "--node-rank", "0", "--coordinator", "h:1", "--", "jaxsr"], "positive integer"),
    ("launch_gpu.sh", ["--nodes", "2", "--node-rank", "0", "--coordinator", "h", "--", "jaxsr"], "HOST:PORT, got 'h'"),
    ("launch_gpu.sh", ["--nodes", "2", "--node-rank", "0", "--coordinator", "h:1"], "missing the command"),
    ("tpu_setup.sh", ["--bogus"], "unknown argument '--bogus'"),
])
def test_bad_arguments(name, args, message):
    r = sh(name, "--dry-run", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert message in r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not on PATH (apt-get install -y shellcheck) so the scripts are not linted")
@pytest.mark.parametrize("name", NAMES)
def test_shellcheck(name):
    # -x: also lint what the script sources (scripts/lib.sh) and check the names it uses from there.
    r = subprocess.run(["shellcheck", "-x", str(SCRIPTS / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
