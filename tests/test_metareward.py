"""Meta-Rewarding (jaxsr/metareward.py): the meta-judge's verdict parsing, both-order position weights, Elo by
maximum likelihood on hand-computed cases, the choice of uncertain candidates, and the loop with it on."""

import math

import numpy as np
import pytest

from jaxsr import metareward as mr


@pytest.mark.parametrize("text, verdict", [
    ("Judgement A misses the count.\nWinner: Judgement B", "B"),
    ("winner: judgment a", "A"),                      # the paper's and NeMo's spelling "Judgment"
    ("Winner: [Judgement A]", "A"),
    ("**Winner:** Judgement B", "B"),                 # markdown emphasis around the statement
    ("Winner: B.", "B"),
    ("Winner: Judgement A ... on reflection, Winner: Judgement B", "B"),  # the last statement counts
    ("Winner: Judgement C", None),
    ("Both are fine.", None),
    ("Winner: Alice", None),                          # a word that starts with A is not a verdict
    ("", None),
])
def test_parse_winner(text, verdict):
    assert mr.parse_winner(text) == verdict


def test_render_meta_prompt_fills_rubric_response_and_both_judgements():
    t = mr.render_meta_prompt("Rubric.\nQ: <INSTRUCTION_HERE>\nA: <RESPONSE_HERE>", "Add 2 and 2.", "4",
                              "Correct. Score: 5", "Wrong. Score: 1")
    assert t.startswith("Rubric.\nQ: Add 2 and 2.\nA: 4\n\nReview the user's question")
    assert t.index("Judgement A:\nCorrect. Score: 5") < t.index("Judgement B:\nWrong. Score: 1")
    assert t.endswith('"Winner: [Judgement A | Judgement B]"')


def test_position_weights_count_wins_over_both_orders():
    # 6 valid verdicts: the first-shown judgement won 4 times, the second 2 times (one unparsed one ignored).
    w1, w2 = mr.position_weights(["A", "A", "B", "A", None, "B", "A"])
    assert (w1, w2) == (2 / 6, 4 / 6)  # the position that wins more often counts less
    assert mr.position_weights(["A", "A"]) == (0.0, 1.0)  # a judge that always picks A says nothing in first place
    assert mr.position_weights([None]) == (0.5, 0.5)


def test_elo_two_players_is_the_log_odds_of_their_wins():
    # A beat B 3 times, B beat A once: the maximum-likelihood gap is 400 log10(3) (L2 penalty off).
    r = mr.elo(2, [(0, 1, 1.0)] * 3 + [(1, 0, 1.0)], l2=0.0)
    assert math.isclose(r[0] - r[1], 400 * math.log10(3), rel_tol=1e-9)
    assert math.isclose(r.mean(), 1000.0)
    # Weights act as counts: one win of weight 3 against one of weight 1 is the same fit.
    np.testing.assert_allclose(mr.elo(2, [(0, 1, 3.0), (1, 0, 1.0)], l2=0.0), r, rtol=1e-12)


def test_elo_three_players_satisfy_the_likelihood_equations():
    outcomes = [(0, 1, 2.0), (1, 0, 1.0), (1, 2, 2.0), (2, 1, 1.0), (0, 2, 3.0), (2, 0, 1.0)]
    r = mr.elo(3, outcomes, l2=0.0)
    beta = (r - 1000.0) * math.log(10) / 400
    # At the maximum, each player's expected wins equal its observed (weighted) wins.
    for i in range(3):
        won = sum(w for a, _, w in outcomes if a == i)
        expected = sum(w / (1 + math.exp(beta[b] - beta[a])) if a == i else w / (1 + math.exp(beta[a] - beta[b]))
                       for a, b, w in outcomes if i in (a, b))
        assert math.isclose(won, expected, rel_tol=1e-8)
    assert r[0] > r[1] > r[2]


def test_elo_of_a_player_who_won_everything_stays_finite():
    r = mr.elo(2, [(0, 1, 1.0)] * 5)
    assert np.all(np.isfinite(r)) and r[0] > r[1]
    assert list(mr.elo(3, [])) == [1000.0] * 3


