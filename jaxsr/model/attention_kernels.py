"""Attention kernels for a chunk attending to its own keys (training rows, a prefill into an empty cache): Pallas
splash attention on TPU, cuDNN flash attention on NVIDIA GPUs (`cudnn_attention`, below).

The XLA path (`decoder._gqa_attention`) materialises [B, H, T, S] scores; the splash kernel streams keys block by
block and skips the blocks a mask rules out, so its memory is linear in T. Every mask of a chunk over itself that
`decoder.attention_mask` builds without `branch_ids_BxT` is one splash understands: causal over slots (`CausalMask`),
or a sliding window over slots (`LocalMask`), and-ed with segment ids (`SegmentIds`) that carry the padding and the
packed sequences: 0 for padding, 1 + the packed segment id for a real token, so a real query never sees padding
and a padding query sees only padding (its output is discarded, as the XLA path's is).

The shared-prefix DPO row (`branch_ids_BxT`: a branch sees the prefix and itself, not the other branch) is not an
equality of ids, so it stays on the XLA path (`dpo.shared_prompt=false` lays pairs out as two rows, which splash
runs). Decode steps (one query over the cache) have their own Pallas kernel, `decode_attention`, which reads only
the cache's filled blocks (`decode_kernel_for`).

cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) takes a causal mask, a sliding window and per-row
sequence lengths, which assume each row's real tokens are one run from slot 0. jaxsr rows are left- or right-padded,
so each row's run is rotated to the front (`rotate_rows`), attended, and rotated back. Packed rows (segment ids) and
shared-prefix rows (branch ids) are not expressible and stay on the XLA path; a row whose real tokens are not one
run gets NaN (loud, never a silently wrong mask).
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
# exact, slow, for tests). cudnn: cuDNN flash attention (NVIDIA GPUs, bfloat16 / float16). auto: splash on TPU, cudnn
# on an NVIDIA GPU where it applies (`kernel_for`), the XLA path elsewhere.
ATTENTION_CHOICES = ("xla", "splash", "cudnn", "auto")

# Chunks are padded to a multiple of this (the kernel's smallest block: 128 lanes).
MIN_BLOCK = 128
# The largest block size tried; larger blocks mean fewer grid steps on TPU (MaxText's default is 512).
MAX_BLOCK = 512

# The implementation `cudnn_attention` asks `jax.nn.dot_product_attention` for. Tests set it to "xla": the same
# causal / sequence-length / window arguments, computed by XLA, so the code around cuDNN runs (and is checked) on CPU.
# With anything but "cudnn" the platform and dtype requirements below are lifted (they are cuDNN's).
CUDNN_IMPLEMENTATION = "cudnn"
CUDNN_DTYPES = ("bfloat16", "float16")
# cuDNN flash attention's head-dim limit for bfloat16 / float16 before Hopper (jax/_src/cudnn/
# fused_attention_stablehlo.py, `check_is_flash_attention`: <= 128, or 256 on compute capability >= 9.0, and a
# multiple of 8). The smaller one, so `auto` never picks cuDNN for a shape a GPU would refuse.
CUDNN_MAX_HEAD_DIM = 128


def check_choice(attention: str, key: str = "attention") -> None:
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"{key}={attention!r} is not an attention implementation; choose one of "
                         f"{list(ATTENTION_CHOICES)}")


def cudnn_unsupported(platform: str, dtype, head_dim: int) -> str | None:
    """Why cuDNN cannot run a chunk of `dtype` activations with heads of `head_dim` on `platform`, or None."""
    if CUDNN_IMPLEMENTATION != "cudnn":
        return None
    if platform != "gpu":
        return f"cuDNN runs on NVIDIA GPUs, and these devices are {platform}"
    if jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return (f"cuDNN flash attention takes bfloat16 or float16, and the activations are {jnp.dtype(dtype).name} "
                f"(model.dtype)")
    if head_dim > CUDNN_MAX_HEAD_DIM or head_dim % 8:
        return f"cuDNN flash attention takes head_dim <= {CUDNN_MAX_HEAD_DIM}, a multiple of 8, not {head_dim}"
    return None


def kernel_for(attention: str, platform: str, *, branch: bool, packed: bool, dtype, head_dim: int) -> str:
    """Which attention a chunk over its own keys runs: "xla", "splash" or "cudnn" (`platform`: the devices'
    platform, "gpu" for NVIDIA; `branch`: shared-prefix rows; `packed`: segment ids; `dtype`: q, k and v's).

    An explicit kernel the chunk rules out is an error rather than a quiet XLA fallback: the user asked for it."""
    check_choice(attention)
    if attention == "xla":
        return "xla"
    if attention in ("splash", "cudnn") and branch:
        raise ValueError(f"attention={attention!r} cannot run a shared-prefix DPO row (branch ids: a branch sees the "
                         f"prefix but not the other branch, which {attention}'s masks cannot express); set "
                         "dpo.shared_prompt=false (two rows per pair) or model.attention=auto (the XLA path for "
                         "those rows)")
    if attention == "splash":
        return "splash"
    why_not = cudnn_unsupported(platform, dtype, head_dim)
    if attention == "cudnn":
        if packed:
            raise ValueError("attention='cudnn' cannot run packed rows (segment ids: cuDNN's sequence lengths take "
                             "one sequence per row); set sft.packing=false or model.attention=auto (the XLA path "
                             "for those rows)")
        if why_not:
            raise ValueError(f"attention='cudnn': {why_not}; set model.attention=auto (cuDNN where it applies, "
                             f"else splash on TPU or the XLA path) or model.attention=xla")
        return "cudnn"
    if branch:
        return "xla"
    if platform == "tpu":
        return "splash"
    return "cudnn" if platform == "gpu" and not packed and why_not is None else "xla"


def decode_kernel_for(attention: str, platform: str) -> str:
    """Which attention a decode step (one query per row over the KV cache) runs: "pallas" (`decode_attention`: reads
    only the cache's filled blocks) under splash (the Pallas choice; off TPU in interpret mode) and under auto on
    TPU; "xla" (every slot of the cache, masked) otherwise: cuDNN has no decode kernel here."""
    check_choice(attention)
    return "pallas" if attention == "splash" or (attention == "auto" and platform == "tpu") else "xla"


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


def _per_device(attend, name: str, mesh, rules: ShardingRules, sizes: dict[str, int], in_layouts, out_layout: str):
    """`attend` as is (no mesh), or under `jax.shard_map` over `mesh` (inside a sharded jit, where a kernel's custom
    call is not partitioned automatically): each argument's and the output's dimensions named by a layout string,
    B rows over `rules.batch`, H heads over `rules.heads`, K kv heads over `rules.kv_heads`, the rest whole."""
    if mesh is None:
        return attend
    if rules.heads != rules.kv_heads:
        raise ShardingError(f"{name} needs heads and kv heads on the same mesh axis (each device's query heads read "
                            f"its own kv heads); the rules put heads on {rules.heads!r} and kv_heads on "
                            f"{rules.kv_heads!r}")
    axes = {"B": rules.batch, "H": rules.heads, "K": rules.kv_heads}
    for what, letter in (("rows", "B"), ("num_heads", "H"), ("num_kv_heads", "K")):
        n, size = _axis_size(mesh, axes[letter]), sizes[letter]
        if size % n:
            raise ShardingError(f"{name}: {what}={size} is not divisible by mesh axis {axes[letter]!r} (size {n}); "
                                f"choose a mesh whose {axes[letter]!r} size divides {size}")

    def spec(layout):
        return P(*(axes.get(letter) for letter in layout))

    return jax.shard_map(attend, mesh=mesh, in_specs=tuple(map(spec, in_layouts)), out_specs=spec(out_layout),
                         check_vma=False)


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
    attend = _per_device(attend, "splash attention", mesh, rules, {"B": B, "H": H, "K": K},
                         ("BHTE", "BKTE", "BKTE", "BT"), "BHTE")
    out_BxHxTxE = attend(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, seg_BxT)
    return out_BxHxTxE[:, :, :T].transpose(0, 2, 1, 3)


# --- cuDNN ---------------------------------------------------------------------------------------------------------

@jax.custom_vjp
def rotate_rows(x_BxTx, shift_B):
    """Row b rotated left by shift_B[b] along axis 1: out[b, t] = x[b, (t + shift_B[b]) mod T]. Its gradient is the
    inverse rotation (a gather, where the gather's own would be a scatter-add)."""
    T = x_BxTx.shape[1]
    index_BxT = (jnp.arange(T)[None, :] + shift_B[:, None]) % T
    return jnp.take_along_axis(x_BxTx, index_BxT.reshape(index_BxT.shape + (1,) * (x_BxTx.ndim - 2)), axis=1)


def _rotate_rows_fwd(x_BxTx, shift_B):
    return rotate_rows(x_BxTx, shift_B), shift_B


def _rotate_rows_bwd(shift_B, g_BxTx):
    return rotate_rows(g_BxTx, -shift_B), None


rotate_rows.defvjp(_rotate_rows_fwd, _rotate_rows_bwd)


def _local_cudnn(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, valid_BxT, *, scale, sliding_window):
    # One device's rows and heads. Each row's real tokens rotated to slots [0, n): a causal mask and a window over
    # slots are unchanged by the shift (a run keeps its slot differences), and n is cuDNN's sequence length.
    # At least 1: a row of padding only then attends slot 0 to itself (its output is zeroed below) rather than
    # asking cuDNN for a sequence of length 0, whose softmax has no key at all.
    length_B = jnp.maximum(valid_BxT.sum(axis=1, dtype=jnp.int32), 1)
    start_B = jnp.argmax(valid_BxT, axis=1).astype(jnp.int32)  # 0 for a row of padding only
    runs_B = jnp.sum(valid_BxT[:, 1:] & ~valid_BxT[:, :-1], axis=1) + valid_BxT[:, 0]
    q, k, v = (rotate_rows(a, start_B) for a in (q_BxTxHxE, k_BxTxKxE, v_BxTxKxE))
    out_BxTxHxE = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, query_seq_lengths=length_B, key_value_seq_lengths=length_B,
        # Keys k <= q with q - k < window, as attention_mask's window over slots.
        local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
        implementation=CUDNN_IMPLEMENTATION)
    out_BxTxHxE = jnp.where(valid_BxT[:, :, None, None], rotate_rows(out_BxTxHxE, -start_B), 0)
    # A row of several runs (a hole among its real tokens) has no sequence length that says which keys
    # each query sees: NaN, not a silently different mask.
    return jnp.where((runs_B <= 1)[:, None, None, None], out_BxTxHxE, jnp.nan).astype(q_BxTxHxE.dtype)


def cudnn_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, valid_BxT, scale: float, *, segment_ids_BxT=None,
                    sliding_window: int | None = None, mesh=None, rules: ShardingRules = DEFAULT_RULES):
    """Attention of T queries over their own T keys by cuDNN flash attention, as `splash_attention` (the same
    contract): [B, T, H, E] in q's dtype, equal to `decoder._gqa_attention` with `decoder.attention_mask` for real
    queries; padding queries' outputs are 0.

    Each row's real tokens must be one run (left- or right-padded, or none): a row with several gets NaN. Packed
    rows (`segment_ids_BxT`) are refused. With `mesh`, it runs under `jax.shard_map` as `splash_attention` does.
    """
    if segment_ids_BxT is not None:
        raise ValueError("cuDNN attention cannot run packed rows (segment ids: cuDNN's sequence lengths take one "
                         "sequence per row); set sft.packing=false or model.attention=auto")
    B, T, H, E = q_BxTxHxE.shape
    attend = functools.partial(_local_cudnn, scale=scale, sliding_window=sliding_window)
    attend = _per_device(attend, "cuDNN attention", mesh, rules, {"B": B, "H": H, "K": k_BxTxKxE.shape[2]},
                         ("BTHE", "BTKE", "BTKE", "BT"), "BTHE")
    return attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, valid_BxT.astype(bool))
