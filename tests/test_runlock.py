"""jaxsr.runlock: one owner per run directory, stale locks taken over, foreign and unreadable ones refused."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from jaxsr import runlock
from jaxsr.runlock import LOCK_NAME, RunDirLocked, RunLock, proc_start_ticks

# Child processes load the module by path: importing the jaxsr package would start JAX in each (seconds).
_LOAD = textwrap.dedent(f"""
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("runlock", {runlock.__file__!r})
    runlock = importlib.util.module_from_spec(spec)
    sys.modules["runlock"] = runlock
    spec.loader.exec_module(runlock)
""")


def _lock_json(path) -> dict:
    return json.loads((path / LOCK_NAME).read_text())


def _write_lock(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    d = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2024-01-01T00:00:00+00:00",
         "proc_start": proc_start_ticks(os.getpid()), "argv": ["jaxsr", "run"]} | fields
    (run_dir / LOCK_NAME).write_text(json.dumps(d))
    return d


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True, timeout=10).stdout)


def test_second_acquire_refused_and_lock_unchanged(tmp_path):
    run_dir = tmp_path / "new" / "run"  # does not exist yet
    with RunLock(run_dir, argv=["jaxsr", "run", "--config", "x.yaml"]) as lock:
        assert lock.held
        before = (run_dir / LOCK_NAME).read_text()
        rec = json.loads(before)
        assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
        assert rec["argv"] == ["jaxsr", "run", "--config", "x.yaml"]
        with pytest.raises(RunDirLocked) as e:
            RunLock(run_dir).acquire()
        msg = str(e.value)
        for part in (str(run_dir), f"host {rec['host']}", f"pid {os.getpid()}", rec["started"], "x.yaml",
                     "another run_dir"):
            assert part in msg
        assert (run_dir / LOCK_NAME).read_text() == before
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_of_exited_child_is_taken_over(tmp_path, caplog):
    code = _LOAD + f"runlock.RunLock({str(tmp_path)!r}).acquire(); print(os.getpid(), flush=True); os._exit(0)"
    child_pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   timeout=10).stdout)
    assert _lock_json(tmp_path)["pid"] == child_pid
    with caplog.at_level(logging.WARNING, logger="jaxsr.runlock"):
        with RunLock(tmp_path):
            assert _lock_json(tmp_path)["pid"] == os.getpid()
    assert f"pid {child_pid}" in caplog.text and "dead process" in caplog.text and "no longer exists" in caplog.text


@pytest.mark.skipif(proc_start_ticks(os.getpid()) is None, reason="no /proc/<pid>/stat")
def test_live_pid_with_other_start_time_is_stale(tmp_path, caplog):
    parent = os.getppid()
    _write_lock(tmp_path, pid=parent, proc_start=proc_start_ticks(parent) + 1)
    with caplog.at_level(logging.WARNING, logger="jaxsr.runlock"):
        with RunLock(tmp_path):
            assert _lock_json(tmp_path)["pid"] == os.getpid()
    assert f"pid {parent} now belongs to another process" in caplog.text


def test_live_pid_with_same_start_time_is_held(tmp_path):
    parent = os.getppid()
    rec = _write_lock(tmp_path, pid=parent, proc_start=proc_start_ticks(parent))
    with pytest.raises(RunDirLocked, match=f"another jaxsr process: .*pid {parent}.*kill {parent}"):
        RunLock(tmp_path).acquire()
    assert _lock_json(tmp_path) == rec


def test_foreign_host_refused_unless_forced(tmp_path, caplog):
    rec = _write_lock(tmp_path, host="elsewhere.example", pid=_dead_pid())
    with pytest.raises(RunDirLocked) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "another host" in msg and "host elsewhere.example" in msg and f"pid {rec['pid']}" in msg
    assert rec["started"] in msg and "force=True" in msg
    assert _lock_json(tmp_path) == rec
    with caplog.at_level(logging.WARNING, logger="jaxsr.runlock"):
        with RunLock(tmp_path, force=True):
            assert _lock_json(tmp_path)["host"] == socket.gethostname()
    assert "elsewhere.example" in caplog.text


def test_release_leaves_a_lock_that_is_not_ours(tmp_path, caplog):
    lock = RunLock(tmp_path).acquire()
    rec = _write_lock(tmp_path, host="elsewhere.example", pid=12345)  # forced over by another host meanwhile
    with caplog.at_level(logging.WARNING, logger="jaxsr.runlock"):
        lock.release()
    assert _lock_json(tmp_path) == rec
    assert "taken over" in caplog.text


def test_unreadable_lock_refused_with_its_path_unless_forced(tmp_path):
    tmp_path.joinpath(LOCK_NAME).write_text("")
    with pytest.raises(RunDirLocked, match=f"lock file {tmp_path / LOCK_NAME} that cannot be read"):
        RunLock(tmp_path).acquire()
    tmp_path.joinpath(LOCK_NAME).write_text('{"host": "h"}')  # no pid
    with pytest.raises(RunDirLocked, match="force=True"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path, force=True):
        assert _lock_json(tmp_path)["pid"] == os.getpid()


def test_not_primary_is_a_no_op(tmp_path):
    _write_lock(tmp_path, host="elsewhere.example")
    with RunLock(tmp_path, primary=False) as lock:
        assert not lock.held
    assert _lock_json(tmp_path)["host"] == "elsewhere.example"


def test_racing_processes_take_over_a_stale_lock_once(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    go = tmp_path / "go"
    # The winner holds the lock until the test closes its stdin, so the losers cannot find it dead.
    code = _LOAD + textwrap.dedent(f"""
        import time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        try:
            runlock.RunLock({str(tmp_path / 'run')!r}).acquire()
        except runlock.RunDirLocked:
            print("locked", flush=True)
        else:
            print("won", flush=True)
            sys.stdin.read()
    """)
    (tmp_path / "run").mkdir()
    os.rename(tmp_path / LOCK_NAME, tmp_path / "run" / LOCK_NAME)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        go.touch()
        results = [p.stdout.readline().strip() for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=10)
    assert sorted(results) == ["locked"] * 3 + ["won"]
    assert _lock_json(tmp_path / "run")["pid"] == procs[results.index("won")].pid


def test_racing_threads_take_over_a_stale_lock_once(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    start, results = threading.Barrier(4), []

    def take():
        start.wait()
        try:
            results.append(RunLock(tmp_path).acquire())
        except RunDirLocked:
            results.append(None)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    winners = [r for r in results if r is not None]
    assert len(results) == 4 and len(winners) == 1
    winners[0].release()
    assert not (tmp_path / LOCK_NAME).exists()
