"""Shared prefixes in the sampler: a prompt prefilled once for its samples, a prefix every prompt of a call starts
with prefilled once per call, and the expected judge's digit probabilities from the sampling pass. Each against
the unshared sampler and a naive full forward, on meshes with one and several data-parallel replicas."""

import dataclasses

import jax
import numpy as np
import pytest

import jaxsr
from jaxsr import judging, make_mesh
from jaxsr.chat import chat_token_ids
from jaxsr.config import JudgeSection
from jaxsr.policy import forward_logits
from jaxsr.sample import _common_prefix, generate

PREFIX = list(range(40, 80))  # 40 tokens: above MIN_SHARED_PREFIX, bucket 48
# Ragged remainders (1 to 21 tokens) behind the shared prefix.
PROMPTS = [PREFIX + [5], PREFIX + [9, 17, 33, 2, 101], PREFIX + list(range(100, 121)), PREFIX + [300, 4, 4, 4]]
SAMPLED = dict(temperature=1.3, top_p=0.9, top_k=50, seed=11)


@pytest.fixture(scope="module")
def llama3(fixtures_dir):
    return jaxsr.load_policy(fixtures_dir / "hf" / "llama3")


def same(a, b, atol=1e-5):
    assert [[(c.token_ids, c.finish_reason, c.prompt_tokens) for c in x] for x in a] == \
        [[(c.token_ids, c.finish_reason, c.prompt_tokens) for c in x] for x in b]
    for x, y in zip(a, b):
        for c, d in zip(x, y):
            np.testing.assert_allclose(c.logprobs, d.logprobs, atol=atol, rtol=0)


def test_common_prefix_leaves_every_prompt_its_last_token():
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert _common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter prompt keeps its last token
    assert _common_prefix([[1, 2, 3], [1, 2, 3]]) == 0  # one distinct prompt: its samples share a prefill anyway
    assert _common_prefix([[7, 1], [8, 1]]) == 0


@pytest.mark.parametrize("kw", [dict(temperature=0.0), SAMPLED], ids=["greedy", "sampled"])
def test_shared_prefill_gives_the_unshared_completions_and_counts_each_prompt_once(llama3, kw):
    common = dict(num_samples=3, max_new_tokens=12, eos_token_ids=[2], **kw)
    shared, plain = {}, {}
    a = generate(llama3, PROMPTS, stats=shared, **common)
    b = generate(llama3, PROMPTS, stats=plain, share_prefixes=False, **common)
    same(a, b)
    assert shared["prefix_tokens"] == len(PREFIX) and plain["prefix_tokens"] == 0
    # The prefix once, then each distinct prompt's remainder once per data shard it has rows on (the default
    # 8-device mesh decodes the 4-head fixture on data 2 x tensor 4: 12 rows in two blocks of 8, one prompt split).
    (chunk,), = [shared["chunks"]]
    assert chunk["rows"] == 12 and chunk["batch"] == 16 and chunk["prefill_rows"] == 8
    remainders = [len(p) - len(PREFIX) for p in PROMPTS]
    assert sum(remainders) <= chunk["prefill_tokens"] <= sum(remainders) + max(remainders)
    assert plain["chunks"][0]["prefill_tokens"] == 3 * sum(len(p) for p in PROMPTS)
    assert plain["chunks"][0]["prefill_rows"] == 16


