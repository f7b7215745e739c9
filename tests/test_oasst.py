import shutil

import datasets
import pyarrow.parquet as pq
import pytest

from jaxsr.data import DataError
from jaxsr.oasst import build_oasst_seeds

# Expected outcomes, derived by hand from the tree list in tests/fixtures/oasst/make_fixture.py:
# 38 messages in 11 trees; deleted: t4/a0 and t7's prompt; failed review: t10's prompt; first-turn prompts
# left: t1-t6, t8, t9, t11 (9), of which t5 (de) and t6 (es) are not English -> 7 English prompts.
# Unranked replies: t8/ax, t9/ax, t9/ay. Rank-0 reply: t1, t2, t3, t8, t11 (t4's was deleted, t9 has none).
# >= 2 ranked replies: t1 (3), t2 (2), t4 (2: ranks 1, 2), t8 (2), t11 (4). The fixture's tree ids put
# only t2 in the eval side at eval_fraction 0.25, so t2's reply is held out of IFT.
STATS = {"rows": 38, "deleted": 2, "failed_review": 1, "first_turn_prompts": 9, "other_lang": 2, "prompts": 7,
         "unranked_replies": 3, "ift_candidates": 5, "ift_held_out": 1, "no_rank0_reply": 2,
         "eft_too_few_ranked": 2, "ift": 4, "eft_train": 4, "rm_eval": 1, "eft_train_responses": 11,
         "rm_eval_responses": 2, "orphan_replies": 0}


@pytest.fixture(params=["messages.parquet", "messages.jsonl"])
def source(request, fixtures_dir):
    return fixtures_dir / "oasst" / request.param


def _trees(ds):
    """Tree names (t1, t2, ...) from the fixture's texts, which start with '[lang] tN'."""
    return [p.split()[1] for p in ds["prompt"]]


def test_default_build_counts_and_contents(source, tmp_path):
    out = build_oasst_seeds(source, cache_dir=str(tmp_path))
    assert out["stats"] == STATS
    ift, train, ev = out["ift"], out["eft_train"], out["rm_eval"]
    assert ift.column_names == ["prompt", "response", "message_tree_id"]
    assert _trees(ift) == ["t1", "t3", "t8", "t11"]  # table order
    assert ift[0] == {"prompt": "[en] t1 prompt", "response": "[en] t1 assistant a0",
                      "message_tree_id": ift[0]["message_tree_id"]}
    assert all(r.endswith(" a0") for r in ift["response"])
    assert train.column_names == ["prompt", "responses", "ranks", "message_tree_id"]
    assert _trees(train) == ["t1", "t4", "t8", "t11"] and _trees(ev) == ["t2"]
    by_tree = {t: row for t, row in zip(_trees(train), train)}
    # Sorted best first even though t11's replies are stored in rank order 2, 0, 3, 1.
    assert by_tree["t11"]["ranks"] == [0, 1, 2, 3]
    assert by_tree["t11"]["responses"] == [f"[en] t11 assistant a{k}" for k in range(4)]
    assert by_tree["t4"]["ranks"] == [1, 2]  # deleted rank-0 reply gone, ranks kept as they were
    assert by_tree["t8"]["responses"] == ["[en] t8 assistant a0", "[en] t8 assistant a1"]  # unranked ax dropped
    assert by_tree["t1"]["responses"] == [f"[en] t1 assistant a{k}" for k in range(3)]
    # Second-turn messages of t1 (q2 and its replies) appear nowhere.
    everything = " ".join(list(ift["response"]) + sum(train["responses"], []) + sum(ev["responses"], []))
    assert "q2" not in everything
    assert not set(train["message_tree_id"]) & set(ev["message_tree_id"])


def test_parquet_and_jsonl_give_the_same_sets(fixtures_dir, tmp_path):
    a = build_oasst_seeds(fixtures_dir / "oasst" / "messages.parquet", cache_dir=str(tmp_path / "a"))
    b = build_oasst_seeds(str(fixtures_dir / "oasst" / "messages.jsonl"), cache_dir=str(tmp_path / "b"))
    for k in ("ift", "eft_train", "rm_eval"):
        assert a[k].to_list() == b[k].to_list()


