"""Preference losses and sequence log-probs: pure functions (objectives.py builds the trainer's losses on them).

The preference losses follow TRL's `DPOTrainer.dpo_loss` (huggingface/trl v0.24-v0.28, before
the 2026 DPO refactor) so that jaxsr metrics can be compared with TRL runs. Validation reads
only static Python arguments and shapes, so every function here can be jitted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _as_float(x) -> jax.Array:
    x = jnp.asarray(x)
    # float64 survives only when the caller enabled x64; bf16/int inputs are promoted so the
    # loss arithmetic never runs in low precision.
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def _check_preference_args(beta, loss_type, label_smoothing) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing!r}")
    if label_smoothing != 0 and loss_type != "sigmoid":
        # TRL only warns and ignores it; a silently ignored setting is worse than an error.
        raise ValueError(
            f"label_smoothing={label_smoothing!r} is only defined for loss_type='sigmoid', "
            f"got loss_type={loss_type!r}; set label_smoothing=0.0"
        )


def _check_same_shape(**arrays) -> None:
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"per-example inputs must share one shape, got {listed}")


def preference_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example DPO-family losses and implicit rewards.

    With logits = (chosen - rejected) - (ref_chosen - ref_rejected):
      sigmoid: -log σ(β·logits)·(1-ε) - log σ(-β·logits)·ε   (DPO; conservative DPO when ε > 0)
      hinge:   relu(1 - β·logits)                              (SLiC)
      ipo:     (logits - 1/(2β))²                              (IPO eq. 17; β plays τ)
    IPO acts on whatever log-probs it is given: TRL feeds it token-averaged log-probs, so pass
    sum_logps / num_tokens to reproduce TRL's IPO.

    Returns (losses, chosen_rewards, rejected_rewards), each shaped like the inputs, with
    rewards = β·(logps - ref_logps) under stop_gradient (they are metrics, as in TRL).
    """
    _check_preference_args(beta, loss_type, label_smoothing)
    chosen, rejected, ref_chosen, ref_rejected = map(
        _as_float, (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )
    _check_same_shape(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )

    # β multiplies the log-ratio difference exactly once (MaxText #1530 applied it twice).
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (
            -jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * logits)
    else:  # ipo
        losses = (logits - 1.0 / (2.0 * beta)) ** 2

    chosen_rewards = jax.lax.stop_gradient(beta * (chosen - ref_chosen))
    rejected_rewards = jax.lax.stop_gradient(beta * (rejected - ref_rejected))
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(logits_BxTxV, target_ids_BxT, mask_BxT) -> tuple[jax.Array, jax.Array]:
    """Summed log-prob of the masked targets of each row, and the number of masked tokens.

    logits_BxTxV[:, t] must already score target_ids_BxT[:, t] (the caller shifts).
    Returns (sum_logps_B float32, num_tokens_B int32).
    """
    logits_BxTxV = jnp.asarray(logits_BxTxV)
    target_ids_BxT = jnp.asarray(target_ids_BxT)
    valid_BxT = jnp.asarray(mask_BxT).astype(bool)
    if logits_BxTxV.shape[:-1] != target_ids_BxT.shape or target_ids_BxT.shape != valid_BxT.shape:
        raise ValueError(
            f"logits {logits_BxTxV.shape} must be target_ids {target_ids_BxT.shape} plus a vocab "
            f"axis, and mask {valid_BxT.shape} must match target_ids"
        )

    # float32 because a log-softmax over a large vocab in bf16 is off by whole nats.
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    target_logits_BxT = jnp.take_along_axis(logits_BxTxV, target_ids_BxT[..., None], axis=-1)[..., 0]
    token_logps_BxT = target_logits_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
    # Pad ids such as -100 gather NaN (jnp's out-of-range fill); select them away rather than
    # multiply by a float mask, where NaN * 0 would poison the sum.
    sum_logps_B = jnp.where(valid_BxT, token_logps_BxT, 0.0).sum(axis=-1)
    return sum_logps_B, valid_BxT.sum(axis=-1, dtype=jnp.int32)
