"""Decode attention that reads only the filled part of the KV cache: a Pallas TPU kernel.

A decode step attends one query per row over the cache's S slots (the call prefix, the prompt bucket, the new-token
bucket). The slots after the current one hold nothing yet, but the XLA path (`decoder._gqa_attention`) reads all S
of them from HBM at every step: XLA:TPU brings each layer's whole cache in before any slice of it (measured by
compiling, docs/sampling.md). This kernel walks the cache in blocks of `block` slots and stops at the block that
holds the current slot: the keys', values' and mask's index maps clamp the block index to that last filled block,
so the grid steps after it ask for the block already in VMEM and the pipeline copies nothing, and `pl.when` skips
their arithmetic. A sliding window skips the blocks before it the same way. Every row of a chunk is at the same
slot (prompts are left-padded, the step is the loop's), so the bound is one scalar, prefetched into SMEM: a step
at slot t reads ceil((t + 1) / block) blocks of keys and values, not S / block.

Each grid step takes `rows` rows of one kv head (their G = H / K query heads at once), so a step's fixed cost is
shared; the softmax is the online one (a running maximum and sum in VMEM). Keys and values are read in the cache's
dtype and used in q's (the activations'), scores and sums are float32, and the probabilities are cast to q's dtype
before p.v, as the XLA path does. Off TPU it runs in Pallas interpret
mode: exact, slow, for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .sharding import DEFAULT_RULES, ShardingRules

# Block sizes tried, largest first: a multiple of 128 lanes (the keys' slot axis is their last); a cache of S slots
# that none divides is one block (correct, but nothing skipped).
BLOCKS = (512, 256, 128)
# Rows per grid step, largest first, the first that divides a device's rows.
ROWS = (8, 4, 2, 1)
# The masked score, as in decoder._gqa_attention (finfo.min, not -inf: exp(min - max) is 0, never NaN).
_NEG = float(jnp.finfo(jnp.float32).min)


def block_for(slots: int) -> int:
    """The kernel's block of slots for a cache of `slots` slots: the largest of BLOCKS dividing it, else all."""
    return next((b for b in BLOCKS if slots % b == 0), slots)


def block_bounds(slot, slots: int, block: int, sliding_window: int | None):
    """int32 [first, last, slot]: the blocks a query at cache slot `slot` reads (first..last, inclusive) and the
    slot itself. Keys after the slot are never read (causal); with a window, neither are those before it."""
    slot = jnp.asarray(slot, jnp.int32)
    first = jnp.int32(0) if sliding_window is None else jnp.maximum(slot - (sliding_window - 1), 0) // block
    return jnp.stack([first, jnp.minimum(slot, slots - 1) // block, slot]).astype(jnp.int32)


def block_read(j, bounds):
    """The block grid step j reads: j clamped to [first, last]. Steps outside ask for a block the step before
    them already holds (or the one after them will), so the pipeline issues no copy for them."""
    return jnp.minimum(jnp.maximum(j, bounds[0]), bounds[1])


def _kernel(bounds_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, m_ref, l_ref, acc_ref, *, rows, block, scale,
            sliding_window):
    j = pl.program_id(2)
    first, last, slot = bounds_ref[0], bounds_ref[1], bounds_ref[2]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= first) & (j <= last))
    def _block():
        index = j * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        allowed = index <= slot
        if sliding_window is not None:
            allowed &= slot - index < sliding_window
        for r in range(rows):  # 2-D matmuls per row: [G, E] x [E, block] and [G, block] x [block, E]
            q, k, v = q_ref[r, 0], k_ref[r, 0], v_ref[r, 0]
            s = jnp.dot(q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
            s = jnp.where(allowed & (valid_ref[r] != 0), s, _NEG)
            m_prev = m_ref[r]
            m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
            alpha, p = jnp.exp(m_prev - m_new), jnp.exp(s - m_new)
            l_ref[r] = alpha * l_ref[r] + p.sum(axis=-1, keepdims=True)
            acc_ref[r] = alpha * acc_ref[r] + jnp.dot(p.astype(q.dtype), v.astype(q.dtype),
                                                      preferred_element_type=jnp.float32)
            m_ref[r] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _out():
        o_ref[:, 0] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)


