"""One owner per run directory: `run_dir/.lock`, a small JSON file naming the process that holds it.

    with RunLock(cfg.run_dir, primary=distributed.is_primary()):
        run(cfg)

A second `jaxsr run` on the same directory fails at once with `RunDirLocked`, naming the holder, instead of
racing the first on the manifest and shards. A lock left by a dead process on this host (its pid is gone, or the
pid now belongs to a process started at another time) is taken over with a warning. A lock from another host
cannot be checked from here: it counts as held unless `force=True`. So does a lock file that cannot be parsed.

The lock file is created whole (a temporary file hard-linked into place, which fails if `.lock` exists), so a
reader never sees a half-written one. Taking over a stale lock happens under `flock` on `.lock.takeover`, which
the kernel releases if its holder dies: of several processes that find the same stale lock, exactly one
replaces it. Hosts are compared by `socket.gethostname()`; containers sharing a run directory need distinct
hostnames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_GUARD_NAME = ".lock.takeover"


class RunDirLocked(RuntimeError):
    """The run directory is held by another process (or by a lock this process cannot check)."""


def proc_start_ticks(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), or None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command name) is in parentheses and may contain spaces; fields 3.. follow the last ')'.
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """What `.lock` says about the process that wrote it."""

    host: str
    pid: int
    started: str  # ISO 8601 wall-clock time of acquisition
    proc_start: Optional[int]  # /proc/<pid>/stat start ticks, to tell a reused pid from the writer
    argv: tuple[str, ...]

    @classmethod
    def current(cls, argv: Optional[Sequence[str]] = None) -> "LockHolder":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   proc_start_ticks(pid), tuple(sys.argv if argv is None else argv))

    @classmethod
    def parse(cls, text: str) -> "LockHolder":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        proc_start = d.get("proc_start")
        return cls(str(d["host"]), int(d["pid"]), str(d["started"]),
                   None if proc_start is None else int(proc_start), tuple(str(a) for a in d.get("argv", ())))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"argv": list(self.argv)}, indent=2) + "\n"

    def describe(self) -> str:
        cmd = " ".join(self.argv)
        return f"host {self.host}, pid {self.pid}, started {self.started}" + (f" ({cmd})" if cmd else "")

    def dead_reason(self) -> Optional[str]:
        """Why this holder is certainly dead (same host only), or None if it may be alive."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return "its process no longer exists"
        except PermissionError:
            pass  # exists, owned by another user
        now = proc_start_ticks(self.pid)
        if self.proc_start is not None and now is not None and now != self.proc_start:
            return f"pid {self.pid} now belongs to another process (start ticks {now}, recorded {self.proc_start})"
        return None


class RunLock:
    """Exclusive ownership of `run_dir` by this process, as a context manager or by `acquire()` / `release()`.

    Attributes:
      path: the lock file, `run_dir/.lock`.
      primary: False makes the lock a no-op (in a multi-process run only process 0 takes it).
      force: take over a lock whose holder cannot be checked (another host, or an unparsable file).
    """

    def __init__(self, run_dir, *, primary: bool = True, force: bool = False, argv: Optional[Sequence[str]] = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.primary = primary
        self.force = force
        self._argv = argv
        self._mine: Optional[str] = None  # the exact text we wrote, while we hold the lock

    @property
    def held(self) -> bool:
        return self._mine is not None

    def acquire(self) -> "RunLock":
        if not self.primary:
            return self
        if self.held:
            raise RuntimeError(f"{self.path}: this RunLock already holds it")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = LockHolder.current(self._argv).to_json()
        if self._create(text):
            # The holder makes the takeover guard too, so a refused second run leaves the directory as it found it.
            os.close(os.open(self.run_dir / _GUARD_NAME, os.O_RDWR | os.O_CREAT, 0o644))
            self._mine = text
            return self
        with self._guard():
            # Under the guard no other taker can replace `.lock`; only a release (which removes it) can change it.
            took_over = None
            while not self._create(text):
                try:
                    old = self.path.read_text()
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                took_over = self._stale_reason(old)
                # Renamed away, then created anew: a plain acquirer may still win the gap, and is then the holder.
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex}")
                try:
                    os.rename(self.path, stale)
                except FileNotFoundError:
                    continue
                with contextlib.suppress(OSError):
                    stale.unlink()
        if took_over:
            log.warning("%s: took over the lock of %s", self.run_dir, took_over)
        self._mine = text
        return self

    def release(self) -> None:
        """Removes the lock file if it is still the one this lock wrote (a forced takeover leaves it alone)."""
        if not self.held:
            return
        mine, self._mine = self._mine, None
        with self._guard():
            try:
                current = self.path.read_text()
            except FileNotFoundError:
                log.warning("%s: lock file vanished while held", self.path)
                return
            if current != mine:
                log.warning("%s: the lock was taken over by another process; leaving its file: %s",
                            self.path, current.strip())
                return
            self.path.unlink()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self, text: str) -> bool:
        """Writes `text` to `.lock` if it does not exist; False if it does. Readers never see a partial file."""
        tmp = self.run_dir / f"{LOCK_NAME}.tmp-{uuid.uuid4().hex}"
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return self._create_excl(text)  # a filesystem without hard links
        finally:
            tmp.unlink()

    def _create_excl(self, text: str) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True

    @contextlib.contextmanager
    def _guard(self):
        fd = os.open(self.run_dir / _GUARD_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stale_reason(self, old: str) -> str:
        """Why the lock text `old` may be replaced; raises RunDirLocked if it may not."""
        try:
            holder = LockHolder.parse(old)
        except (ValueError, KeyError, TypeError) as e:
            if self.force:
                return f"an unreadable lock file, by force=True ({e}: {old[:200]!r})"
            raise RunDirLocked(
                f"run directory {self.run_dir} has a lock file {self.path} that cannot be read ({e}: {old[:200]!r}). "
                f"If no jaxsr process is using {self.run_dir}, delete {self.path} or take it over with force=True (jaxsr run --force-lock); "
                f"or use another run_dir.") from None
        reason = holder.dead_reason()
        if reason:
            return f"a dead process ({holder.describe()}): {reason}"
        if holder.host != socket.gethostname():
            if self.force:
                return f"a process on another host, by force=True ({holder.describe()})"
            raise RunDirLocked(
                f"run directory {self.run_dir} is locked by a process on another host: {holder.describe()}. "
                f"Its liveness cannot be checked from {socket.gethostname()}. Wait for it to finish or stop it there; "
                f"if it is no longer running, take the lock over with force=True (jaxsr run --force-lock); or use another run_dir.")
        who = "this process" if holder.pid == os.getpid() else "another jaxsr process"
        raise RunDirLocked(
            f"run directory {self.run_dir} is in use by {who}: {holder.describe()}. "
            f"Wait for it to finish, or stop it (kill {holder.pid}); or use another run_dir.")
