import json
import math
import random

import pytest

from jaxsr.evaluate import (
    PAIRWISE_TEMPLATE,
    exact_match,
    five_best,
    head_to_head,
    iteration_summary,
    kendall_tau,
    load_pairwise_template,
    pairwise_accuracy,
    parse_pairwise_verdict,
    render_pairwise_prompt,
    reward_model_report,
    scores_from_ranks,
    spearman,
    world_metrics,
)

# Four prompts; every expected value below is worked out by hand in the comments.
MODEL = [[5, 4, 4], [None, 3, 2], [4.4, 4.67], [3, 4.5]]
REF = [[3, 2, 1], [1, 1, 0], [2, 1], [0, 1]]


def test_scores_from_ranks():
    assert scores_from_ranks([0, 1, 2]) == [0.0, -1.0, -2.0]


def test_pairwise_accuracy_hand_computed():
    # p0: (0,1) agree, (0,2) agree, (1,2) model tie -> 2/3.  p1: (0,1) reference tie, not counted;
    # (0,2) None -> disagree; (1,2) agree.  p2: reversed -> 0/1.  p3: agree -> 1/1.  Total 4/7.
    assert pairwise_accuracy(MODEL, REF) == pytest.approx(4 / 7)
    assert pairwise_accuracy([[1, 2]], [[2, 1]]) == 0.0
    assert pairwise_accuracy([[4, 4]], [[2, 1]]) == 0.0  # an all-ties judge gets no credit
    assert pairwise_accuracy([[1, 2]], [[1, 1]]) is None  # no pair with different reference scores


def test_five_best_hand_computed():
    # Model 5s (>= 4.5 after half-up rounding): p0[0] (top: hit), p2[1] = 4.67 (not top: miss),
    # p3[1] = 4.5 (top: hit); 4.4 is not a 5.  -> 2/3.
    assert five_best(MODEL, REF) == pytest.approx(2 / 3)
    assert five_best([[5, 5, 1]], [[1, 1, 0]]) == 1.0  # both reference-tied tops count
    assert five_best([[4, 3]], [[1, 0]]) is None


def test_exact_match_hand_computed():
    # p0 model tie vs distinct refs: no; p1 None: no; p2 reversed: no; p3 same order: yes -> 1/4.
    assert exact_match(MODEL, REF) == 0.25
    assert exact_match([[5, 3, 3]], [[2, 1, 1]]) == 1.0  # ties in the same places match
    assert exact_match([[5, 3, 2]], [[2, 1, 1]]) == 0.0  # a model split of a reference tie does not
    assert exact_match([[5]], [[1]]) is None  # one response: no ordering to match


# Correlation cases: A has a model tie, B is reversed, C has a parse failure (dropped), D is constant, E has
# a single scored response (both skipped).
CORR_MODEL = [[5, 4, 4], [1, 2, 3, 4], [None, 3, 1, 2], [4, 4, 4], [None, None, 3]]
CORR_REF = [[3, 2, 1], [4, 3, 2, 1], [4, 3, 2, 1], [3, 2, 1], [3, 2, 1]]
# A: average ranks x=(3,1.5,1.5), y=(3,2,1): cov 1.5, var 1.5 and 2 -> rho = 1.5/sqrt(3) = sqrt(3)/2.
#    tau-b: concordance signs +1,+1,0; untied pairs 2 (x) and 3 (y) -> 2/sqrt(6).
# B: rho = tau = -1.
# C: x=(3,1,2), y=(3,2,1): rho = 1/2; tau = (1+1-1)/3 = 1/3.
RHO = [math.sqrt(3) / 2, -1.0, 0.5]
TAU = [2 / math.sqrt(6), -1.0, 1 / 3]


