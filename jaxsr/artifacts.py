"""Crash-safe stage outputs: datasets committed in whole shards, atomic JSON, append-only JSONL.

A stage that is killed and rerun must neither lose nor duplicate work. Every
commit here is a write to a temporary path followed by ``os.replace`` (atomic on
POSIX), so a reader sees either the old state or the new one, never a half-write.

    writer = ShardedWriter(out_dir, shard_size=256)
    for x in inputs[writer.done_rows():]:   # a rerun skips what is committed
        writer.append(process(x))
    writer.finalize()                       # last shard + _COMPLETE
    ds = read_dataset(out_dir)

One writer per directory at a time. In a multi-process run every process opens the same writers in the same
order and appends the same rows; only process 0 writes (``jaxsr.distributed.is_primary``), the others count
along and wait for it at ``finalize``. ``write_json_atomic`` and ``append_jsonl`` likewise write on process 0 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import datasets

from . import distributed

# Shards are small and many; the library's per-save progress bars would drown the stage's own bar.
datasets.disable_progress_bars()

COMPLETE = "_COMPLETE"
_TMP_PREFIX = ".tmp-"  # anything named so is an unfinished write, removed on open
_SHARD_RE = re.compile(r"shard-(\d{5,})")


def _fsync(path, flags=os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_paths(directory: Path) -> list[Path]:
    found = {int(m[1]): p for p in directory.iterdir() if (m := _SHARD_RE.fullmatch(p.name)) and p.is_dir()}
    if sorted(found) != list(range(len(found))):
        raise ValueError(
            f"{directory} has shards {sorted(found)}; expected consecutive shard-00000, shard-00001, ..."
        )
    return [found[i] for i in range(len(found))]


def canonical_json(row) -> str:
    """One row as deterministic JSON: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(rows) -> str:
    """sha256 hex digest of the rows in order, each as ``canonical_json`` plus a newline."""
    h = hashlib.sha256()
    for row in rows:
        h.update(canonical_json(row).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def is_complete(directory) -> bool:
    """Whether ``directory`` holds a finalized ``ShardedWriter`` dataset."""
    return (Path(directory) / COMPLETE).is_file()


class ShardedWriter:
    """Appends rows (dicts) to ``directory`` and commits them as HF ``datasets``
    shards ``shard-00000``, ``shard-00001``, ... of ``shard_size`` rows each.

    Rows are committed only in whole shards, so after a crash ``done_rows()`` on a
    new writer counts exactly the rows that survived; the rows still buffered were
    lost and must be produced again. ``features`` fixes the column types; without
    it they are inferred from the first shard and every later shard is cast to
    them (pass it when a column can be all None in a shard, or int in one and
    float in another).
    """

    def __init__(self, directory, *, shard_size: int, features: datasets.Features | None = None):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        self.directory = Path(directory)
        self.shard_size = shard_size
        self._primary = distributed.is_primary()
        if self._primary:
            self.directory.mkdir(parents=True, exist_ok=True)
            for p in self.directory.iterdir():
                if p.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        # Every process counts the same committed shards: none is read before the primary has cleaned up, and
        # the primary commits nothing new before every process has counted.
        distributed.barrier(f"open {self.directory}")
        committed = ([datasets.load_from_disk(str(p)) for p in _shard_paths(self.directory)]
                     if self.directory.is_dir() else [])
        self._complete = is_complete(self.directory)
        distributed.barrier(f"opened {self.directory}")
        if committed and features is not None and committed[0].features != features:
            raise ValueError(
                f"{self.directory} was written with features {committed[0].features}, not the given {features}"
            )
        self.features = committed[0].features if committed else features
        self._num_shards = len(committed)
        self._done = sum(len(ds) for ds in committed)
        self._buffer: list[dict] = []

    def done_rows(self) -> int:
        """Rows committed to disk (by this writer or an earlier, interrupted one)."""
        return self._done

    def reopen(self) -> None:
        """Makes a finalized directory appendable again (it is incomplete until the next `finalize`): for a stage
        that grows an earlier stage's dataset (the pairs target, `prompts.target_pairs`). Every process calls it."""
        if not self._complete:
            return
        if self._primary:
            (self.directory / COMPLETE).unlink()
            _fsync(self.directory)
        distributed.barrier(f"reopen {self.directory}")
        self._complete = False

    def append(self, row: dict) -> None:
        if self._complete:
            raise ValueError(f"{self.directory} is already finalized; write a new directory instead")
        self._buffer.append(row)
        if len(self._buffer) >= self.shard_size:
            self._commit()

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)

    def flush(self) -> None:
        """Commit the buffered rows now as one (possibly short) shard, e.g. at the end of a generation round."""
        if self._buffer:
            self._commit()

    def _commit(self) -> None:
        if not self._primary:  # process 0 writes these rows; the others only keep count
            self._num_shards += 1
            self._done += len(self._buffer)
            self._buffer = []
            return
        first = self._done
        try:
            ds = datasets.Dataset.from_list(self._buffer, features=self.features)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"rows {first}..{first + len(self._buffer) - 1} for {self.directory} do not fit its features "
                f"{self.features}; pass features= to ShardedWriter"
            ) from e
        name = f"shard-{self._num_shards:05d}"
        tmp = self.directory / (_TMP_PREFIX + name)
        ds.save_to_disk(str(tmp))
        # Durable before visible: a power loss after the rename must not expose empty files.
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        os.replace(tmp, self.directory / name)
        _fsync(self.directory)
        self.features = ds.features
        self._num_shards += 1
        self._done += len(self._buffer)
        self._buffer = []

    def finalize(self) -> dict:
        """Commit the buffered rows and write ``_COMPLETE`` (row and shard counts,
        ``content_hash`` of all rows as read back, features). Idempotent. With several processes, every one
        must call it; they return once process 0 has written ``_COMPLETE``."""
        path = self.directory / COMPLETE
        if self._complete:
            return json.loads(path.read_text(encoding="utf-8"))
        if self._buffer:
            self._commit()
        if self._primary:
            ds = read_dataset(self.directory, require_complete=False)
            info = {
                "num_rows": len(ds),
                "num_shards": self._num_shards,
                "sha256": content_hash(ds),
                # Kept here so that a stage with no rows (hence no shard) still reads back with its columns.
                "features": None if self.features is None else self.features.to_dict(),
            }
            write_json_atomic(path, info)
        distributed.barrier(f"finalize {self.directory}")
        self._complete = True
        return json.loads(path.read_text(encoding="utf-8"))


