"""The next-token draw against a float64 numpy reference distribution (temperature, top-k, top-p, greedy)."""

import jax
import numpy as np
import pytest

from jaxsr.next_token import sample_tokens


def reference_distribution(logits, temperature, top_k, top_p):
    """The target distribution in float64, written independently of the sampler (no bisection, no CDF)."""
    logits = np.asarray(logits, np.float64)
    keep = np.ones(len(logits), bool)
    if top_k:
        keep &= logits >= np.sort(logits)[::-1][top_k - 1]
    p = np.where(keep, np.exp((logits - logits.max()) / temperature), 0.0)
    if top_p < 1:
        total = p.sum()
        keep &= np.array([p[p > q].sum() < top_p * total for q in p])  # mass strictly above each token
        p = np.where(keep, p, 0.0)
    return p / p.sum()


# 40 tokens = 3 CDF blocks; exact ties at 1.5 (three tokens) straddle the top-p cut of case "top_p".
LOGITS = np.round(np.random.RandomState(0).normal(0, 1.5, 40), 1)
LOGITS[[3, 17, 29]] = 1.5
CASES = {
    "temperature": (0.7, 0, 1.0),
    "top_k": (1.0, 7, 1.0),
    "top_p": (1.3, 0, float(reference_distribution(LOGITS, 1.3, 0, 1.0)[LOGITS > 1.5].sum() + 0.03)),
    "top_k_top_p": (0.8, 20, 0.8),
    "tiny_top_p_flat": (50.0, 0, 0.04),  # most proposals rejected: exercises the exact bisection fallback
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_distribution_matches_numpy(case):
    temperature, top_k, top_p = CASES[case]
    n = 200_000
    want = reference_distribution(LOGITS, temperature, top_k, top_p)
    draw = jax.jit(lambda l, k: sample_tokens(l, k, temperature=temperature, top_p=top_p, top_k=top_k))
    tokens = np.asarray(draw(np.tile(LOGITS.astype(np.float32), (n, 1)), jax.random.split(jax.random.key(11), n)))
    got = np.bincount(tokens, minlength=len(LOGITS)) / n
    assert got[want == 0].sum() == 0, "a token outside the top-k / top-p truncation was sampled"
    # With 200k draws the empirical total variation to the true distribution is ~0.003 (sum over tokens of
    # sqrt(p(1-p)/n)/2 for these ~10-40 tokens); 0.01 is > 3x that, while a wrong cut or temperature moves
    # at least one token's mass by a few percent.
    assert 0.5 * np.abs(got - want).sum() < 0.01, (got, want)


def test_ties_at_the_top_p_threshold_are_all_kept():
    want = reference_distribution(LOGITS, *CASES["top_p"])
    assert np.all(want[LOGITS == 1.5] > 0) and np.all(want[LOGITS < 1.5] == 0)


def test_greedy_is_argmax():
    logits = np.random.RandomState(1).normal(size=(64, 40)).astype(np.float32)
    logits[0, [4, 9]] = 10.0  # a tie: the first index wins, as np.argmax
    keys = jax.random.split(jax.random.key(0), 64)
    np.testing.assert_array_equal(sample_tokens(logits, keys, temperature=0.0), logits.argmax(-1))