def test_candidate_elo_weights_wins_by_position():
    # Judgements 0 and 1, both orders: 0 won when shown first (verdict A), 1 won when shown first too.
    comps = [(0, 1, "A"), (1, 0, "A")]
    r = mr.candidate_elo(2, comps, w1=0.25, w2=0.75)
    assert math.isclose(r[0], r[1])  # one first-position win each: a tie
    # 0 wins in both orders: once first (w1) and once second (w2).
    r = mr.candidate_elo(2, [(0, 1, "A"), (1, 0, "B")], w1=0.25, w2=0.75)
    assert r[0] > r[1]
    # With w1 = 0 (a judge that always picks A), first-position wins say nothing.
    r = mr.candidate_elo(2, [(0, 1, "A"), (1, 0, "A")], w1=0.0, w2=1.0)
    assert list(r) == [1000.0, 1000.0]


def _judgement(pid, cid, jid, score, text=None, excluded=False):
    return {"prompt_id": pid, "candidate_id": cid, "judge_id": jid, "judge_text": text or f"t{pid}{cid}{jid}",
            "score": score, "excluded": excluded}


def test_uncertain_candidates_have_the_highest_score_variance_and_usable_judgements():
    rows = []
    for (pid, cid), scores in {(0, 0): [1, 5, 3], (0, 1): [4, 4, 4], (1, 0): [2, 3, 2], (1, 1): [0, 5, None],
                               (2, 0): [1, 5, 1]}.items():
        rows += [_judgement(pid, cid, j, s) for j, s in enumerate(scores)]
    rows.append(_judgement(3, 0, 0, 0.0, text="x" * 50))
    rows += [_judgement(3, 0, j, 5.0) for j in (1, 2)]
    too_long = lambda text: len(text) > 40  # noqa: E731
    picked = mr.uncertain_candidates(rows, 3, 2, too_long)
    # Population variances: (2, 0) [1, 5, 1] 32/9 = 3.56 > (0, 0) [1, 5, 3] 8/3 = 2.67 > (1, 0) [2, 3, 2] 2/9.
    assert [key for key, _ in picked] == [(2, 0), (0, 0)]
    assert [r["judge_id"] for r in picked[0][1]] == [0, 1, 2]
    keys = [k for k, _ in mr.uncertain_candidates(rows, 3, 10, too_long)]
    assert (0, 1) not in keys      # no variance: no preference among its judgements
    assert (1, 1) not in keys      # an unparsed judgement
    assert (3, 0) not in keys      # an over-long judgement
    assert keys == [(2, 0), (0, 0), (1, 0)]


def test_meta_config_needs_sampled_judgements():
    from jaxsr.config import CONFIG_DIR, ConfigValueError, load_config

    with pytest.raises(ConfigValueError, match="meta.enabled=true with judge.mode='expected'.*judge.num_judgements >= 2"):
        load_config(CONFIG_DIR / "tiny.yaml", ["meta.enabled=true", "judge.mode=expected"]).check_run()
    load_config(CONFIG_DIR / "tiny.yaml", ["meta.enabled=true"]).check_run()


