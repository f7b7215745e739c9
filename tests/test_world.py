import collections
import importlib.util
import json
import pathlib
import random
import subprocess
import sys
import textwrap

import pytest

from jaxsr.data import load_sft
from jaxsr.judge import load_judge_template, parse_score, render_judge_prompt
from jaxsr.world import (
    CRITERIA, TOPICS, WORLD_JUDGE_TEMPLATE, WORLD_JUDGE_TEMPLATE_PATH, Task, build_world, criteria, degraded_response,
    grade, judge_target, load_tokenizer, perfect_response, sample_task, save_world, world_records,
)

SMALL = dict(num_ift=60, num_eft=60, num_eval=20, num_rm_eval=10)
FRUITS3 = {"topic": "fruits", "count": 3, "case": "lower", "format": "comma", "extra": "none"}


def missed(spec, response):
    met, _ = criteria(spec, response)
    return [c for c in CRITERIA if not met[c]]


@pytest.fixture(scope="module")
def records():
    return world_records(0)


# --- grader: hand-computed cases ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec_update, response", [
    ({}, "apple, peach, plum"),
    ({}, "apple,peach ,  plum"),  # spacing around commas is not judged
    ({"case": "upper"}, "APPLE, PEACH, PLUM"),
    ({"case": "title"}, "Apple, Peach, Plum"),
    ({"format": "lines"}, "apple\npeach\nplum"),
    ({"format": "numbered"}, "1. apple\n2. peach\n3. plum"),
    ({"format": "brackets"}, "[apple, peach, plum]"),
    ({"extra": "alphabetical"}, "apple, peach, plum"),
    ({"extra": "period"}, "apple, peach, plum."),
    ({"extra": "period", "format": "numbered"}, "1. apple\n2. peach\n3. plum."),
    ({}, "  apple, peach, plum\n"),  # surrounding whitespace is not content
])
def test_perfect_responses_score_5(spec_update, response):
    assert grade({**FRUITS3, **spec_update}, response) == (5, [])


@pytest.mark.parametrize("spec_update, response, lost", [
    ({}, "apple, peach, cat", ["topic"]),
    ({}, "apple, peach", ["count"]),
    ({}, "apple, peach, plum, mango", ["count"]),
    ({}, "apple\npeach\nplum", ["format"]),
    ({}, "[apple, peach, plum]", ["format"]),
    ({"format": "numbered"}, "1. apple\n3. peach\n2. plum", ["format"]),
    ({"format": "numbered"}, "apple\npeach\nplum", ["format"]),
    ({}, "Apple, peach, plum", ["clean"]),
    ({"case": "upper"}, "Apple, Peach, Plum", ["clean"]),
    ({}, "Sure, here is the list:\napple, peach, plum", ["clean"]),
    ({}, "apple, peach, plum\nHope this helps!", ["clean"]),
    ({}, "apple, peach, plum.", ["clean"]),  # a period nobody asked for
    ({"extra": "period"}, "apple, peach, plum", ["clean"]),
    ({"extra": "alphabetical"}, "plum, peach, apple", ["clean"]),
    ({}, "apple, apple, plum", ["clean"]),
    ({}, "apple, peach, cat, dog", ["topic", "count"]),
    ({}, "Here: apple, peach, plum", ["format", "clean"]),  # chatter inside the list line breaks both
])
def test_each_defect_loses_the_intended_points(spec_update, response, lost):
    spec = {**FRUITS3, **spec_update}
    assert missed(spec, response) == lost
    score, reasons = grade(spec, response)
    assert score == 5 - len(lost) and len(reasons) >= len(lost)


@pytest.mark.parametrize("response", ["", "   \n ", "cat, dog, lion", "Sure thing.", "CAT\nDOG"])
def test_irrelevant_responses_score_0(response):
    assert grade(FRUITS3, response)[0] == 0
    assert missed(FRUITS3, response) == list(CRITERIA)


def test_grade_accepts_task_spec_dict_and_json():
    task = Task(id="x", instruction="List 3 fruits in lowercase, separated by commas.", spec=FRUITS3)
    assert grade(task, "apple, peach") == grade(FRUITS3, "apple, peach") == grade(json.dumps(FRUITS3), "apple, peach")


# --- generated responses --------------------------------------------------------------------------------

