"""Head-to-head evaluation (paper Fig. 3): the win rate and its Wilson interval against published and hand-computed
values, the both-orders tie rule with a stub judge, request truncation."""

import json
import types

import numpy as np
import pytest

from jaxsr import headtohead
from jaxsr.evaluate import head_to_head, wilson_interval
from jaxsr.sample import Completion


# --- the numbers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("successes, n, lo, hi", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17, Table I
    # (method 3, Wilson score without continuity correction).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_newcombe_1998(successes, n, lo, hi):
    got = wilson_interval(successes / n, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_hand_computed_and_solves_the_score_equation():
    # p = 0.7, n = 10, z^2 = 3.841459: center (0.7 + 0.192073) / 1.384146 = 0.644493,
    # half 1.959964 / 1.384146 * sqrt(0.021 + 3.841459 / 400) = 1.416011 * 0.174939 = 0.247715.
    lo, hi = wilson_interval(0.7, 10)
    assert (lo, hi) == pytest.approx((0.644493 - 0.247715, 0.644493 + 0.247715), abs=2e-6)
    z = 1.959963984540054
    roots = np.roots([1 + z * z / 10, -(2 * 0.7 + z * z / 10), 0.49])  # (p_hat - p)^2 = z^2 p (1 - p) / n
    assert sorted(roots) == pytest.approx([lo, hi], abs=1e-12)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0.5, 0)


def test_win_rate_counts_ties_as_half_with_its_interval():
    # 3 wins, 4 ties (2 inconsistent, 1 both-tie, 1 unparsed), 1 loss: (3 + 4/2) / 8 = 0.625.
    ab = ["A", "A", "A", "B", "A", "B", "tie", None]
    ba = ["B", "B", "B", "A", "A", "B", "tie", "B"]
    res = head_to_head(ab, ba)
    assert (res["wins"], res["ties"], res["losses"], res["inconsistent"], res["unparsed"]) == (3, 4, 1, 2, 1)
    assert res["win_rate"] == pytest.approx(0.625)
    assert res["win_rate_ci95"] == pytest.approx(list(wilson_interval(0.625, 8)))
    assert head_to_head([], [])["win_rate"] is None and head_to_head([], [])["win_rate_ci95"] is None


def test_tally_reads_the_judge_texts_of_both_orders():
    texts_ab = ["A is right. [[A]]", "[[B]]", "B quotes [[A]] but [[B]]", "no verdict", "Output (a)"]
    texts_ba = ["[[B]]", "[[A]]", "[[A]]", "[[B]]", "[[A]]"]
    # win; loss; loss (the last mark counts); unparsed -> tie; inconsistent (A first both times) -> tie.
    res = headtohead.tally(texts_ab, texts_ba)
    assert (res["wins"], res["ties"], res["losses"], res["unparsed"], res["inconsistent"]) == (1, 2, 2, 1, 1)
    assert res["win_rate"] == pytest.approx((1 + 2 / 2) / 5)


# --- the protocol with a stub judge ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from jaxsr.world import load_tokenizer

    return load_tokenizer()


def _stub_generate(judge_rule):
    """`generate` for fake policies: a policy answers with its `answer`; the judge applies `judge_rule(a, b)` to
    the two outputs it reads in the request."""
    def generate(policy, ids, *, max_new_tokens, temperature, **_):
        assert temperature == 0.0  # greedy answers and verdicts
        out = []
        for row in ids:
            text = policy.tokenizer.decode(row)
            if "## Output A:" in text:
                a = text.split("## Output A:\n")[1].split("\n\n## Output B:")[0]
                b = text.split("## Output B:\n")[1].split("\n\n## Which")[0]
                reply = judge_rule(a, b)
            else:
                reply = policy.answer(text)
            out.append([Completion([], reply, [], "eos", len(row))])
        return out
    return generate


def _policy(tok, answer, context=4096):
    return types.SimpleNamespace(tokenizer=tok, answer=answer, config=types.SimpleNamespace(max_position_embeddings=context))


def test_both_orders_with_a_stub_judge(tok, monkeypatch):
    questions = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    right = _policy(tok, lambda q: "3" if "1 + 2" in q else "7" if "3 + 4" in q else "11" if "5 + 6" in q else "16")
    wrong = _policy(tok, lambda q: "3" if "1 + 2" in q else "0")  # right on the first question only

    def fair(a, b):  # prefers the right answer; a tie of equal answers makes it pick the first shown
        def ok(x):
            return x in ("3", "7", "11", "15")
        return "[[A]]" if ok(a) or not ok(b) else "[[B]]"

    monkeypatch.setattr(headtohead, "generate", _stub_generate(fair))
    res = headtohead.compare(right, wrong, questions, max_new_tokens=4, judge_max_new_tokens=8, names=("R", "W"))
    # q1: both "3" -> A then A: inconsistent, a tie. q2, q3: R right -> wins. q4: both wrong ("16", "0"), the
    # judge picks the first shown both times -> a tie.
    assert (res["wins"], res["ties"], res["losses"], res["inconsistent"]) == (2, 2, 0, 2)
    assert res["win_rate"] == pytest.approx(0.75)
    assert (res["a"], res["b"], res["judge"], res["ci_method"]) == ("R", "W", "R", "wilson")
    assert [p["output_a"] for p in res["prompts"]] == ["3", "7", "11", "16"]
    assert [(p["verdict_ab"], p["verdict_ba"]) for p in res["prompts"]][1] == ("A", "B")

    monkeypatch.setattr(headtohead, "generate", _stub_generate(lambda a, b: "[[A]]"))  # pure position bias
    res = headtohead.compare(right, wrong, questions, max_new_tokens=4, judge_max_new_tokens=8)
    assert (res["wins"], res["ties"], res["losses"], res["win_rate"]) == (0, 4, 0, 0.5)


def test_pairwise_request_cuts_both_outputs_to_the_same_budget(tok):
    long_a, long_b = "one two three " * 40, "four five six " * 40
    short = headtohead.pairwise_request_ids(tok, 4096, "Count.", "a", "b", max_new_tokens=8)
    assert short[1] is False
    ids, cut = headtohead.pairwise_request_ids(tok, 400, "Count.", long_a, long_b, max_new_tokens=8)
    assert cut and len(ids) <= 392
    text = tok.decode(ids)
    a = text.split("## Output A:\n")[1].split("\n\n## Output B:")[0]
    b = text.split("## Output B:\n")[1].split("\n\n## Which")[0]
    n_a, n_b = (len(tok(x, add_special_tokens=False)["input_ids"]) for x in (a, b))
    assert abs(n_a - n_b) <= 2 and n_a > 20  # equal budgets, and the room is used
    with pytest.raises(ValueError, match="does not fit the judge's context"):
        headtohead.pairwise_request_ids(tok, 128, "Count.", long_a, long_b, max_new_tokens=8)