def test_spearman_and_kendall_hand_computed():
    assert spearman(CORR_MODEL, CORR_REF) == pytest.approx(sum(RHO) / 3, abs=1e-12)
    assert kendall_tau(CORR_MODEL, CORR_REF) == pytest.approx(sum(TAU) / 3, abs=1e-12)
    for (m, r), rho, tau in zip(zip(CORR_MODEL, CORR_REF), RHO, TAU):
        assert spearman([m], [r]) == pytest.approx(rho, abs=1e-12)
        assert kendall_tau([m], [r]) == pytest.approx(tau, abs=1e-12)
    assert spearman(CORR_MODEL[3:], CORR_REF[3:]) is None
    assert kendall_tau([[1, 2]], [[1, 1]]) is None  # constant reference: skipped too


def test_correlations_match_scipy_on_random_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 7)
        m = [rng.choice([1, 2, 3, 4, 5]) for _ in range(n)]
        r = [rng.choice([0, 1, 2, 3]) for _ in range(n)]
        if len(set(m)) < 2 or len(set(r)) < 2:
            assert spearman([m], [r]) is None and kendall_tau([m], [r]) is None
            continue
        assert spearman([m], [r]) == pytest.approx(stats.spearmanr(m, r).statistic, abs=1e-12)
        assert kendall_tau([m], [r]) == pytest.approx(stats.kendalltau(m, r, variant="b").statistic, abs=1e-12)


def test_kendall_matches_naive_count():
    # tau-b from explicit concordant/discordant/tie counts (Kendall 1945), on one hand-made prompt.
    x, y = [1, 2, 2, 3, 5], [2, 1, 3, 3, 4]
    c = d = tx = ty = 0
    for i in range(5):
        for j in range(i + 1, 5):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx * dy > 0:
                c += 1
            else:
                d += 1
    expected = (c - d) / math.sqrt((c + d + tx) * (c + d + ty))
    assert kendall_tau([x], [y]) == pytest.approx(expected, abs=1e-12)


def test_reward_model_report_counts_and_json():
    rep = reward_model_report(MODEL, REF)
    assert rep["pairwise_accuracy"] == pytest.approx(4 / 7)
    assert rep["five_best"] == pytest.approx(2 / 3)
    assert rep["exact_match"] == 0.25
    assert (rep["prompts"], rep["responses"], rep["pairs"]) == (4, 10, 7)
    assert (rep["parse_failures"], rep["scored_top"]) == (1, 3)
    assert rep["parse_failure_rate"] == pytest.approx(0.1)
    # p0 is usable; p1 drops None -> x=(3,2), y=(1,0); p2 and p3 have 2 distinct values each.
    assert rep["correlation_prompts"] == 4
    json.dumps(rep, allow_nan=False)
    empty = reward_model_report([[None, None]], [[1, 0]])
    json.dumps(empty, allow_nan=False)  # undefined metrics are None, not NaN
    assert empty["spearman"] is None and empty["five_best"] is None


def test_shape_errors():
    with pytest.raises(ValueError, match="prompt 1: 1 model scores for 2 reference scores"):
        pairwise_accuracy([[1, 2], [3]], [[1, 2], [1, 2]])
    with pytest.raises(ValueError, match="3 prompts"):
        spearman([[1]] * 3, [[1]] * 2)
    with pytest.raises(ValueError, match="reference scores must all be numbers"):
        exact_match([[1, 2]], [[1, None]])


@pytest.mark.parametrize("text, verdict", [
    ("Output (a)", "A"),
    ("  output (b).\n", "B"),
    ("A is shorter; I first thought [[A]], but B is correct. [[B]]", "B"),
    ("**[[ A ]]**", "A"),
    ("Both are equally good. [[C]]", "tie"),
    ("[[tie]]", "tie"),
    ("I think Output (a) is better", None),  # AlpacaEval form only as the whole reply
    ("[[D]]", None),
    ("", None),
    (None, None),
])
def test_parse_pairwise_verdict(text, verdict):
    assert parse_pairwise_verdict(text) == verdict