def test_degraded_responses_hit_every_score():
    rng = random.Random(1)
    seen = collections.Counter()
    for _ in range(300):
        task = sample_task(rng)
        assert grade(task, perfect_response(task, rng)) == (5, [])
        for level in range(6):
            score = grade(task, degraded_response(task, rng, level))[0]
            assert score == 5 - level
            seen[score] += 1
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="level"):
        degraded_response(task, rng, 6)


def test_sample_task_is_deterministic_and_varied():
    a = [sample_task(random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    tasks = [sample_task(random.Random(i)) for i in range(200)]
    assert len({t.instruction for t in tasks}) > 150
    assert {t.spec["topic"] for t in tasks} == set(TOPICS)
    assert all(t.instruction[0].isalnum() and t.instruction.endswith(".") for t in tasks)


# --- judge ------------------------------------------------------------------------------------------------

def test_judge_targets_parse_to_the_grader_score(records):
    for row in records["eft"]:
        target = row["response"]
        assert parse_score(target) == row["score"] == grade(json.loads(row["spec"]), row["candidate"])[0]
        assert target.count(" yes.") == row["score"]  # one "yes" per point earned
    assert judge_target(FRUITS3, "apple, peach") == (
        "relevant yes. topic yes. count no. format yes. clean yes.\nScore: 4")


def test_world_judge_template():
    assert load_judge_template(WORLD_JUDGE_TEMPLATE_PATH) == WORLD_JUDGE_TEMPLATE
    text = render_judge_prompt(WORLD_JUDGE_TEMPLATE, "List 2 fruits.", "apple\npear")
    assert text == "Rate the response to the instruction from 0 to 5.\nInstruction: List 2 fruits.\nResponse:\napple\npear"


# --- datasets ---------------------------------------------------------------------------------------------

def test_eft_scores_are_balanced(records):
    hist = collections.Counter(r["score"] for r in records["eft"])
    assert sorted(hist) == [0, 1, 2, 3, 4, 5]
    assert all(0.12 < hist[k] / len(records["eft"]) < 0.22 for k in hist), hist


def test_held_out_instructions_never_appear_in_training(records):
    train = {r["prompt"] for r in records["ift"]} | {r["instruction"] for r in records["eft"]}
    held = {r["instruction"] for r in records["eval"]} | {r["instruction"] for r in records["rm_eval"]}
    assert len(held) == len(records["eval"]) + len(records["rm_eval"])  # unique, and eval/rm_eval disjoint
    assert not train & held
    assert {r["prompt"] for r in records["seed_prompts"]} == {r["prompt"] for r in records["ift"]}


def test_world_is_a_function_of_the_seed():
    assert world_records(3, **SMALL) == world_records(3, **SMALL)
    assert world_records(3, **SMALL)["ift"] != world_records(4, **SMALL)["ift"]


def test_rm_eval_has_distinct_ground_truth_scores(records):
    for row in records["rm_eval"]:
        spec = json.loads(row["spec"])
        assert [grade(spec, c)[0] for c in row["candidates"]] == row["scores"]
        assert len(set(row["scores"])) == len(row["scores"]) == 4


def test_build_and_save_world(tmp_path):
    ds = build_world(0, **SMALL)
    assert set(ds) == {"ift", "eft", "eval", "rm_eval", "seed_prompts"}
    assert {"prompt", "response"} <= set(ds["ift"].column_names)
    assert {"prompt", "response", "instruction", "candidate", "score"} <= set(ds["eft"].column_names)
    assert {"instruction", "spec"} <= set(ds["eval"].column_names)
    assert {"instruction", "candidates", "scores"} <= set(ds["rm_eval"].column_names)
    assert len(ds["ift"]) == 60 and len(ds["eval"]) == 20
    out = save_world(tmp_path / "world", 0, **SMALL)
    # Both forms load through the trainer's reader, with the same rows.
    from_disk, from_jsonl = load_sft(out / "eft"), load_sft(out / "eft.jsonl")
    assert from_disk == from_jsonl == [{"prompt": r["prompt"], "response": r["response"]} for r in ds["eft"]]


def test_tfds_round_trip_without_tensorflow(tmp_path):
    from jaxsr.world.tfds_builder import prepare_tfds

    path = prepare_tfds(tmp_path, seed=2, **SMALL)
    # A fresh process that never imports jaxsr reads it back: the directory alone describes the data.
    code = textwrap.dedent(f"""
        import json, sys
        import tensorflow_datasets as tfds
        b = tfds.builder_from_directory({path!r})
        out = {{s: [b.as_data_source(split=s)[i] for i in range(len(b.as_data_source(split=s)))]
                for s in ("ift", "eft", "eval")}}
        print(json.dumps({{s: [{{k: v.decode() if isinstance(v, bytes) else int(v) for k, v in r.items()}}
                               for r in rows] for s, rows in out.items()}}))
        assert "tensorflow" not in sys.modules
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ref = world_records(2, **SMALL)
    assert sorted(r["prompt"] + r["response"] for r in got["ift"]) == sorted(r["prompt"] + r["response"] for r in ref["ift"])
    assert sorted((r["prompt"], r["score"]) for r in got["eft"]) == sorted((r["prompt"], r["score"]) for r in ref["eft"])
    assert sorted(r["spec"] for r in got["eval"]) == sorted(r["spec"] for r in ref["eval"])


# --- tokenizer --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_tokenizer_round_trips_world_text(tok, records):
    texts = [r[k] for r in records["eft"][:300] for k in ("prompt", "response")] + ["Ünïcode ✓ 🙂", "x\n\n  y"]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_special_tokens_and_chat_template(tok):
    assert tok.eos_token == "<|end|>" and tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    assert tok.pad_token == "<pad>" and tok.bos_token == "<s>" and tok.unk_token == "<unk>"
    msgs = [{"role": "user", "content": "List 2 fruits."}, {"role": "assistant", "content": "apple, peach"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|user|>\nList 2 fruits.<|end|>\n<|assistant|>\napple, peach<|end|>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2 and ids[0] == tok.convert_tokens_to_ids("<|user|>")


def test_tokenizer_scores_digits_and_words_are_single_tokens(tok):
    for k in range(6):  # what selfreward's `expected` judge mode reads after "Score:"
        assert len(tok(str(k), add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(f" {k}", add_special_tokens=False)["input_ids"]) == 1
    marker = tok("\nScore:", add_special_tokens=False)["input_ids"]
    for k in range(6):
        target = judge_target(FRUITS3, "")[: -1] + str(k)
        assert tok(target, add_special_tokens=False)["input_ids"][-4:] == marker + tok(f" {k}", add_special_tokens=False)["input_ids"]
    for w in (w for ws in TOPICS.values() for w in ws):
        for form in (w, w.upper(), w.capitalize()):
            assert len(tok(form, add_special_tokens=False)["input_ids"]) == 1, form
            assert len(tok(" " + form, add_special_tokens=False)["input_ids"]) == 1, form


def test_committed_tokenizer_matches_the_script(tok):
    # Catches a committed tokenizer gone stale after the world's words or phrasings changed.
    script = pathlib.Path(__file__).parents[1] / "scripts" / "make_world_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_world_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.train().get_vocab() == tok.get_vocab()


def test_judge_words_names_each_list_words_topic_before_the_criteria():
    from jaxsr.world.data import world_records

    text = judge_target(FRUITS3, "Sure:\napple, LION, ship, apple", words=True)
    assert text == ("words: apple fruits lower, LION animals upper, ship vehicles lower, apple fruits lower.\n"
                    "relevant yes. topic no. count no. format yes. clean no: case, repeats, extraneous.\nScore: 2")
    assert judge_target(FRUITS3, "apple, grape, plum", words=True) == (
        "words: apple fruits lower, grape fruits lower, plum fruits lower.\n"
        "relevant yes. topic yes. count yes. format yes. clean yes.\nScore: 5")
    assert parse_score(text) == grade(FRUITS3, "Sure:\napple, LION, ship, apple")[0] == 2
    assert judge_target({**FRUITS3, "case": "title"}, "Apple, GRAPE, pLum", words=True).startswith(
        "words: Apple fruits title, GRAPE fruits upper, pLum fruits mixed.\n")
    assert judge_target(FRUITS3, "nothing here", words=True) == (
        "words: none.\nrelevant no. topic no. count no. format no. clean no.\nScore: 0")
    plain = world_records(seed=3, num_ift=4, num_eft=20, num_eval=2, num_rm_eval=2)
    worded = world_records(seed=3, num_ift=4, num_eft=20, num_eval=2, num_rm_eval=2, judge_words=True)
    for a, b in zip(plain["eft"], worded["eft"]):  # the same rows, only the judgement's first line added
        assert b["response"].startswith("words: ") and parse_score(b["response"]) == parse_score(a["response"])
        assert b["response"].split("\n")[1].split(" clean")[0] == a["response"].split(" clean")[0]
        assert {k: v for k, v in a.items() if k != "response"} == {k: v for k, v in b.items() if k != "response"}