def test_shared_prefill_matches_a_naive_full_forward_on_other_meshes(fixtures_dir):
    # Greedy tokens and their log-probabilities against recomputing the full forward for every token, with the
    # prompts' samples and the shared prefix spread over 8 data-parallel replicas, and on one device.
    path = fixtures_dir / "hf" / "llama3"
    prompts = [[3, 8] + PREFIX + p[len(PREFIX):] for p in PROMPTS] + [[3, 8] + PREFIX[:30] + [77]]
    for mesh, tensor in ((make_mesh(data=1, fsdp=4, tensor=2), 1), (make_mesh(1, 1, 1, devices=jax.devices()[:1]), None)):
        policy = dataclasses.replace(jaxsr.load_policy(path, mesh=mesh), decode_tensor=tensor)
        stats = {}
        out = generate(policy, prompts, num_samples=2, max_new_tokens=6, temperature=0.0, eos_token_ids=[],
                       stats=stats)
        assert stats["prefix_tokens"] == 32
        seqs = [list(p) for p in prompts]
        for _ in range(6):
            width = max(map(len, seqs))
            ids, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), bool)
            for r, s in enumerate(seqs):
                ids[r, :len(s)], mask[r, :len(s)] = s, True
            logits = forward_logits(policy, ids, mask).astype(np.float64)
            for r, s in enumerate(seqs):
                s.append(int(np.argmax(logits[r, len(s) - 1])))
        for p, s, x in zip(prompts, seqs, out):
            assert [c.token_ids for c in x] == [s[len(p):]] * 2
        # Log-probabilities of the last step's full forward.
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for r, (p, x) in enumerate(zip(prompts, out)):
            want = [logp[r, len(p) + t - 1, tok] for t, tok in enumerate(x[0].token_ids[:5])]
            np.testing.assert_allclose(x[0].logprobs[:5], want, atol=2e-5, rtol=0)


def test_rows_depend_only_on_seed_prompt_and_sample_whatever_the_chunking(llama3):
    kw = dict(num_samples=4, max_new_tokens=10, eos_token_ids=[2], **SAMPLED)
    full = generate(llama3, PROMPTS, **kw)
    same(full, generate(llama3, PROMPTS, max_batch_rows=6, progress=False, **kw))  # samples split across chunks
    same(full, generate(llama3, PROMPTS, concurrency=3, **kw))
    # Another call (another shared prefix and other neighbours) gives prompt 0 the same rows.
    same([full[0]], [generate(llama3, [PROMPTS[0], PROMPTS[2][:45]], **kw)[0]])


def test_a_sliding_window_model_does_not_share_the_call_prefix(fixtures_dir):
    # The remainders sit after padding slots, and a window counts slots: no call-wide prefix with a window.
    policy = jaxsr.load_policy(fixtures_dir / "hf" / "mistral")
    policy = dataclasses.replace(policy, config=dataclasses.replace(policy.config, sliding_window=24))
    stats = {}
    a = generate(policy, PROMPTS[:2], num_samples=2, max_new_tokens=5, temperature=0.0, eos_token_ids=[], stats=stats)
    assert stats["prefix_tokens"] == 0
    same(a, generate(policy, PROMPTS[:2], num_samples=2, max_new_tokens=5, temperature=0.0, eos_token_ids=[],
                     share_prefixes=False))


def test_after_stop_probs_are_the_next_token_distribution_after_the_stop(world_policy, monkeypatch):
    # Random weights rarely write "score:" on their own, so the stop automaton is replaced by one that stops on a
    # token the rows produce; the captured masses are then the next-token probabilities after it, summed per group.
    policy = world_policy
    prompts = chat_token_ids(policy.tokenizer, ["List 2 fruits.", "Name three colors.", "Hi"])
    free = generate(policy, prompts, max_new_tokens=8, temperature=0.0, eos_token_ids=[])
    tok = free[1][0].token_ids[3]
    table = np.zeros((policy.config.vocab_size, 2), np.int32)
    table[tok] = 1
    from jaxsr import sample
    monkeypatch.setattr(sample, "stop_table", lambda tokenizer, vocab, kind: table)
    groups = [[5, 6], [7], [9, 10, 11]]
    out = generate(policy, prompts, max_new_tokens=8, temperature=0.0, eos_token_ids=[], stop="score",
                   after_stop_probs=groups)
    stopped = [r for r, x in enumerate(out) if x[0].finish_reason == "stop"]
    assert 1 in stopped
    for r, x in enumerate(out):
        c = x[0]
        if c.finish_reason != "stop":
            assert c.after_stop_probs is None
            continue
        seq = list(prompts[r]) + c.token_ids
        logits = forward_logits(policy, np.array([seq], np.int32), np.ones((1, len(seq)), bool))[0, -1].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        np.testing.assert_allclose(c.after_stop_probs, [p[g].sum() for g in groups], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="after_stop_probs needs a stop condition"):
        generate(policy, prompts, max_new_tokens=4, after_stop_probs=groups)
    with pytest.raises(ValueError, match=r"after_stop_probs group 1 must be a non-empty list of token ids in \[0, 1024\)"):
        generate(policy, prompts, max_new_tokens=4, stop="score", after_stop_probs=[[5], [1024]])