def _local(bounds, q_BxKxGxE, k_BxKxExS, v_BxKxSxE, valid_Bx1xS, *, block, scale, sliding_window, interpret):
    # One device's rows and kv heads.
    B, K, G, E = q_BxKxGxE.shape
    S = k_BxKxExS.shape[3]
    rows = next(r for r in ROWS if B % r == 0)

    def at(b, h, j, bounds):
        return block_read(j, bounds)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(B // rows, K, S // block),
        in_specs=[pl.BlockSpec((rows, 1, G, E), lambda b, h, j, bounds: (b, h, 0, 0)),
                  pl.BlockSpec((rows, 1, E, block), lambda b, h, j, bounds: (b, h, 0, at(b, h, j, bounds))),
                  pl.BlockSpec((rows, 1, block, E), lambda b, h, j, bounds: (b, h, at(b, h, j, bounds), 0)),
                  pl.BlockSpec((rows, 1, block), lambda b, h, j, bounds: (b, 0, at(b, h, j, bounds)))],
        out_specs=pl.BlockSpec((rows, 1, G, E), lambda b, h, j, bounds: (b, h, 0, 0)),
        scratch_shapes=[pltpu.VMEM((rows, G, 1), jnp.float32), pltpu.VMEM((rows, G, 1), jnp.float32),
                        pltpu.VMEM((rows, G, E), jnp.float32)])
    kernel = functools.partial(_kernel, rows=rows, block=block, scale=scale, sliding_window=sliding_window)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q_BxKxGxE.shape, q_BxKxGxE.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="jaxsr_decode_attention")(bounds, q_BxKxGxE, k_BxKxExS, v_BxKxSxE, valid_Bx1xS)


def decode_attention(q_BxHxE, k_BxKxExS, v_BxKxSxE, valid_BxS, slot, scale: float, *,
                     sliding_window: int | None = None, mesh=None, rules: ShardingRules = DEFAULT_RULES,
                     interpret: bool = False, block: int | None = None):
    """One query per row at cache slot `slot` (a traced int32 scalar, the same for every row) over a KVCache layer
    (keys [B, K, E, S], values [B, K, S, E], `valid_BxS` the real slots): [B, H, E] in q's dtype, equal to
    `decoder._gqa_attention` with `decoder.attention_mask(slot, valid_BxS, sliding_window)` for a row with at least
    one real slot at or before `slot` (a decode step's own token always is one).

    Reads only the blocks at or before `slot` (and, with a window, not before it). With `mesh` (inside a sharded
    jit, where a Mosaic kernel is not partitioned automatically) it runs under `jax.shard_map`: rows over
    `rules.batch`, heads and kv heads over `rules.heads`. `block`: slots per block (default `block_for(S)`).
    """
    from .attention_kernels import _per_device

    B, H, E = q_BxHxE.shape
    K, S = k_BxKxExS.shape[1], k_BxKxExS.shape[3]
    block = block or block_for(S)
    if S % block:
        raise ValueError(f"decode attention: block {block} does not divide the cache's {S} slots")
    bounds = block_bounds(slot, S, block, sliding_window)
    valid_Bx1xS = valid_BxS.astype(jnp.int32)[:, None, :]
    attend = functools.partial(_local, block=block, scale=scale, sliding_window=sliding_window, interpret=interpret)
    attend = _per_device(attend, "decode attention", mesh, rules, {"B": B, "H": H, "K": K},
                         ("", "BKGE", "BKES", "BKSE", "B1S"), "BKGE")
    out_BxKxGxE = attend(bounds, q_BxHxE.reshape(B, K, H // K, E), k_BxKxExS, v_BxKxSxE, valid_Bx1xS)
    return out_BxKxGxE.reshape(B, H, E)


def decode_step(q_Bx1xHxE, k_BxKxExS, v_BxKxSxE, **kw):
    """`decode_attention` for the decoder's layout of a decode step's query, [B, 1, H, E]: [B, 1, H, E]."""
    return decode_attention(q_Bx1xHxE[:, 0], k_BxKxExS, v_BxKxSxE, **kw)[:, None]
