"""How M_t speaks: batched sampling with a KV cache, one jitted prefill and one jitted `lax.while_loop` decode.

A call is split into chunks of at most `max_batch_rows` rows (one row = one sample of one prompt). Each chunk is
left-padded into static buckets (batch, prompt length, new tokens), prefilled in one dispatch and decoded in a
second: the whole decode is a single `while_loop` over a preallocated cache that stops once every row has hit
an EOS id or `max_new_tokens`. Sampling is a pure function of (logits, per-row key), and each row's key is
derived from (seed, prompt index, sample index) only, so completions do not depend on the mesh, the batch
padding or the chunking. See docs/sampling.md.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import distributed
from .data import bucket
from .model import decoder
from .model.config import ModelConfig
from .model.sharding import ShardingRules, batch_multiple, batch_sharding, replicated
from .next_token import Mode, draw_tokens, sampling_mode, token_logprobs
from .policy import DTYPES, Policy, param_shardings

DEFAULT_MAX_BATCH_ROWS = 256
_EOS_SLOTS = 4  # EOS ids are passed as an array padded to a multiple of this, so new EOS sets reuse compiled code


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt.

    Attributes:
      token_ids: the generated token ids, EOS excluded.
      text: `tokenizer.decode(token_ids, skip_special_tokens=True)`, or "" when the policy has no tokenizer.
      logprobs: log-probability of each generated token under the model's unmodified distribution
        (log_softmax of the raw float32 logits: no temperature, top-k or top-p), same length as token_ids.
      finish_reason: "eos" (an EOS id was sampled) or "length" (max_new_tokens were generated).
      prompt_tokens: how many prompt tokens the model saw (after truncation, if any).
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int


# --- decode state and the two jitted entry points ----------------------------------------------------------

class _Knobs(NamedTuple):
    """Per-call values, traced (replicated scalars) so new values reuse compiled code."""

    temperature: jax.Array  # f32
    top_p: jax.Array  # f32
    top_k: jax.Array  # i32
    max_new: jax.Array  # i32
    pad_id: jax.Array  # i32
    eos_E: jax.Array  # i32 [E], -1 = unused slot


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
    step: jax.Array  # int32 scalar, tokens sampled so far


def _record(state: _State, knobs: _Knobs, mode: Mode) -> _State:
    """Samples token `state.step` of every row from `state.logits_BxV` and writes it (pad for finished rows)."""
    t = state.step
    u_BxA = jax.lax.dynamic_index_in_dim(state.u_BxNxA, t, axis=1, keepdims=False)
    tok_B = draw_tokens(state.logits_BxV, u_BxA, knobs.temperature, knobs.top_p, knobs.top_k, mode)
    lp_B = token_logprobs(state.logits_BxV, tok_B)
    active_B = ~state.done_B
    hit_eos_B = active_B & jnp.any(tok_B[:, None] == knobs.eos_E[None, :], axis=-1)
    keep_B = active_B & ~hit_eos_B
    tok_B = jnp.where(keep_B, tok_B, knobs.pad_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens_BxN, tok_B[:, None], t, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(state.logprobs_BxN, jnp.where(keep_B, lp_B, 0.0)[:, None], t, axis=1)
    return state._replace(
        tokens_BxN=tokens, logprobs_BxN=logprobs, last_B=tok_B, length_B=state.length_B + keep_B,
        done_B=state.done_B | hit_eos_B | (t + 1 >= knobs.max_new), eos_B=state.eos_B | hit_eos_B, step=t + 1)


def _cache_sharding(mesh, rules: ShardingRules):
    # Keys [B, K, E, S] and values [B, K, S, E] alike: batch over data x fsdp, kv heads over tensor.
    return jax.sharding.NamedSharding(mesh, rules.spec(("batch", "kv_heads", "head_dim", "seq")))


def _knob_shardings(mesh):
    return _Knobs(*([replicated(mesh)] * len(_Knobs._fields)))


def _layer_param_shardings(cfg: ModelConfig, mesh, rules: ShardingRules):
    """Shardings of `decoder.unstack_layers`' output: the loaded ones, per layer without the layer axis."""
    stacked = param_shardings(cfg, mesh, rules)
    per_layer = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s.spec[1:])),
                             stacked["layers"])
    return {**stacked, "layers": [per_layer] * cfg.num_layers}


