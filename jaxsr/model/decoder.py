"""The Llama-family decoder as pure functions of (params, arrays), plus a thin Flax NNX wrapper.

Parameters are one nested dict with the layers stacked on a leading axis, so the layer stack is one
`lax.scan` (compile time independent of depth) and the HF mapping is a loop over names. Shapes carry their
dimension letters: B batch, T query length, S key length (cache slots), D model, H heads, K kv heads,
E head dim, F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import attention_kernels, decode_attention
from .config import ModelConfig, rope_inv_freq
from .sharding import DEFAULT_RULES, ShardingRules

Params = dict[str, Any]

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param_logical_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter, in the same tree as the parameters."""
    layer = {
        "attn_norm": ("layers", "norm"),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "norm"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if cfg.attention_bias:
        layer |= {"bq": ("layers", "bias", "bias"), "bk": ("layers", "bias", "bias"), "bv": ("layers", "bias", "bias")}
    if cfg.o_bias:
        layer["bo"] = ("layers", "bias")
    if cfg.mlp_bias:
        layer |= {"b_gate": ("layers", "bias"), "b_up": ("layers", "bias"), "b_down": ("layers", "bias")}
    if cfg.qk_norm:
        layer |= {"q_norm": ("layers", "norm"), "k_norm": ("layers", "norm")}
    out = {"embed": ("vocab", "embed"), "layers": layer, "final_norm": ("norm",)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ("embed", "vocab")
    return out


def param_shapes(cfg: ModelConfig) -> Params:
    L, D, H, K, E, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
    layer = {
        "attn_norm": (L, D), "wq": (L, D, H, E), "wk": (L, D, K, E), "wv": (L, D, K, E), "wo": (L, H, E, D),
        "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
        "bq": (L, H, E), "bk": (L, K, E), "bv": (L, K, E), "bo": (L, D),
        "b_gate": (L, F), "b_up": (L, F), "b_down": (L, D), "q_norm": (L, E), "k_norm": (L, E),
    }
    axes = param_logical_axes(cfg)
    out = {"embed": (V, D), "final_norm": (D,), "lm_head": (D, V)}
    return {k: ({n: layer[n] for n in v} if k == "layers" else out[k]) for k, v in axes.items()}


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters as transformers initialises them: normal(0, std) weights, ones for norms, zero biases."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = path[-1].key
        if name.endswith("norm"):
            out.append(jnp.ones(shape, dtype))
        elif name.startswith("b"):
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


class KVCache(NamedTuple):
    """Keys and values of every layer for S slots; `valid_BxS` marks slots holding a real token.

    One array per layer rather than one stacked [L, ...] array: a decode step then writes its slot into each
    layer's buffer in place and attention reads that buffer directly, whereas slicing a layer out of a stacked
    cache (and writing it back) copies the whole layer every step. Keys are stored transposed ([B, K, E, S])
    and values [B, K, S, E], so q.k and p.v are plain batched matmuls over (B, K) with the contraction on
    contiguous memory (with keys [B, K, S, E], XLA:CPU's grouped-query q.k is ~3x slower).
    """

    k_BxKxExS: tuple[jax.Array, ...]  # one per layer
    v_BxKxSxE: tuple[jax.Array, ...]  # one per layer
    valid_BxS: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype) -> "KVCache":
        K, E, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        return cls(tuple(jnp.zeros((batch, K, E, slots), dtype) for _ in range(L)),
                   tuple(jnp.zeros((batch, K, slots, E), dtype) for _ in range(L)), jnp.zeros((batch, slots), bool))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _mm_low(x_NxD, w_DxF, dtype, out_dtype, x_dtype, w_dtype):
    return jnp.dot(x_NxD.astype(dtype), w_DxF.astype(dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _mm_low_fwd(x_NxD, w_DxF, dtype, out_dtype, x_dtype, w_dtype):
    xl_NxD, wl_DxF = x_NxD.astype(dtype), w_DxF.astype(dtype)
    out = jnp.dot(xl_NxD, wl_DxF, preferred_element_type=jnp.float32).astype(out_dtype)
    return out, (xl_NxD, wl_DxF)  # the low-precision copies are the residuals


def _mm_low_bwd(dtype, out_dtype, x_dtype, w_dtype, res, g_NxF):
    xl_NxD, wl_DxF = res
    g_NxF = g_NxF.astype(dtype)
    # Both products leave float32 and are cast once, to the inputs' own dtypes (float32 master weights and
    # activations: no cast at all).
    dx_NxD = jax.lax.dot_general(g_NxF, wl_DxF, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw_DxF = jax.lax.dot_general(xl_NxD, g_NxF, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx_NxD.astype(x_dtype), dw_DxF.astype(w_dtype)


_mm_low.defvjp(_mm_low_fwd, _mm_low_bwd)


def matmul(x_NxD, w_DxF, dtype=None, out_dtype=None):
    """x @ w of 2-D operands cast to `dtype` (default x's), accumulated in float32, the result in `out_dtype`
    (default x's dtype).

    Float32 operands: a plain dot. Lower precision (bfloat16): every product of the forward and the backward
    pass takes low-precision operands and a float32 result, cast afterwards. Written as a dot with a
    low-precision result (or, in the gradient, a mixed-dtype dot), XLA:CPU converts the operands to float32
    and multiplies there, which forgoes the bfloat16 matrix units (AMX) that make these dots ~4x faster; on
    GPUs and TPUs the two forms are the same arithmetic.
    """
    dtype, out_dtype = jnp.dtype(dtype or x_NxD.dtype), jnp.dtype(out_dtype or x_NxD.dtype)
    if dtype == jnp.float32:
        return jnp.dot(x_NxD.astype(dtype), w_DxF.astype(dtype), preferred_element_type=jnp.float32).astype(out_dtype)
    return _mm_low(x_NxD, w_DxF, dtype, out_dtype, jnp.dtype(x_NxD.dtype), jnp.dtype(w_DxF.dtype))


def activation_dtype(dtype, mesh=None):
    """The dtype of activations (residual stream, norms, RoPE, softmax, SiLU) for matmul dtype `dtype`.

    The same as `dtype`, except on CPU, where XLA emulates bfloat16 elementwise arithmetic (RoPE's gradient
    is ~15x slower in bfloat16 than in float32 there): CPU keeps activations in float32 and casts only the
    matmul operands (see `matmul`).
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return dtype
    return jnp.dtype(jnp.float32) if _platform(mesh) == "cpu" else dtype


def _platform(mesh) -> str:
    """cpu, tpu, gpu (NVIDIA) or rocm (an AMD GPU, which jax calls gpu too: no cuDNN there)."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return "rocm" if device.platform == "gpu" and "rocm" in device.client.platform_version else device.platform


# Weights that only enter matmuls (cast to the matmul dtype there); the rest (norms, biases) take the activations'.
_MATMUL_WEIGHTS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})


def rms_norm(x, weight, eps):
    # transformers normalises in float32 and casts back before the scale; doing the same keeps bf16 parity.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions_BxT, dtype):
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    angles_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTxE = jnp.concatenate([angles_BxTxE2, angles_BxTxE2], axis=-1)
    return jnp.cos(angles_BxTxE).astype(dtype), jnp.sin(angles_BxTxE).astype(dtype)


def apply_rope(x_BxTxNxE, cos_BxTxE, sin_BxTxE):
    half = x_BxTxNxE.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxE[..., half:], x_BxTxNxE[..., :half]], axis=-1)
    return x_BxTxNxE * cos_BxTxE[:, :, None, :] + rotated * sin_BxTxE[:, :, None, :]


def _dropout(x, rate, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention_mask(q_index_T, kv_valid_BxS, sliding_window: int | None, segment_ids_BxT=None, branch_ids_BxT=None,
                   positions_BxT=None):
    """Boolean [B, 1, T, S]: causal over slot indices, real keys only, optional sliding window.

    `segment_ids_BxT` (packed rows, no cache, so T == S): a query sees only keys of its own segment.
    `branch_ids_BxT` (a shared prefix, no cache): tokens of branch 0 are a prefix every later token sees;
    a token of branch k > 0 sees the prefix and the earlier tokens of branch k, never another branch; the
    sliding window then counts positions (`positions_BxT`), not slots, since a later branch sits further
    from the prefix in the row than in its own sequence.
    """
    S = kv_valid_BxS.shape[1]
    k_index_S = jnp.arange(S)
    allowed_TxS = k_index_S[None, :] <= q_index_T[:, None]
    if sliding_window is not None and branch_ids_BxT is None:
        allowed_TxS &= q_index_T[:, None] - k_index_S[None, :] < sliding_window
    mask_BxTxS = allowed_TxS[None] & kv_valid_BxS[:, None, :]
    if segment_ids_BxT is not None:
        mask_BxTxS &= segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    if branch_ids_BxT is not None:
        if sliding_window is not None:
            mask_BxTxS &= positions_BxT[:, :, None] - positions_BxT[:, None, :] < sliding_window
        mask_BxTxS &= (branch_ids_BxT[:, None, :] == 0) | (branch_ids_BxT[:, :, None] == branch_ids_BxT[:, None, :])
    return mask_BxTxS[:, None]


# Causal query blocks (see `query_blocks`): at most this many, of at least this many queries each.
_MAX_QUERY_BLOCKS, _MIN_QUERY_BLOCK = 4, 48


def query_blocks(T: int) -> list[tuple[int, int]]:
    """Query blocks [i, j) of a T-token chunk attending to itself (keys = the same T slots).

    Every mask `attention_mask` builds is causal over slots, so block [i, j) needs the keys [0, j) only:
    with n blocks the scores shrink to (n + 1) / 2n of T x T (62.5% at 4), and so do the softmax's work and
    the probabilities kept for the backward pass. The skipped scores are masked (their probability is
    exactly 0), so the result is the same. On a 2-core CPU the gradient of attention at T = 192 takes ~0.7x
    the time of the full square (docs/benchmarks.md); blocks below ~48 queries cost more in dispatch than
    they save.
    """
    n = min(_MAX_QUERY_BLOCKS, max(1, T // _MIN_QUERY_BLOCK))
    per_block = -(-T // n)
    size = -(-per_block // 8) * 8
    return [(i, min(T, i + size)) for i in range(0, T, size)]


def _gqa_attention(q_BxTxHxE, k_BxKxExS, v_BxKxSxE, mask_Bx1xTxS, scale, *, causal_blocks: bool = False):
    """Grouped-query attention over keys [B, K, E, S] and values [B, K, S, E] (a KVCache layer's layout, or
    this chunk's keys and values transposed to it); scores and softmax in float32.

    `causal_blocks` (keys = these T queries' own slots, S == T): attend block by block (`query_blocks`),
    skipping the keys after each block.
    """
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxKxExS.shape[1]
    if causal_blocks and len(blocks := query_blocks(T)) > 1:
        assert k_BxKxExS.shape[3] == T, (k_BxKxExS.shape, T)
        return jnp.concatenate([_gqa_attention(q_BxTxHxE[:, i:j], k_BxKxExS[..., :j], v_BxKxSxE[:, :, :j],
                                               mask_Bx1xTxS[:, :, i:j, :j], scale) for i, j in blocks], axis=1)
    if T == 1:
        # A decode step. Without the unit T axis in the contractions XLA:CPU keeps the probabilities
        # [B, K, G, S] and p.v a plain batched matmul; with it, it transposes them and runs p.v ~6x slower.
        q_BxKxGxE = q_BxTxHxE.reshape(B, K, H // K, E)
        s_BxKxGxS = jnp.einsum("bkge,bkes->bkgs", q_BxKxGxE, k_BxKxExS, preferred_element_type=jnp.float32) * scale
        s_BxKxGxS = jnp.where(mask_Bx1xTxS[:, :, 0][:, :, None], s_BxKxGxS, jnp.finfo(jnp.float32).min)
        p_BxKxGxS = jax.nn.softmax(s_BxKxGxS, axis=-1).astype(v_BxKxSxE.dtype)
        return jnp.einsum("bkgs,bkse->bkge", p_BxKxGxS, v_BxKxSxE).reshape(B, 1, H, E)
    q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
    s_BxKxGxTxS = jnp.einsum("btkge,bkes->bkgts", q_BxTxKxGxE, k_BxKxExS, preferred_element_type=jnp.float32) * scale
    # finfo.min, not -inf: a row with no valid key (batch padding) gets a uniform softmax instead of NaN.
    s_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], s_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(v_BxKxSxE.dtype)
    return jnp.einsum("bkgts,bkse->btkge", p_BxKxGxTxS, v_BxKxSxE).reshape(B, T, H, E)


def _layer(cfg: ModelConfig, dtype, mesh, x_BxTxD, lp, cos, sin, mask, cache_kv, cache_index, rng, dropout_rate,
           rules: ShardingRules = DEFAULT_RULES, kernel=None):
    """One decoder block. `cache_kv` is None (keys = this chunk) or (k_BxKxExS, v_BxKxSxE) to write into.

    `dtype` is the matmul dtype; the activations are `x_BxTxD.dtype` (see `activation_dtype`). `kernel`: None, or
    (q, k, v) -> attention of this chunk over its own keys by a kernel (splash or cuDNN, `attention_kernels`), used
    in place of `mask` when the keys are this chunk's (no cache, or a prefill into an empty cache); in a decode
    step, (q, cache keys, cache values) -> attention over the cache's filled blocks (`decode_attention`).
    """
    act = x_BxTxD.dtype
    # Matmul weights stay as stored: `matmul` casts them (and returns their gradient in the stored dtype).
    lp = {name: a if name in _MATMUL_WEIGHTS else a.astype(act) for name, a in lp.items()}
    # Projections and MLP run as 2-D matmuls over N = B*T rows: for a 3-D einsum, XLA:CPU computes the weight
    # gradient (a contraction over b and t) after explicit transposes of the activations, which cost about a
    # third of a train step on CPU; the 2-D form needs none and is the same arithmetic.
    B, T, D = x_BxTxD.shape
    h = rms_norm(x_BxTxD, lp["attn_norm"], cfg.rms_norm_eps).reshape(B * T, D)
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = matmul(h, lp["wq"].reshape(D, H * E), dtype).reshape(B, T, H, E)
    k = matmul(h, lp["wk"].reshape(D, K * E), dtype).reshape(B, T, K, E)
    v = matmul(h, lp["wv"].reshape(D, K * E), dtype).reshape(B, T, K, E)
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q, k = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache_kv is None and kernel is not None:
        new_cache, attn = None, kernel(q, k, v)
    elif cache_kv is None:
        new_cache = None
        # The same grouped-query attention as the cache path, keys laid out [B, K, E, S]: on CPU its
        # gradient is ~40% faster than jax.nn.dot_product_attention's (which transposes scores and probabilities).
        attn = _gqa_attention(q, k.transpose(0, 2, 3, 1), v.swapaxes(1, 2), mask, cfg.head_dim ** -0.5,
                              causal_blocks=True)
    else:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.transpose(0, 2, 3, 1).astype(ck.dtype), cache_index, axis=3)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.swapaxes(1, 2).astype(cv.dtype), cache_index, axis=2)
        new_cache = (ck, cv)
        if isinstance(cache_index, int) and cache_index == 0 and kernel is not None:
            # Keys and values as the cache holds them (its dtype), as the XLA path below reads them.
            attn = kernel(q, k.astype(ck.dtype).astype(act), v.astype(cv.dtype).astype(act))
        elif isinstance(cache_index, int) and cache_index == 0:
            # A prefill into an empty cache: the keys are this chunk's, so skip the (empty) slots after it.
            attn = _gqa_attention(q, ck[..., :T].astype(act), cv[:, :, :T].astype(act), mask[..., :T],
                                  cfg.head_dim ** -0.5, causal_blocks=True)
        elif kernel is not None:
            # A decode step by the Pallas kernel that reads only the cache's filled blocks (decode_attention).
            attn = kernel(q, ck, cv)
        else:
            attn = _gqa_attention(q, ck.astype(act), cv.astype(act), mask, cfg.head_dim ** -0.5)
    # One contracting dim (h*e): with two, XLA:CPU may pick (e, h) order and transpose wo to match, which inside
    # the sampler's decode loop is a copy of every layer's wo at every step.
    HE = cfg.num_heads * cfg.head_dim
    out = matmul(attn.reshape(B * T, HE), lp["wo"].reshape(HE, D), dtype).reshape(B, T, D)
    if cfg.o_bias:
        out = out + lp["bo"]
    r1 = r2 = None
    if rng is not None:
        r1, r2 = jax.random.split(rng)
    x_BxTxD = x_BxTxD + _dropout(out, dropout_rate, r1)
    h = rms_norm(x_BxTxD, lp["mlp_norm"], cfg.rms_norm_eps).reshape(B * T, D)
    gate = matmul(h, lp["w_gate"], dtype)
    up = matmul(h, lp["w_up"], dtype)
    if cfg.mlp_bias:
        gate, up = gate + lp["b_gate"], up + lp["b_up"]
    down = matmul(jax.nn.silu(gate) * up, lp["w_down"], dtype)
    if cfg.mlp_bias:
        down = down + lp["b_down"]
    x_BxTxD = x_BxTxD + _dropout(down.reshape(B, T, D), dropout_rate, r2)
    if mesh is not None:
        # The residual stream: rows over the layout's batch axes, the model dimension whole.
        x_BxTxD = jax.lax.with_sharding_constraint(x_BxTxD, jax.sharding.NamedSharding(mesh, rules.spec(("batch", None, None))))
    return x_BxTxD, new_cache


def hidden_states(params: Params, cfg: ModelConfig, ids_BxT, positions_BxT, kv_valid_BxS, *, cache: KVCache | None = None,
                  cache_index=0, dtype=jnp.float32, dropout_rate: float = 0.0, rng=None, remat: str = "none",
                  mesh=None, unroll: int | bool = 1, segment_ids_BxT=None, branch_ids_BxT=None,
                  rules: ShardingRules = DEFAULT_RULES, attention: str = "xla"):
    """Final-norm hidden states [B, T, D] (and the updated cache).

    Without a cache, keys are this chunk and `kv_valid_BxS` is its padding mask (S = T). With a cache, the
    chunk is written at slots [cache_index, cache_index + T) and `kv_valid_BxS` marks the valid slots
    after the write. `segment_ids_BxT` (packed rows, no cache) keeps attention inside each sequence; the
    caller passes per-sequence `positions_BxT` (see `positions_from_segments`). `branch_ids_BxT` (no cache)
    lays several continuations of one shared prefix side by side in a row: see `attention_mask`; each
    branch's positions continue from the prefix's. `rules`: the layout `params` and the batch are on (the
    activations' shardings follow it). `attention`: xla, splash, cudnn or auto (`attention_kernels.kernel_for`):
    the implementation of a chunk's attention over its own keys (no cache, or a prefill into an empty cache); a
    decode step (T = 1 into a cache) takes the Pallas kernel that reads only the filled blocks under splash, and
    under auto on TPU (`attention_kernels.decode_kernel_for`), else the XLA path.
    """
    T = ids_BxT.shape[1]
    for name, ids in (("segment_ids_BxT (packed sequences)", segment_ids_BxT),
                      ("branch_ids_BxT (a shared prefix)", branch_ids_BxT)):
        if ids is not None and cache is not None:
            raise ValueError(f"{name} cannot be combined with a KV cache")
    embed_VxD = params["embed"]
    if mesh is not None:
        # The model dimension whole before the lookup: a gather whose table and output both use `fsdp` makes
        # XLA replicate the whole table instead (the training layout all-gathers the FSDP dim here; the decode
        # layout holds it whole already, so this is a no-op there).
        embed_VxD = jax.lax.with_sharding_constraint(
            embed_VxD, jax.sharding.NamedSharding(mesh, rules.spec(("vocab", None))))
    act = activation_dtype(dtype, mesh)
    x = embed_VxD[ids_BxT].astype(act)
    cos, sin = rope_cos_sin(cfg, positions_BxT, act)
    kernel, platform = None, _platform(mesh)
    own_keys = cache is None or (isinstance(cache_index, int) and cache_index == 0)
    which = "xla" if not own_keys else attention_kernels.kernel_for(
        attention, platform, branch=branch_ids_BxT is not None, packed=segment_ids_BxT is not None, dtype=act,
        head_dim=cfg.head_dim)
    if not own_keys and T == 1 and attention_kernels.decode_kernel_for(attention, platform) != "xla":
        kernel = functools.partial(decode_attention.decode_step, valid_BxS=kv_valid_BxS, slot=cache_index,
                                   scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window, mesh=mesh,
                                   rules=rules, interpret=platform != "tpu")
    elif which != "xla":
        kernel = functools.partial(
            attention_kernels.splash_attention if which == "splash" else attention_kernels.cudnn_attention,
            valid_BxT=kv_valid_BxS[:, :T], scale=cfg.head_dim ** -0.5, segment_ids_BxT=segment_ids_BxT,
            sliding_window=cfg.sliding_window, mesh=mesh, rules=rules,
            **({"interpret": platform != "tpu"} if which == "splash" else {}))
    mask = None if kernel is not None else attention_mask(
        cache_index + jnp.arange(T), kv_valid_BxS, cfg.sliding_window, segment_ids_BxT, branch_ids_BxT, positions_BxT)
    layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)

    if cache is not None:
        # The cached path (prefill and decode) unrolls the layers in Python so each layer reads and writes
        # its own cache buffer in place (see KVCache). `params["layers"]` may also be a list of per-layer
        # dicts (`unstack_layers`): a decode loop slices the weights once, outside the loop, not every step.
        layers = params["layers"]
        # Materialise the RoPE tables once: otherwise XLA fuses sin/cos into every layer's q and k rotation
        # and recomputes them 2L times per step.
        cos, sin = jax.lax.optimization_barrier((cos, sin))
        ks, vs = [], []
        for i in range(cfg.num_layers):
            lp = layers[i] if isinstance(layers, (list, tuple)) else jax.tree.map(lambda a: a[i], layers)
            lrng = None if layer_rngs is None else layer_rngs[i]
            x, (k_i, v_i) = _layer(cfg, dtype, mesh, x, lp, cos, sin, mask, (cache.k_BxKxExS[i], cache.v_BxKxSxE[i]),
                                   cache_index, lrng, dropout_rate, rules, kernel)
            ks.append(k_i)
            vs.append(v_i)
        x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
        return x, KVCache(tuple(ks), tuple(vs), kv_valid_BxS)

    def body(x, xs):
        lp, lrng = xs
        x, _ = _layer(cfg, dtype, mesh, x, lp, cos, sin, mask, None, cache_index, lrng, dropout_rate, rules, kernel)
        return x, None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (params["layers"], layer_rngs), unroll=unroll)
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return x, None


def unstack_layers(params: Params, num_layers: int) -> Params:
    """The same parameters with `layers` as a list of per-layer dicts (accepted by the cached path)."""
    return {**params, "layers": [jax.tree.map(lambda a: a[i], params["layers"]) for i in range(num_layers)]}


def lm_head(params: Params, cfg: ModelConfig, h_BxTxD, dtype=None):
    """Logits in float32 (the loss and the sampler both want full precision here); `dtype`: the matmul's
    operand dtype (default the hidden states')."""
    w_DxV = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    # A 2-D matmul over all rows (see _layer: no activation transposes in the weight gradient on CPU).
    *lead, D = h_BxTxD.shape
    logits = matmul(h_BxTxD.reshape(-1, D), w_DxV, dtype or h_BxTxD.dtype, jnp.float32)
    return logits.reshape(*lead, w_DxV.shape[1])


def forward(params: Params, cfg: ModelConfig, ids_BxT, mask_BxT=None, segment_ids_BxT=None, **kw):
    """Logits [B, T, V] (float32) of a left- or right-padded batch without a cache.

    With `segment_ids_BxT` (packed rows: several sequences per row, each a run of equal ids), every
    sequence gets its own positions from 0 and attends only to itself.
    """
    if mask_BxT is None:
        mask_BxT = jnp.ones(ids_BxT.shape, bool)
    mask_BxT = mask_BxT.astype(bool)
    if segment_ids_BxT is None:
        positions = positions_from_mask(mask_BxT)
    else:
        positions = positions_from_segments(segment_ids_BxT)
        kw["segment_ids_BxT"] = segment_ids_BxT
    h, _ = hidden_states(params, cfg, ids_BxT, positions, mask_BxT, **kw)
    return lm_head(params, cfg, h, kw.get("dtype"))


def positions_from_mask(mask_BxT):
    # Left padding: a row's first real token is position 0, as transformers derives it from the mask.
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids_BxT):
    """Index of each token within its segment (a run of equal segment ids), for packed rows."""
    T = segment_ids_BxT.shape[1]
    index_BxT = jnp.broadcast_to(jnp.arange(T), segment_ids_BxT.shape)
    starts_BxT = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                                  segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    return index_BxT - jax.lax.cummax(jnp.where(starts_BxT, index_BxT, 0), axis=1)


class Decoder(nnx.Module):
    """Flax NNX view of the decoder: the parameters as `nnx.Param`s, the forward pass delegated to `forward`.

    The hot paths (sampler, train steps) call the pure functions on `params()` directly; this class is
    for users who want an NNX module (e.g. to compose it with their own NNX code or optimizers).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None,
                 dtype=jnp.float32):
        self.cfg = cfg
        if params is None:
            params = init_params(cfg, (rngs or nnx.Rngs(0)).params(), dtype)
        self.weights = nnx.data(jax.tree.map(nnx.Param, params))

    def params(self) -> Params:
        return jax.tree.map(lambda p: p[...], self.weights, is_leaf=lambda x: isinstance(x, nnx.Param))

    def __call__(self, ids_BxT, mask_BxT=None, **kw):
        return forward(self.params(), self.cfg, ids_BxT, mask_BxT, **kw)
