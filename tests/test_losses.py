"""jaxsr.losses and the trainer's SFT/DPO losses (jaxsr.objectives) against float64 numpy references, finite
differences and hand-computed values."""

from functools import partial
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsr.losses import preference_loss, sequence_logps
from jaxsr.objectives import dpo_loss, sft_loss

BETAS = (0.01, 0.1, 0.5, 2.0)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_preference_loss(c, r, rc, rr, beta, loss_type, ls):
    """TRL dpo_loss (v0.24-v0.28) written out in float64 numpy."""
    c, r, rc, rr = (np.asarray(a, np.float64) for a in (c, r, rc, rr))
    z = (c - r) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -np_log_sigmoid(beta * z) * (1 - ls) - np_log_sigmoid(-beta * z) * ls
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * z)
    else:
        losses = (z - 1 / (2 * beta)) ** 2
    return losses, beta * (c - rc), beta * (r - rr)


def random_logps(seed, n=64):
    """Sequence log-probs around -30 with policy/reference gaps of a few nats, as in real pairs."""
    rng = np.random.default_rng(seed)
    ref_c, ref_r = rng.uniform(-60, -1, size=(2, n))
    return ref_c + rng.normal(0, 3, n), ref_r + rng.normal(0, 3, n), ref_c, ref_r


CASES = [(lt, b, 0.0) for lt in ("sigmoid", "hinge", "ipo") for b in BETAS]
CASES += [("sigmoid", b, ls) for b in BETAS for ls in (0.1, 0.3)]


@pytest.mark.parametrize("loss_type,beta,ls", CASES)
def test_preference_loss_matches_numpy_float64(loss_type, beta, ls):
    inputs = random_logps(seed=CASES.index((loss_type, beta, ls)))
    want = np_preference_loss(*inputs, beta, loss_type, ls)
    with jax.enable_x64(True):
        got = preference_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=ls)
        assert all(g.dtype == jnp.float64 for g in got)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5)


@pytest.mark.parametrize("loss_type,beta,ls", CASES)
def test_preference_loss_float32(loss_type, beta, ls):
    inputs = [x.astype(np.float32) for x in random_logps(seed=7)]
    # Reference from the same float32 values, so only the float32 arithmetic differs.
    want = np_preference_loss(*inputs, beta, loss_type, ls)
    got = preference_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=ls)
    assert all(g.dtype == jnp.float32 for g in got)
    # atol: float32 inputs of size ~60 round logits by ~1e-5 absolute, which cannot be matched
    # relatively where hinge/ipo cross zero.
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5 * max(1.0, beta))


def test_rewards_are_beta_times_log_ratio():
    c, r, rc, rr = [-3.0, -5.0], [-4.0, -1.0], [-2.5, -6.0], [-4.5, -2.0]
    _, cr, rr_ = preference_loss(c, r, rc, rr, beta=0.5)
    np.testing.assert_allclose(cr, [0.5 * -0.5, 0.5 * 1.0], rtol=1e-6)
    np.testing.assert_allclose(rr_, [0.5 * 0.5, 0.5 * 1.0], rtol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_hand_computed_values_at_zero_logits(beta):
    # logits = (-7 - -9) - (-4 - -6) = 0
    args = ([-7.0], [-9.0], [-4.0], [-6.0])
    for ls in (0.0, 0.3):
        loss, _, _ = preference_loss(*args, beta=beta, label_smoothing=ls)
        np.testing.assert_allclose(loss, [math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(preference_loss(*args, beta=beta, loss_type="hinge")[0], [1.0])
    want_ipo = 1 / (4 * beta**2)
    np.testing.assert_allclose(preference_loss(*args, beta=beta, loss_type="ipo")[0], [want_ipo], rtol=1e-6)


def test_beta_applied_once():
    # logits = 1, beta = 0.1: the loss is -log σ(0.1); applying β twice (MaxText #1530) gives -log σ(0.01).
    loss, _, _ = preference_loss([1.0], [0.0], [0.0], [0.0], beta=0.1)
    once, twice = -math.log(1 / (1 + math.exp(-0.1))), -math.log(1 / (1 + math.exp(-0.01)))
    np.testing.assert_allclose(loss, [once], rtol=1e-6)
    assert abs(float(loss[0]) - twice) > 1e-2


@pytest.mark.parametrize("ls", (0.0, 0.1, 0.3))
@pytest.mark.parametrize("beta", BETAS)
def test_sigmoid_gradient_matches_finite_differences(beta, ls):
    c, r, rc, rr = random_logps(seed=3, n=8)
    with jax.enable_x64(True):
        def total(chosen):
            return preference_loss(chosen, r, rc, rr, beta=beta, label_smoothing=ls)[0].sum()

        grad = np.asarray(jax.grad(total)(jnp.asarray(c)))
    eps = 1e-5
    fd = np.empty_like(c)
    for i in range(len(c)):
        up, down = c.copy(), c.copy()
        up[i] += eps
        down[i] -= eps
        loss_up = np_preference_loss(up, r, rc, rr, beta, "sigmoid", ls)[0].sum()
        loss_down = np_preference_loss(down, r, rc, rr, beta, "sigmoid", ls)[0].sum()
        fd[i] = (loss_up - loss_down) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-10)


def test_rewards_carry_no_gradient():
    def reward_sum(c):
        return preference_loss(c, jnp.zeros(3), jnp.zeros(3), jnp.zeros(3))[1].sum()

    np.testing.assert_array_equal(jax.grad(reward_sum)(jnp.ones(3)), np.zeros(3))


def np_sequence_logps(logits, targets, mask):
    logits = np.asarray(logits, np.float64)
    sums, counts = np.zeros(logits.shape[0]), np.zeros(logits.shape[0], int)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                row = logits[b, t]
                lse = row.max() + math.log(np.exp(row - row.max()).sum())
                sums[b] += row[targets[b, t]] - lse
                counts[b] += 1
    return sums, counts


def random_batch(seed, B=3, T=6, V=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T))
    mask = rng.random((B, T)) < 0.6
    mask[0] = False  # one row without response tokens
    mask[1] = True
    targets[~mask] = -100  # TRL's label pad id must be ignored, not indexed
    return logits, targets, mask


def test_sequence_logps_matches_numpy_loop():
    logits, targets, mask = random_batch(seed=0)
    got_sum, got_n = sequence_logps(logits, targets, mask)
    want_sum, want_n = np_sequence_logps(logits, targets, mask)
    assert got_sum.dtype == jnp.float32 and got_n.dtype == jnp.int32
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_n, want_n)


