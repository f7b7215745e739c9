import random

import pytest
from rouge_score import rouge_scorer

from jaxsr.selfinstruct import (
    SELFINSTRUCT_TEMPLATE,
    PromptFilter,
    _lcs_length,
    build_fewshot_prompt,
    extract_instruction,
)

SEEDS = [f"Seed task number {i}: explain topic {i} to a curious child." for i in range(10)]
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge(a, b):
    return SCORER.score(a, b)["rougeL"].fmeasure


# ---- few-shot prompt ------------------------------------------------------------


def _tasks(prompt):
    lines = prompt.split("\n")
    assert lines[0] == "Come up with a series of tasks:"
    assert lines[-1] == f"Task {len(lines) - 1}:"
    body = lines[1:-1]
    for i, line in enumerate(body, 1):
        assert line.startswith(f"Task {i}: ")
    return [line.split(": ", 1)[1] for line in body]


def test_fewshot_format_mix_and_no_repeats():
    generated = [f"Generated prompt {i} about cooking pasta well." for i in range(5)]
    prompt = build_fewshot_prompt(SEEDS, generated, random.Random(0))
    tasks = _tasks(prompt)
    assert len(tasks) == 8 and len(set(tasks)) == 8
    assert sum(t in generated for t in tasks) == 2
    assert sum(t in SEEDS for t in tasks) == 6
    assert prompt.endswith("\nTask 9:")
    assert SELFINSTRUCT_TEMPLATE == "Come up with a series of tasks:\n<TASKS_HERE>"


def test_fewshot_deterministic_given_rng():
    generated = [f"Generated prompt {i} about cooking pasta well." for i in range(50)]
    a = build_fewshot_prompt(SEEDS, generated, random.Random(7))
    b = build_fewshot_prompt(SEEDS, generated, random.Random(7))
    c = build_fewshot_prompt(SEEDS, generated, random.Random(8))
    assert a == b and a != c


def test_fewshot_fills_from_seeds_and_never_repeats():
    # One generated prompt, which also duplicates a seed (case/space differences);
    # seeds listed twice: the 8 demonstrations must still be distinct.
    generated = ["  seed TASK number 3: explain topic 3 to a   curious child. "]
    for s in range(20):
        tasks = _tasks(build_fewshot_prompt(SEEDS + SEEDS, generated, random.Random(s)))
        assert len(tasks) == 8
        assert len({t.lower() for t in tasks}) == 8
    assert len(_tasks(build_fewshot_prompt(SEEDS, [], random.Random(0)))) == 8


def test_fewshot_collapses_whitespace_and_custom_template():
    seeds = [f"Line one {i}\n\nline   two" for i in range(8)]
    prompt = build_fewshot_prompt(seeds, [], random.Random(0), template="Tasks:\n<TASKS_HERE>")
    assert prompt.startswith("Tasks:\nTask 1: Line one ")
    assert all(t.endswith(" line two") for t in prompt.split("\n")[1:-1])


def test_fewshot_errors():
    with pytest.raises(ValueError, match="only 5 are available"):
        build_fewshot_prompt(SEEDS[:5], [], random.Random(0))
    with pytest.raises(ValueError, match="<TASKS_HERE>"):
        build_fewshot_prompt(SEEDS, [], random.Random(0), template="no slot")


# ---- extract_instruction --------------------------------------------------------


@pytest.mark.parametrize(
    "generated, expected",
    [
        (" Write a haiku about rain.\nTask 10: Summarise this article.", "Write a haiku about rain."),
        (" Write a haiku about rain. Task 10: Summarise.", "Write a haiku about rain."),
        ("Task 9: Plan a trip to Rome.\nTask 10: x", "Plan a trip to Rome."),
        ("  Explain recursion.\n\nSome chatter after a blank line.", "Explain recursion."),
        (" Explain recursion.\n \nMore chatter.", "Explain recursion."),
        (" List three fruits:\n- apple\n- pear", "List three fruits:\n- apple\n- pear"),
        (" Give a short answer", "Give a short answer"),
        ("", None),
        ("   \n  ", None),
        ("Task 9:\nTask 10: next", None),
        (" Finish task 3: it is lowercase, so not a marker.", "Finish task 3: it is lowercase, so not a marker."),
    ],
)
def test_extract_instruction(generated, expected):
    assert extract_instruction(generated) == expected


# ---- PromptFilter ---------------------------------------------------------------


