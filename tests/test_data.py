"""jaxsr.data: sources, chat-templated tokenisation, over-length handling, bad input, order and batch layout."""

import json

import numpy as np
import pytest

from jaxsr import data
from jaxsr.data import DataError


@pytest.fixture(scope="module")
def tok(fixtures_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixtures_dir / "hf" / "llama3"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- sources ------------------------------------------------------------------------------------------------

def test_jsonl_and_hf_dataset_dir_read_the_same(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "ref_chosen_logps": -1.0 * i,
             "ref_rejected_logps": -2.0 * i, "extra": i} for i in range(5)]
    from_jsonl = data.load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    from_disk = data.load_pairs(tmp_path / "ds")
    want = [{k: v for k, v in r.items() if k != "extra"} for r in rows]
    assert from_jsonl == want and from_disk == want


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_sft(tmp_path / "nope.jsonl")


def test_missing_column_names_path_column_and_present_columns(tmp_path):
    from datasets import Dataset

    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"sft\.jsonl:2: missing column\(s\) response; columns present: prompt, answer"):
        data.load_sft(path)
    Dataset.from_list([{"prompt": "a", "chosen": "b"}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds: missing column\(s\) rejected; columns present: prompt, chosen"):
        data.load_pairs(tmp_path / "ds")


def test_empty_dataset_and_bad_json_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: the dataset is empty"):
        data.load_sft(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        data.load_sft(tmp_path / "bad.jsonl")


# --- tokenisation -------------------------------------------------------------------------------------------

def test_sft_tokens_follow_the_chat_template_and_end_with_eos(tok):
    (ex,), counts = data.tokenize_sft(tok, [{"prompt": "Name a fruit.", "response": "A pear."}], max_length=64)
    text = tok.decode(np.concatenate([ex.prompt, ex.response]))
    assert text == "<|user|>\nName a fruit.<|end|>\n<|assistant|>\nA pear.</s>"
    assert ex.response[-1] == tok.eos_token_id and not counts


def test_loss_targets_are_exactly_the_response_tokens(tok):
    recs = [{"prompt": "Name a fruit.", "response": "A pear."}, {"prompt": "Hi", "response": "Hello there, friend."}]
    exs, _ = data.tokenize_sft(tok, recs, max_length=64)
    b = data.sft_batch(exs, [[0], [1]], batch_size=2, max_length=64)
    for i, ex in enumerate(exs):
        pos, ids, m = b["target_pos"][0, i], b["target_ids"][0, i], b["target_mask"][0, i]
        np.testing.assert_array_equal(ids[m], ex.response)
        # The hidden state at target_pos predicts the next token: the scored token sits right after it.
        np.testing.assert_array_equal(b["ids"][0, i][pos[m] + 1], ex.response)
        assert pos[m][0] == len(ex.prompt) - 1
        assert b["mask"][0, i].sum() == ex.length


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_responses_are_truncated_or_dropped_and_counted(tok, overlong):
    short = {"prompt": "Hi", "response": "ok"}
    long = {"prompt": "Hi", "response": " ".join(["word"] * 40)}
    huge_prompt = {"prompt": " ".join(["word"] * 40), "response": "ok"}
    p_len = len(data.prompt_ids(tok, "Hi"))
    exs, counts = data.tokenize_sft(tok, [short, long, huge_prompt], max_length=24, overlong=overlong)
    # A prompt alone longer than max_length is dropped in both modes (prompts are never cut).
    assert counts["prompt_too_long"] == 1
    if overlong == "truncate":
        assert counts["truncated"] == 1 and len(exs) == 2
        cut = exs[1]
        np.testing.assert_array_equal(cut.prompt, data.prompt_ids(tok, "Hi"))
        assert cut.length == 24 and len(cut.response) == 24 - p_len
        np.testing.assert_array_equal(cut.response, data.response_ids(tok, long["response"])[:24 - p_len])
    else:
        assert counts["dropped_overlong"] == 1 and len(exs) == 1


def test_pair_truncation_cuts_both_responses_to_the_same_room(tok):
    rec = {"prompt": "Hi", "chosen": " ".join(["yes"] * 40), "rejected": " ".join(["no"] * 40)}
    (pair,), counts = data.tokenize_pairs(tok, [rec], max_length=20)
    assert counts["truncated"] == 1
    assert len(pair.prompt) + len(pair.chosen) == 20 and len(pair.prompt) + len(pair.rejected) == 20


def test_bad_pairs_are_counted_skips(tok, caplog):
    recs = [{"prompt": "a", "chosen": "good", "rejected": "bad"},
            {"prompt": "b", "chosen": "", "rejected": "bad"},
            {"prompt": "c", "chosen": "same", "rejected": "same"},
            {"prompt": "d", "chosen": "x " * 30 + "tail one", "rejected": "x " * 30 + "tail two"}]
    with caplog.at_level("INFO", logger="jaxsr.data"):
        pairs, counts = data.tokenize_pairs(tok, recs, max_length=24)
    assert [p.index for p in pairs] == [0]
    assert counts["empty_response"] == 1 and counts["identical"] == 1 and counts["identical_after_truncation"] == 1
    assert "1 of 4 pairs kept" in caplog.text and "1 empty response" in caplog.text
    assert "1 chosen identical to rejected" in caplog.text


def test_nothing_left_after_filtering_is_an_error(tok):
    with pytest.raises(DataError, match="no usable pairs: all 2 were skipped"):
        data.tokenize_pairs(tok, [{"prompt": "a", "chosen": "x", "rejected": "x"},
                                  {"prompt": "b", "chosen": " ", "rejected": "y"}], max_length=64)
    with pytest.raises(DataError, match="empty"):
        data.tokenize_sft(tok, [], max_length=64)


def test_missing_reference_logps_are_an_error(tok):
    recs = [{"prompt": "a", "chosen": "x", "rejected": "y"}]
    with pytest.raises(DataError, match="no ref_chosen_logps / ref_rejected_logps columns"):
        data.tokenize_pairs(tok, recs, max_length=64, need_ref=True)
    recs = [{"prompt": "a", "chosen": "x", "rejected": "y", "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
            {"prompt": "b", "chosen": "x", "rejected": "y", "ref_chosen_logps": None, "ref_rejected_logps": -2.0}]
    with pytest.raises(DataError, match="row 1 has no finite ref_chosen_logps"):
        data.tokenize_pairs(tok, recs, max_length=64, need_ref=True)
    pairs, _ = data.tokenize_pairs(tok, recs[:1], max_length=64, need_ref=True)
    assert pairs[0].ref_logps == (-1.0, -2.0)


def test_no_chat_template_is_an_error(tok):
    import copy

    bare = copy.copy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        data.tokenize_sft(bare, [{"prompt": "a", "response": "b"}], max_length=64)


# --- order and batches --------------------------------------------------------------------------------------

def test_buckets_are_powers_of_two_capped_at_max_length():
    assert [data.bucket(n, 100) for n in (1, 16, 17, 33, 64, 65, 99, 100)] == [16, 16, 32, 64, 64, 100, 100, 100]
    assert data.bucket(5, 8) == 8 and data.bucket(40, 1024) == 64
    fine = [data.bucket(n, 1000, fine=True) for n in (1, 16, 17, 24, 25, 33, 48, 49, 65, 96, 97, 192, 193, 999)]
    assert fine == [16, 16, 24, 24, 32, 48, 48, 64, 96, 96, 128, 192, 256, 1000]


def _naive_bucket(n, *, cap=None, half_octaves=False):
    """The buckets as they were before data.bucket and sample.bucket shared one definition, written out as a
    list: 16 x powers of two (data.bucket), with their halfway points 24 x powers of two (data.bucket(fine=True),
    sample.bucket); data.bucket never goes above cap unless n itself does."""
    sizes = sorted([16 << k for k in range(12)] + ([24 << k for k in range(12)] if half_octaves else []))
    b = next(s for s in sizes if s >= n)
    return b if cap is None else max(n, min(b, cap))


def test_bucket_sequences_of_every_caller_are_unchanged():
    ns = range(1, 2001)
    # data: _microbatches / _pair_microbatches (cap = max_length, or the prompt bucket), _shared_prompt (fine).
    for cap in (8, 16, 24, 63, 64, 100, 512, 1000, 1024, 2000, 4096):
        assert [data.bucket(n, cap) for n in ns] == [_naive_bucket(n, cap=cap) for n in ns]
        assert [data.bucket(n, cap, fine=True) for n in ns] == [_naive_bucket(n, cap=cap, half_octaves=True) for n in ns]
    # sample: prompt and new-token buckets; plan: the KV-cache slots (both uncapped, fine).
    assert [data.bucket(n, fine=True) for n in ns] == [_naive_bucket(n, half_octaves=True) for n in ns]


def test_shared_prompt_rows_hold_prompt_chosen_rejected(tok):
    recs = [{"prompt": f"question {i}", "chosen": "yes " * (i + 1), "rejected": "no " * (3 - i), "ref_chosen_logps": -1.0,
             "ref_rejected_logps": -2.0} for i in range(3)]
    pairs, _ = data.tokenize_pairs(tok, recs, max_length=64, need_ref=True)
    b = data.pair_batch(pairs, [[0], [1], [2]], batch_size=4, multiple=4, max_length=64, shared_prompt=True)
    assert b["ids"].ndim == 3 and b["target_pos"].shape[:3] == (1, 4, 2)
    for i, p in enumerate(pairs):
        P, C, R = len(p.prompt), len(p.chosen), len(p.rejected)
        n = P + C + R
        ids, pos, branch = b["ids"][0, i], b["positions"][0, i], b["branch"][0, i]
        np.testing.assert_array_equal(ids[:n], np.concatenate([p.prompt, p.chosen, p.rejected]))
        np.testing.assert_array_equal(pos[:n], np.concatenate([np.arange(P + C), np.arange(P, P + R)]))
        np.testing.assert_array_equal(branch[:n], [0] * P + [1] * C + [2] * R)
        assert b["mask"][0, i].sum() == n
        for k, resp in enumerate((p.chosen, p.rejected)):
            tpos = b["target_pos"][0, i, k][b["target_mask"][0, i, k]]
            np.testing.assert_array_equal(b["target_ids"][0, i, k][:len(resp)], resp)
            # Token j of a response is predicted at the slot holding its predecessor in that sequence: the
            # last prompt token for j = 0, else the same branch's token j - 1.
            assert tpos[0] == P - 1
            np.testing.assert_array_equal(ids[tpos[1:]], resp[:-1])
            assert (branch[tpos[1:]] == k + 1).all()
    assert not b["mask"][0, 3].any() and b["weight"][0].tolist() == [1, 1, 1, 0]
    assert data.num_tokens(b) == sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def test_order_is_a_function_of_seed_and_epoch():
    plan = data.StepPlan([10] * 10, batch_size=4, seed=3, epochs=2)
    assert plan.total_steps == 6 and [plan.locate(s) for s in (0, 2, 3, 5)] == [(0, 0), (0, 2), (1, 0), (1, 2)]
    again = data.StepPlan([10] * 10, batch_size=4, seed=3, epochs=2)
    assert [again.rows(s) for s in range(6)] == [plan.rows(s) for s in range(6)]
    for epoch in (0, 1):  # each epoch visits every item once
        seen = sorted(i for s in range(3 * epoch, 3 * epoch + 3) for row in plan.rows(s) for i in row)
        assert seen == list(range(10))
    assert plan.epoch_rows(0) != plan.epoch_rows(1)
    assert data.StepPlan([10] * 10, 4, seed=4).epoch_rows(0) != plan.epoch_rows(0)
    assert data.StepPlan([10] * 10, 4, seed=3, max_steps=7).total_steps == 7


def test_microbatches_pad_rows_to_the_device_multiple(tok):
    recs = [{"prompt": f"p{i}", "chosen": "yes" * (i + 1), "rejected": "no", "ref_chosen_logps": -1.0,
             "ref_rejected_logps": -2.0} for i in range(5)]
    pairs, _ = data.tokenize_pairs(tok, recs, max_length=64, need_ref=True)
    b = data.pair_batch(pairs, [[0], [1], [2], [3], [4]], batch_size=6, grad_accum=2, multiple=4, max_length=64)
    assert b["ids"].shape[:3] == (2, 4, 2) and b["weight"].shape == (2, 4)
    # rows 0-2 in micro-batch 0, rows 3-4 in micro-batch 1, everything else is weight-0 padding
    np.testing.assert_array_equal(b["weight"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert not b["mask"][0, 3].any() and not b["target_mask"][1, 2:].any()
    assert data.num_tokens(b) == sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in pairs)


def test_packing_keeps_segments_apart(tok):
    recs = [{"prompt": f"q{i}", "response": "answer " * (i + 1)} for i in range(6)]
    exs, _ = data.tokenize_sft(tok, recs, max_length=64)
    plan = data.StepPlan([e.length for e in exs], batch_size=2, seed=0, pack_capacity=64)
    rows = plan.epoch_rows(0)
    assert sorted(i for r in rows for i in r) == list(range(6)) and len(rows) < 6
    assert all(sum(exs[i].length for i in r) <= 64 for r in rows)
    b = data.sft_batch(exs, rows[:2], batch_size=2, max_length=64, packed=True)
    seg, pos, ids = b["segment_ids"][0, 0], b["positions"][0, 0], b["ids"][0, 0]
    start = 0
    for k, i in enumerate(rows[0]):
        n = exs[i].length
        np.testing.assert_array_equal(seg[start:start + n], k + 1)
        np.testing.assert_array_equal(pos[start:start + n], np.arange(n))
        np.testing.assert_array_equal(ids[start:start + n], np.concatenate([exs[i].prompt, exs[i].response]))
        start += n
    assert (seg[start:] == 0).all()
    m = b["target_mask"][0, 0]
    np.testing.assert_array_equal(b["target_ids"][0, 0][m], np.concatenate([exs[i].response for i in rows[0]]))
    np.testing.assert_array_equal(ids[b["target_pos"][0, 0][m] + 1], b["target_ids"][0, 0][m])


def test_non_string_text_is_an_error(tok):
    with pytest.raises(DataError, match="row 0 column 'response' must be a string, got int 42"):
        data.tokenize_sft(tok, [{"prompt": "a", "response": 42}], max_length=64)
