"""jaxsr.train against a naive unbatched DPO, finite differences, single-device steps and uninterrupted runs."""

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxsr
from jaxsr import data, objectives, train, train_state
from jaxsr.config import DpoSection, SftSection
from jaxsr.model import decoder, make_mesh
from jaxsr.model.sharding import batch_sharding
from test_losses import np_dpo_objective  # the float64 numpy reference of the DPO objective

LLAMA3 = Path(__file__).parent / "fixtures" / "hf" / "llama3"  # 4 heads, 2 kv heads: tensor-parallel over 2 works
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "lemon", "candle", "window", "garden", "silver", "forest"]


def one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def llama3():
    return LLAMA3


@pytest.fixture(scope="module")
def policy1(llama3):
    return jaxsr.load_policy(llama3, mesh=one_device())


def sft_records(n=12):
    return [{"prompt": f"Repeat {w}.", "response": f"{w} {w}"} for w in (WORDS * 2)[:n]]


def pair_records(n=12):
    return [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"not {w}, {WORDS[(i + 3) % len(WORDS)]} instead"}
            for i, w in enumerate((WORDS * 2)[:n])]


# --- the DPO gradient against a naive implementation --------------------------------------------------------

GRAD_PAIRS = [  # shared prompt length, responses of different lengths: padding and masks matter
    {"prompt": "Say yes", "chosen": "yes yes yes", "rejected": "no", "ref_chosen_logps": -20.0, "ref_rejected_logps": -9.0},
    {"prompt": "Say no", "chosen": "no", "rejected": "yes yes yes", "ref_chosen_logps": -10.0, "ref_rejected_logps": -18.0},
    {"prompt": "Say ok", "chosen": "ok ok ok", "rejected": "ok", "ref_chosen_logps": -15.0, "ref_rejected_logps": -12.0},
]
GRAD_CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.1, rpo_alpha=0.5),
    "ipo": dict(loss_type="ipo", beta=0.5, label_smoothing=0.0, rpo_alpha=0.0),
}


@functools.partial(jax.jit, static_argnums=1)  # compiled once per sequence shape, shared by the tests below
def naive_seq_logp(params, cfg, prompt, response):
    """log p(response | prompt) of one unpadded sequence, summed by hand from decoder.forward's logits."""
    ids = jnp.concatenate([prompt, response])[None]
    logp_TxV = jax.nn.log_softmax(decoder.forward(params, cfg, ids)[0], axis=-1)
    p = len(prompt)
    return logp_TxV[jnp.arange(p - 1, p - 1 + len(response)), response].sum()


def naive_dpo_loss(params, cfg, pairs, *, loss_type, beta, label_smoothing, rpo_alpha):
    """The DPO objective pair by pair: two separate forwards per pair, no batching, no padding."""
    total = 0.0
    for pr in pairs:
        c = naive_seq_logp(params, cfg, pr.prompt, pr.chosen)
        r = naive_seq_logp(params, cfg, pr.prompt, pr.rejected)
        rc, rr = pr.ref_logps
        if loss_type == "ipo":  # token-averaged log-probs, as TRL feeds IPO
            z = (c / len(pr.chosen) - r / len(pr.rejected)) - (rc / len(pr.chosen) - rr / len(pr.rejected))
            loss = (z - 1 / (2 * beta)) ** 2
        else:
            z = beta * ((c - r) - (rc - rr))
            loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
        total = total + loss + rpo_alpha * (-c / len(pr.chosen))
    return total / len(pairs)


@functools.lru_cache(maxsize=None)
def step_grads(case: str, grad_accum: int, shared_prompt: bool = True):
    """Gradient and metrics of the trainer's DPO step on GRAD_PAIRS (batch 4: one padding row), one device."""
    pol = jaxsr.load_policy(LLAMA3, mesh=one_device())
    pairs, _ = data.tokenize_pairs(pol.tokenizer, GRAD_PAIRS, max_length=64, need_ref=True)
    section = DpoSection(batch_size=4, grad_accum=grad_accum, dropout=0.0, max_length=64, **GRAD_CASES[case])
    tx, schedule = train.make_optimizer(section, 10)
    _, grads_fn, _ = train.make_step_fns(objectives.dpo_objective(section), pol.config, pol.mesh, tx, schedule)
    batch = data.pair_batch(pairs, [[0], [1], [2]], batch_size=4, grad_accum=grad_accum, max_length=64,
                            shared_prompt=shared_prompt)
    grads, metrics = jax.jit(grads_fn)(pol.params, batch, None, None)
    return pol, pairs, grads, metrics


