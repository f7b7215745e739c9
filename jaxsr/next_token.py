"""How one next token is drawn from logits: temperature, top-k, top-p and an inverse-CDF draw, and its log-prob.

Pure functions of (logits, uniforms) with static shapes, made to run fast on XLA:CPU (no sort, no argmax
reduce, no cumsum: see each function). `jaxsr.sample` calls `draw_tokens` once per decode step; `sample_tokens`
is the same draw on a [B, V] array with one PRNG key per row. See docs/sampling.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

ROUND = 2  # top-p proposals tested together in one pass over the logits (see _draw_nucleus)
PROPOSALS = 4 * ROUND  # top-p proposals per step before the exact fallback
_MIN_BLOCK = 16  # the smallest block of the two-level CDF (see _cdf)


@dataclasses.dataclass(frozen=True)
class Mode:
    """The static shape of the sampling computation; the parameter values themselves are traced."""

    greedy: bool
    top_k: bool
    top_p: bool

    @property
    def uniforms(self) -> int:
        """Uniforms per row and step: top-p's proposals plus one for its exact fallback, else one."""
        return PROPOSALS + 1 if self.top_p else 1


def sampling_mode(temperature: float, top_p: float, top_k: int, vocab: int) -> Mode:
    """Which stages a draw runs: top-k only when it truncates (0 < k < vocab), top-p only below 1, none at temperature 0."""
    greedy = temperature == 0.0
    return Mode(greedy, not greedy and 0 < top_k < vocab, not greedy and top_p < 1.0)


def _argmax(x_BxV):
    """First index of each row's maximum, as a max and a min-reduction (XLA's CPU argmax reduce is ~5x slower)."""
    V = x_BxV.shape[-1]
    at_max_BxV = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(at_max_BxV, jnp.arange(V, dtype=jnp.int32), V), axis=-1), V - 1)


