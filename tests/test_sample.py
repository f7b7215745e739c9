"""The sampler against transformers' greedy decoding and a naive full-forward decoder.

Compile time dominates on CPU, so the tests share a few shapes: prompts of <= 16 tokens with max_new_tokens
<= 20 (bucket 16 x 32) on the default 8-device mesh (batch 8 or 16), plus one long-prompt batch.
"""

import dataclasses

import jax
import numpy as np
import pytest

from jaxsr import load_policy, make_mesh
from jaxsr.chat import chat_token_ids, render_user_turn
from jaxsr.policy import forward_logits
from jaxsr import sample
from jaxsr.sample import Completion, generate

FAMILIES = ["llama2", "llama3", "llama_linear_bias", "mistral", "qwen2", "qwen3"]
# A ragged batch from 1 token to 100 (bucket 128); SHORT stays in the 16-token bucket of the fixture prompts.
SHORT = [[5], [9, 17, 33, 2, 101], list(range(40, 56)), [300, 4, 4, 4], [7, 8, 9]]
RAGGED = SHORT + [list(range(100, 200))]


@pytest.fixture(scope="module")
def policies(fixtures_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_policy(fixtures_dir / "hf" / family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def llama3(policies):
    return policies("llama3")


def reference(fixtures_dir, family):
    ref = np.load(fixtures_dir / "hf" / family / "reference.npz")
    prompts = [ref[f"greedy_prompt_{i}"].tolist() for i in range(3)]
    return prompts, [ref[f"greedy_{i}"].tolist() for i in range(3)]


def naive_greedy(policy, prompts, steps):
    """Greedy decoding that recomputes the full forward (right-padded, no cache) for every new token."""
    seqs = [list(p) for p in prompts]
    width = max(map(len, prompts)) + steps
    for _ in range(steps):
        ids, mask = right_pad(seqs, width)
        logits = forward_logits(policy, ids, mask)
        for r, s in enumerate(seqs):
            s.append(int(np.argmax(logits[r, len(s) - 1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def naive_logprobs(policy, prompts, completions):
    """log_softmax of the full-forward logits at each completion token (float64 on the host)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    ids, mask = right_pad(seqs, max(map(len, seqs)))
    logits = forward_logits(policy, ids, mask).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return [[logp[r, len(p) + t - 1, tok] for t, tok in enumerate(c)] for r, (p, c) in enumerate(zip(prompts, completions))]


def right_pad(seqs, width):
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, True
    return ids, mask


def assert_same(a, b):
    """Same completions: ids, texts and reasons exactly; logprobs up to float32 rounding (batch shapes differ)."""
    assert [[(c.token_ids, c.text, c.finish_reason, c.prompt_tokens) for c in x] for x in a] == \
        [[(c.token_ids, c.text, c.finish_reason, c.prompt_tokens) for c in x] for x in b]
    for x, y in zip(a, b):
        for c, d in zip(x, y):
            np.testing.assert_allclose(c.logprobs, d.logprobs, atol=1e-5, rtol=0)


def only(completions):
    assert all(len(c) == 1 for c in completions)
    return [c[0] for c in completions]


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, policies, fixtures_dir):
    prompts, expected = reference(fixtures_dir, family)
    out = only(generate(policies(family), prompts, max_new_tokens=20, temperature=0.0, eos_token_ids=[]))
    assert [c.token_ids for c in out] == expected
    assert all(c.finish_reason == "length" and len(c.logprobs) == 20 for c in out)


@pytest.mark.parametrize("family, prompts", [("llama3", RAGGED), ("mistral", SHORT)])  # mistral: sliding window
def test_greedy_and_logprobs_match_naive_full_forward(family, prompts, policies):
    policy = policies(family)
    out = only(generate(policy, prompts, max_new_tokens=20, temperature=0.0, eos_token_ids=[]))
    assert [c.token_ids for c in out] == naive_greedy(policy, prompts, 20)
    for got, want in zip([c.logprobs for c in out], naive_logprobs(policy, prompts, [c.token_ids for c in out])):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert [c.prompt_tokens for c in out] == [len(p) for p in prompts]


# ------------------------------------------------------------------ stopping and shapes


def test_eos_as_first_token_gives_empty_completion(llama3, fixtures_dir):
    prompts, expected = reference(fixtures_dir, "llama3")
    out = only(generate(llama3, prompts, max_new_tokens=20, temperature=0.0, eos_token_ids=[expected[0][0]]))
    assert out[0] == Completion([], "", [], "eos", len(prompts[0]))


def test_per_row_eos_stop_while_other_rows_continue(llama3, fixtures_dir):
    prompts, expected = reference(fixtures_dir, "llama3")
    # A token row 1 produces at step k but row 0 never produces: row 1 stops there, row 0 runs to the limit.
    k, eos = next((k, t) for k, t in enumerate(expected[1]) if t not in expected[1][:k] and t not in expected[0])
    out = only(generate(llama3, prompts, max_new_tokens=20, temperature=0.0, eos_token_ids=[999, eos]))
    assert out[1].token_ids == expected[1][:k] and out[1].finish_reason == "eos" and len(out[1].logprobs) == k
    assert out[0].token_ids == expected[0] and out[0].finish_reason == "length"


def test_default_eos_ids_come_from_the_policy(llama3):
    assert 2 in llama3.eos_token_ids
    out = only(generate(llama3, [[5, 9]], max_new_tokens=20, temperature=0.0))
    greedy = only(generate(llama3, [[5, 9]], max_new_tokens=20, temperature=0.0, eos_token_ids=[]))[0].token_ids
    want = greedy[:greedy.index(2)] if 2 in greedy else greedy
    assert out[0].token_ids == want


def test_one_prompt_and_max_new_tokens_one(llama3, fixtures_dir):
    prompts, expected = reference(fixtures_dir, "llama3")
    (c,), = generate(llama3, prompts[:1], max_new_tokens=1, temperature=0.0, eos_token_ids=[])
    assert c.token_ids == expected[0][:1] and c.finish_reason == "length" and len(c.logprobs) == 1


def test_a_chunk_ends_when_its_real_rows_end(llama3, fixtures_dir):
    # EOS ids each reference row produces within 3 greedy steps: every real row ends early, while the padding
    # rows (a batch of 4 holds 3 real rows, one of 8 holds 5; the decode layout's data axis is 2) would decode to
    # max_new_tokens if they counted.
    prompts, expected = reference(fixtures_dir, "llama3")
    eos = [row[2] for row in expected]
    for kw in (dict(), dict(num_samples=3, max_batch_rows=8)):  # one chunk; two chunks of 5 rows
        stats = {}
        out = generate(llama3, prompts, max_new_tokens=20, temperature=0.0, eos_token_ids=eos, stats=stats, **kw)
        assert all(c.finish_reason == "eos" for x in out for c in x)
        chunks = stats["chunks"]
        assert len(chunks) == (2 if kw else 1) and chunks[0]["rows"] < chunks[0]["batch"]
        assert sum(c["rows"] for c in chunks) == 3 * kw.get("num_samples", 1)
        longest = max(len(c.token_ids) for x in out for c in x) + 1  # + the EOS
        assert max(c["longest_row"] for c in chunks) == longest <= 3
        assert [c["decode_steps"] for c in chunks] == [c["longest_row"] for c in chunks]


def test_length_hints_put_rows_of_similar_length_into_one_chunk(llama3):
    # 16 prompts whose greedy completions end at different steps: EOS ids taken from their completions.
    prompts = [SHORT[i % 5][: 1 + i % 4] + [i + 3] for i in range(16)]
    free = generate(llama3, prompts, max_new_tokens=20, temperature=0.0, eos_token_ids=[])
    eos = sorted({c[0].token_ids[i % 12 + 2] for i, c in enumerate(free)})
    kw = dict(max_new_tokens=20, temperature=0.0, eos_token_ids=eos, max_batch_rows=8, progress=False)
    by_prompt, hinted = {}, {}
    out = generate(llama3, prompts, stats=by_prompt, **kw)
    lengths = [len(c[0].token_ids) + (c[0].finish_reason == "eos") for c in out]
    assert len(set(lengths)) > 2
    assert_same(out, generate(llama3, prompts, length_hints=lengths, stats=hinted, **kw))
    # Sorted by the true lengths, the 8 longest rows share one chunk: the other ends with the 9th longest.
    ordered = sorted(lengths, reverse=True)
    assert [c["decode_steps"] for c in hinted["chunks"]] == [ordered[0], ordered[8]]
    assert sum(c["decode_steps"] for c in hinted["chunks"]) <= sum(c["decode_steps"] for c in by_prompt["chunks"])
    with pytest.raises(ValueError, match="length_hints must hold one finite number per prompt"):
        generate(llama3, prompts, length_hints=[1.0], **kw)


def test_per_row_max_new_tokens(llama3, fixtures_dir):
    prompts, expected = reference(fixtures_dir, "llama3")
    stats = {}
    out = only(generate(llama3, prompts, max_new_tokens=[3, 20, 7], temperature=0.0, eos_token_ids=[], stats=stats))
    assert [c.token_ids for c in out] == [expected[0][:3], expected[1], expected[2][:7]]
    assert all(c.finish_reason == "length" for c in out) and stats["chunks"][0]["decode_steps"] == 20
    with pytest.raises(ValueError, match="max_new_tokens has 2 values for 3 prompts"):
        generate(llama3, prompts, max_new_tokens=[3, 20])
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1 \(prompt 1\)"):
        generate(llama3, prompts, max_new_tokens=[3, 0, 4])


def test_stop_condition_runs_on_the_device(llama3, fixtures_dir, monkeypatch):
    # A two-state automaton that stops on the token reference row 1 produces at step 5 (and no other row
    # produces): row 1 keeps that token and ends with "stop"; the other rows are unchanged.
    prompts, expected = reference(fixtures_dir, "llama3")
    k, tok = next((k, t) for k, t in enumerate(expected[1]) if k >= 5 and t not in expected[0] + expected[2])
    table = np.zeros((llama3.config.vocab_size, 2), np.int32)
    table[tok] = 1
    monkeypatch.setattr(sample, "stop_table", lambda tokenizer, vocab, kind: table)
    stats = {}
    out = only(generate(llama3, prompts, max_new_tokens=20, temperature=0.0, eos_token_ids=[], stop="score", stats=stats))
    assert out[1].token_ids == expected[1][:k + 1] and out[1].finish_reason == "stop" and len(out[1].logprobs) == k + 1
    assert [c.token_ids for c in (out[0], out[2])] == [expected[0], expected[2]]
    assert stats["chunks"][0]["decode_steps"] == 20
    bare = dataclasses.replace(llama3, tokenizer=None)
    with pytest.raises(ValueError, match="stop='score' needs the policy's tokenizer"):
        generate(bare, prompts, max_new_tokens=4, stop="score")


@pytest.mark.parametrize("n", [3, 13])  # fewer prompts than devices, and more but not a multiple of 8
def test_any_number_of_prompts_and_chunking(llama3, n):
    prompts = [SHORT[i % 4][: 1 + i % 5] + [i] for i in range(n)]
    kw = dict(max_new_tokens=20, temperature=1.0, seed=5, eos_token_ids=[2])
    full = generate(llama3, prompts, **kw)
    assert len(full) == n
    assert_same(full, generate(llama3, prompts, max_batch_rows=4, progress=False, **kw))  # 8-row chunks
    assert_same(full, generate(llama3, prompts, concurrency=3, **kw))  # chunks in parallel threads
    # A prompt's completions depend on its index and the seed, not on the rest of the batch.
    assert_same(generate(llama3, prompts[:1], **kw), full[:1])


def test_num_samples_determinism_and_seeds(llama3):
    kw = dict(num_samples=4, max_new_tokens=20, temperature=1.0, eos_token_ids=[])
    a = generate(llama3, SHORT[:2], seed=0, **kw)
    assert [len(x) for x in a] == [4, 4]
    assert len({tuple(c.token_ids) for c in a[0]}) == 4  # different rows, different streams
    assert generate(llama3, SHORT[:2], seed=0, **kw) == a
    b = generate(llama3, SHORT[:2], seed=1, **kw)
    assert [c.token_ids for c in b[0]] != [c.token_ids for c in a[0]]


def test_texts_are_decoded_without_special_tokens(llama3):
    (c,), = generate(llama3, ["Write a short poem"], max_new_tokens=20, temperature=0.0, eos_token_ids=[])
    assert c.text == llama3.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert c.prompt_tokens == len(llama3.tokenizer("Write a short poem")["input_ids"])
    ids = llama3.tokenizer("Write a short poem")["input_ids"]
    assert only(generate(llama3, [ids], max_new_tokens=20, temperature=0.0, eos_token_ids=[]))[0] == c
    bare = dataclasses.replace(llama3, tokenizer=None)
    assert only(generate(bare, [[5, 9]], max_new_tokens=20, temperature=0.0, eos_token_ids=[]))[0].text == ""


# ------------------------------------------------------------------ sharding


SAMPLED = dict(temperature=1.5, top_p=0.8, top_k=40, seed=7)  # all three truncations at once


@pytest.fixture(scope="module")
def sharded_vs_single(fixtures_dir):
    """Greedy and sampled completions of SHORT loaded on an fsdp=4 x tensor=2 mesh and on one device. The sampler
    decodes on its own layout: "sharded" on data 2 x tensor 4 (the automatic choice: 4 heads; the 2 kv heads
    repeated twice), "replicas" on data 8 x tensor 1, "single" on the one device."""
    path = fixtures_dir / "hf" / "llama3"  # 2 kv heads: tensor parallelism of 2 divides them
    out = {}
    for name, mesh, tensor in (("sharded", make_mesh(data=1, fsdp=4, tensor=2), None),
                               ("replicas", make_mesh(data=1, fsdp=4, tensor=2), 1),
                               ("single", make_mesh(1, 1, 1, devices=jax.devices()[:1]), None)):
        policy = dataclasses.replace(load_policy(path, mesh=mesh), decode_tensor=tensor)
        assert policy.for_decode().tensor == {"sharded": 4, "replicas": 1, "single": 1}[name]
        for mode, kw in (("greedy", dict(temperature=0.0)), ("sampled", SAMPLED)):
            out[name, mode] = generate(policy, SHORT, max_new_tokens=20, eos_token_ids=[2], num_samples=2, **kw)
        out[name, "policy"] = policy
    return out


@pytest.mark.parametrize("layout", ["sharded", "replicas"])
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_sharded_mesh_equals_single_device(sharded_vs_single, mode, layout):
    assert_same(sharded_vs_single[layout, mode], sharded_vs_single["single", mode])


def test_sampled_logprobs_are_the_unmodified_model_distribution(sharded_vs_single):
    # Temperature, top-k and top-p change which token is drawn, never the reported log-probability.
    policy, out = sharded_vs_single["single", "policy"], sharded_vs_single["sharded", "sampled"]
    prompts = [p for p in SHORT for _ in range(2)]
    completions = [c.token_ids for x in out for c in x]
    assert len({tuple(c) for c in completions}) == len(completions)
    want = naive_logprobs(policy, prompts, completions)
    for got, w in zip([c.logprobs for x in out for c in x], want):
        np.testing.assert_allclose(got, w, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ bad input


def test_empty_prompt_list(llama3):
    assert generate(llama3, [], max_new_tokens=4) == []


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(num_samples=0), "num_samples"),
    (dict(concurrency=0), "concurrency"), (dict(max_batch_rows=0), "max_batch_rows"),
])
def test_bad_sampling_arguments(llama3, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(llama3, [[5]], **{"max_new_tokens": 4, **kw})


def test_bad_prompts(llama3):
    ctx = llama3.config.max_position_embeddings  # 128
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(llama3, [[5], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=rf"prompt 1 has {ctx + 1} tokens.*{ctx}"):
        generate(llama3, [[5], [5] * (ctx + 1)], max_new_tokens=4)
    with pytest.raises(ValueError, match=rf"prompt 0 has 120 tokens; with max_new_tokens=20 it needs 140.*{ctx}"):
        generate(llama3, [[5] * 120], max_new_tokens=20)
    with pytest.raises(ValueError, match=r"prompt 2 has token id 320 outside the vocabulary \[0, 320\)"):
        generate(llama3, [[5], [6], [7, 320]], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 has token id -1"):
        generate(llama3, [[-1]], max_new_tokens=4)
    with pytest.raises(ValueError, match="list"):
        generate(llama3, "a single string", max_new_tokens=4)


def test_truncate_prompts_keeps_the_last_tokens(llama3):
    long = list(range(3, 3 + 120))
    (c,), = generate(llama3, [long], max_new_tokens=20, temperature=0.0, eos_token_ids=[], truncate_prompts=True)
    (d,), = generate(llama3, [long[-108:]], max_new_tokens=20, temperature=0.0, eos_token_ids=[])
    assert c == d and c.prompt_tokens == 108


# ------------------------------------------------------------------ chat


def test_chat_helpers(llama3):
    tok = llama3.tokenizer
    text = render_user_turn(tok, "hi")
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert render_user_turn(tok, "hi", system="be brief").startswith("<|system|>\nbe brief<|end|>\n<|user|>")
    ids = chat_token_ids(tok, ["hi", "there"])
    assert ids[0] == tok(text, add_special_tokens=False)["input_ids"] and len(ids) == 2
    assert ids[0][0] == tok.convert_tokens_to_ids("<|user|>")


def test_chat_without_template_names_the_tokenizer(llama3):
    import copy

    tok = copy.deepcopy(llama3.tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="llama3.*no chat_template"):
        render_user_turn(tok, "hi")