# Both batch layouts: one row per pair (prompt + chosen + rejected, the default) and two rows per pair.
@pytest.mark.parametrize("case, shared_prompt", [("sigmoid", True), ("ipo", True), ("sigmoid", False), ("ipo", False)])
def test_dpo_step_gradient_equals_naive_unbatched_gradient(case, shared_prompt):
    pol, pairs, grads, metrics = step_grads(case, 2, shared_prompt)
    naive = functools.partial(naive_dpo_loss, cfg=pol.config, pairs=pairs, **GRAD_CASES[case])
    want_loss, want = jax.value_and_grad(naive)(pol.params)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        # Same float32 math in another order (padding, batching, gathered logits): ~1e-6 of the largest entry.
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max(), jax.tree_util.keystr(path)


def test_dpo_step_gradient_matches_finite_differences():
    pol, pairs, grads, _ = step_grads("sigmoid", 2)
    loss = functools.partial(naive_dpo_loss, cfg=pol.config, pairs=pairs, **GRAD_CASES["sigmoid"])
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), pol.params)
    norm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / np.float32(norm), direction)
    h = 3e-2

    def at(t):
        return float(loss(jax.tree.map(lambda p, d: p + np.float32(t * h) * d, pol.params, direction)))

    # Fourth-order central difference: truncation ~h^4 |L^(5)| is negligible at h=0.03; float32 evaluation noise
    # in L (|L| ~ 1, ~1e-6 absolute) enters as ~1.5e-6/h = 5e-5, i.e. 5e-4 of a directional derivative of ~0.1.
    fd = (-at(2) + 8 * at(1) - 8 * at(-1) + at(-2)) / (12 * h)
    analytic = sum(float((np.asarray(g, np.float64) * d).sum()) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert abs(analytic) > 1e-2
    assert abs(fd - analytic) <= 5e-4 * abs(analytic)


def test_gradient_accumulation_equals_one_big_batch():
    # Two rows per pair: with one row per pair the micro-batches' matmuls round differently enough to exceed
    # this bound on a few wk entries (1.6e-6 of the largest); in float64 all four layout x accumulation
    # combinations agree to 3e-15. The one-row layout's accumulated gradient is checked against the naive one above.
    _, _, g2, m2 = step_grads("sigmoid", 2, False)
    _, _, g1, m1 = step_grads("sigmoid", 1, False)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(np.asarray(b)).max())
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_dpo_metrics_equal_the_reference_objective():
    """The step's weighted objective is the batch-mean reference of tests/test_losses.py (TRL names)."""
    pol, pairs, _, metrics = step_grads("sigmoid", 1)
    c = np.array([float(naive_seq_logp(pol.params, pol.config, p.prompt, p.chosen)) for p in pairs])
    r = np.array([float(naive_seq_logp(pol.params, pol.config, p.prompt, p.rejected)) for p in pairs])
    ref = np.array([p.ref_logps for p in pairs])
    want = np_dpo_objective(c, r, ref[:, 0], ref[:, 1], np.array([len(p.chosen) for p in pairs]), 0.1, 0.1, 0.5)
    assert set(want) <= set(metrics)
    for k, v in want.items():
        np.testing.assert_allclose(metrics[k], v, rtol=2e-5, atol=1e-6, err_msg=k)