def read_dataset(directory, *, require_complete: bool = True) -> datasets.Dataset:
    """The shards of ``directory`` concatenated in order.

    With ``require_complete`` (the default) the directory must have been finalized,
    and its row count must match ``_COMPLETE``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset directory {directory} does not exist")
    if require_complete and not is_complete(directory):
        raise FileNotFoundError(
            f"dataset directory {directory} is incomplete (no {COMPLETE} marker): the stage writing it has "
            "not finished; rerun it, or pass require_complete=False to read the committed shards"
        )
    info = json.loads((directory / COMPLETE).read_text(encoding="utf-8")) if is_complete(directory) else None
    parts = [datasets.load_from_disk(str(p)) for p in _shard_paths(directory)]
    if parts:
        ds = datasets.concatenate_datasets(parts)
    elif info is not None and info["features"] is not None:
        features = datasets.Features.from_dict(info["features"])
        ds = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    else:
        ds = datasets.Dataset.from_list([])
    if info is not None and len(ds) != info["num_rows"]:
        raise ValueError(f"{directory} has {len(ds)} rows in its shards but {COMPLETE} records {info['num_rows']}")
    return ds


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see the old file or the new one, never a mix.

    Process 0 only: in a multi-process run the others return without writing.
    """
    if not distributed.is_primary():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)


def _drop_torn_tail(f) -> None:
    # Truncate after the last newline: bytes past it are a write cut short by a
    # crash, and appending onto them would corrupt the next record too.
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
        start = max(0, pos - (1 << 16))
        f.seek(start)
        newline = f.read(pos - start).rfind(b"\n")
        if newline >= 0:
            if start + newline + 1 != end:
                f.truncate(start + newline + 1)
            return
        pos = start
    if end:
        f.truncate(0)


def append_jsonl(path, obj) -> None:
    """Append ``obj`` as one JSON line to ``path`` and fsync it.

    The trailing newline is the commit mark: a torn last line left by an earlier
    crash is dropped first, as ``read_jsonl`` would drop it. Process 0 only, as ``write_json_atomic``.
    """
    if not distributed.is_primary():
        return
    line = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        _drop_torn_tail(f)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list:
    """The records of a JSONL file written by ``append_jsonl``.

    A last line without its newline is a torn write: it is dropped with a warning.
    Any other line that is not valid JSON is an error; blank lines are skipped.
    """
    data = Path(path).read_bytes()
    *lines, tail = data.split(b"\n")
    if tail:
        warnings.warn(f"{path}: dropping a torn last line ({len(tail)} bytes without a newline)", stacklevel=2)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not valid JSON ({e.msg}); only a torn last line is tolerated") from e
    return records
