"""How M_t speaks: batched sampling with a KV cache, one jitted prefill and one jitted `lax.while_loop` decode.

This module is the host side (arguments, tokenisation, chunks, results); `jaxsr.sampler` runs one chunk.
A call is split into chunks of at most `max_batch_rows` rows (one row = one sample of one prompt). Each chunk is
left-padded into static buckets (batch, prompt length, new tokens), prefilled in one dispatch and decoded in a
second: the whole decode is a single `while_loop` over a preallocated cache that stops once every row has hit
an EOS id or `max_new_tokens`. Sampling is a pure function of (logits, per-row key), and each row's key is
derived from (seed, prompt index, sample index) only, so completions do not depend on the mesh, the batch
padding or the chunking. The chunks run on the policy's decode layout (`Policy.for_decode`: tensor-parallel
weights in the compute dtype, no FSDP, rows over the data-parallel replicas). See docs/sampling.md.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from . import distributed
from .data import bucket
from .model.sharding import batch_multiple
from .next_token import sampling_mode
from .policy import Policy
from .sampler import EOS_SLOTS, Knobs, make_prefix, prefill_rows, programs, run_chunk
from .stop import stop_table

DEFAULT_MAX_BATCH_ROWS = 256
MIN_SHARED_PREFIX = 16  # shorter common prefixes are prefilled with each prompt


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt.

    Attributes:
      token_ids: the generated token ids, EOS excluded.
      text: `tokenizer.decode(token_ids, skip_special_tokens=True)`, or "" when the policy has no tokenizer.
      logprobs: log-probability of each generated token under the model's unmodified distribution
        (log_softmax of the raw float32 logits: no temperature, top-k or top-p), same length as token_ids.
      finish_reason: "eos" (an EOS id was sampled), "stop" (the stop condition was met; its last token is kept)
        or "length" (max_new_tokens were generated).
      prompt_tokens: how many prompt tokens the model saw (after truncation, if any).
      after_stop_probs: with `generate(..., after_stop_probs=groups)`, when the row ended on its stop condition:
        each group's probability (summed over its token ids) for the token after the stop, under the model's
        unmodified distribution, from the same pass that sampled it; else None.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    after_stop_probs: list[float] | None = None



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


def _hints(hints, n: int) -> list[float]:
    out = [float(h) for h in hints]
    if len(out) != n or not all(math.isfinite(h) for h in out):
        raise ValueError(f"length_hints must hold one finite number per prompt ({n}), got {len(out)}: {hints!r}"[:200])
    return out


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _budgets(max_new_tokens, n: int) -> list[int]:
    """max_new_tokens per prompt, from one integer or one per prompt."""
    per_prompt = not _is_int(max_new_tokens)
    out = list(max_new_tokens) if per_prompt else [max_new_tokens] * n
    if per_prompt and len(out) != n:
        raise ValueError(f"max_new_tokens has {len(out)} values for {n} prompts; give one integer or one per prompt")
    for i, m in enumerate(out):
        if not _is_int(m) or m < 1:
            where = f" (prompt {i})" if per_prompt else ""
            raise ValueError(f"max_new_tokens must be an integer >= 1{where}, got {m!r}")
    return [int(m) for m in out]


def _check_args(num_samples, temperature, top_p, top_k, max_batch_rows):
    is_int = _is_int
    if not is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not is_int(max_batch_rows) or max_batch_rows < 1:
        raise ValueError(f"max_batch_rows must be an integer >= 1, got {max_batch_rows!r}")


def generate(policy: Policy, prompts, *, num_samples: int = 1, max_new_tokens: int | Sequence[int],
             temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, eos_token_ids: Sequence[int] | None = None,
             truncate_prompts: bool = False, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
             concurrency: int | None = None, progress: bool = True, stats: dict | None = None,
             length_hints: Sequence[float] | None = None, stop: str | None = None, share_prefixes: bool = True,
             after_stop_probs: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
    """Samples `num_samples` completions for each prompt; returns one list per prompt.

    prompts: strings (tokenised with `tokenizer(text)["input_ids"]`, the tokenizer's default special tokens)
    or token-id lists (used verbatim). eos_token_ids: None = `policy.eos_token_ids`; [] = never stop early.
    Sampling: temperature, then top-k, then top-p (see `sample_tokens`); temperature=0 is greedy. The same
    seed gives the same completions whatever the mesh, batch padding, `max_batch_rows` or `concurrency`.
    concurrency: chunks in flight at once (None: see `_default_concurrency`); always 1 with several processes.
    length_hints: the expected new tokens of each prompt (any scale), used only to put rows of similar length
    into the same chunk; None: every prompt's max_new_tokens.
    max_new_tokens: one budget for every prompt, or one per prompt.
    stop: a stop condition of `jaxsr.stop` ("score": the judge's "Score: d"; "score_marker": "score:"), checked
    on the device after every token; a row that meets it ends with finish_reason "stop".
    share_prefixes: prefill each distinct prompt of a chunk once for all its rows (its samples), and a prefix
    every prompt of the call starts with (at least 16 tokens, e.g. the judge's rubric) once per call; off: every
    row prefills its whole prompt (the same completions, up to float rounding across batch shapes).
    after_stop_probs: groups of token ids (e.g. the score digits' spellings); a row that ends on `stop` gets each
    group's probability for the next token in `Completion.after_stop_probs` (needs `stop`).
    stats: a dict to receive `"chunks"`, one dict per chunk in the order the rows were chunked: real `rows`,
    padded `batch`, `prompt_bucket`, `decode_steps` (iterations of its decode loop), `longest_row` (tokens
    its longest real row sampled, EOS included), `prefill_rows` (padded rows its prefill ran) and
    `prefill_tokens` (real prompt tokens it prefilled); and `"prefix_tokens"`: the shared prefix's tokens,
    prefilled once for the call (0: none).

    With several processes every process must call it with the same arguments: each feeds its devices their
    rows of every chunk and gets back all completions.
    """
    _check_args(num_samples, temperature, top_p, top_k, max_batch_rows)
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ValueError(f"concurrency must be an integer >= 1 or None, got {concurrency!r}")
    if len(prompts) == 0:
        return []
    # The weights in the compute dtype (the KV cache's) on the decode layout, made once per policy.
    model = policy.for_decode()
    cfg = policy.config
    budgets = _budgets(max_new_tokens, len(prompts))
    ids = [_fit(p, i, budgets[i], cfg.max_position_embeddings, truncate_prompts)
           for i, p in enumerate(_tokenize(policy, prompts))]
    if stop is not None and policy.tokenizer is None:
        raise ValueError(f"stop={stop!r} needs the policy's tokenizer (it reads the tokens' text); this policy has none")
    stop_VxS = np.zeros((1, 2), np.int32) if stop is None else stop_table(policy.tokenizer, cfg.vocab_size, stop)
    eos = list(policy.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if any(not isinstance(e, (int, np.integer)) for e in eos):
        raise ValueError(f"eos_token_ids must be integers, got {eos!r}")
    eos_E = np.full(-(-max(len(eos), 1) // EOS_SLOTS) * EOS_SLOTS, -1, np.int32)
    eos_E[:len(eos)] = eos
    pad_id = int(np.clip(policy.pad_token_id, 0, cfg.vocab_size - 1))
    mode = sampling_mode(float(temperature), float(top_p), int(top_k), cfg.vocab_size)
    knobs = Knobs(np.float32(max(float(temperature), 1e-30)), np.float32(top_p), np.int32(top_k),
                  np.int32(pad_id), eos_E, stop_VxS)
    seed_key_2 = np.asarray(jax.random.key_data(jax.random.key(seed)))
    new_bucket = bucket(max(budgets), fine=True)
    multiple = batch_multiple(model.mesh)
    cap = -(-max_batch_rows // multiple) * multiple

    capture = _capture_groups(after_stop_probs, stop, cfg.vocab_size)
    # A prefix every prompt shares (the judge's rubric and the chat header before it) is prefilled once and
    # each prompt keeps only its remainder. Not with a sliding window: the remainders sit after a gap of
    # padding slots, and the window counts slots.
    prefix = None
    full_ids = ids
    if share_prefixes and (cfg.sliding_window is None or cfg.sliding_window >= cfg.max_position_embeddings):
        n = _common_prefix(ids)
        if n >= MIN_SHARED_PREFIX:
            prefix = make_prefix(model, ids[0][:n], pad_id)
            ids = [p[n:] for p in ids]

    # Length-aware chunks: rows sorted by expected new tokens, then prompt length (longest first), so a chunk
    # does not wait for one long row and its prompt bucket is tight; results do not depend on which rows share
    # a chunk. At least `concurrency` chunks of equal size (equal shapes: one compilation), at most `cap` rows.
    # A prompt's samples stay next to each other (the sort is stable), so a chunk prefills each prompt once.
    expected = budgets if length_hints is None else _hints(length_hints, len(ids))
    rows = sorted(((i, j) for i in range(len(ids)) for j in range(num_samples)),
                  key=lambda r: (-expected[r[0]], -len(ids[r[0]])))
    concurrency = concurrency or _default_concurrency(model.mesh)
    if jax.process_count() > 1:
        # Every process must launch the same collective programs in the same order; threads would not.
        concurrency = 1
    size = -(-len(rows) // max(-(-len(rows) // cap), min(concurrency, len(rows))))
    chunks = [rows[k:k + size] for k in range(0, len(rows), size)]
    shapes = [_chunk_shape(ids, chunk, multiple, cap, share_prefixes) for chunk in chunks]
    run = functools.partial(run_chunk, model, ids, budgets, new_bucket=new_bucket, mode=mode, knobs=knobs,
                            seed_key_2=seed_key_2, prefix=prefix, capture=capture)
    C = 0 if prefix is None else prefix.slots
    for B, P, Bp in sorted(set(shapes)):
        programs(model.config, model.mesh, model.dtype, model.rules, mode, B, P, new_bucket, len(eos_E),
                 stop_VxS.shape, model.attention, None if Bp == B else Bp, C, capture)  # compile here, once
    results: dict[tuple[int, int], tuple[list[int], list[float], str, list[float] | None]] = {}
    steps: dict[int, int] = {}
    bar = None
    if progress and len(chunks) > concurrency:
        bar = distributed.progress(len(chunks), desc="sampling", unit="batch")
    start, generated = time.perf_counter(), 0
    with concurrent.futures.ThreadPoolExecutor(min(concurrency, len(chunks))) as pool:
        futures = {pool.submit(run, chunk, shape): k for k, (chunk, shape) in enumerate(zip(chunks, shapes))}
        for future in concurrent.futures.as_completed(futures):
            out, steps[futures[future]] = future.result()
            results.update(out)
            generated += sum(len(r[0]) for r in out.values())
            if bar is not None:
                bar.set_postfix(tokens_per_s=f"{generated / (time.perf_counter() - start):.0f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    if stats is not None:
        stats["prefix_tokens"] = 0 if prefix is None else prefix.length
        stats["chunks"] = []
        for k, (chunk, (B, P, Bp)) in enumerate(zip(chunks, shapes)):
            prefilled = ([i for block in prefill_rows(chunk, B, multiple) for i in block] if Bp < B
                         else [i for i, _ in chunk])
            stats["chunks"].append({
                "rows": len(chunk), "batch": B, "prompt_bucket": P, "decode_steps": steps[k],
                "longest_row": max(len(results[r][0]) + (results[r][2] == "eos") for r in chunk),
                "prefill_rows": Bp, "prefill_tokens": sum(len(ids[i]) for i in prefilled)})

    order = [(i, j) for i in range(len(ids)) for j in range(num_samples)]
    texts = _decode_texts(policy.tokenizer, [results[r][0] for r in order])
    completions = [Completion(results[r][0], text, results[r][1], results[r][2], len(full_ids[r[0]]), results[r][3])
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


def _chunk_shape(ids, chunk, multiple: int, cap: int, share: bool) -> tuple[int, int, int]:
    """(batch, prompt bucket, prefill batch) of a chunk: the prefill batch holds each data shard's distinct
    prompts (`prefill_rows`) when that is fewer rows than the batch, else it is the batch (nothing shared)."""
    B = _batch_bucket(len(chunk), multiple, cap)
    P = bucket(max(len(ids[i]) for i, _ in chunk), fine=True)
    Bp = B
    if share:
        distinct = max(len(block) for block in prefill_rows(chunk, B, multiple))
        Bp = min(B, _batch_bucket(distinct * multiple, multiple, B))
    return B, P, Bp


def _capture_groups(groups, stop, vocab: int) -> tuple[tuple[int, ...], ...] | None:
    """`after_stop_probs` as the decode program's static table, checked: a stop condition to read it after, and
    non-empty groups of token ids inside the vocabulary."""
    if groups is None:
        return None
    if stop is None:
        raise ValueError("after_stop_probs needs a stop condition (stop=...): it is read after the stop token")
    out = tuple(tuple(int(t) for t in g) for g in groups)
    for k, g in enumerate(out):
        if not g or any(not 0 <= t < vocab for t in g):
            raise ValueError(f"after_stop_probs group {k} must be a non-empty list of token ids in [0, {vocab}), "
                             f"got {list(g)}")
    if not out:
        raise ValueError("after_stop_probs must hold at least one group of token ids")
    return out


def _common_prefix(ids: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least its last token (whose logits the prefill needs);
    0 for fewer than two distinct prompts (their samples share a prefill anyway)."""
    distinct = {tuple(p) for p in ids}
    if len(distinct) < 2:
        return 0
    first, n = ids[0], min(len(p) for p in ids) - 1
    for p in ids[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n


def _decode_texts(tokenizer: Any, token_ids: list[list[int]]) -> list[str]:
    if tokenizer is None:
        return [""] * len(token_ids)
    return tokenizer.batch_decode(token_ids, skip_special_tokens=True)