@functools.lru_cache(maxsize=16)
def _unstack_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules):
    """Jitted: the parameters with one weight dict per layer, made once per `generate` call. Slicing a layer
    out of the stacked weights copies it, so the prefill and decode of every chunk take these instead.

    Shardings: in as loaded (FSDP x tensor), out the same per layer. Donates nothing (the policy keeps its
    parameters); the call holds this extra copy of the layer weights while it runs.
    """
    return jax.jit(functools.partial(decoder.unstack_layers, num_layers=cfg.num_layers),
                   in_shardings=(param_shardings(cfg, mesh, rules),), out_shardings=_layer_param_shardings(cfg, mesh, rules))


@functools.lru_cache(maxsize=64)
def _prefill_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, new_bucket: int):
    """Jitted prefill: the prompts' keys and values in a fresh cache of P + new_bucket slots, and the logits
    of each row's next token. No sampling here, so the sampler is compiled once (in `_decode_fn`).

    Shardings: per-layer parameters (`_unstack_fn`) as loaded (FSDP x tensor); prompts, logits and the
    cache's batch over data x fsdp; the cache's kv heads over tensor. Donates nothing: its inputs are small
    host arrays and the parameters.
    """

    def prefill(params, ids_BxP, mask_BxP):
        B, P = ids_BxP.shape
        cache = decoder.KVCache.zeros(cfg, B, P + new_bucket, DTYPES[dtype])
        valid_BxS = jnp.concatenate([mask_BxP, jnp.zeros((B, new_bucket), bool)], axis=1)
        h_BxPxD, cache = decoder.hidden_states(params, cfg, ids_BxP, decoder.positions_from_mask(mask_BxP), valid_BxS,
                                               cache=cache._replace(valid_BxS=valid_BxS), cache_index=0,
                                               dtype=DTYPES[dtype], mesh=mesh)
        # Left padding puts every row's last prompt token in the last column: only it needs logits.
        return cache, decoder.lm_head(params, cfg, h_BxPxD[:, -1:], DTYPES[dtype])[:, 0]

    b2 = batch_sharding(mesh, 2, rules)
    layers = (_cache_sharding(mesh, rules),) * cfg.num_layers
    return jax.jit(prefill, in_shardings=(_layer_param_shardings(cfg, mesh, rules), b2, b2),
                   out_shardings=(decoder.KVCache(layers, layers, b2), b2))


@functools.lru_cache(maxsize=64)
def _decode_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, mode: Mode, prompt_bucket: int):
    """Jitted decode: per-row random streams, then one `lax.while_loop` of (sample, feed) until every row is
    done. Returns (tokens_BxN, logprobs_BxN, length_B, eos_B) and the spent (cache, logits).

    Shardings: per-layer parameters as in `_prefill_fn`; the cache as it returns it; logits, per-row indices and the
    outputs over data x fsdp; the seed key and knobs replicated. Donates the cache and logits: the loop
    carries them in the donated buffers and updates the cache in place, one slot per step.
    """

    def decode(params, cache, logits_BxV, mask_BxP, prompt_idx_B, sample_idx_B, seed_key_2, knobs: _Knobs):
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
                       length_B=jnp.zeros((B,), jnp.int32), done_B=jnp.zeros((B,), bool),
                       eos_B=jnp.zeros((B,), bool), step=jnp.int32(0))
        def feed(s: _State) -> _State:
            slot = prompt_bucket + s.step - 1  # the slot of the token just sampled
            valid_BxS = jax.lax.dynamic_update_slice_in_dim(s.cache.valid_BxS, jnp.ones((B, 1), bool), slot, axis=1)
            h_Bx1xD, cache = decoder.hidden_states(params, cfg, s.last_B[:, None], s.pos_B[:, None], valid_BxS,
                                                   cache=s.cache._replace(valid_BxS=valid_BxS), cache_index=slot,
                                                   dtype=DTYPES[dtype], mesh=mesh)
            return s._replace(cache=cache, logits_BxV=decoder.lm_head(params, cfg, h_Bx1xD, DTYPES[dtype])[:, 0], pos_B=s.pos_B + 1)

        def body(s: _State) -> _State:
            # The forward after the last token is wasted, but skipping it with a lax.cond makes XLA copy the
            # cache through the conditional every step (2x slower on CPU).
            return feed(_record(s, knobs, mode))

        s = jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), body, state)
        # The cache and logits go back out only so their donated buffers alias the loop's (no copy in).
        return (s.tokens_BxN, s.logprobs_BxN, s.length_B, s.eos_B), (s.cache, s.logits_BxV)

    b1, b2 = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules)
    layers = (_cache_sharding(mesh, rules),) * cfg.num_layers
    return jax.jit(decode,
                   in_shardings=(_layer_param_shardings(cfg, mesh, rules), decoder.KVCache(layers, layers, b2), b2, b2, b1, b1,
                                 replicated(mesh), _knob_shardings(mesh)),
                   out_shardings=((b2, b2, b1, b1), (decoder.KVCache(layers, layers, b2), b2)), donate_argnums=(1, 2))