def test_render_pairwise_prompt_fills_each_slot_once():
    out = render_pairwise_prompt("Say hi.", "hi <OUTPUT_B_HERE>", "hello")
    assert "## Instruction:\nSay hi.\n" in out
    assert "## Output A:\nhi <OUTPUT_B_HERE>\n" in out  # slot text inside an output is not substituted
    assert "## Output B:\nhello\n" in out
    assert "[[A]]" in PAIRWISE_TEMPLATE and "[[B]]" in PAIRWISE_TEMPLATE
    with pytest.raises(ValueError, match="<OUTPUT_B_HERE>"):
        render_pairwise_prompt("x", "a", "b", template="<INSTRUCTION_HERE> <OUTPUT_A_HERE>")


def test_head_to_head_both_orders():
    ab = ["A", "B", "A", "tie", "A", None, "B"]
    ba = ["B", "A", "A", "tie", "tie", "B", "B"]
    # win; loss; inconsistent; tie; inconsistent; unparsed; inconsistent.
    res = head_to_head(ab, ba)
    assert (res["wins"], res["ties"], res["losses"], res["n"]) == (1, 5, 1, 7)
    assert (res["inconsistent"], res["unparsed"]) == (3, 1)
    assert res["win"] == pytest.approx(1 / 7) and res["tie"] == pytest.approx(5 / 7)
    assert res["win"] + res["tie"] + res["loss"] == pytest.approx(1.0)
    assert head_to_head([], [])["win"] is None
    with pytest.raises(ValueError, match="prompt 0"):
        head_to_head(["a"], ["B"])
    with pytest.raises(ValueError, match="2 verdicts with X as A but 1"):
        head_to_head(["A", "B"], ["B"])


def test_world_metrics():
    assert world_metrics([5, 3, 5, 0]) == {"world_score": 3.25, "world_perfect": 0.5, "n": 4}
    assert world_metrics([]) == {"world_score": None, "world_perfect": None, "n": 0}
    with pytest.raises(ValueError, match="None/NaN"):
        world_metrics([5, None])


def test_iteration_summary():
    stats = {
        "candidates": {"stage": "candidates", "candidates": 40, "mean_tokens": 120.5},
        "judgements": {"stage": "judgements", "parse_failure_rate": 0.05,
                       "score_histogram": {"0": 0, "1": 1, "2": 0, "3": 2, "4": 5, "5": 2}},
        "pairs": {"stage": "pairs", "pairs": 7, "tie_rate": 0.3, "mean_chosen_tokens": 150.0,
                  "mean_rejected_tokens": 110.0},
    }
    s = iteration_summary(stats)
    assert (s["candidates"], s["mean_candidate_tokens"], s["pairs"], s["tie_rate"]) == (40, 120.5, 7, 0.3)
    assert s["parse_failure_rate"] == 0.05
    assert s["mean_score"] == pytest.approx((1 + 6 + 20 + 10) / 10)
    assert s["share_score_5"] == pytest.approx(0.2)
    assert s["chosen_minus_rejected_tokens"] == 40.0
    partial = iteration_summary({"candidates": stats["candidates"]})
    assert partial["pairs"] is None and partial["mean_score"] is None and partial["score_histogram"] is None


def test_pairwise_template_is_the_default_or_a_file_with_the_three_slots(tmp_path):
    assert load_pairwise_template("default") == PAIRWISE_TEMPLATE
    good = tmp_path / "short.txt"
    good.write_text("Q: <INSTRUCTION_HERE>\nA: <OUTPUT_A_HERE>\nB: <OUTPUT_B_HERE>\n")
    assert load_pairwise_template(str(good)) == "Q: <INSTRUCTION_HERE>\nA: <OUTPUT_A_HERE>\nB: <OUTPUT_B_HERE>"
    assert render_pairwise_prompt("i", "a", "b", load_pairwise_template(str(good))) == "Q: i\nA: a\nB: b"
    bad = tmp_path / "bad.txt"
    bad.write_text("Q: <INSTRUCTION_HERE>\nA: <OUTPUT_A_HERE>")
    with pytest.raises(ValueError, match="has no <OUTPUT_B_HERE> slot"):
        load_pairwise_template(str(bad))
    with pytest.raises(FileNotFoundError, match="pass 'default'"):
        load_pairwise_template(str(tmp_path / "missing.txt"))