def test_shared_prompt_rows_give_each_response_its_own_sequence_log_prob():
    """One row prompt + chosen + rejected scores each response as if it followed the prompt alone: the rejected
    response never sees the chosen one, and (mistral: sliding window 5) the window counts positions, not slots."""
    pol = jaxsr.load_policy(LLAMA3.parent / "mistral", mesh=one_device())
    assert pol.config.sliding_window == 5
    recs = [{"prompt": "Say yes and then say no please", "chosen": "yes yes yes no no", "rejected": "no",
             "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0},
            {"prompt": "Say ok", "chosen": "ok", "rejected": "fine, ok, sure, yes, alright then",
             "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}]
    pairs, _ = data.tokenize_pairs(pol.tokenizer, recs, max_length=64, need_ref=True)
    fwd = functools.partial(train.target_logps, cfg=pol.config, dtype=jnp.float32)
    got = {}
    for shared in (True, False):
        b = data.pair_batch(pairs, [[0], [1]], batch_size=2, max_length=64, shared_prompt=shared)
        rows = {k: v[0] for k, v in b.items() if k not in ("weight", "ref_logps")}
        got[shared] = np.asarray(jax.jit(train.pair_logps, static_argnums=0)(fwd, pol.params, rows, None)[0])
    want = np.array([[float(naive_seq_logp(pol.params, pol.config, p.prompt, r)) for r in (p.chosen, p.rejected)]
                     for p in pairs])
    np.testing.assert_allclose(got[True], want, rtol=1e-5)
    np.testing.assert_allclose(got[False], want, rtol=1e-5)


# --- SFT loss and packing -----------------------------------------------------------------------------------

def test_sft_target_logps_packed_equal_unpacked_equal_forward(policy1):
    exs, _ = data.tokenize_sft(policy1.tokenizer, sft_records(6), max_length=64)
    cfg = policy1.config
    fwd = jax.jit(functools.partial(train.target_logps, rng=None, cfg=cfg, dtype=jnp.float32))
    rows = [[i] for i in range(6)]
    flat = {k: v[0] for k, v in data.sft_batch(exs, rows, batch_size=6, max_length=64).items()}
    lp_flat, n_flat = fwd(policy1.params, flat)
    packed_rows = data.pack(range(6), [e.length for e in exs], 64)
    assert len(packed_rows) < 6
    packed = {k: v[0] for k, v in data.sft_batch(exs, packed_rows, batch_size=len(packed_rows), max_length=64,
                                                 packed=True).items()}
    lp_packed, _ = fwd(policy1.params, packed)
    # A packed row's summed log-prob is the sum of its examples' (attention never crosses segments).
    want = np.array([sum(float(lp_flat[i]) for i in row) for row in packed_rows])
    np.testing.assert_allclose(lp_packed, want, rtol=2e-6)
    # And the trainer's SFT loss is the token-mean response NLL of full, shifted forward logits (float64 numpy).
    logits = np.asarray(decoder.forward(policy1.params, cfg, jnp.asarray(flat["ids"]), jnp.asarray(flat["mask"])),
                        np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    response = np.zeros(flat["ids"].shape, bool)
    for i, ex in enumerate(exs):
        response[i, len(ex.prompt):ex.length] = True
    target_logp = np.take_along_axis(logp, flat["ids"][:, 1:, None], axis=-1)[..., 0]
    n = response[:, 1:].sum()
    assert n == int(np.sum(n_flat))
    nll, _ = objectives.sft_loss(policy1.params, flat, None, jnp.float32(n), None, fwd=lambda p, rows, rng: fwd(p, rows))
    np.testing.assert_allclose(nll, -target_logp[response[:, 1:]].sum() / n, rtol=2e-6)


def test_a_custom_objective_runs_through_the_unchanged_step_builder(policy1):
    """An Objective defined here (3x SFT's summed NLL, averaged over examples instead of tokens) needs no edit to
    train.make_step_fns: its gradient is SFT's times 3 x (response tokens / examples)."""
    section = SftSection(batch_size=4, grad_accum=2, dropout=0.0, max_length=64)
    sft = objectives.sft_objective(section)

    def tripled(params, mb, rng, denom, ref_params, *, fwd):
        loss = 3 * objectives.sft_loss(params, mb, rng, denom, ref_params, fwd=fwd)[0]
        return loss, {"loss": loss}

    per_example = objectives.Objective(
        "sft_per_example", section, objectives.STEP_FIELDS, tripled, tokenize=sft.tokenize, batches=sft.batches,
        normaliser=lambda b: (b["target_mask"].sum(-1) > 0).sum())  # rows with a response: [A, b, R] -> count
    exs = sft.tokenize(policy1.tokenizer, sft_records(4))
    batch = sft.batches(exs, multiple=1, pad_id=policy1.pad_token_id)([[0], [1], [2], [3]])
    tx, schedule = train_state.make_optimizer(section, 10)
    grads = {}
    for obj in (sft, per_example):
        _, grads_fn, _ = train.make_step_fns(obj, policy1.config, policy1.mesh, tx, schedule)
        grads[obj.name] = jax.jit(grads_fn)(policy1.params, batch, None, None)[0]
    scale = 3 * batch["target_mask"].sum() / 4
    for (path, g), want in zip(jax.tree_util.tree_flatten_with_path(grads["sft_per_example"])[0],
                               jax.tree.leaves(grads["sft"])):
        want = scale * np.asarray(want)
        assert np.abs(np.asarray(g) - want).max() <= 1e-6 * np.abs(want).max(), jax.tree_util.keystr(path)


# --- sharding -----------------------------------------------------------------------------------------------

def one_step(policy, section, batch):
    schedule = train_state.learning_rate_schedule(section, 10)
    # Adam's first update is lr * g / (|g| + eps). With the default eps=1e-8 an entry with |g| ~ eps turns a
    # reduction-order difference of 1e-10 into a parameter difference of ~1e-6 (gain up to lr / (4 eps)).
    # eps=1e-3 keeps the same computation well conditioned, so parameters compare at float32 tolerance.
    tx = optax.chain(optax.clip_by_global_norm(section.clip_norm),
                     optax.adamw(schedule, eps=1e-3, weight_decay=section.weight_decay, mask=train_state._decay_mask))
    step, _, sh = train.make_step_fns(objectives.dpo_objective(section), policy.config, policy.mesh, tx, schedule)
    state = jax.jit(lambda p: train.init_state(jax.tree.map(jnp.copy, p), tx), out_shardings=sh)(policy.params)
    state, metrics = step(state, train.to_device(batch, batch_sharding(policy.mesh, micro_axis=True)), jax.random.key(7), None)
    return state, metrics


def test_sharded_step_equals_single_device_step(llama3, policy1):
    mesh = make_mesh(1, 4, 2)
    sharded = jaxsr.load_policy(llama3, mesh=mesh)
    recs = [r | {"ref_chosen_logps": -30.0 + i, "ref_rejected_logps": -40.0 + 2 * i} for i, r in enumerate(pair_records(8))]
    pairs, _ = data.tokenize_pairs(policy1.tokenizer, recs, max_length=64, need_ref=True)
    # Dropout on: the random bits must not depend on how the batch is split (partitionable threefry).
    section = DpoSection(lr=1e-3, batch_size=8, grad_accum=2, dropout=0.1, max_length=64, weight_decay=0.01)
    batch = data.pair_batch(pairs, [[i] for i in range(8)], batch_size=8, grad_accum=2, multiple=4, max_length=64,
                            shared_prompt=section.shared_prompt)
    assert batch["branch"].shape == batch["ids"].shape  # the trainer's default layout: one row per pair
    s8, m8 = one_step(sharded, section, batch)
    s1, m1 = one_step(policy1, section, batch)
    wq = s8["params"]["layers"]["wq"]
    assert len(wq.sharding.device_set) == 8 and tuple(wq.sharding.spec)[1:3] == ("fsdp", "tensor")
    # Optimizer state lives where its parameter lives.
    adam = s8["opt_state"][1][0]
    assert adam.mu["layers"]["wq"].sharding == wq.sharding and adam.nu["embed"].sharding == s8["params"]["embed"].sharding
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # One AdamW step moves each weight by at most ~lr; float32 reduction order differs across shards.
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s8["params"])[0], jax.tree.leaves(s1["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))


# --- training runs ------------------------------------------------------------------------------------------

def response_nll(policy, records, max_length=64):
    exs, _ = data.tokenize_sft(policy.tokenizer, records, max_length=max_length)
    b = {k: v[0] for k, v in data.sft_batch(exs, [[i] for i in range(len(exs))], batch_size=len(exs),
                                            multiple=8, max_length=max_length).items()}
    rows = jax.sharding.NamedSharding(policy.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    b = {k: jax.device_put(v, rows) for k, v in b.items()}
    lp, n = eval_logps(policy.config, policy.mesh)(policy.params, b)
    return float(-np.asarray(lp).sum() / np.asarray(n).sum())


@functools.lru_cache(maxsize=None)
def eval_logps(cfg, mesh):
    return jax.jit(functools.partial(train.target_logps, rng=None, cfg=cfg, dtype=jnp.float32, mesh=mesh))


# Shared by the SFT tests below so that they run one compiled step (train._step_for caches it).
SFT_SETTINGS = dict(lr=3e-3, final_lr=3e-4, batch_size=4, max_steps=12, dropout=0.1, max_length=64)


def test_sft_lowers_the_response_loss(llama3, tmp_path):
    policy = jaxsr.load_policy(llama3)  # default mesh: 8 devices
    recs = sft_records(12)
    section = SftSection(**SFT_SETTINGS, checkpoint_every=6, keep_checkpoints=1)
    before = response_nll(policy, recs)
    seen = []
    trained = train.train_sft(policy, recs, section, tmp_path, log_fn=lambda s, m: seen.append((s, m)))
    after = response_nll(trained, recs)
    assert after < 0.8 * before, (before, after)
    assert [s for s, _ in seen] == list(range(1, 13))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s"} <= set(lines[0])
    np.testing.assert_allclose([lines[0]["learning_rate"], lines[-1]["learning_rate"]], [3e-3, 3e-4], rtol=1e-6)
    assert sorted(p.name for p in (tmp_path / "steps").iterdir() if p.name.isdigit()) == ["12"]  # keep_checkpoints=1
    final = jaxsr.load_policy(tmp_path / "final", mesh=one_device())
    for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(trained.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The policy passed in is untouched (the train state works on a copy that it donates).
    assert np.isfinite(np.asarray(policy.params["embed"])).all()


def test_bfloat16_compute_and_remat_train_the_same_objective(policy1, tmp_path):
    recs = sft_records(8)
    section = SftSection(lr=1e-3, batch_size=8, max_steps=2, dropout=0.0, max_length=64, checkpoint_every=2)
    seen = []
    train.train_sft(policy1, recs, section, tmp_path, compute_dtype="bfloat16", remat="full",
                    log_fn=lambda s, m: seen.append(m["loss"]))
    # Step 1 sees all 8 examples with the initial parameters: its loss is their float32 response NLL up to
    # bfloat16 rounding (8 bits of mantissa: ~1e-2 relative on logits of a few units).
    np.testing.assert_allclose(seen[0], response_nll(policy1, recs), rtol=3e-2)
    assert seen[1] < seen[0]


def test_dpo_raises_margin_and_accuracy_on_its_pairs(llama3, tmp_path):
    policy = jaxsr.load_policy(llama3)
    recs = pair_records(12)
    c0, r0 = train.reference_logps(policy, recs, max_length=64)
    with_ref = [r | {"ref_chosen_logps": float(a), "ref_rejected_logps": float(b)} for r, a, b in zip(recs, c0, r0)]
    section = DpoSection(lr=2e-3, final_lr=2e-4, schedule="linear", batch_size=4, max_steps=9, dropout=0.1,
                         max_length=64, beta=0.1, checkpoint_every=3)
    seen = []
    trained = train.train_dpo(policy, with_ref, section, tmp_path, log_fn=lambda s, m: seen.append(m))
    c1, r1 = train.reference_logps(trained, recs, max_length=64)
    margins = (c1 - r1) - (c0 - r0)
    assert (margins > 0).mean() == 1.0 and margins.mean() > 1.0, margins
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "grad_norm", "learning_rate", "tokens_per_s"} <= set(seen[0])
    assert seen[-1]["rewards/accuracies"] == 1.0 and seen[-1]["rewards/margins"] > seen[0]["rewards/margins"]


def test_dpo_on_the_fly_reference_starts_at_zero_reward(policy1, tmp_path):
    section = DpoSection(lr=1e-3, batch_size=4, max_steps=2, dropout=0.0, max_length=64, reference="on_the_fly",
                         checkpoint_every=2)
    seen = []
    train.train_dpo(policy1, pair_records(4), section, tmp_path, log_fn=lambda s, m: seen.append(m))
    # pi_ref = the starting policy and no dropout: the first step's implicit rewards are zero, the loss log 2.
    assert abs(seen[0]["rewards/chosen"]) < 1e-6 and abs(seen[0]["rewards/rejected"]) < 1e-6
    np.testing.assert_allclose(seen[0]["loss"], np.log(2), rtol=1e-6)
    assert seen[1]["rewards/margins"] > 0


def test_missing_reference_logps_is_an_error(policy1, tmp_path):
    with pytest.raises(data.DataError, match="reference='precomputed'.*reference_logps"):
        train.train_dpo(policy1, pair_records(4), DpoSection(max_length=64), tmp_path)
    with pytest.raises(data.DataError, match="the dataset is empty"):
        train.train_sft(policy1, [], SftSection(max_length=64), tmp_path)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(llama3, tmp_path, caplog):
    policy = jaxsr.load_policy(llama3)
    recs = sft_records(11) + [{"prompt": "Spell zyxw.", "response": "zyxw zyxw"}]
    tok = policy.tokenizer
    others = {t for r in recs[:-1] for t in data.prompt_ids(tok, r["prompt"]) + data.response_ids(tok, r["response"])}
    poison = sorted(set(data.response_ids(tok, recs[-1]["response"])) - others)[0]
    section = SftSection(**SFT_SETTINGS, checkpoint_every=1, keep_checkpoints=2, seed=4)
    plan = data.StepPlan([1] * 12, 4, seed=4, max_steps=12)
    bad_step = next(s for s in range(12) if any(11 in row for row in plan.rows(s))) + 1
    assert bad_step == 3  # seed 4 puts the poisoned example late enough to have checkpoints before it
    # A NaN in the embedding row of a token only the last example uses: steps before it are finite.
    params = dict(policy.params, embed=policy.params["embed"].at[poison].set(jnp.nan))
    with pytest.raises(train.TrainingDiverged, match=f"non-finite loss nan .* at step {bad_step};"):
        train.train_sft(policy.with_params(params), recs, section, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "steps").iterdir() if p.name.isdigit())
    assert steps == [bad_step - 2, bad_step - 1]
    with ocp.CheckpointManager(tmp_path / "steps") as mngr:
        meta = mngr.restore(bad_step - 1, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    assert meta["step"] == bad_step - 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, bad_step))
    assert not (tmp_path / "final").exists()
    # Rerun: the last good checkpoint restores onto the 8-device shardings and the same step fails again.
    with caplog.at_level("INFO", logger="jaxsr.train"), pytest.raises(train.TrainingDiverged, match=f"at step {bad_step};"):
        train.train_sft(policy.with_params(params), recs, section, tmp_path)
    assert f"resumed from {tmp_path / 'steps' / str(bad_step - 1)} (step {bad_step - 1} of 12)" in caplog.text


def test_checkpoint_hook_runs_every_n_steps_stops_early_and_is_asked_again_on_resume(policy1, tmp_path):
    section = SftSection(lr=1e-3, batch_size=4, max_steps=6, dropout=0.0, max_length=64, checkpoint_every=100,
                         keep_checkpoints=1)
    sft, calls = objectives.sft_objective(section), []

    def stop_at_4(step, params):
        calls.append((step, jax.tree.map(np.asarray, params)))  # copied: the next step donates them
        return "stop" if step == 4 else "continue"

    trained = train.train_objective(sft, policy1, sft_records(8), tmp_path, on_checkpoint=stop_at_4, hook_every=2)
    assert [s for s, _ in calls] == [2, 4]
    lines = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4]
    with ocp.CheckpointManager(tmp_path / "steps") as mngr:
        assert mngr.latest_step() == 4  # saved although checkpoint_every=100: the hook needs it
    for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(calls[-1][1])):
        np.testing.assert_array_equal(np.asarray(a), b)
    extra = json.loads((tmp_path / "final" / "jaxsr_model.json").read_text())["extra"]
    assert extra["steps"] == 4 and extra["stopped_early"] is True
    # A run killed after the step-4 save but before its final model: resumed, the hook is asked about step 4 again.
    shutil.rmtree(tmp_path / "final")
    again = train.train_objective(sft, policy1, sft_records(8), tmp_path, on_checkpoint=stop_at_4, hook_every=2)
    assert [s for s, _ in calls] == [2, 4, 4]
    for a, b, c in zip(jax.tree.leaves(again.params), jax.tree.leaves(calls[-1][1]), jax.tree.leaves(calls[1][1])):
        np.testing.assert_array_equal(np.asarray(a), b)
        np.testing.assert_array_equal(b, c)
    # Without a stop the hook also sees the last step, and an unknown answer is an error.
    seen = []
    train.train_objective(objectives.sft_objective(dataclasses.replace(section, max_steps=5)), policy1, sft_records(8),
                          tmp_path / "b",
                    on_checkpoint=lambda s, p: seen.append(s) or "continue", hook_every=2)
    assert seen == [2, 4, 5]
    with pytest.raises(ValueError, match="on_checkpoint returned 'maybe' at step 2"):
        train.train_objective(sft, policy1, sft_records(8), tmp_path / "c", on_checkpoint=lambda s, p: "maybe",
                        hook_every=2)


def test_learning_rate_schedules():
    def lrs(**kw):
        section = SftSection(lr=1.0, final_lr=0.1, **kw)
        s = train_state.learning_rate_schedule(section, 11)
        return np.array([float(s(i)) for i in range(11)])

    t = np.arange(11) / 10
    np.testing.assert_allclose(lrs(schedule="cosine"), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)), rtol=1e-6)
    np.testing.assert_allclose(lrs(schedule="linear"), 1.0 - 0.9 * t, rtol=1e-6)
    warm = lrs(schedule="linear", warmup_steps=2)
    np.testing.assert_allclose(warm[:3], [0.0, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(warm[-1], 0.1, rtol=1e-6)
    np.testing.assert_allclose(lrs(schedule="constant", warmup_steps=2)[2:], 1.0)


# --- kill -9 and resume -------------------------------------------------------------------------------------

def cli_env(cache_dir, devices):
    env = dict(os.environ)
    env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
                "TOKENIZERS_PARALLELISM": "false",
                # Later runs load the first run's executables instead of compiling them again.
                "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    return env


def start_cli(args, env, log_path):
    log = open(log_path, "w")
    p = subprocess.Popen([sys.executable, "-m", "jaxsr.cli", *map(str, args)], env=env, stdout=log, stderr=subprocess.STDOUT)
    p.log_path, p.log_file = log_path, log
    return p


def finish(p, timeout=300):
    rc = p.wait(timeout=timeout)
    p.log_file.close()
    return rc, p.log_path.read_text()


def kill_at_first_checkpoint(p, steps_dir, timeout=300):
    deadline = time.time() + timeout
    while not (steps_dir.is_dir() and any(d.name.isdigit() for d in steps_dir.iterdir())):
        assert p.poll() is None, f"exited before its first checkpoint:\n{p.log_path.read_text()}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    return finish(p)


def metrics_without_timing(path):
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sigkill_and_rerun_gives_the_uninterrupted_result(stage, llama3, tmp_path):
    path = tmp_path / f"{stage}.jsonl"
    recs = sft_records(12) if stage == "sft" else pair_records(12)  # DPO: the CLI computes the reference log-probs
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    env = cli_env(tmp_path / "jax_cache", 1)  # (restoring onto 8-device shardings: see the NaN test)
    over = [f"model.path={llama3}", f"{stage}.max_steps=32", f"{stage}.checkpoint_every=4", f"{stage}.batch_size=4",
            f"{stage}.grad_accum=2", f"{stage}.max_length=64", f"{stage}.lr=1e-3", f"{stage}.dropout=0.1",
            f"{stage}.seed=3"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # The uninterrupted run goes alongside the first (XLA compiles on one core), with its own compilation cache.
    reference = start_cli([stage, "--data", path, "--out", clean, *over], cli_env(tmp_path / "cache_c", 1),
                          tmp_path / "c.log")
    rc, out = kill_at_first_checkpoint(start_cli([stage, "--data", path, "--out", killed, *over], env,
                                                 tmp_path / "a.log"), killed / "steps")
    # Killed before the end (a final/ cut short mid-save would be redone on resume; not complete is what counts).
    assert rc == -signal.SIGKILL and not (killed / "final" / "jaxsr_model.json").exists(), out
    rc, out = finish(start_cli([stage, "--data", path, "--out", killed, *over], env, tmp_path / "b.log"))
    assert rc == 0, out
    assert "resumed from" in out, out
    rc, out = finish(reference)
    assert rc == 0, out
    a = jaxsr.load_policy(killed / "final", mesh=one_device())
    b = jaxsr.load_policy(clean / "final", mesh=one_device())
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a.params)[0], jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))
    assert metrics_without_timing(killed / "metrics.jsonl") == metrics_without_timing(clean / "metrics.jsonl")
