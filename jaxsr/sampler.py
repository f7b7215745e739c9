"""How one chunk of rows runs on the device: the decode state, one jitted prefill and one jitted `lax.while_loop`
decode, compiled ahead of time per chunk shape. `jaxsr.sample.generate` (the host side) splits a call into chunks
and calls `run_chunk` on each. The programs take any (mesh, rules); `generate` runs them on the decode layout
(`jaxsr.decode_layout`). See docs/sampling.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import distributed
from .data import bucket
from .model import decoder
from .model.config import ModelConfig
from .model.sharding import ShardingRules, batch_multiple, batch_sharding, replicated
from .decode_layout import DecodeModel, layer_param_shardings
from .next_token import Mode, draw_tokens, token_logprobs
from .policy import DTYPES

EOS_SLOTS = 4  # EOS ids are passed as an array padded to a multiple of this, so new EOS sets reuse compiled code

# --- decode state and the two jitted entry points ----------------------------------------------------------

class Knobs(NamedTuple):
    """Per-call values, traced (replicated scalars) so new values reuse compiled code."""

    temperature: jax.Array  # f32
    top_p: jax.Array  # f32
    top_k: jax.Array  # i32
    pad_id: jax.Array  # i32
    eos_E: jax.Array  # i32 [E], -1 = unused slot
    stop_VxS: jax.Array  # i32 [V or 1, S]: the stop automaton's next state per (token, state); S - 1 = stop


class _State(NamedTuple):
    """Everything the decode loop carries. Batch-sharded except `step` (replicated)."""

    cache: decoder.KVCache
    logits_BxV: jax.Array  # float32 logits of the next token to sample
    u_BxNxA: jax.Array  # float32 uniforms of each (row, step), drawn up front so the loop does no PRNG work
    tokens_BxN: jax.Array  # int32, pad after a row finished
    logprobs_BxN: jax.Array  # float32, 0 after a row finished
    last_B: jax.Array  # int32, the token sampled last (fed next)
    pos_B: jax.Array  # int32, its position
    length_B: jax.Array  # int32, tokens recorded (EOS excluded)
    done_B: jax.Array  # bool
    eos_B: jax.Array  # bool, finished by an EOS id
    stop_state_B: jax.Array  # int32, the stop automaton's state after the tokens so far
    stopped_B: jax.Array  # bool, finished by the stop condition
    max_new_B: jax.Array  # int32, the row's max_new_tokens
    captured_BxG: jax.Array  # float32, see `_decode_fn`'s `capture` ([B, 0] without it)
    step: jax.Array  # int32 scalar, tokens sampled so far


def _record(state: _State, knobs: Knobs, mode: Mode) -> _State:
    """Samples token `state.step` of every row from `state.logits_BxV` and writes it (pad for finished rows)."""
    t = state.step
    u_BxA = jax.lax.dynamic_index_in_dim(state.u_BxNxA, t, axis=1, keepdims=False)
    tok_B = draw_tokens(state.logits_BxV, u_BxA, knobs.temperature, knobs.top_p, knobs.top_k, mode)
    lp_B = token_logprobs(state.logits_BxV, tok_B)
    active_B = ~state.done_B
    hit_eos_B = active_B & jnp.any(tok_B[:, None] == knobs.eos_E[None, :], axis=-1)
    keep_B = active_B & ~hit_eos_B
    V, S = knobs.stop_VxS.shape  # (1, 2) without a stop condition: state 0 forever
    stop_state_B = knobs.stop_VxS[jnp.minimum(tok_B, V - 1), state.stop_state_B]
    hit_stop_B = keep_B & (stop_state_B == S - 1)  # the token is kept, then the row ends
    tok_B = jnp.where(keep_B, tok_B, knobs.pad_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens_BxN, tok_B[:, None], t, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(state.logprobs_BxN, jnp.where(keep_B, lp_B, 0.0)[:, None], t, axis=1)
    return state._replace(
        tokens_BxN=tokens, logprobs_BxN=logprobs, last_B=tok_B, length_B=state.length_B + keep_B,
        done_B=state.done_B | hit_eos_B | hit_stop_B | (t + 1 >= state.max_new_B), eos_B=state.eos_B | hit_eos_B,
        stop_state_B=jnp.where(keep_B, stop_state_B, state.stop_state_B), stopped_B=state.stopped_B | hit_stop_B,
        step=t + 1)


def _cache_sharding(mesh, rules: ShardingRules):
    # Keys [B, K, E, S] and values [B, K, S, E] alike: rows and kv heads as the rules say (the decode layout:
    # rows over data, kv heads over tensor).
    return jax.sharding.NamedSharding(mesh, rules.spec(("batch", "kv_heads", "head_dim", "seq")))


def _knob_shardings(mesh):
    return Knobs(*([replicated(mesh)] * len(Knobs._fields)))


def _repeat_rows(x, rows: int):
    """[m, ...] -> [rows, ...], row r a copy of row r // (rows / m): with rows over `data` in m contiguous
    blocks, every device copies the row it already holds (no communication)."""
    return jnp.repeat(x, rows // x.shape[0], axis=0)


def _local_take(x, src_B, groups: int):
    """Rows `src_B` of `x`, where rows and sources come in `groups` contiguous blocks (one per data shard) and
    each source indexes its own block: a gather that never crosses a device."""
    Bp, B = x.shape[0], src_B.shape[0]
    xg = x.reshape(groups, Bp // groups, *x.shape[1:])
    out = jax.vmap(lambda a, i: a[i])(xg, src_B.reshape(groups, B // groups))
    return out.reshape(B, *x.shape[1:])


@functools.lru_cache(maxsize=16)
def _prefix_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, attention: str = "xla"):
    """Jitted prefill of a prefix shared by every prompt of a call (the judge's rubric): its keys and values,
    computed once. Rows: one copy per data shard (`batch_multiple` rows, all the same prefix), so each replica
    holds the prefix its rows read (`_repeat_rows`)."""

    def prefix(params, ids_MxC, mask_MxC):
        M, C = ids_MxC.shape
        cache = decoder.KVCache.zeros(cfg, M, C, DTYPES[dtype])
        _, cache = decoder.hidden_states(params, cfg, ids_MxC, decoder.positions_from_mask(mask_MxC), mask_MxC,
                                         cache=cache._replace(valid_BxS=mask_MxC), cache_index=0,
                                         dtype=DTYPES[dtype], mesh=mesh, rules=rules, attention=attention)
        return cache

    b2 = batch_sharding(mesh, 2, rules)
    layers = (_cache_sharding(mesh, rules),) * cfg.num_layers
    return jax.jit(prefix, in_shardings=(layer_param_shardings(cfg, mesh, rules), b2, b2),
                   out_shardings=decoder.KVCache(layers, layers, b2))


@functools.lru_cache(maxsize=64)
def _prefill_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, new_bucket: int, attention: str = "xla",
                batch: int | None = None, prefix_bucket: int = 0):
    """Jitted prefill: the prompts' keys and values in a fresh cache of (prefix) + P + new_bucket slots, and the
    logits of each row's next token. No sampling here, so the sampler is compiled once (in `_decode_fn`).

    Shared prefixes: the prefill runs on the chunk's distinct prompts (Bp rows) and `src_B` copies each into
    the rows that sample from it (`batch` rows: a prompt's N samples, an answer's K judgements), so a prompt is
    prefilled once however many rows it has; `batch` None = the prefill's rows are the decode's. A prefix shared
    by the whole call (`prefix_bucket` > 0 slots, from `_prefix_fn`) is copied in front of every row and the
    prompts' remainders attend to it: computed once per call, not once per row.

    Shardings: per-layer parameters (`DecodeModel.params`) by `rules` (the decode layout: tensor-parallel, no
    FSDP); prompts, logits and the cache's rows over the batch axes; the cache's kv heads over tensor. Donates
    nothing: its inputs are small host arrays, the parameters and the call's prefix.
    """
    C = prefix_bucket

    def prefill(params, prefix, ids_BxP, mask_BxP, src_B):
        B, P = ids_BxP.shape
        act = DTYPES[dtype]
        if C:
            pre_valid_BxC = _repeat_rows(prefix.valid_BxS, B)
            valid_BxS = jnp.concatenate([pre_valid_BxC, mask_BxP, jnp.zeros((B, new_bucket), bool)], axis=1)
            zk = jnp.zeros((B, cfg.num_kv_heads, cfg.head_dim, P + new_bucket), act)
            zv = jnp.zeros((B, cfg.num_kv_heads, P + new_bucket, cfg.head_dim), act)
            cache = decoder.KVCache(tuple(jnp.concatenate([_repeat_rows(k, B), zk], axis=3) for k in prefix.k_BxKxExS),
                                    tuple(jnp.concatenate([_repeat_rows(v, B), zv], axis=2) for v in prefix.v_BxKxSxE),
                                    valid_BxS)
            positions_BxP = decoder.positions_from_mask(jnp.concatenate([pre_valid_BxC, mask_BxP], axis=1))[:, C:]
        else:
            valid_BxS = jnp.concatenate([mask_BxP, jnp.zeros((B, new_bucket), bool)], axis=1)
            cache = decoder.KVCache.zeros(cfg, B, P + new_bucket, act)._replace(valid_BxS=valid_BxS)
            positions_BxP = decoder.positions_from_mask(mask_BxP)
        h_BxPxD, cache = decoder.hidden_states(params, cfg, ids_BxP, positions_BxP, valid_BxS, cache=cache,
                                               cache_index=C, dtype=act, mesh=mesh, rules=rules, attention=attention)
        # Left padding puts every row's last prompt token in the last column: only it needs logits.
        logits_BxV = decoder.lm_head(params, cfg, h_BxPxD[:, -1:], act)[:, 0]
        if batch is not None and batch != B:
            take = functools.partial(_local_take, src_B=src_B, groups=batch_multiple(mesh))
            cache = jax.tree.map(take, cache)
            logits_BxV = take(logits_BxV)
        return cache, logits_BxV

    b1, b2 = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules)
    layers = (_cache_sharding(mesh, rules),) * cfg.num_layers
    prefix_sh = decoder.KVCache(layers, layers, b2) if C else None
    return jax.jit(prefill, in_shardings=(layer_param_shardings(cfg, mesh, rules), prefix_sh, b2, b2, b1),
                   out_shardings=(decoder.KVCache(layers, layers, b2), b2))


@functools.lru_cache(maxsize=64)
def _decode_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, mode: Mode, prompt_bucket: int,
               capture: tuple[tuple[int, ...], ...] | None = None, attention: str = "xla"):
    """Jitted decode: per-row random streams, then one `lax.while_loop` of (sample, feed) until every row is
    done. Returns (tokens_BxN, logprobs_BxN, length_B, eos_B, stopped_B, captured_BxG, iterations of the loop)
    and the spent (cache, logits).

    `capture`: G groups of token ids (the expected judge's score digits 0-5 and their spellings): when a row
    meets the stop condition, the probability of each group at the next position (the logits the same pass
    computes after the stop token, under the model's unmodified distribution) is kept in `captured_BxG`, so
    nothing runs a second forward over the request for them.

    `attention`: the policy's choice (`attention_kernels.decode_kernel_for`): under auto on TPU (and splash
    anywhere) each step attends with the Pallas kernel that reads only the cache's filled blocks
    (`decode_attention`), else with the XLA path over every slot.

    Shardings: per-layer parameters as in `_prefill_fn`; the cache as it returns it; logits, per-row flags and
    indices and the outputs over the batch axes; the seed key and knobs replicated. Donates the cache and logits:
    the loop carries them in the donated buffers and updates the cache in place, one slot per step.
    """

    if capture:
        width = max(len(ids) for ids in capture)
        # [G, W] token ids and 0/1 weights; a group with fewer spellings reads token 0 with weight 0.
        ids_GxW = np.array([list(ids) + [0] * (width - len(ids)) for ids in capture], np.int32)
        w_GxW = np.array([[1.0] * len(ids) + [0.0] * (width - len(ids)) for ids in capture], np.float32)

    def decode(params, cache, logits_BxV, mask_BxP, live_B, max_new_B, prompt_idx_B, sample_idx_B, seed_key_2,
               knobs: Knobs):
        B = logits_BxV.shape[0]
        N = cache.valid_BxS.shape[1] - prompt_bucket
        # Row (prompt i, sample j) draws all its uniforms from fold_in(fold_in(seed, i), j): a function of the
        # row alone, whatever batch it lands in. Step t uses row t of a [N, A] draw.
        seed_key = jax.random.wrap_key_data(seed_key_2)
        row_keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(seed_key, i), j))(prompt_idx_B, sample_idx_B)
        u_BxNxA = jax.vmap(lambda k: jax.random.uniform(k, (N, mode.uniforms), jnp.float32))(row_keys)
        state = _State(cache=cache, logits_BxV=logits_BxV, u_BxNxA=u_BxNxA,
                       tokens_BxN=jnp.zeros((B, N), jnp.int32), logprobs_BxN=jnp.zeros((B, N), jnp.float32),
                       last_B=jnp.zeros((B,), jnp.int32), pos_B=jnp.sum(mask_BxP, axis=1, dtype=jnp.int32),
                       # Padding rows are done from the start: the loop ends when the real rows end.
                       length_B=jnp.zeros((B,), jnp.int32), done_B=~live_B,
                       eos_B=jnp.zeros((B,), bool), stop_state_B=jnp.zeros((B,), jnp.int32),
                       stopped_B=jnp.zeros((B,), bool), max_new_B=max_new_B,
                       captured_BxG=jnp.zeros((B, len(capture or ())), jnp.float32), step=jnp.int32(0))
        def feed(s: _State) -> _State:
            slot = prompt_bucket + s.step - 1  # the slot of the token just sampled
            valid_BxS = jax.lax.dynamic_update_slice_in_dim(s.cache.valid_BxS, jnp.ones((B, 1), bool), slot, axis=1)
            h_Bx1xD, cache = decoder.hidden_states(params, cfg, s.last_B[:, None], s.pos_B[:, None], valid_BxS,
                                                   cache=s.cache._replace(valid_BxS=valid_BxS), cache_index=slot,
                                                   dtype=DTYPES[dtype], mesh=mesh, rules=rules, attention=attention)
            return s._replace(cache=cache, logits_BxV=decoder.lm_head(params, cfg, h_Bx1xD, DTYPES[dtype])[:, 0], pos_B=s.pos_B + 1)

        def body(s: _State) -> _State:
            # The forward after the last token is wasted, but skipping it with a lax.cond makes XLA copy the
            # cache through the conditional every step (2x slower on CPU).
            r = _record(s, knobs, mode)
            f = feed(r)
            if capture:
                # The row stopped on this step: the logits just computed are those after its stop token.
                g_BxG = (jax.nn.softmax(f.logits_BxV, axis=-1)[:, ids_GxW] * w_GxW).sum(-1)
                f = f._replace(captured_BxG=jnp.where((r.stopped_B & ~s.stopped_B)[:, None], g_BxG, f.captured_BxG))
            return f

        s = jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), body, state)
        # The cache and logits go back out only so their donated buffers alias the loop's (no copy in).
        return (s.tokens_BxN, s.logprobs_BxN, s.length_B, s.eos_B, s.stopped_B, s.captured_BxG, s.step), (s.cache, s.logits_BxV)

    b1, b2 = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules)
    layers = (_cache_sharding(mesh, rules),) * cfg.num_layers
    return jax.jit(decode,
                   in_shardings=(layer_param_shardings(cfg, mesh, rules), decoder.KVCache(layers, layers, b2), b2, b2, b1, b1, b1, b1,
                                 replicated(mesh), _knob_shardings(mesh)),
                   out_shardings=((b2, b2, b1, b1, b1, b2, replicated(mesh)), (decoder.KVCache(layers, layers, b2), b2)), donate_argnums=(1, 2))


def _abstract_params(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules):
    """`DecodeModel.params` as abstract arrays (per-layer weights on `rules`' layout, in `dtype`)."""
    shapes = decoder.param_shapes(cfg)
    shapes["layers"] = [{k: v[1:] for k, v in shapes["layers"].items()}] * cfg.num_layers
    return jax.tree.map(lambda shape, sh: jax.ShapeDtypeStruct(shape, DTYPES[dtype], sharding=sh), shapes,
                        layer_param_shardings(cfg, mesh, rules), is_leaf=lambda x: isinstance(x, tuple))


def prefill_program(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, batch: int, prompt_bucket: int,
                    new_bucket: int, attention: str = "xla", prefill_batch: int | None = None, prefix_bucket: int = 0):
    """The compiled prefill of one chunk shape (see `programs`); `attention`: its attention path (decode steps take
    the XLA path). `prefill_batch`: the distinct prompts' rows (None: `batch`, nothing shared); `prefix_bucket`:
    slots of the call's shared prefix in front of `prompt_bucket` (0: none)."""
    Bp = batch if prefill_batch is None else prefill_batch
    b1, b2 = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules)
    sds = jax.ShapeDtypeStruct
    ids = sds((Bp, prompt_bucket), jnp.int32, sharding=b2)
    mask = sds((Bp, prompt_bucket), bool, sharding=b2)
    prefix = None
    if prefix_bucket:
        M, K, E, C, L = batch_multiple(mesh), cfg.num_kv_heads, cfg.head_dim, prefix_bucket, cfg.num_layers
        kv = _cache_sharding(mesh, rules)
        prefix = decoder.KVCache((sds((M, K, E, C), DTYPES[dtype], sharding=kv),) * L,
                                 (sds((M, K, C, E), DTYPES[dtype], sharding=kv),) * L, sds((M, C), bool, sharding=b2))
    return _prefill_fn(cfg, mesh, dtype, rules, new_bucket, attention, None if Bp == batch else batch,
                       prefix_bucket).lower(_abstract_params(cfg, mesh, dtype, rules), prefix, ids, mask,
                                            sds((batch,), jnp.int32, sharding=b1)).compile()


@functools.lru_cache(maxsize=16)
def prefix_program(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, prefix_bucket: int,
                   attention: str = "xla"):
    """The compiled prefill of a call's shared prefix (`_prefix_fn`) of `prefix_bucket` slots."""
    b2 = batch_sharding(mesh, 2, rules)
    shape = (batch_multiple(mesh), prefix_bucket)
    return _prefix_fn(cfg, mesh, dtype, rules, attention).lower(
        _abstract_params(cfg, mesh, dtype, rules), jax.ShapeDtypeStruct(shape, jnp.int32, sharding=b2),
        jax.ShapeDtypeStruct(shape, bool, sharding=b2)).compile()


def decode_program(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, mode: Mode, batch: int,
                   prompt_bucket: int, new_bucket: int, eos_slots: int, stop_shape: tuple[int, int],
                   capture: tuple | None = None, attention: str = "xla"):
    """The compiled decode of one chunk shape (see `programs`); `prompt_bucket`: every slot before the new
    tokens (a shared prefix's included); `attention`: the policy's (see `_decode_fn`)."""
    B, P, S, V = batch, prompt_bucket, prompt_bucket + new_bucket, cfg.vocab_size
    sds = jax.ShapeDtypeStruct
    b1, b2, rep = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules), replicated(mesh)
    K, E, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    k_layer = sds((B, K, E, S), DTYPES[dtype], sharding=_cache_sharding(mesh, rules))
    v_layer = sds((B, K, S, E), DTYPES[dtype], sharding=_cache_sharding(mesh, rules))
    cache = decoder.KVCache((k_layer,) * L, (v_layer,) * L, sds((B, S), bool, sharding=b2))
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    knobs = Knobs(sds((), jnp.float32, sharding=rep), sds((), jnp.float32, sharding=rep), sds((), jnp.int32, sharding=rep),
                  sds((), jnp.int32, sharding=rep), sds((eos_slots,), jnp.int32, sharding=rep),
                  sds(stop_shape, jnp.int32, sharding=rep))
    row_i32 = sds((B,), jnp.int32, sharding=b1)
    return _decode_fn(cfg, mesh, dtype, rules, mode, P, capture, attention).lower(
        _abstract_params(cfg, mesh, dtype, rules), cache, sds((B, V), jnp.float32, sharding=b2),
        sds((B, P), bool, sharding=b2), sds((B,), bool, sharding=b1), row_i32, row_i32, row_i32,
        sds(key_shape, jnp.uint32, sharding=rep), knobs).compile()


@functools.lru_cache(maxsize=64)
def programs(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, mode: Mode, batch: int, prompt_bucket: int,
             new_bucket: int, eos_slots: int, stop_shape: tuple[int, int], attention: str = "xla",
             prefill_batch: int | None = None, prefix_bucket: int = 0, capture: tuple | None = None):
    """The compiled (prefill, decode) of one chunk shape. Compiled ahead of time from abstract arguments, so
    chunks running in parallel threads never compile the same program twice. `attention`: the policy's (the
    prefill's kernel, and the decode step's: `_decode_fn`);
    `prefill_batch`, `prefix_bucket`: see `prefill_program`; `capture`: see `_decode_fn`."""
    return (prefill_program(cfg, mesh, dtype, rules, batch, prompt_bucket, new_bucket, attention, prefill_batch,
                            prefix_bucket),
            decode_program(cfg, mesh, dtype, rules, mode, batch, prefix_bucket + prompt_bucket, new_bucket,
                           eos_slots, stop_shape, capture, attention))


def prefill_rows(chunk, batch: int, groups: int) -> list[list[int]]:
    """The distinct prompts of each of the chunk's `groups` row blocks (one block of `batch / groups` rows per
    data shard), in order of first appearance: the rows a shared prefill computes (`_prefill_fn`)."""
    per = batch // groups
    blocks: list[list[int]] = [[] for _ in range(groups)]
    for r, (i, _) in enumerate(chunk):
        if i not in blocks[r // per]:
            blocks[r // per].append(i)
    return blocks


class Prefix(NamedTuple):
    """A prefix every prompt of a call starts with, prefilled once (`prefix_program`): its `length` tokens
    left-padded into `slots`, `valid` [slots] on the host, `cache` on the device (one copy per data shard)."""

    length: int
    slots: int
    valid: np.ndarray
    cache: decoder.KVCache


def run_chunk(model: DecodeModel, ids, max_new, chunk, shape: tuple[int, int, int], *, new_bucket, mode, knobs,
              seed_key_2, prefix: Prefix | None = None, capture: tuple | None = None):
    """Prefill + decode of one chunk of (prompt, sample) rows padded to `shape` = (batch, prompt bucket, prefill
    batch) on `model`'s layout; `ids[i]`: prompt i (after the call's shared `prefix`, if any); `max_new[i]`: its
    max_new_tokens. A prefill batch below `batch` prefills each distinct prompt once (`prefill_rows`).

    Returns ({row: (token ids, logprobs, finish reason, captured group probabilities)}, the decode loop's
    iterations).
    """
    B, P, Bp = shape
    groups = batch_multiple(model.mesh)
    C = 0 if prefix is None else prefix.slots
    # The decode's rows: the prompt's mask behind the shared prefix's (positions count both).
    mask_BxCP = np.zeros((B, C + P), bool)
    live_B = np.zeros((B,), bool)
    max_new_B = np.ones((B,), np.int32)
    prompt_idx_B = np.zeros((B,), np.int32)
    sample_idx_B = np.zeros((B,), np.int32)
    src_B = np.zeros((B,), np.int32)
    if Bp < B:
        blocks = prefill_rows(chunk, B, groups)
        rows_of = [(d, blocks[d].index(i)) for d, i in ((r // (B // groups), i) for r, (i, _) in enumerate(chunk))]
        prefill_prompts = [(d * (Bp // groups) + k, i) for d, block in enumerate(blocks) for k, i in enumerate(block)]
    else:
        rows_of = [(0, r) for r in range(len(chunk))]
        prefill_prompts = [(r, i) for r, (i, _) in enumerate(chunk)]
    ids_BpxP = np.full((Bp, P), knobs.pad_id, np.int32)
    mask_BpxP = np.zeros((Bp, P), bool)
    mask_BpxP[:, -1] = True  # padding rows get one real token so their (discarded) attention is well defined
    for r, i in prefill_prompts:
        n = len(ids[i])
        ids_BpxP[r, :] = knobs.pad_id
        ids_BpxP[r, P - n:] = ids[i]
        mask_BpxP[r, :] = False
        mask_BpxP[r, P - n:] = True
    for r, ((i, j), (_, k)) in enumerate(zip(chunk, rows_of)):
        n = len(ids[i])
        mask_BxCP[r, C + P - n:] = True
        live_B[r], max_new_B[r], prompt_idx_B[r], sample_idx_B[r], src_B[r] = True, max_new[i], i, j, k
    mask_BxCP[len(chunk):, -1] = True
    if prefix is not None:
        mask_BxCP[:, :C] = prefix.valid
    prefill, decode = programs(model.config, model.mesh, model.dtype, model.rules, mode, B, P, new_bucket,
                               len(knobs.eos_E), knobs.stop_VxS.shape, model.attention, None if Bp == B else Bp, C,
                               capture)
    # Every process builds the same chunk; each device is given only its own rows (see jaxsr.distributed).
    b1, b2 = batch_sharding(model.mesh, 1, model.rules), batch_sharding(model.mesh, 2, model.rules)
    rep = replicated(model.mesh)
    ids_BpxP, mask_BpxP, mask_BxCP = (distributed.global_array(x, b2) for x in (ids_BpxP, mask_BpxP, mask_BxCP))
    live_B, max_new_B, prompt_idx_B, sample_idx_B, src_B = (
        distributed.global_array(x, b1) for x in (live_B, max_new_B, prompt_idx_B, sample_idx_B, src_B))
    knobs = Knobs(*(distributed.global_array(k, rep) for k in knobs))
    cache, logits_BxV = prefill(model.params, None if prefix is None else prefix.cache, ids_BpxP, mask_BpxP, src_B)
    out, _ = decode(model.params, cache, logits_BxV, mask_BxCP, live_B, max_new_B, prompt_idx_B, sample_idx_B,
                    distributed.global_array(seed_key_2, rep), knobs)
    # Batch-sharded across processes: gathered whole onto every process.
    tokens_BxN, logprobs_BxN, length_B, eos_B, stopped_B, captured_BxG, steps = distributed.to_host(out)
    reasons = np.where(eos_B, "eos", np.where(stopped_B, "stop", "length"))
    return ({row: (tokens_BxN[r, :length_B[r]].tolist(), logprobs_BxN[r, :length_B[r]].tolist(), str(reasons[r]),
                   captured_BxG[r].tolist() if capture and stopped_B[r] else None)
             for r, row in enumerate(chunk)}, int(steps))


def make_prefix(model: DecodeModel, prefix_ids: list[int], pad_id: int) -> Prefix:
    """Prefills `prefix_ids` once (one copy per data shard) for the chunks of a call to start from."""
    L = len(prefix_ids)
    C = bucket(L, fine=True)
    M = batch_multiple(model.mesh)
    ids_MxC = np.full((M, C), pad_id, np.int32)
    ids_MxC[:, C - L:] = prefix_ids
    mask_MxC = np.zeros((M, C), bool)
    mask_MxC[:, C - L:] = True
    b2 = batch_sharding(model.mesh, 2, model.rules)
    fn = prefix_program(model.config, model.mesh, model.dtype, model.rules, C, model.attention)
    cache = fn(model.params, distributed.global_array(ids_MxC, b2), distributed.global_array(mask_MxC, b2))
    return Prefix(L, C, mask_MxC[0], cache)
