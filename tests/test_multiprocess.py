"""Multi-process `jaxsr run` on CPU (jax.distributed over loopback, gloo collectives).

Through the real CLI: 2 processes x 2 devices write exactly the datasets of 1 process x 4 devices (same mesh,
same seed) and the same models up to float32 rounding; SIGKILL of one process stops both within a bounded time
and a rerun of both resumes and completes; an error on one process stops the other; an unreachable coordinator,
a mesh that does not match the global devices and a batch that cannot be split are clear errors before any
compilation. Helper units run in the pytest process (one process, 8 devices).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsr import artifacts, distributed
from jaxsr.config import ConfigValueError, load_config

ROOT = Path(__file__).resolve().parents[1]
# One micro iteration: SFT -> M1, eval, prompts, candidates, judgements, pairs, DPO -> M2, eval, report.
# SFT takes one step at learning rate 0 (the first warmup step), so M1 = M0 bit for bit on any layout and the
# data stages of both layouts start from the same model. With real SFT updates M1 differs in the last bits
# between 1 x 4 and 2 x 2 (XLA:CPU's matmul results depend on the number of devices in a process, and gloo adds
# across processes in another order than XLA's in-process collectives), and so do the float judge scores.
MICRO = [
    "seed=1", "model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
    "model.architecture.num_layers=2", "model.architecture.num_heads=2", "model.architecture.num_kv_heads=1",
    "model.architecture.head_dim=32", "data.options.ift=32", "data.options.eft=16", "data.options.eval=4",
    "data.options.rm_eval=2", "loop.iterations=2", "loop.eval_max_new_tokens=8", "sft.max_steps=1",
    "sft.checkpoint_every=1", "sft.batch_size=8", "prompts.num_prompts=8", "prompts.requests_per_round=8",
    "prompts.max_rounds=4", "sample.num_samples=2", "sample.max_new_tokens=8", "judge.mode=expected",
    "judge.max_new_tokens=8", "dpo.max_steps=3", "dpo.checkpoint_every=1", "dpo.batch_size=4",
    "mesh.data=2", "mesh.fsdp=2",
]
HEARTBEAT = 10  # seconds without heartbeats after which the coordinator declares a process dead
KILL_BOUND = 60  # both processes must have exited this long after one of them was killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if cache is not None:
        # Programs compiled by one launch are reused by the next (the rerun after the kill).
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _cmd(run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "jaxsr.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"run_dir={run_dir}", *MICRO, *extra]


def _launch(run_dir, n: int = 2, *, extra=(), per_process=None, cache=None, argv=None) -> list[subprocess.Popen]:
    """n processes of `jaxsr run` (or of `argv`) with 4 // n devices each; output to <run_dir>-logs-<port>/p{i}.log."""
    port = _free_port()
    log_dir = Path(run_dir).parent / f"{Path(run_dir).name}-logs-{port}"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        dist = [f"distributed.coordinator_address=127.0.0.1:{port}", f"distributed.num_processes={n}",
                f"distributed.process_id={i}", f"distributed.heartbeat_timeout={HEARTBEAT}",
                "distributed.initialization_timeout=120"]
        cmd = (argv or _cmd(run_dir)) + [*extra, *dist, *((per_process or {}).get(i, ()))]
        # Loopback only: JAX's coordinator would otherwise listen on every interface.
        env = _env(4 // n, cache) | {"JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}
        with open(log_dir / f"p{i}.log", "w") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
        procs[-1].log_path = log_dir / f"p{i}.log"
    return procs


def _wait(procs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def _logs(procs) -> str:
    return "\n".join(f"--- process {i} (rc {p.returncode}) ---\n{Path(p.log_path).read_text()[-3000:]}"
                     for i, p in enumerate(procs))


def _stages(run_dir) -> dict:
    try:
        return json.loads((Path(run_dir) / "manifest.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _stages_done(run_dir) -> set:
    return {k for k, v in _stages(run_dir).items() if v["status"] == "done"}


def _params(model_dir) -> list[np.ndarray]:
    import jaxsr

    return [np.asarray(x) for x in jax.tree.leaves(jaxsr.load_policy(model_dir).params)]


# --- two processes, killed once and rerun ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A 2 x 2 run whose process 1 is SIGKILLed at the start of the candidates stage, then rerun to the end."""
    base = tmp_path_factory.mktemp("mp")
    run_dir, cache = base / "run", base / "xla-cache"
    t0 = time.monotonic()
    procs = _launch(run_dir, cache=cache)
    killed_at = None
    while time.monotonic() - t0 < 400 and all(p.poll() is None for p in procs):
        if (run_dir / "iteration1" / "candidates").exists():
            procs[1].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            break
        time.sleep(0.05)
    first_rcs = _wait(procs, KILL_BOUND + 30)
    exited_after = time.monotonic() - killed_at if killed_at else None
    first = {"rcs": first_rcs, "exited_after": exited_after, "killed": killed_at is not None,
             "stages": _stages(run_dir), "logs": _logs(procs)}
    t1 = time.monotonic()
    procs = _launch(run_dir, cache=cache)
    rerun_rcs = _wait(procs, 600)
    rerun = {"rcs": rerun_rcs, "logs": _logs(procs), "seconds": time.monotonic() - t1,
             "stdout": [Path(p.log_path).read_text() for p in procs]}
    print(f"2 x 2 run: process 1 killed {killed_at - t0 if killed_at else float('nan'):.0f}s in, both exited "
          f"{exited_after or float('nan'):.1f}s after the kill (rcs {first_rcs}); rerun {rerun['seconds']:.0f}s")
    return {"run_dir": run_dir, "first": first, "rerun": rerun}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The same config in 1 process x 4 devices, without jax.distributed (XLA's in-process collectives)."""
    run_dir = tmp_path_factory.mktemp("sp") / "run"
    out = subprocess.run(_cmd(run_dir), env=_env(4), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_killed_process_stops_both_and_the_rerun_resumes(two_process_run):
    first, rerun = two_process_run["first"], two_process_run["rerun"]
    assert first["killed"], "the run ended before the candidates stage began:\n" + first["logs"]
    # The survivor waits in a collective for the dead process; the coordinator notices the missing heartbeats.
    assert all(rc != 0 for rc in first["rcs"]), first["logs"]
    assert first["exited_after"] < KILL_BOUND, (first["exited_after"], first["logs"])
    before = {k for k, v in first["stages"].items() if v["status"] == "done"}
    assert {"data", "sft", "eval/M1", "iteration1/prompts"} <= before, before
    assert "iteration1/candidates" not in before
    # Both processes read the manifest written by process 0 and resume after the last finished stage.
    assert rerun["rcs"] == [0, 0], rerun["logs"]
    run_dir = two_process_run["run_dir"]
    after = _stages(run_dir)
    assert "report" in after and (run_dir / "report.md").is_file() and (run_dir / "models" / "M2").is_dir()
    for stage in before:  # not redone
        assert after[stage] == first["stages"][stage], stage
    # Process 0 alone writes (and prints the report).
    p0, p1 = rerun["stdout"]
    # (Every process logs its stage lines, "stage report: ..."; only process 0 prints the report's paths.)
    assert "report.md  plot:" in p0 and "report.md  plot:" not in p1


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(two_process_run, one_process_run):
    assert two_process_run["rerun"]["rcs"] == [0, 0], two_process_run["rerun"]["logs"]
    mp, sp = two_process_run["run_dir"], one_process_run
    for stage in ("prompts", "candidates", "judgements", "pairs"):
        a, b = artifacts.read_dataset(mp / "iteration1" / stage), artifacts.read_dataset(sp / "iteration1" / stage)
        assert len(a) > 0 and a.to_list() == b.to_list(), stage
        assert artifacts.content_hash(a) == artifacts.content_hash(b), stage
    assert len(artifacts.read_dataset(mp / "iteration1" / "pairs")) >= 4
    for x, y in zip(_params(mp / "models" / "M1"), _params(sp / "models" / "M1")):
        np.testing.assert_array_equal(x, y)
    assert json.loads((mp / "eval" / "M1.json").read_text()) == json.loads((sp / "eval" / "M1.json").read_text())
    # DPO's weight gradients round differently (XLA:CPU matmuls with 2 vs 4 devices in a process; gloo vs
    # in-process sums): measured up to 2e-9 absolute, 9e-8 relative.
    for x, y in zip(_params(mp / "models" / "M2"), _params(sp / "models" / "M2")):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    a, b = (json.loads((d / "train" / "dpo1" / "metrics.jsonl").read_text().splitlines()[0]) for d in (mp, sp))
    assert a["step"] == b["step"] == 1 and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.slow
def test_export_gathers_every_tensor_across_processes(two_process_run, tmp_path):
    import jaxsr
    from safetensors.numpy import load_file

    ckpt = two_process_run["run_dir"] / "models" / "M2"
    procs = _launch(tmp_path / "hf", argv=[sys.executable, "-m", "jaxsr.cli", "export", str(ckpt), str(tmp_path / "hf"),
                                           "mesh.data=2", "mesh.fsdp=2"])
    assert _wait(procs, 300) == [0, 0], _logs(procs)
    ref = jaxsr.save_hf(jaxsr.load_policy(ckpt), tmp_path / "ref")  # one process, 8 devices
    got, want = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((ref / "config.json").read_text())


# --- failing together and bad input ---------------------------------------------------------------------------

@pytest.mark.slow
def test_an_error_on_one_process_stops_both(tmp_path):
    # Process 1 alone cannot load its tokenizer (as if a file were missing on one host) when SFT starts; process 0
    # goes on into SFT's collectives and must not wait there for ever.
    procs = _launch(tmp_path / "run", per_process={1: ["model.tokenizer=/nonexistent/tokenizer"]})
    procs[1].wait(timeout=180)
    t_err = time.monotonic()
    rcs = _wait(procs, KILL_BOUND + 30)
    assert rcs[1] != 0 and rcs[0] != 0, _logs(procs)
    assert time.monotonic() - t_err < KILL_BOUND, _logs(procs)
    log1, log0 = Path(procs[1].log_path).read_text(), Path(procs[0].log_path).read_text()
    assert "[process 1/2] jaxsr run: OSError:" in log1 and "/nonexistent/tokenizer" in log1, log1[-3000:]
    # The survivor's collective fails when process 1's connections drop; it names process 1's error.
    assert "[process 0/2] error reported by process 1: jaxsr run: OSError:" in log0, log0[-3000:]


def test_unreachable_coordinator_is_a_clear_error(tmp_path):
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    out = subprocess.run(_cmd(tmp_path / "run", f"distributed.coordinator_address=127.0.0.1:{port}",
                              "distributed.num_processes=2", "distributed.process_id=1",
                              "distributed.initialization_timeout=2"),
                         env=_env(2), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (f"could not reach the coordinator at distributed.coordinator_address=127.0.0.1:{port} within "
            f"distributed.initialization_timeout=2s") in out.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["mesh.data=3", "mesh.fsdp=1"],
     "mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but there are 4 devices (2 processes x 2 devices each)"),
    (["mesh.data=4", "mesh.fsdp=1", "dpo.batch_size=1"],
     "dpo.batch_size=1 / dpo.grad_accum=1 = 1 rows per micro-batch cannot be split across the 2 processes"),
])
def test_bad_layout_is_an_error_before_compilation(tmp_path, extra, message):
    procs = _launch(tmp_path / "run", extra=extra)
    rcs = _wait(procs, 120)
    assert rcs == [2, 2], _logs(procs)
    for p in procs:
        assert message in Path(p.log_path).read_text(), _logs(procs)
    assert not (tmp_path / "run" / "manifest.json").exists()  # nothing ran: the mesh comes first


# --- helpers in one process -------------------------------------------------------------------------------------

def test_single_process_helpers():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxsr.model.sharding import make_mesh

    mesh = make_mesh(data=4, fsdp=2)
    assert distributed.is_primary() and not distributed.is_multiprocess()
    assert distributed.batch_groups(mesh) == 1
    distributed.check_batches({"dpo": load_config(None, ["dpo.batch_size=1"]).dpo}, mesh)  # one process: no limit
    x_8x3 = np.arange(24, dtype=np.float32).reshape(8, 3)
    g = distributed.global_array(x_8x3, NamedSharding(mesh, P(("data", "fsdp"))))
    assert g.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(distributed.to_host({"g": g})["g"], x_8x3)
    assert distributed.broadcast_json({"a": [1, "b"]}) == {"a": [1, "b"]}
    distributed.barrier("no-op with one process")


@pytest.mark.parametrize("overrides, match", [
    (["distributed.coordinator_address=h:1", "distributed.num_processes=2", "distributed.process_id=2"],
     r"distributed.process_id=2 must be in \[0, 2\)"),
    (["distributed.heartbeat_timeout=0"], "distributed.heartbeat_timeout=0 must be > 0"),
])
def test_distributed_config_is_checked(overrides, match):
    with pytest.raises(ConfigValueError, match=match):
        load_config(None, overrides)


def test_bad_coordinator_address_is_named():
    with pytest.raises(distributed.DistributedSetupError, match="coordinator_address='nohostport' must look like"):
        distributed._split_address("nohostport")