def bigram_policy(policy, chain):
    """`policy` made to follow `chain` greedily (token a -> b for each (a, b)): attention and MLP outputs zeroed,
    so the last hidden state is the normed embedding of the current token, and lm_head's column b points at a's."""
    import jax.numpy as jnp
    params = jax.tree.map(np.asarray, policy.params)
    for name in ("wo", "w_down"):
        params["layers"][name] = np.zeros_like(params["layers"][name])
    embed = params["embed"].astype(np.float64)
    h = embed / np.sqrt((embed ** 2).mean(-1, keepdims=True) + policy.config.rms_norm_eps) * params["final_norm"]
    head = np.array(params["lm_head"])
    for a, b in chain:
        head[:, b] = 10 * h[a] / np.linalg.norm(h[a])
    params["lm_head"] = head.astype(params["lm_head"].dtype)
    return dataclasses.replace(policy, params=jax.device_put(jax.tree.map(jnp.asarray, params)))


def test_expected_judge_reads_the_digits_from_the_sampling_pass(world_policy, monkeypatch):
    # A policy that writes "Score:" right after the request: the expected judge stops there and takes the digit
    # masses from that pass; no second forward runs, and the masses equal the second forward's.
    tok = world_policy.tokenizer
    requests = chat_token_ids(tok, ["List 2 fruits.", "Name three colors.", "Hi"])
    score, colon = tok("Score:", add_special_tokens=False)["input_ids"]
    policy = bigram_policy(world_policy, [(requests[0][-1], score), (score, colon)])
    sec = JudgeSection(mode="expected", max_new_tokens=6, temperature=0.0)
    second = []
    real = judging.expected_scores
    monkeypatch.setattr(judging, "expected_scores",
                        lambda p, ids, texts, **kw: second.append(len(ids)) or real(p, ids, texts, **kw))
    verdicts = judging.judge(policy, requests, sec, seed=0)
    assert [v[0][0] for v in verdicts] == ["Score:"] * 3
    assert second == [0]  # every row from the sampling pass
    want = real(policy, requests, [v[0][0] for v in verdicts])
    for (text, score_, mass), (ws, wm) in zip((v[0] for v in verdicts), want):
        np.testing.assert_allclose(mass, wm, rtol=1e-4, atol=1e-7)
        assert score_ == pytest.approx(ws, rel=1e-4)
    # Without the stop at the score, every row goes through the second forward.
    second.clear()
    judging.judge(policy, requests, dataclasses.replace(sec, stop_at_score=False), seed=0)
    assert second == [3]



@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama2"])  # attention biases, q/k norms, a BOS tokenizer
def test_shared_prefill_equals_the_unshared_one_for_other_families(fixtures_dir, family):
    policy = jaxsr.load_policy(fixtures_dir / "hf" / family)
    kw = dict(num_samples=2, max_new_tokens=8, eos_token_ids=[], **SAMPLED)
    stats = {}
    a = generate(policy, PROMPTS[:3], stats=stats, **kw)
    assert stats["prefix_tokens"] == len(PREFIX)
    same(a, generate(policy, PROMPTS[:3], share_prefixes=False, **kw))