def test_sequence_logps_bf16_logits_computed_in_float32():
    logits, targets, mask = random_batch(seed=1)
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    got_sum, _ = sequence_logps(logits_bf16, targets, mask)
    want_sum, _ = np_sequence_logps(np.asarray(logits_bf16.astype(jnp.float32)), targets, mask)
    assert got_sum.dtype == jnp.float32
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, atol=1e-5)


def trainer_sft_loss(logits, targets, mask):
    """objectives.sft_loss with the logits as its "params": the step's token mean over one micro-batch."""
    fwd = lambda x, mb, rng: sequence_logps(x, targets, mask)  # noqa: E731
    return sft_loss(jnp.asarray(logits), {}, None, jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32), None, fwd=fwd)[0]


def test_sft_loss_is_token_mean_and_ignores_masked_positions():
    logits, targets, mask = random_batch(seed=2)
    loss = trainer_sft_loss(logits, targets, mask)
    want_sum, want_n = np_sequence_logps(logits, targets, mask)
    np.testing.assert_allclose(loss, -want_sum.sum() / want_n.sum(), rtol=1e-5)

    # Pad ids (-100) sit in targets: their gather must not put NaN into the gradient.
    grad = jax.grad(trainer_sft_loss)(jnp.asarray(logits), targets, mask)
    assert np.isfinite(np.asarray(grad)).all()

    rng = np.random.default_rng(9)
    logits2, targets2 = logits.copy(), targets.copy()
    logits2[~mask] = rng.normal(0, 50, logits2[~mask].shape)
    targets2[~mask] = rng.integers(0, logits.shape[-1], (~mask).sum())
    np.testing.assert_array_equal(trainer_sft_loss(logits2, targets2, mask), loss)
    grad = jax.grad(trainer_sft_loss)(jnp.asarray(logits2), targets2, mask)
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)

    logits2[0, 0, 0] = np.inf  # a non-finite logit in padding must not leak into the value
    np.testing.assert_array_equal(trainer_sft_loss(logits2, targets2, mask), loss)


def test_sft_loss_all_masked_is_zero():
    logits, targets, _ = random_batch(seed=4)
    assert float(trainer_sft_loss(logits, np.zeros_like(targets), np.zeros(targets.shape, bool))) == 0.0


