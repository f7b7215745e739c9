"""The `expected` judge mode's digit masses against full logits, and what the compiled function sends to the host."""

import jax
import numpy as np
import pytest

import jaxsr
from jaxsr import judge_scores, judging
from jaxsr.chat import chat_token_ids
from jaxsr.model.sharding import batch_multiple

# Rows of different lengths: with and without "Score:", with text after it, one empty justification.
JUSTIFICATIONS = ["The answer lists three colours.\nScore: 4", "Too short.", "Score: 2 but then more words",
                  "", "It follows every instruction and is concise, so it deserves a high mark overall."]
INSTRUCTIONS = ["List 2 fruits.", "Write one sentence about the sea and the wind and the rain.", "Hi",
                "Name three colors.", "Respond with exactly five words about cats."]


@pytest.fixture(scope="module")
def policy(world_policy):
    return world_policy


def naive_expected_scores(policy, request_ids, justifications):
    """The old computation: whole [B, T, V] logits on the host, last position, softmax in float64."""
    tok = policy.tokenizer
    rows = []
    for req, text in zip(request_ids, justifications):
        idx = text.lower().rfind("score:")
        prefix = text[: idx + len("score:")] if idx >= 0 else text.rstrip() + "\nScore:"
        rows.append(list(req) + tok(prefix, add_special_tokens=False)["input_ids"])
    length = max(16, 1 << (max(len(r) for r in rows) - 1).bit_length())
    ids = np.full((len(rows), length), policy.pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, True
    logits_BxV = jaxsr.forward_logits(policy, ids, mask)[:, -1].astype(np.float64)
    probs_BxV = np.exp(logits_BxV - logits_BxV.max(-1, keepdims=True))
    probs_BxV /= probs_BxV.sum(-1, keepdims=True)
    spellings = [[tok(s, add_special_tokens=False)["input_ids"] for s in (str(k), f" {k}")] for k in range(6)]
    mass_Bx6 = np.stack([sum(probs_BxV[:, s[0]] for s in sp if len(s) == 1) for sp in spellings], axis=1)
    return mass_Bx6 @ np.arange(6) / mass_Bx6.sum(1), mass_Bx6, ids, mask


def test_expected_scores_match_full_logits(policy):
    request_ids = chat_token_ids(policy.tokenizer, INSTRUCTIONS)
    assert len({len(r) for r in request_ids}) > 1
    ref_scores, ref_mass, _, _ = naive_expected_scores(policy, request_ids, JUSTIFICATIONS)
    got = judging.expected_scores(policy, request_ids, JUSTIFICATIONS)
    assert len(got) == len(JUSTIFICATIONS)
    np.testing.assert_allclose(np.array([m for _, m in got]), ref_mass, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.array([s for s, _ in got]), ref_scores, rtol=1e-5, atol=1e-6)
    # Every digit has two single-token spellings in the world tokenizer, so each mass sums two probabilities.
    assert all(len(v) == 2 for v in judge_scores.digit_token_ids(policy.tokenizer).values())


def test_compiled_function_returns_only_the_digit_masses(policy):
    request_ids = chat_token_ids(policy.tokenizer, INSTRUCTIONS)
    _, _, ids, mask = naive_expected_scores(policy, request_ids, JUSTIFICATIONS)
    B = -len(ids) % batch_multiple(policy.mesh) + len(ids)
    fn = judge_scores.digit_mass_fn(policy.config, policy.mesh, policy.dtype, policy.rules,
                                    judge_scores.digit_id_table(policy.tokenizer))
    ids_BxT = jax.ShapeDtypeStruct((B, ids.shape[1]), np.int32)
    mask_BxT = jax.ShapeDtypeStruct((B, ids.shape[1]), np.bool_)
    compiled = fn.lower(policy.params, ids_BxT, mask_BxT).compile()
    out = jax.eval_shape(fn, policy.params, ids_BxT, mask_BxT)
    assert (out.shape, out.dtype) == ((B, 6), np.float32)
    assert compiled.out_info.shape == (B, 6)
    # XLA's count of the bytes each device's program returns: its rows' 6 float32 masses, no [B, T, V] logits.
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.output_size_in_bytes == B // batch_multiple(policy.mesh) * 6 * 4
