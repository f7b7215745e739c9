"""Pallas splash attention (TPU) for a chunk attending to its own keys: training rows and a prefill into an empty cache.

The XLA path (`decoder._gqa_attention`) materialises [B, H, T, S] scores; the splash kernel streams keys block by
block and skips the blocks a mask rules out, so its memory is linear in T. Every mask of a chunk over itself that
`decoder.attention_mask` builds without `branch_ids_BxT` is one splash understands: causal over slots (`CausalMask`),
or a sliding window over slots (`LocalMask`), and-ed with segment ids (`SegmentIds`) that carry the padding and the
packed sequences: 0 for padding, 1 + the packed segment id for a real token, so a real query never sees padding
and a padding query sees only padding (its output is discarded, as the XLA path's is).

The shared-prefix DPO row (`branch_ids_BxT`: a branch sees the prefix and itself, not the other branch) is not an
equality of ids, so it stays on the XLA path (`dpo.shared_prompt=false` lays pairs out as two rows, which splash
runs). Decode steps (one query over the cache) stay on the XLA path too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from .sharding import DEFAULT_RULES, ShardingError, ShardingRules

# xla: always the XLA path. splash: the kernel for every chunk over its own keys (off TPU in Pallas interpret mode:
# exact, slow, for tests). auto: the kernel on TPU, the XLA path elsewhere.
ATTENTION_CHOICES = ("xla", "splash", "auto")

# Chunks are padded to a multiple of this (the kernel's smallest block: 128 lanes).
MIN_BLOCK = 128
# The largest block size tried; larger blocks mean fewer grid steps on TPU (MaxText's default is 512).
MAX_BLOCK = 512


def check_choice(attention: str, key: str = "attention") -> None:
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"{key}={attention!r} is not an attention implementation; choose one of "
                         f"{list(ATTENTION_CHOICES)}")


def use_splash(attention: str, platform: str, *, branch: bool) -> bool:
    """Whether a chunk attending to its own keys runs the splash kernel (`platform`: the devices' platform).

    An explicit `splash` with a shared-prefix row (`branch`) is an error rather than a quiet XLA fallback: the
    user asked for the kernel and the batch layout rules it out."""
    check_choice(attention)
    if attention == "xla":
        return False
    if branch:
        if attention == "splash":
            raise ValueError("attention='splash' cannot run a shared-prefix DPO row (branch ids: a branch sees the "
                             "prefix but not the other branch, which splash's segment ids cannot express); set "
                             "dpo.shared_prompt=false (two rows per pair) or model.attention=auto (the XLA path for "
                             "those rows)")
        return False
    return attention == "splash" or platform == "tpu"


def block_size(T: int) -> int:
    """The kernel's block size for a chunk of T tokens padded to a multiple of MIN_BLOCK: the largest power of two
    up to MAX_BLOCK that divides the padded length."""
    Tp = -(-T // MIN_BLOCK) * MIN_BLOCK
    b = MAX_BLOCK
    while Tp % b:
        b //= 2
    return b


def _kernel(num_heads: int, T: int, block: int, sliding_window: int | None, interpret: bool):
    if sliding_window is None:
        head_mask = splash.CausalMask((T, T))
    else:
        # Keys k with q - k < window and k <= q, as attention_mask's window over slots.
        head_mask = splash.LocalMask((T, T), window_size=(sliding_window - 1, 0), offset=0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * num_heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _local_attention(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, seg_BxT, *, block, sliding_window, interpret):
    # One device's rows and heads; the kernel works on one row [H, T, E] (kv heads [K, T, E], query head h reading
    # kv head h // (H / K), the decoder's grouping), so the rows are a vmap.
    kernel = _kernel(q_BxHxTxE.shape[1], q_BxHxTxE.shape[2], block, sliding_window, interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
        q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, seg_BxT)


def _axis_size(mesh, axis) -> int:
    if axis is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))


def splash_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, valid_BxT, scale: float, *, segment_ids_BxT=None,
                     sliding_window: int | None = None, mesh=None, rules: ShardingRules = DEFAULT_RULES,
                     interpret: bool = False, block: int | None = None):
    """Attention of T queries over their own T keys, as `decoder._gqa_attention` with `decoder.attention_mask`
    computes it for real queries: [B, T, H, E], in q's dtype.

    `valid_BxT` marks real tokens (keys a real query may see); `segment_ids_BxT` (packed rows, ids >= 0) keeps each
    query inside its own segment. T is padded to a multiple of MIN_BLOCK (the padding is a segment of its own) and
    cut back. With `mesh` (inside a sharded jit, where a Mosaic kernel cannot be partitioned automatically), the
    kernel runs under `jax.shard_map`: rows over `rules.batch`, heads and kv heads over `rules.heads`. `block`: the
    kernel's block size (default `block_size(T)`).
    """
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxTxKxE.shape[2]
    seg_BxT = jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
    seg_BxT = jnp.where(valid_BxT, seg_BxT + 1, 0)
    block = block or block_size(T)
    Tp = -(-T // MIN_BLOCK) * MIN_BLOCK
    # splash does not scale the scores; scaling q is the same product (up to rounding in low precision).
    q_BxHxTxE = (q_BxTxHxE * jnp.asarray(scale, q_BxTxHxE.dtype)).transpose(0, 2, 1, 3)
    k_BxKxTxE, v_BxKxTxE = k_BxTxKxE.transpose(0, 2, 1, 3), v_BxTxKxE.transpose(0, 2, 1, 3)
    if Tp != T:
        pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
        q_BxHxTxE, k_BxKxTxE, v_BxKxTxE = (jnp.pad(a, pad) for a in (q_BxHxTxE, k_BxKxTxE, v_BxKxTxE))
        seg_BxT = jnp.pad(seg_BxT, ((0, 0), (0, Tp - T)))
    attend = functools.partial(_local_attention, block=block, sliding_window=sliding_window, interpret=interpret)
    if mesh is not None:
        if rules.heads != rules.kv_heads:
            raise ShardingError(f"splash attention needs heads and kv heads on the same mesh axis (the kernel pairs "
                                f"each device's query heads with its own kv heads); the rules put heads on "
                                f"{rules.heads!r} and kv_heads on {rules.kv_heads!r}")
        rows, heads = _axis_size(mesh, rules.batch), _axis_size(mesh, rules.heads)
        for what, size, axis, n in (("rows", B, rules.batch, rows), ("num_heads", H, rules.heads, heads),
                                    ("num_kv_heads", K, rules.kv_heads, heads)):
            if size % n:
                raise ShardingError(f"splash attention: {what}={size} is not divisible by mesh axis {axis!r} "
                                    f"(size {n}); choose a mesh whose {axis!r} size divides {size}")
        spec_q = P(rules.batch, rules.heads, None, None)
        spec_kv = P(rules.batch, rules.kv_heads, None, None)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, P(rules.batch, None)),
                               out_specs=spec_q, check_vma=False)
    out_BxHxTxE = attend(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, seg_BxT)
    return out_BxHxTxE[:, :, :T].transpose(0, 2, 1, 3)