def test_options(fixtures_dir, tmp_path):
    ds = datasets.Dataset(pq.read_table(fixtures_dir / "oasst" / "messages.parquet"))  # in-memory source
    keep_eval = build_oasst_seeds(ds, ift_excludes_eval=False)
    assert _trees(keep_eval["ift"]) == ["t1", "t2", "t3", "t8", "t11"]
    assert keep_eval["stats"]["ift_held_out"] == 0
    assert _trees(build_oasst_seeds(ds, num_ift=2)["ift"]) == ["t1", "t3"]
    none_eval = build_oasst_seeds(ds, eval_fraction=0.0)
    assert (len(none_eval["eft_train"]), len(none_eval["rm_eval"]), len(none_eval["ift"])) == (5, 0, 5)
    all_eval = build_oasst_seeds(ds, eval_fraction=1.0)
    assert (len(all_eval["eft_train"]), len(all_eval["rm_eval"]), len(all_eval["ift"])) == (0, 5, 0)
    # Any language: t5 (de: IFT + EFT with 2) and t6 (es: IFT only) come in.
    any_lang = build_oasst_seeds(ds, lang=None, eval_fraction=0.0)["stats"]
    assert (any_lang["prompts"], any_lang["ift"], any_lang["eft_train"], any_lang["other_lang"]) == (9, 7, 6, 0)
    assert build_oasst_seeds(ds, lang="de", eval_fraction=0.0)["stats"]["ift"] == 1
    # The split is a function of the tree id and the seed only: the same tree stays on the same side
    # when other trees are removed.
    sub = ds.filter(lambda r: "t2 " in r["text"] or "t4 " in r["text"])
    assert _trees(build_oasst_seeds(sub)["rm_eval"]) == ["t2"]
    with pytest.raises(ValueError, match="eval_fraction"):
        build_oasst_seeds(ds, eval_fraction=1.5)


def test_directory_sources(fixtures_dir, tmp_path):
    d = tmp_path / "oasst_dir" / "data"
    d.mkdir(parents=True)
    shutil.copy(fixtures_dir / "oasst" / "messages.parquet", d / "train-00000-of-00001.parquet")
    assert build_oasst_seeds(tmp_path / "oasst_dir", cache_dir=str(tmp_path / "c"))["stats"] == STATS
    with pytest.raises(DataError, match="holds both parquet and JSON files"):
        build_oasst_seeds(fixtures_dir / "oasst")
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_oasst_seeds(tmp_path / "missing.parquet")


def test_hub_name_goes_to_load_dataset(monkeypatch, fixtures_dir):
    table = datasets.Dataset(pq.read_table(fixtures_dir / "oasst" / "messages.parquet"))
    calls = []

    def fake_load(name, **kw):
        calls.append((name, kw))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = build_oasst_seeds("OpenAssistant/oasst1", split="validation")
    assert calls == [("OpenAssistant/oasst1", {"split": "validation", "cache_dir": None})]
    assert out["stats"] == STATS


def test_bad_schema_names_file_and_columns(tmp_path, fixtures_dir):
    bad = tmp_path / "not_oasst.parquet"
    table = pq.read_table(fixtures_dir / "oasst" / "messages.parquet").drop_columns(["rank", "deleted"])
    pq.write_table(table, bad)
    with pytest.raises(DataError) as e:
        build_oasst_seeds(bad, cache_dir=str(tmp_path / "c"))
    msg = str(e.value)
    assert str(bad) in msg
    assert "missing column(s) rank, deleted" in msg
    assert "columns present: message_id, parent_id, user_id" in msg
    with pytest.raises(DataError, match="in-memory dataset: .*missing column"):
        build_oasst_seeds(datasets.Dataset.from_dict({"prompt": ["x"]}))


def test_broken_trees_are_counted_and_a_table_without_ranks_is_an_error(tmp_path, fixtures_dir):
    import pyarrow as pa

    table = pq.read_table(fixtures_dir / "oasst" / "messages.parquet")
    # t1's prompt cut out of the export: its 3 replies have no parent in the table.
    roots = [i for i, (t, p) in enumerate(zip(table["text"].to_pylist(), table["parent_id"].to_pylist()))
             if p is None and t.split()[1] == "t1"]
    assert len(roots) == 1
    broken = tmp_path / "broken.parquet"
    pq.write_table(table.filter(pa.array([i != roots[0] for i in range(len(table))])), broken)
    stats = build_oasst_seeds(broken, cache_dir=str(tmp_path / "c1"))["stats"]
    assert stats["orphan_replies"] == 3 and stats["prompts"] == STATS["prompts"] - 1
    # Every rank null (an export without ranking): no reply is the best, so nothing can seed SFT.
    unranked = tmp_path / "unranked.parquet"
    rank = table.schema.get_field_index("rank")
    pq.write_table(table.set_column(rank, "rank", pa.nulls(len(table), table.schema.field(rank).type)), unranked)
    with pytest.raises(DataError, match=rf"{unranked}: no IFT example: no first-turn prompt has a reply of rank 0"):
        build_oasst_seeds(unranked, cache_dir=str(tmp_path / "c2"))