def test_the_loop_with_meta_rewarding_trains_dpo_on_actor_and_judge_pairs(tmp_path, monkeypatch):
    """The judge_pairs stage in the loop at micro scale. A model trained for 4 steps writes no parsable score, so
    scripted stand-ins play the judge (seeded scores) and the meta-judge (it prefers the judgement that gives the
    higher score: the paper's score bias); everything else (selection, Elo, reference log-probs, DPO) is real."""
    import json
    import random
    import re

    from jaxsr import artifacts, backends, loop, selfreward
    from jaxsr.envs.arithmetic import JUDGE_TEMPLATE
    from jaxsr.sample import Completion
    from test_stages import _cfg

    def judge(policy, request_ids, sec, seed, **kw):
        rng = random.Random(seed)
        return [[(f"Score: {s}", float(s), []) for s in (rng.randint(0, 5) for _ in range(3))]
                for _ in request_ids]

    def meta_generate(policy, ids, **kw):
        out = []
        for row in ids:
            text = policy.tokenizer.decode(row)
            a, b = (int(re.search(rf"Judgement {x}:\nScore: (\d)", text).group(1)) for x in "AB")
            out.append([Completion(token_ids=[], text=f"Winner: Judgement {'A' if a >= b else 'B'}", logprobs=[],
                                   finish_reason="eos", prompt_tokens=len(row))])
        return out

    monkeypatch.setattr(selfreward, "judge", judge)
    real = backends.generate
    # The meta-judge's requests get the stand-in; every other stage samples as usual.
    monkeypatch.setattr(backends, "generate", lambda policy, ids, **kw: (
        meta_generate if "Judgement A:" in policy.tokenizer.decode(ids[0]) else real)(policy, ids, **kw))
    cfg = _cfg(tmp_path, "judge.mode=sampled", "judge.num_judgements=3", "judge.max_new_tokens=16",
               "meta.enabled=true", "meta.responses=6", "meta.iterations=[1]")
    loop.run(cfg)
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    meta, dpo = stages["iteration1/judge_pairs"]["result"], stages["iteration1/dpo"]["result"]
    assert "judge_pairs" in stages["iteration1/dpo"]["inputs"]  # the DPO stage records them as an input
    rows = artifacts.read_dataset(tmp_path / "iteration1" / "judge_pairs" / "meta").to_list()
    assert meta["candidates"] == 6
    assert meta["comparisons"] == len(rows) == 6 * 3 * 2  # every two of 3 judgements, both orders
    assert meta["verdicts"]["unparsed"] == 0 and sum(meta["verdicts"].values()) == len(rows)
    assert math.isclose(meta["w1"] + meta["w2"], 1.0)
    pairs = artifacts.read_dataset(tmp_path / "iteration1" / "judge_pairs" / "pairs").to_list()
    assert meta["judge_pairs"] == len(pairs) == dpo["judge_pairs"] > 0
    assert meta["judge_pairs"] + meta["no_preference"] == meta["candidates"]
    assert meta["chosen_scored_higher"] == len(pairs)  # the stand-in meta-judge's score bias, through the Elo
    actor = len(artifacts.read_dataset(tmp_path / "iteration1" / "pairs"))
    assert dpo["train_pairs"] == actor + len(pairs)
    for p in pairs:
        assert p["chosen_elo"] > p["rejected_elo"] and p["chosen"] != p["rejected"]
        # The judge request the judgements answered: the environment's template, filled in.
        assert p["prompt"].startswith(JUDGE_TEMPLATE.split("<INSTRUCTION_HERE>")[0]) and "<RESPONSE_HERE>" not in p["prompt"]
        assert np.isfinite(p["ref_chosen_logps"]) and np.isfinite(p["ref_rejected_logps"])


def test_world_meta_eft_rows_name_the_right_judgement_and_leave_other_splits_alone():
    from jaxsr.world.data import world_records
    from jaxsr.world.tasks import grade, judge_target

    sizes = dict(num_ift=20, num_eft=20, num_eval=10, num_rm_eval=10)
    plain, with_meta = world_records(3, **sizes), world_records(3, **sizes, num_meta_eft=30)
    assert {k: v for k, v in with_meta.items() if k != "eft"} == {k: v for k, v in plain.items() if k != "eft"}
    assert with_meta["eft"][:20] == plain["eft"][:20]
    meta = with_meta["eft"][20:]
    assert len(meta) == 30 and {m["response"] for m in meta} == {"Winner: Judgement A", "Winner: Judgement B"}
    for m in meta:
        import json

        spec = json.loads(m["spec"])
        right = judge_target(spec, m["candidate"])
        winner = m["response"][-1]
        shown = {x: m["prompt"].split(f"Judgement {x}:\n")[1].split("\n\n")[0] for x in "AB"}
        assert shown[winner] == right and shown["B" if winner == "A" else "A"] != right
        assert m["score"] == grade(spec, m["candidate"])[0]
        assert mr.parse_winner(m["response"]) == winner
