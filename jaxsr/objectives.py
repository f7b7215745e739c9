"""Training objectives as values: SFT and DPO, each a loss, a batch layout and the config fields its step compiles.

The step builder (train.make_step_fns) and the checkpointed loop read only an `Objective`; a new objective is
one more `Objective` built from its own config section, with no change to either.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import data as data_lib
from .config import DpoSection, SftSection, TrainSection
from .losses import preference_loss, sequence_logps
from .model import decoder
from .model.config import ModelConfig

Batch = dict[str, jax.Array]

# TrainSection fields every compiled step depends on (optimizer, schedule, batch shape, dropout); the rest
# (stage length, max_length, checkpoints, seed) only shape the data or the checkpoints.
STEP_FIELDS = ("lr", "final_lr", "schedule", "warmup_steps", "batch_size", "grad_accum", "dropout", "weight_decay",
               "clip_norm", "adam_b1", "adam_b2")


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """What the step builder and the training loop need to know about one objective.

    Equal (and hashed alike) when the name and the `step_fields` values agree: such objectives compile to the
    same step, so the name must identify the loss.

    Attributes:
      name: the stage and config section it trains ("sft", "dpo"); logs and checkpoint metadata carry it.
      section: its config section.
      step_fields: the section's fields that change the compiled step.
      loss: (params, mb, rng, denom, ref_params, *, fwd) -> (loss, metrics) of one micro-batch, already divided
        by `denom` (the whole step's normaliser); `fwd(params, rows, rng)` is train.target_logps on the model.
      normaliser: batch [A, b, ...] -> the count the step's loss is a mean over (response tokens, real pairs).
      tokenize: (tokenizer, records) -> items with a `.length`.
      batches: (items, *, multiple, pad_id) -> a function of a step's rows -> host batch [A, b, ...].
      reference: None, or where pi_ref comes from: "precomputed" (log-probs in the batch) or "on_the_fly"
        (the step takes frozen reference params).
      packing: rows hold several items each (the step plan packs them to max_length).
    """

    name: str
    section: TrainSection
    step_fields: tuple[str, ...]
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    normaliser: Callable[[Batch], jax.Array]
    tokenize: Callable[[Any, list], list]
    batches: Callable[..., Callable[[list], dict]]
    reference: str | None = None
    packing: bool = False

    @property
    def section_type(self) -> type:
        return type(self.section)

    @property
    def step_key(self) -> tuple:
        return (self.name,) + tuple((f, getattr(self.section, f)) for f in self.step_fields)

    def __eq__(self, other):
        return isinstance(other, Objective) and self.step_key == other.step_key

    def __hash__(self):
        return hash(self.step_key)


# --- the forward the losses share ---------------------------------------------------------------------------

def target_logps(params, rows: Batch, rng, *, cfg: ModelConfig, dtype, dropout_rate: float = 0.0, remat: str = "none",
                 mesh=None, unroll: int | bool = 1, attention: str = "xla"):
    """Summed log-probs of each row's target (response) tokens and their count: ([N, ...] float32, [N, ...] int32).

    The targets are `target_pos`/`target_ids`/`target_mask` [N, R], or [N, k, R] for k responses per row
    (a shared-prompt DPO row with `branch` ids: k = 2). Logits are computed only at the scored positions:
    the hidden states are gathered first, so the [N, k*R, V] log-softmax is the only vocabulary-sized tensor.
    """
    h_NxTxD, _ = decoder.hidden_states(
        params, cfg, rows["ids"], rows["positions"], rows["mask"], segment_ids_BxT=rows.get("segment_ids"),
        branch_ids_BxT=rows.get("branch"), dtype=dtype, dropout_rate=dropout_rate if rng is not None else 0.0,
        rng=rng, remat=remat, mesh=mesh, unroll=unroll, attention=attention)
    pos = rows["target_pos"]
    N, lead = pos.shape[0], pos.shape[:-1]
    h_NxRxD = jnp.take_along_axis(h_NxTxD, pos.reshape(N, -1)[..., None], axis=1)
    logits_NxRxV = decoder.lm_head(params, cfg, h_NxRxD, dtype)
    R = pos.shape[-1]
    logps, ntok = sequence_logps(logits_NxRxV.reshape(-1, R, logits_NxRxV.shape[-1]), rows["target_ids"].reshape(-1, R),
                                 rows["target_mask"].reshape(-1, R))
    return logps.reshape(lead), ntok.reshape(lead)


def pair_logps(fwd, params, rows: Batch, rng):
    """[b, 2] summed log-probs and token counts of each pair's chosen and rejected response, from either batch
    layout: one row per pair with `branch` ids ([b, T]), or two rows per pair ([b, 2, T], run as [2b, T])."""
    if "branch" in rows:
        return fwd(params, rows, rng)
    b = rows["ids"].shape[0]
    logps, ntok = fwd(params, {k: v.reshape((2 * b,) + v.shape[2:]) for k, v in rows.items()}, rng)
    return logps.reshape(b, 2), ntok.reshape(b, 2)


# --- SFT ----------------------------------------------------------------------------------------------------

def sft_loss(params, mb: Batch, rng, denom, ref_params, *, fwd):
    """Summed response NLL of a micro-batch / `denom` (the response tokens of the whole step)."""
    logps_N, _ = fwd(params, mb, rng)
    loss = -logps_N.sum() / denom
    return loss, {"loss": loss}


def sft_objective(section: SftSection) -> Objective:
    """Token-mean NLL of the responses of {prompt, response} records, rows optionally packed."""
    section.validate("sft")
    tokenize = lambda tok, records: data_lib.tokenize_sft(  # noqa: E731
        tok, records, max_length=section.max_length, overlong=section.overlong)[0]

    def batches(items, *, multiple, pad_id):
        return functools.partial(data_lib.sft_batch, items, batch_size=section.batch_size,
                                 grad_accum=section.grad_accum, multiple=multiple, max_length=section.max_length,
                                 pad_id=pad_id, packed=section.packing)

    return Objective("sft", section, STEP_FIELDS, sft_loss, normaliser=lambda b: b["target_mask"].sum(),
                     tokenize=tokenize, batches=batches, packing=section.packing)


# --- DPO ----------------------------------------------------------------------------------------------------

def dpo_loss(params, mb: Batch, rng, denom, ref_params, *, fwd, beta, loss_type, label_smoothing, rpo_alpha):
    """Preference loss of a micro-batch's pairs, summed and divided by `denom` (the real pairs of the step).

    Chosen and rejected go through one forward pass: as rows of their own ([b, 2, T] viewed as [2b, T]) or,
    with `branch` ids, side by side after their shared prompt in one row per pair ([b, T]). The reference
    log-probs come with the batch (precomputed with M_t) or from `ref_params` (on the fly, no gradient).
    """
    w_B = mb["weight"]
    rows = {k: v for k, v in mb.items() if k not in ("weight", "ref_logps")}
    logps_Bx2, ntok_Bx2 = pair_logps(fwd, params, rows, rng)
    if ref_params is None:
        ref_Bx2 = mb["ref_logps"]
    else:
        ref_Bx2 = jax.lax.stop_gradient(pair_logps(fwd, ref_params, rows, None)[0])
    pol_Bx2 = logps_Bx2
    if loss_type == "ipo":
        # TRL's IPO uses token-averaged log-probs, for the policy and the reference alike.
        n_Bx2 = jnp.maximum(ntok_Bx2, 1).astype(jnp.float32)
        pol_Bx2, ref_Bx2 = logps_Bx2 / n_Bx2, ref_Bx2 / n_Bx2
    losses_B, chosen_r_B, rejected_r_B = preference_loss(
        pol_Bx2[:, 0], pol_Bx2[:, 1], ref_Bx2[:, 0], ref_Bx2[:, 1],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)

    def mean(x_B):  # over the real pairs of the whole step; padding rows have weight 0
        return (x_B.astype(jnp.float32) * w_B).sum() / denom

    loss = mean(losses_B)
    metrics = {}
    if rpo_alpha > 0:
        # Iterative RPO: length-normalised NLL of the chosen response (always from summed log-probs).
        metrics["nll_loss"] = mean(-logps_Bx2[:, 0] / jnp.maximum(ntok_Bx2[:, 0], 1))
        loss = loss + rpo_alpha * metrics["nll_loss"]
    metrics.update({
        "loss": loss,
        "rewards/chosen": mean(chosen_r_B),
        "rewards/rejected": mean(rejected_r_B),
        "rewards/margins": mean(chosen_r_B - rejected_r_B),
        "rewards/accuracies": mean(chosen_r_B > rejected_r_B),
        "logps/chosen": mean(pol_Bx2[:, 0]),
        "logps/rejected": mean(pol_Bx2[:, 1]),
    })
    return loss, metrics


def dpo_objective(section: DpoSection) -> Objective:
    """DPO-family loss (+ Iterative RPO's NLL) on {prompt, chosen, rejected[, ref_*_logps]} records."""
    section.validate("dpo")
    preference_loss(0.0, 0.0, 0.0, 0.0, beta=section.beta, loss_type=section.loss_type,
                    label_smoothing=section.label_smoothing)  # rejects bad combinations before any compute
    precomputed = section.reference == "precomputed"
    tokenize = lambda tok, records: data_lib.tokenize_pairs(  # noqa: E731
        tok, records, max_length=section.max_length, overlong=section.overlong, need_ref=precomputed)[0]

    def batches(items, *, multiple, pad_id):
        make = functools.partial(data_lib.pair_batch, items, batch_size=section.batch_size,
                                 grad_accum=section.grad_accum, multiple=multiple, max_length=section.max_length,
                                 pad_id=pad_id, shared_prompt=section.shared_prompt)
        if precomputed:
            return make
        return lambda rows: {k: v for k, v in make(rows).items() if k != "ref_logps"}  # the step computes them

    loss = functools.partial(dpo_loss, beta=section.beta, loss_type=section.loss_type,
                             label_smoothing=section.label_smoothing, rpo_alpha=section.rpo_alpha)
    return Objective("dpo", section, STEP_FIELDS + ("beta", "loss_type", "label_smoothing", "rpo_alpha", "reference"),
                     loss, normaliser=lambda b: b["weight"].sum(), tokenize=tokenize, batches=batches,
                     reference=section.reference)