def _ordered_int32(x_f32):
    """An int32 whose order is the float order (negative floats have their magnitude bits reversed)."""
    bits = jax.lax.bitcast_convert_type(x_f32, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kth_largest_threshold(logits_BxV, k):
    """The k-th largest logit of each row, as an ordered int32 [B, 1] (exact, by bisection).

    32 halvings of the int32 range with one count per halving: cheaper on CPU than `lax.top_k` or a sort
    (both sort the whole row there), and `k` may be traced.
    """
    key_BxV = _ordered_int32(logits_BxV)
    # Invariant: count(key >= lo) >= k and count(key >= hi) < k; the answer is the final lo.
    lo = jnp.min(key_BxV, axis=-1, keepdims=True)
    hi = jnp.max(key_BxV, axis=-1, keepdims=True) + 1

    def halve(_, lo_hi):
        lo, hi = lo_hi
        # hi - lo can exceed int32: take the difference modulo 2**32 as uint32, which is exact here.
        half = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(hi - lo, jnp.uint32), jnp.uint32(1))
        mid = lo + jax.lax.bitcast_convert_type(half, jnp.int32)
        ok = jnp.sum(key_BxV >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return key_BxV, lo


def _mass_above(p_BxV, x_Bx1):
    """Mass strictly above x in each row. The nucleus test and its fallback share this one reduction."""
    return jnp.sum(jnp.where(p_BxV > x_Bx1, p_BxV, 0.0), axis=-1, keepdims=True)


def _nucleus_mask(p_BxV, target_Bx1):
    """Tokens whose mass strictly above them is < target, found exactly by bisection (30 passes over [B, V]).

    Works on the float32 bit patterns of p (non-negative, max exactly 1): the smallest x with
    mass_above(x) < target is the threshold, and every token at or above it is in the nucleus.
    """
    bits_BxV = jax.lax.bitcast_convert_type(p_BxV, jnp.int32)
    # Invariant: mass_above(lo) >= target, mass_above(hi) < target (nothing lies above p's max, 1.0).
    lo = jnp.full(target_Bx1.shape, -1, jnp.int32)
    hi = jnp.full(target_Bx1.shape, 0x3F800000, jnp.int32)

    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = _mass_above(p_BxV, jax.lax.bitcast_convert_type(jnp.maximum(mid, 0), jnp.float32)) < target_Bx1
        ok &= mid >= 0  # mid = -1 (below every p) is "everything above"
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    # hi - lo <= 2**30 + 1, so 31 halvings reach hi - lo == 1.
    _, hi = jax.lax.fori_loop(0, 31, halve, (lo, hi))
    return bits_BxV >= hi


def _block_size(vocab: int) -> int:
    return max(_MIN_BLOCK, 1 << math.ceil(math.log2(math.sqrt(vocab))))


def _inclusive_cumsum(x_BxNxM):
    """Cumulative sum over the last axis as a matmul with a triangle of ones: XLA's CPU cumsum is ~10x slower."""
    n = x_BxNxM.shape[-1]
    tri_MxM = jnp.triu(jnp.ones((n, n), x_BxNxM.dtype))
    return jnp.einsum("...m,mn->...n", x_BxNxM, tri_MxM, precision=jax.lax.Precision.HIGHEST)


class _CDF(NamedTuple):
    """Two-level cumulative sums of non-negative weights: blocks of ~sqrt(V) tokens, then tokens in a block."""

    p_BxNbxBlk: jax.Array
    bsum_BxNb: jax.Array
    bstart_BxNb: jax.Array


def _cdf(p_BxV) -> _CDF:
    B, V = p_BxV.shape
    blk = _block_size(V)
    nb = -(-V // blk)
    p_BxNbxBlk = jnp.pad(p_BxV, ((0, 0), (0, nb * blk - V))).reshape(B, nb, blk)
    bsum_BxNb = jnp.sum(p_BxNbxBlk, axis=-1)
    return _CDF(p_BxNbxBlk, bsum_BxNb, _inclusive_cumsum(bsum_BxNb) - bsum_BxNb)


def _invert(cdf: _CDF, u_B):
    """The index whose cumulative interval holds u * total (u in [0, 1)); only weights > 0 can come out."""
    nb, blk = cdf.p_BxNbxBlk.shape[1:]
    target_B = u_B * (cdf.bstart_BxNb[:, -1] + cdf.bsum_BxNb[:, -1])
    # The last non-empty block that starts at or below the target (the first non-empty one starts at 0).
    block_ok = (cdf.bstart_BxNb <= target_B[:, None]) & (cdf.bsum_BxNb > 0)
    j_B = nb - 1 - jnp.argmax(block_ok[:, ::-1], axis=-1)
    inner_BxBlk = jnp.take_along_axis(cdf.p_BxNbxBlk, j_B[:, None, None], axis=1)[:, 0]
    rest_B = target_B - jnp.take_along_axis(cdf.bstart_BxNb, j_B[:, None], axis=1)[:, 0]
    hit = (_inclusive_cumsum(inner_BxBlk) > rest_B[:, None]) & (inner_BxBlk > 0)
    # Rounding can leave the remainder past the block's last cumulative sum: then take its last positive token.
    last_pos_B = blk - 1 - jnp.argmax((inner_BxBlk > 0)[:, ::-1], axis=-1)
    i_B = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last_pos_B)
    return (j_B * blk + i_B).astype(jnp.int32)


def _draw(p_BxV, u_B):
    """Inverse-CDF draw of one index per row from unnormalised weights: one uniform per row, not V Gumbels."""
    return _invert(_cdf(p_BxV), u_B)


def _draw_nucleus(p_BxV, u_BxA, top_p):
    """A draw from p restricted to its top-p nucleus (tokens whose mass strictly above them is < top_p * total).

    Rejection sampling: propose from p, accept the first proposal that is in the nucleus. An accepted proposal
    is distributed as p on the nucleus, and each is accepted with probability >= top_p (the nucleus holds at
    least that much mass). Proposals are tested ROUND at a time in one pass over [B, V], so a step usually
    costs one pass instead of the 31 of finding the threshold. Rows still rejected after all PROPOSALS (rare
    unless top_p is tiny and p flat) take the exact bisection path with the last uniform. A row's result
    depends on its own uniforms only, never on the other rows.
    """
    B = p_BxV.shape[0]
    rounds = (u_BxA.shape[1] - 1) // ROUND
    cdf = _cdf(p_BxV)
    target_Bx1 = top_p * jnp.sum(p_BxV, axis=-1, keepdims=True)

    def more(c):
        r, _, ok_B = c
        return (r < rounds) & ~jnp.all(ok_B)

    def propose(c):
        r, tok_B, ok_B = c
        u_BxR = jax.lax.dynamic_slice_in_dim(u_BxA, r * ROUND, ROUND, axis=1)
        cand_BxR = jax.vmap(lambda u_B: _invert(cdf, u_B), in_axes=1, out_axes=1)(u_BxR)
        p_cand_BxR = jnp.take_along_axis(p_BxV, cand_BxR, axis=1)
        # Reduced over the minor (vocabulary) axis: XLA:CPU reduces [B, V, R] over V ~20x slower.
        above_BxR = jnp.sum(jnp.where(p_BxV[:, None, :] > p_cand_BxR[:, :, None], p_BxV[:, None, :], 0.0), axis=-1)
        inside_BxR = above_BxR < target_Bx1
        first_B = jnp.argmax(inside_BxR, axis=1)
        take_B = ~ok_B & jnp.any(inside_BxR, axis=1)
        tok_B = jnp.where(take_B, jnp.take_along_axis(cand_BxR, first_B[:, None], axis=1)[:, 0], tok_B)
        return r + 1, tok_B, ok_B | take_B

    _, tok_B, ok_B = jax.lax.while_loop(more, propose, (0, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool)))

    def fallback(_):
        exact_B = _draw(jnp.where(_nucleus_mask(p_BxV, target_Bx1), p_BxV, 0.0), u_BxA[:, -1])
        return jnp.where(ok_B, tok_B, exact_B)

    return jax.lax.cond(jnp.all(ok_B), lambda _: tok_B, fallback, None)


