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


def test_tpu_pod_help_names_slices():
    r = sh("launch_tpu_pod.sh", "--help")
    assert "--slices N" in r.stdout and "MEGASCALE_SLICE_ID" in r.stdout and "--megascale-port" in r.stdout


def megascale(remote: str) -> dict:
    """The MEGASCALE_* variables a remote command exports (the export before the command)."""
    parts = [shlex.split(part) for part in remote.split(" && ")]
    exports = [p for p in parts if p[0] == "export" and p[1].startswith("MEGASCALE_")]
    assert len(exports) == 1, remote
    return dict(word.split("=", 1) for word in exports[0][1:])


def test_tpu_pod_slices_dry_run():
    r = sh("launch_tpu_pod.sh", "--tpu", "ms", "--zone", "us-east5-a", "--project", "my-proj", "--slices", "2",
           "--setup", "--dry-run", "--", "jaxsr", "run", "--config", PAPER, "mesh.data=2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5
    where = "--zone us-east5-a --project my-proj"
    assert lines[:2] == [f"gcloud compute tpus tpu-vm ssh ms-{i} {where} --worker=all --command "
                         "'cd jaxsr && bash scripts/tpu_setup.sh'" for i in range(2)]
    # The coordinator: slice 0's worker 0, by its internal IP, looked up once (a placeholder in a dry run).
    assert shlex.split(lines[2]) == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ms-0", "--zone", "us-east5-a",
                                     "--project", "my-proj", "--format=value(networkEndpoints[0].ipAddress)"]
    runs = [shlex.split(line) for line in lines[3:]]
    coordinators = set()
    for i, argv in enumerate(runs):
        assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and argv[5] == f"ms-{i}"
        assert argv[-3:-1] == ["--worker=all", "--command"]
        remote = argv[-1]
        assert remote.startswith("cd jaxsr && . .venv/bin/activate && export LIBTPU_INIT_ARGS=")
        env = megascale(remote)
        assert env["MEGASCALE_SLICE_ID"] == str(i)
        assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_PORT"] == "8080"
        assert env["MEGASCALE_COORDINATOR_ADDRESS"].endswith(":8080")
        coordinators.add(env["MEGASCALE_COORDINATOR_ADDRESS"])
        assert shlex.split(remote.split(" && ")[-1]) == ["jaxsr", "run", "--config", PAPER, "mesh.data=2"]
    assert len(coordinators) == 1 and "ms-0" in coordinators.pop()
    r = sh("launch_tpu_pod.sh", "--tpu", "ms", "--zone", "z", "--slices", "3", "--megascale-port", "9000",
           "--tpu-flags", "", "--dry-run", "--", "jaxsr", "plan")
    runs = r.stdout.splitlines()[1:]
    assert [megascale(shlex.split(line)[-1])["MEGASCALE_SLICE_ID"] for line in runs] == ["0", "1", "2"]
    assert {megascale(shlex.split(line)[-1])["MEGASCALE_PORT"] for line in runs} == {"9000"}


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: `describe` prints an IP; `ssh NAME` records its argv, waits until every slice's ssh has
# started (so the slices must run at once), prints a line and fails for $GCLOUD_FAIL.
case "$4" in
  describe) echo "10.0.0.7"; exit 0 ;;
  ssh)
    printf '%s
' "$@" > "$GCLOUD_DIR/argv.$5"
    touch "$GCLOUD_DIR/started.$5"
    for _ in $(seq 100); do
      [ "$(ls "$GCLOUD_DIR" | grep -c '^started\.')" -ge "$GCLOUD_SLICES" ] && break
      sleep 0.1
    done
    [ "$(ls "$GCLOUD_DIR" | grep -c '^started\.')" -ge "$GCLOUD_SLICES" ] || { echo "not concurrent"; exit 9; }
    echo "hello from $5"
    if [ "$5" = "${GCLOUD_FAIL:-}" ]; then exit 7; fi ;;
esac
"""


@pytest.mark.parametrize("fail", [None, "t-1"])
def test_tpu_pod_slices_run_at_once_and_a_failure_names_the_slice(tmp_path, fail):
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "GCLOUD_DIR": str(tmp_path), "GCLOUD_SLICES": "3",
           "GCLOUD_FAIL": fail or ""}
    r = sh("launch_tpu_pod.sh", "--tpu", "t", "--zone", "z", "--slices", "3", "--", "jaxsr", "plan", env=env)
    assert sorted(r.stdout.splitlines()) == [f"[slice {i}] hello from t-{i}" for i in range(3)]
    if fail:
        assert r.returncode == 7
        assert "command failed on slice 1 (t-1): gcloud exit status 7" in r.stderr
        assert "failed on slice(s) 1 of 3" in r.stderr
    else:
        assert r.returncode == 0 and r.stderr == ""
    for i in range(3):
        argv = (tmp_path / f"argv.t-{i}").read_text().splitlines()
        assert argv[:8] == ["compute", "tpus", "tpu-vm", "ssh", f"t-{i}", "--zone", "z", "--worker=all"]
        assert megascale(argv[9]) == {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.7:8080", "MEGASCALE_NUM_SLICES": "3",
                                      "MEGASCALE_SLICE_ID": str(i), "MEGASCALE_PORT": "8080"}


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
    ("launch_tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--slices", "0", "--", "jaxsr"], "--slices must be a positive"),
    ("launch_tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--slices", "two", "--", "jaxsr"], "got 'two'"),
    ("launch_tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--slices", "-1", "--", "jaxsr"], "got '-1'"),
    ("launch_tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--slices", "", "--", "jaxsr"], "got ''"),
    ("launch_tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--slices"], "--slices needs a value"),
    ("launch_tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--slices", "2", "--megascale-port", "70000", "--", "jaxsr"],
     "--megascale-port must be a port number (1-65535), got '70000'"),
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