def trainer_dpo_loss(c, r, rc, rr, n_chosen, *, weight=None, **kw):
    """objectives.dpo_loss on given sequence log-probs (chosen `c` may be traced): its fwd returns them instead of
    running a model. `weight` 0 marks padding rows, as in the trainer's batches."""
    c, r = jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32)
    w = jnp.ones(c.shape, jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
    ntok = jnp.stack([jnp.asarray(n_chosen), jnp.ones(c.shape, jnp.int32)], 1)
    mb = {"branch": jnp.zeros(c.shape), "weight": w, "ref_logps": jnp.stack([jnp.asarray(rc), jnp.asarray(rr)], 1)}
    fwd = lambda params, rows, rng: (jnp.stack([params, r], 1), ntok)  # noqa: E731
    return dpo_loss(c, mb, None, w.sum(), None, fwd=fwd, **kw)


def np_dpo_objective(c, r, rc, rr, n_tokens, beta, ls, rpo_alpha):
    """Batch-mean preference loss + Iterative RPO's length-normalised NLL (Pang et al. 2024), TRL's metric names."""
    losses, cr, rr_ = np_preference_loss(c, r, rc, rr, beta, "sigmoid", ls)
    nll = np.mean(-np.asarray(c, np.float64) / n_tokens)
    want = {"loss": losses.mean() + rpo_alpha * nll, "rewards/chosen": cr.mean(), "rewards/rejected": rr_.mean(),
            "rewards/margins": (cr - rr_).mean(), "rewards/accuracies": (cr > rr_).mean(), "logps/chosen": c.mean(),
            "logps/rejected": r.mean()}
    return want | ({"nll_loss": nll} if rpo_alpha else {})


@pytest.mark.parametrize("rpo_alpha", (0.0, 1.0))
def test_dpo_loss_matches_numpy(rpo_alpha):
    c, r, rc, rr = random_logps(seed=5, n=16)
    n_tokens = np.random.default_rng(5).integers(1, 200, 16)
    want = np_dpo_objective(c, r, rc, rr, n_tokens, 0.1, 0.1, rpo_alpha)
    # Two padding rows (weight 0, garbage log-probs) change nothing.
    pad = lambda x, v: np.concatenate([x, [v, v]])  # noqa: E731
    loss, metrics = trainer_dpo_loss(pad(c, -1e3), pad(r, 5.0), pad(rc, 0.0), pad(rr, -7.0), pad(n_tokens, 1),
                                     weight=pad(np.ones(16), 0.0), beta=0.1, loss_type="sigmoid",
                                     label_smoothing=0.1, rpo_alpha=rpo_alpha)
    assert set(metrics) == set(want)
    np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
    for k, v in want.items():  # float32 sums of log-probs around -30
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_reward_ties_are_not_accurate():
    # At the first DPO step policy == reference, so every reward is 0: TRL counts a tie as wrong.
    logps = np.array([-5.0, -7.0])
    _, metrics = trainer_dpo_loss(logps, logps, logps, logps, np.array([3, 4]), beta=0.1, loss_type="sigmoid",
                                  label_smoothing=0.0, rpo_alpha=0.0)
    assert float(metrics["rewards/accuracies"]) == 0.0
    np.testing.assert_allclose(metrics["loss"], math.log(2), rtol=1e-6)


def test_dpo_loss_rpo_gradient_is_length_normalised():
    # d/dc [alpha * mean(-c / n)] = -alpha / (n * B), added to the preference-loss gradient.
    zeros, n_tokens = jnp.zeros(2), jnp.array([4, 10])

    def objective(c, alpha):
        return trainer_dpo_loss(c, zeros, zeros, zeros, n_tokens, beta=0.1, loss_type="sigmoid",
                                label_smoothing=0.0, rpo_alpha=alpha)[0]

    diff = jax.grad(objective)(zeros, 2.0) - jax.grad(objective)(zeros, 0.0)
    np.testing.assert_allclose(diff, [-2.0 / (4 * 2), -2.0 / (10 * 2)], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="dpo"), r"unknown loss_type 'dpo'.*'sigmoid', 'hinge', 'ipo'"),
        (dict(beta=0.0), r"beta must be > 0, got 0.0"),
        (dict(beta=-0.1), r"beta must be > 0"),
        (dict(beta=float("nan")), r"beta must be > 0"),
        (dict(label_smoothing=0.6), r"label_smoothing must lie in \[0, 0.5\], got 0.6"),
        (dict(label_smoothing=-0.1), r"label_smoothing must lie in \[0, 0.5\]"),
        (dict(loss_type="ipo", label_smoothing=0.1), r"only defined for loss_type='sigmoid'.*'ipo'"),
        (dict(loss_type="hinge", label_smoothing=0.1), r"only defined for loss_type='sigmoid'.*'hinge'"),
    ],
)
def test_preference_loss_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss([0.0], [0.0], [0.0], [0.0], **kwargs)


def test_label_smoothing_half_is_allowed():
    loss, _, _ = preference_loss([1.0], [0.0], [0.0], [0.0], beta=1.0, label_smoothing=0.5)
    want = 0.5 * (-np_log_sigmoid(1.0) - np_log_sigmoid(-1.0))
    np.testing.assert_allclose(loss, [want], rtol=1e-6)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"chosen_logps \(3,\).*rejected_logps \(2,\)"):
        preference_loss(np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\).*target_ids \(2, 4\)"):
        sequence_logps(np.zeros((2, 3, 5)), np.zeros((2, 4), int), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"mask \(2, 4\)"):
        sequence_logps(np.zeros((2, 3, 5)), np.zeros((2, 3), int), np.ones((2, 4)))


def test_jit_compatible():
    inputs = [jnp.asarray(x, jnp.float32) for x in random_logps(seed=11, n=8)]
    jitted = jax.jit(partial(preference_loss, beta=0.1, loss_type="ipo"))
    for got, want in zip(jitted(*inputs), preference_loss(*inputs, beta=0.1, loss_type="ipo")):
        np.testing.assert_allclose(got, want, rtol=1e-6)

    objective = jax.jit(partial(trainer_dpo_loss, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=1.0))
    loss, metrics = objective(*inputs, jnp.full(8, 5))
    assert np.isfinite(float(loss)) and "nll_loss" in metrics

    logits, targets, mask = random_batch(seed=12)
    np.testing.assert_allclose(jax.jit(trainer_sft_loss)(logits, targets, mask), trainer_sft_loss(logits, targets, mask),
                               rtol=1e-6)
