"""The `expected` judge mode's digit probabilities, computed on the device.

Only the score position goes through the LM head and only the six digit masses come back: the host receives
[B, 6] floats, never [B, T, V] logits (tens of GB per batch with a 152k vocabulary and long judge requests).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from .model import decoder
from .model.config import ModelConfig
from .model.sharding import ShardingRules, batch_sharding
from .policy import DTYPES, Policy, call_on_rows, param_shardings

SCORES = range(6)


def digit_token_ids(tok) -> dict[int, list[int]]:
    """Single-token spellings of 0-5 ("4" and " 4") that can follow "Score:"."""
    out = {}
    for k in SCORES:
        ids = set()
        for text in (str(k), f" {k}"):
            enc = tok(text, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.add(enc[0])
        out[k] = sorted(ids)
    return out


def digit_id_table(tok) -> tuple[tuple[int, ...], ...]:
    """`digit_token_ids` as a hashable table (one tuple per score), the compiled function's static argument."""
    return tuple(tuple(ids) for ids in digit_token_ids(tok).values())


@functools.lru_cache(maxsize=32)
def digit_mass_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, digit_ids: tuple[tuple[int, ...], ...],
                  attention: str = "xla"):
    """Jitted (params, ids [B, T], mask [B, T]) -> [B, 6] float32: each score's probability at the last position
    of left-padded rows, summed over its spellings. One compilation per padded length (jit's shape cache)."""
    width = max(1, max(len(ids) for ids in digit_ids))
    # [6, width] token ids and 0/1 weights; a missing spelling reads token 0 with weight 0.
    ids_6xW = np.array([list(ids) + [0] * (width - len(ids)) for ids in digit_ids], np.int32)
    w_6xW = np.array([[1.0] * len(ids) + [0.0] * (width - len(ids)) for ids in digit_ids], np.float32)

    def masses(params, ids_BxT, mask_BxT):
        h_BxTxD, _ = decoder.hidden_states(params, cfg, ids_BxT, decoder.positions_from_mask(mask_BxT), mask_BxT,
                                           dtype=DTYPES[dtype], mesh=mesh, rules=rules, attention=attention)
        # Left padding puts every row's score position last; the LM head sees that position only.
        logits_BxV = decoder.lm_head(params, cfg, h_BxTxD[:, -1], DTYPES[dtype])
        probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)  # lm_head returns float32
        return (probs_BxV[:, ids_6xW] * w_6xW).sum(-1)

    b2 = batch_sharding(mesh, 2, rules)
    # Parameters keep their FSDP x tensor shardings; rows are split over data x fsdp; nothing is donated
    # (the parameters are M_t's, used again by the next stage).
    return jax.jit(masses, in_shardings=(param_shardings(cfg, mesh, rules), b2, b2), out_shardings=b2)


def digit_masses(policy: Policy, ids_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
    """[B, 6] float32 probabilities of the scores 0-5 after the last token of each left-padded row.

    With several processes every process must call it with the same rows; each returns all the masses.
    """
    policy = policy.for_compute()  # the compute-dtype copy sampling uses, made once per model
    fn = digit_mass_fn(policy.config, policy.mesh, policy.dtype, policy.rules, digit_id_table(policy.tokenizer),
                       policy.attention)
    return call_on_rows(policy, fn, ids_BxT, mask_BxT)