def draw_tokens(logits_BxV, u_BxA, temperature, top_p, top_k, mode: Mode):
    """Token ids [B] from float32 logits: temperature, then top-k, then top-p, then an inverse-CDF draw.

    u_BxA: `mode.uniforms` uniforms in [0, 1) per row; a row's token depends on its own logits and uniforms only.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if mode.greedy:
        return _argmax(logits_BxV)
    if mode.top_k:
        key_BxV, kth_Bx1 = _kth_largest_threshold(logits_BxV, top_k)
        # Ties with the k-th largest logit are kept (as transformers' TopKLogitsWarper does).
        logits_BxV = jnp.where(key_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
    # Temperature is monotone, so it commutes with top-k; the max logit survives top-k, so the max is finite
    # and p's largest entry is exactly exp(0) = 1.
    z_BxV = logits_BxV / temperature
    p_BxV = jnp.exp(z_BxV - jnp.max(z_BxV, axis=-1, keepdims=True))
    if mode.top_p:
        return _draw_nucleus(p_BxV, u_BxA, top_p)
    return _draw(p_BxV, u_BxA[:, 0])


def sample_tokens(logits_BxV, keys_B, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
    """One token per row from `logits_BxV` with one PRNG key per row: `draw_tokens`, as `jaxsr.sample.generate`
    runs it each step.

    Order: temperature, top-k (keep logits >= the k-th largest; 0 = off), top-p (the nucleus of the tempered,
    top-k-truncated distribution; ties at the threshold kept), then a draw from what remains. temperature=0
    is greedy (argmax, first index on ties). The arithmetic is float32.
    """
    logits_BxV = jnp.asarray(logits_BxV)
    mode = sampling_mode(float(temperature), float(top_p), int(top_k), logits_BxV.shape[-1])
    u_BxA = jax.vmap(lambda k: jax.random.uniform(k, (mode.uniforms,), jnp.float32))(keys_B)
    return draw_tokens(logits_BxV, u_BxA, jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p), jnp.int32(top_k), mode)


def token_logprobs(logits_BxV, tokens_B):
    """log_softmax(logits)[b, tokens[b]] in float32: the model's own (unmodified) log-probability."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    lse_B = jax.nn.logsumexp(logits_BxV, axis=-1)
    return jnp.take_along_axis(logits_BxV, tokens_B[:, None], axis=-1)[:, 0] - lse_B