def test_rouge_rejects_near_duplicate_keeps_distinct():
    base = "Write a short poem about the ocean at night for children"
    f = PromptFilter()
    assert f.check(base) is None
    f.add(base)
    near = "Write a short poem about the forest at night for children"  # one word of 11 changed
    assert rouge(base, near) >= 0.7
    assert f.check(near) == f"rouge:{rouge(base, near):.3f}"
    distinct = "Explain how compound interest works with a simple example"
    assert rouge(base, distinct) < 0.7
    assert f.check(distinct) is None
    assert f.counts == {"rouge": 1}


def test_rouge_threshold_edge():
    a = "one two three four five six seven eight nine ten"
    b = "one two three four five six seven alpha beta gamma"
    assert rouge(a, b) == 0.7  # 7 of 10 tokens in common: F = 0.7 exactly
    f = PromptFilter(existing=[a])
    assert f.check(b) == "rouge:0.700"
    c = "one two three four five six alpha beta gamma delta"  # F = 0.6
    assert f.check(c) is None
    assert PromptFilter(max_rouge=0.71, existing=[a]).check(b) is None


def test_existing_prompts_are_compared():
    seed = "Describe the water cycle in simple terms for students"
    f = PromptFilter(existing=[seed])
    assert f.check("Describe the water cycle in simple terms for pupils").startswith("rouge:")
    assert f.check(seed.upper() + "  ") == "duplicate"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Draw a map of the town.", "blocklist:draw"),
        ("Please plan a route; go to the station first.", "blocklist:go to"),
        ("Describe this IMAGE in detail", "blocklist:image"),
        ("Write a song about music theory", "blocklist:music"),
        ("Explain data mapping in ETL pipelines", None),
        ("Summarise the profile of a filer", None),
        ("Explain graphical models briefly", None),
    ],
)
def test_blocklist_word_boundary(text, reason):
    assert PromptFilter().check(text) == reason


def test_blocklist_reports_first_hit_and_custom_list():
    assert PromptFilter().check("Draw a map of the town.") == "blocklist:draw"
    assert PromptFilter(blocklist=("town",)).check("Draw a map of the town.") == "blocklist:town"
    assert PromptFilter(blocklist=()).check("Draw a map of the town.") is None


def test_length_bounds():
    f = PromptFilter(min_words=3, max_words=5)
    assert f.check("") == "empty"
    assert f.check("  \n ") == "empty"
    assert f.check("Say hi") == "too_short"
    assert f.check("Say hi now") is None
    assert f.check("Say hi now to everyone") is None
    assert f.check("Say hi now to everyone here") == "too_long"
    assert f.counts == {"empty": 2, "too_short": 1, "too_long": 1}


def test_bad_start():
    f = PromptFilter()
    assert f.check('"Quote this sentence back to me"') == "bad_start"
    assert f.check("- Make a list of fruits") == "bad_start"
    assert f.check("Écris un poème sur la mer") == "bad_start"
    assert f.check("3 ways to stay warm in winter") is None


def test_exact_dedup_is_normalised():
    f = PromptFilter(max_rouge=1.01)  # ROUGE off: only exact dedup can reject
    f.add("Name three  primary colours.")
    assert f.check("name three primary colours.") == "duplicate"
    assert f.check("  NAME three\nprimary   colours. ") == "duplicate"
    assert f.check("Name three primary colours!") is None


def test_lcs_shortcut_equals_rouge_scorer():
    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "runs", "fast", "slow", "red", "blue", "Big", "small", "it's", "3", "x-ray"]
    f = PromptFilter()
    for _ in range(200):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 70)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(1, 70)))
        ref = SCORER.score(a, b)["rougeL"]
        ta, tb = f._tokenizer.tokenize(a), f._tokenizer.tokenize(b)
        masks = {}
        for i, t in enumerate(ta):
            masks[t] = masks.get(t, 0) | (1 << i)
        lcs = _lcs_length(masks, len(ta), tb)
        assert lcs == round(ref.recall * len(ta))
        # Same decision as the library at thresholds around the true score.
        for threshold in (ref.fmeasure, ref.fmeasure + 1e-12, 0.7):
            g = PromptFilter(max_rouge=threshold, min_words=1, max_words=1000, blocklist=(), existing=[a])
            # (an exact duplicate is rejected as "duplicate"; its ROUGE-L is 1 anyway)
            assert (g.check(b) is not None) == (ref.fmeasure >= threshold)


def test_filter_stream_keeps_prompts_mutually_distinct():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(30)]
    f = PromptFilter(existing=SEEDS)
    kept = []
    for _ in range(300):
        text = "Write " + " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12)))
        if f.check(text) is None:
            f.add(text)
            kept.append(text)
    assert len(kept) > 10 and len(f) == len(kept) + len(SEEDS)
    pool = SEEDS + kept
    for i, text in enumerate(kept):
        assert max(rouge(other, text) for other in pool[: len(SEEDS) + i]) < 0.7