# --- host side ---------------------------------------------------------------------------------------------

def _batch_bucket(rows: int, multiple: int, cap: int) -> int:
    """Rows rounded up to a power of two (at most `cap`), then to a multiple of the data-parallel size."""
    b = min(1 << max(0, math.ceil(math.log2(rows))), max(cap, rows))
    return -(-b // multiple) * multiple


def _tokenize(policy: Policy, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
        raise ValueError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}; "
                         "wrap a single prompt in a list")
    out: list[list[int] | None] = [None] * len(prompts)
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    if texts:
        if policy.tokenizer is None:
            raise ValueError(f"prompt {texts[0]} is a string but the policy has no tokenizer; pass token-id lists instead")
        # The tokenizer's default special tokens (e.g. a BOS), exactly as `tokenizer(text)` gives them.
        encoded = policy.tokenizer([prompts[i] for i in texts])["input_ids"]
        for i, ids in zip(texts, encoded):
            out[i] = [int(t) for t in ids]
    vocab = policy.config.vocab_size
    for i, p in enumerate(prompts):
        if out[i] is None:
            arr = np.asarray(p)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"prompt {i} must be a string or a flat list of token ids, got {type(p).__name__} "
                                 f"with shape {arr.shape} and dtype {arr.dtype}")
            out[i] = [int(t) for t in arr]
        bad = [t for t in out[i] if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    return out  # type: ignore[return-value]


def _fit(ids: list[int], i: int, max_new_tokens: int, context: int, truncate: bool) -> list[int]:
    if not ids:
        raise ValueError(f"prompt {i} is empty (0 tokens); every prompt needs at least one token")
    if len(ids) + max_new_tokens <= context:
        return ids
    room = context - max_new_tokens
    if truncate and room >= 1:
        return ids[-room:]  # left-truncation: the end of a prompt (the question, the generation prompt) matters most
    raise ValueError(
        f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it needs {len(ids) + max_new_tokens} "
        f"positions but the model's context (max_position_embeddings) is {context}"
        + ("" if truncate else "; shorten it, lower max_new_tokens, or pass truncate_prompts=True"))


def _check_args(num_samples, max_new_tokens, temperature, top_p, top_k, max_batch_rows):
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not is_int(max_batch_rows) or max_batch_rows < 1:
        raise ValueError(f"max_batch_rows must be an integer >= 1, got {max_batch_rows!r}")


def generate(policy: Policy, prompts, *, num_samples: int = 1, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, eos_token_ids: Sequence[int] | None = None,
             truncate_prompts: bool = False, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
             concurrency: int | None = None, progress: bool = True) -> list[list[Completion]]:
    """Samples `num_samples` completions for each prompt; returns one list per prompt.

    prompts: strings (tokenised with `tokenizer(text)["input_ids"]`, the tokenizer's default special tokens)
    or token-id lists (used verbatim). eos_token_ids: None = `policy.eos_token_ids`; [] = never stop early.
    Sampling: temperature, then top-k, then top-p (see `sample_tokens`); temperature=0 is greedy. The same
    seed gives the same completions whatever the mesh, batch padding, `max_batch_rows` or `concurrency`.
    concurrency: chunks in flight at once (None: see `_default_concurrency`); always 1 with several processes.

    With several processes every process must call it with the same arguments: each feeds its devices their
    rows of every chunk and gets back all completions.
    """
    _check_args(num_samples, max_new_tokens, temperature, top_p, top_k, max_batch_rows)
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ValueError(f"concurrency must be an integer >= 1 or None, got {concurrency!r}")
    if len(prompts) == 0:
        return []
    policy = policy.for_compute()  # parameters in the compute dtype (the KV cache's), cast once per policy
    cfg = policy.config
    ids = [_fit(p, i, max_new_tokens, cfg.max_position_embeddings, truncate_prompts)
           for i, p in enumerate(_tokenize(policy, prompts))]
    eos = list(policy.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if any(not isinstance(e, (int, np.integer)) for e in eos):
        raise ValueError(f"eos_token_ids must be integers, got {eos!r}")
    eos_E = np.full(-(-max(len(eos), 1) // _EOS_SLOTS) * _EOS_SLOTS, -1, np.int32)
    eos_E[:len(eos)] = eos
    pad_id = int(np.clip(policy.pad_token_id, 0, cfg.vocab_size - 1))
    mode = sampling_mode(float(temperature), float(top_p), int(top_k), cfg.vocab_size)
    knobs = _Knobs(np.float32(max(float(temperature), 1e-30)), np.float32(top_p), np.int32(top_k),
                   np.int32(max_new_tokens), np.int32(pad_id), eos_E)
    seed_key_2 = np.asarray(jax.random.key_data(jax.random.key(seed)))
    new_bucket = bucket(max_new_tokens, fine=True)
    multiple = batch_multiple(policy.mesh)
    cap = -(-max_batch_rows // multiple) * multiple

    # Rows sorted by prompt length (longest first) so each chunk's prompt bucket is tight; results do not
    # depend on which rows share a chunk. At least `concurrency` chunks of equal size (equal shapes: one
    # compilation), at most `cap` rows each.
    rows = sorted(((i, j) for i in range(len(ids)) for j in range(num_samples)), key=lambda r: -len(ids[r[0]]))
    concurrency = concurrency or _default_concurrency(policy.mesh)
    if jax.process_count() > 1:
        # Every process must launch the same collective programs in the same order; threads would not.
        concurrency = 1
    size = -(-len(rows) // max(-(-len(rows) // cap), min(concurrency, len(rows))))
    chunks = [rows[k:k + size] for k in range(0, len(rows), size)]
    layer_params = _unstack_fn(cfg, policy.mesh, policy.dtype, policy.rules)(policy.params)
    run = functools.partial(_run_chunk, policy, layer_params, ids, multiple=multiple, cap=cap, new_bucket=new_bucket, mode=mode,
                            knobs=knobs, seed_key_2=seed_key_2)
    for B, P in sorted({_chunk_shape(ids, chunk, multiple, cap) for chunk in chunks}):
        _programs(cfg, policy.mesh, policy.dtype, policy.rules, mode, B, P, new_bucket, len(eos_E))  # compile here, once
    results: dict[tuple[int, int], tuple[list[int], list[float], bool]] = {}
    bar = None
    if progress and len(chunks) > concurrency:
        bar = distributed.progress(len(chunks), desc="sampling", unit="batch")
    start, generated = time.perf_counter(), 0
    with concurrent.futures.ThreadPoolExecutor(min(concurrency, len(chunks))) as pool:
        for future in concurrent.futures.as_completed([pool.submit(run, chunk) for chunk in chunks]):
            out = future.result()
            results.update(out)
            generated += sum(len(t) for t, _, _ in out.values())
            if bar is not None:
                bar.set_postfix(tokens_per_s=f"{generated / (time.perf_counter() - start):.0f}")
                bar.update(1)
    if bar is not None:
        bar.close()

    order = [(i, j) for i in range(len(ids)) for j in range(num_samples)]
    texts = _decode_texts(policy.tokenizer, [results[r][0] for r in order])
    completions = [Completion(results[r][0], text, results[r][1], "eos" if results[r][2] else "length", len(ids[r[0]]))
                   for r, text in zip(order, texts)]
    return [completions[i * num_samples:(i + 1) * num_samples] for i in range(len(ids))]


def _default_concurrency(mesh) -> int:
    """Chunks to run at once. XLA:CPU runs a small model's decode step (many small ops) mostly on one core, so
    on CPU one chunk per core and mesh device keeps the cores busy (~1.5x the tokens/s for a 1.5M-parameter
    model on 2 cores; at 30M parameters XLA's own threading already fills them and it changes nothing).
    Accelerators run one program at a time: 1. Several processes: 1 (see `generate`)."""
    if any(d.platform != "cpu" for d in mesh.devices.flat) or jax.process_count() > 1:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // mesh.devices.size, 8))


@functools.lru_cache(maxsize=64)
def _programs(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, mode: Mode, batch: int, prompt_bucket: int,
              new_bucket: int, eos_slots: int):
    """The compiled (prefill, decode) of one chunk shape. Compiled ahead of time from abstract arguments, so
    chunks running in parallel threads never compile the same program twice."""
    B, P, S, V = batch, prompt_bucket, prompt_bucket + new_bucket, cfg.vocab_size
    sds = jax.ShapeDtypeStruct
    b1, b2, rep = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules), replicated(mesh)
    shapes = decoder.param_shapes(cfg)
    shapes["layers"] = [{k: v[1:] for k, v in shapes["layers"].items()}] * cfg.num_layers
    params = jax.tree.map(lambda shape, sh: sds(shape, DTYPES[dtype], sharding=sh), shapes,
                          _layer_param_shardings(cfg, mesh, rules), is_leaf=lambda x: isinstance(x, tuple))
    ids, mask = sds((B, P), jnp.int32, sharding=b2), sds((B, P), bool, sharding=b2)
    prefill = _prefill_fn(cfg, mesh, dtype, rules, new_bucket).lower(params, ids, mask).compile()
    K, E, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    k_layer = sds((B, K, E, S), DTYPES[dtype], sharding=_cache_sharding(mesh, rules))
    v_layer = sds((B, K, S, E), DTYPES[dtype], sharding=_cache_sharding(mesh, rules))
    cache = decoder.KVCache((k_layer,) * L, (v_layer,) * L, sds((B, S), bool, sharding=b2))
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    knobs = _Knobs(sds((), jnp.float32, sharding=rep), sds((), jnp.float32, sharding=rep), sds((), jnp.int32, sharding=rep),
                   sds((), jnp.int32, sharding=rep), sds((), jnp.int32, sharding=rep), sds((eos_slots,), jnp.int32, sharding=rep))
    decode = _decode_fn(cfg, mesh, dtype, rules, mode, P).lower(
        params, cache, sds((B, V), jnp.float32, sharding=b2), mask, sds((B,), jnp.int32, sharding=b1),
        sds((B,), jnp.int32, sharding=b1), sds(key_shape, jnp.uint32, sharding=rep), knobs).compile()
    return prefill, decode


def _chunk_shape(ids, chunk, multiple: int, cap: int) -> tuple[int, int]:
    return _batch_bucket(len(chunk), multiple, cap), bucket(max(len(ids[i]) for i, _ in chunk), fine=True)


def _run_chunk(policy: Policy, layer_params, ids, chunk, *, multiple, cap, new_bucket, mode, knobs, seed_key_2):
    """Prefill + decode of one chunk of (prompt, sample) rows; returns {row: (token ids, logprobs, eos?)}."""
    B, P = _chunk_shape(ids, chunk, multiple, cap)
    ids_BxP = np.full((B, P), knobs.pad_id, np.int32)
    mask_BxP = np.zeros((B, P), bool)
    prompt_idx_B = np.zeros((B,), np.int32)
    sample_idx_B = np.zeros((B,), np.int32)
    for r, (i, j) in enumerate(chunk):
        n = len(ids[i])
        ids_BxP[r, P - n:] = ids[i]
        mask_BxP[r, P - n:] = True
        prompt_idx_B[r], sample_idx_B[r] = i, j
    # Padding rows get one real token so their (discarded) attention is well defined.
    mask_BxP[len(chunk):, -1] = True
    prefill, decode = _programs(policy.config, policy.mesh, policy.dtype, policy.rules, mode, B, P, new_bucket,
                                len(knobs.eos_E))
    # Every process builds the same chunk; each device is given only its own rows (see jaxsr.distributed).
    b1, b2 = batch_sharding(policy.mesh, 1, policy.rules), batch_sharding(policy.mesh, 2, policy.rules)
    rep = replicated(policy.mesh)
    ids_BxP, mask_BxP = distributed.global_array(ids_BxP, b2), distributed.global_array(mask_BxP, b2)
    prompt_idx_B, sample_idx_B = distributed.global_array(prompt_idx_B, b1), distributed.global_array(sample_idx_B, b1)
    knobs = _Knobs(*(distributed.global_array(k, rep) for k in knobs))
    cache, logits_BxV = prefill(layer_params, ids_BxP, mask_BxP)
    out, _ = decode(layer_params, cache, logits_BxV, mask_BxP, prompt_idx_B, sample_idx_B,
                    distributed.global_array(seed_key_2, rep), knobs)
    # Batch-sharded across processes: gathered whole onto every process.
    tokens_BxN, logprobs_BxN, length_B, eos_B = distributed.to_host(out)
    return {row: (tokens_BxN[r, :length_B[r]].tolist(), logprobs_BxN[r, :length_B[r]].tolist(), bool(eos_B[r]))
            for r, row in enumerate(chunk)}


def _decode_texts(tokenizer: Any, token_ids: list[list[int]]) -> list[str]:
    if tokenizer is None:
        return [""] * len(token_ids)
    return tokenizer.batch_decode(token_ids, skip_special_tokens=True)
