import hashlib
import json

import datasets
import pytest

from jaxsr.artifacts import (
    COMPLETE,
    ShardedWriter,
    append_jsonl,
    content_hash,
    is_complete,
    read_dataset,
    read_jsonl,
    write_json_atomic,
)

ROWS = [{"id": i, "prompt": f"prompt {i} é", "score": i / 2, "tags": ["a"] * (i % 3)} for i in range(23)]


def _write(directory, rows, shard_size=5):
    writer = ShardedWriter(directory, shard_size=shard_size)
    for row in rows[writer.done_rows():]:
        writer.append(row)
    return writer.finalize()


def _shards(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("shard-"))


def test_write_read_in_order(tmp_path):
    info = _write(tmp_path / "out", ROWS)
    assert _shards(tmp_path / "out") == [f"shard-{i:05d}" for i in range(5)]
    assert is_complete(tmp_path / "out")
    ds = read_dataset(tmp_path / "out")
    assert ds.to_list() == ROWS
    # Reference hash computed independently of content_hash.
    lines = "".join(json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" for r in ROWS)
    expected = hashlib.sha256(lines.encode("utf-8")).hexdigest()
    assert (info["num_rows"], info["num_shards"], info["sha256"]) == (23, 5, expected)
    assert datasets.Features.from_dict(info["features"]) == ds.features
    assert json.loads((tmp_path / "out" / COMPLETE).read_text()) == info
    assert content_hash(ds) == expected


def test_crash_resume_matches_uninterrupted(tmp_path):
    reference = _write(tmp_path / "ref", ROWS)

    out = tmp_path / "out"
    crashed = ShardedWriter(out, shard_size=5)
    crashed.extend(ROWS)
    assert crashed.done_rows() == 20  # rows 20..22 are only buffered
    del crashed  # abandoned without finalize: the 3 buffered rows are lost
    (out / ".tmp-shard-00004").mkdir()  # a shard save cut short by the crash
    (out / ".tmp-shard-00004" / "data-00000-of-00001.arrow").write_bytes(b"partial")
    assert not is_complete(out)
    with pytest.raises(FileNotFoundError, match=str(out)):
        read_dataset(out)
    assert read_dataset(out, require_complete=False).to_list() == ROWS[:20]

    writer = ShardedWriter(out, shard_size=5)
    assert writer.done_rows() == 20
    assert not (out / ".tmp-shard-00004").exists()
    for row in ROWS[writer.done_rows():]:
        writer.append(row)
    info = writer.finalize()
    assert info == reference
    assert read_dataset(out).to_list() == read_dataset(tmp_path / "ref").to_list() == ROWS
    assert writer.finalize() == info  # idempotent
    with pytest.raises(ValueError, match="already finalized"):
        writer.append(ROWS[0])


def test_resume_mid_shard_boundary(tmp_path):
    # Killed right after a shard commit: nothing is lost, nothing is redone.
    out = tmp_path / "out"
    writer = ShardedWriter(out, shard_size=5)
    writer.extend(ROWS[:10])
    assert ShardedWriter(out, shard_size=5).done_rows() == 10
    assert _write(out, ROWS) == _write(tmp_path / "ref", ROWS)


def test_features_and_empty(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "score": datasets.Value("float64")})
    writer = ShardedWriter(tmp_path / "typed", shard_size=2, features=features)
    writer.extend([{"text": "a", "score": 1}, {"text": None, "score": 2.5}, {"text": "c", "score": 3}])
    writer.finalize()
    ds = read_dataset(tmp_path / "typed")
    assert ds.features == features
    assert ds.to_list() == [{"text": "a", "score": 1.0}, {"text": None, "score": 2.5}, {"text": "c", "score": 3.0}]

    empty = ShardedWriter(tmp_path / "empty", shard_size=4, features=features).finalize()
    assert (empty["num_rows"], empty["num_shards"]) == (0, 0)
    ds = read_dataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.features == features


def test_inferred_features_mismatch_names_directory(tmp_path):
    writer = ShardedWriter(tmp_path / "out", shard_size=1)
    writer.append({"x": 1})
    with pytest.raises(ValueError, match="pass features="):
        writer.append({"x": "not an int"})


def test_read_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_dataset(tmp_path / "nowhere")


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "manifest.json"
    write_json_atomic(path, {"stage": "prompts", "done": False})
    write_json_atomic(path, {"stage": "prompts", "done": True})
    assert json.loads(path.read_text()) == {"stage": "prompts", "done": True}
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no temp file left


def test_jsonl_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"i": 0, "text": "line\nbreak é"})
    append_jsonl(path, {"i": 1})
    with open(path, "ab") as f:
        f.write(b'{"i": 2, "tex')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_jsonl(path) == [{"i": 0, "text": "line\nbreak é"}, {"i": 1}]
    # The next append drops the torn tail instead of gluing onto it.
    append_jsonl(path, {"i": 2})
    assert read_jsonl(path) == [{"i": 0, "text": "line\nbreak é"}, {"i": 1}, {"i": 2}]

    torn_only = tmp_path / "torn.jsonl"
    torn_only.write_bytes(b'{"i"')
    append_jsonl(torn_only, {"i": 0})
    assert torn_only.read_bytes() == b'{"i": 0}\n'


def test_jsonl_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2"):
        read_jsonl(path)
