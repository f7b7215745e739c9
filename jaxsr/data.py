"""Training data: SFT examples and preference pairs read from disk, chat-templated, cut into fixed-shape batches.

The path of one item: a record (dict of strings) -> token ids (prompt rendered as a user turn with the chat
template; response text + EOS) -> an over-length check (truncate the response or drop) -> a row of a padded
batch whose length is a power-of-two bucket. The order of items is a pure function of (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted run would.

A batch is a dict of numpy arrays with a leading micro-batch axis A (gradient accumulation) and a row axis:
  ids, positions, mask        [A, b, T]      tokens, their positions, real-token mask (right padding)
  segment_ids                 [A, b, T]      packed SFT rows only: 1, 2, ... per sequence, 0 on padding
  target_pos, target_ids,     [A, b, R]      the R response tokens scored per row: the hidden state at
  target_mask                                target_pos predicts target_ids (so logits are computed for
                                             response positions only, never for the prompt)
Preference batches put chosen and rejected side by side on an axis of size 2 ([A, b, 2, T]: index 0 chosen,
1 rejected) and add `weight` [A, b] (1 real pair, 0 batch padding) and `ref_logps` [A, b, 2].
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .chat import render_user_turn

log = logging.getLogger(__name__)

SFT_COLUMNS = ("prompt", "response")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
MIN_BUCKET = 16

# Why an item was skipped or changed; logged after tokenisation and returned to callers.
SKIP_REASONS = {
    "prompt_too_long": "prompt alone fills max_length",
    "dropped_overlong": "prompt + response longer than max_length (overlong=drop)",
    "empty_response": "empty response",
    "identical": "chosen identical to rejected",
    "identical_after_truncation": "chosen and rejected identical after truncation",
}


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names the file, row or column."""


# --- sources ------------------------------------------------------------------------------------------------

def read_records(path, columns: Sequence[str], optional: Sequence[str] = ()) -> list[dict]:
    """Rows of a JSONL file or a `datasets.Dataset.save_to_disk` directory, keeping `columns` + `optional`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (expected a JSONL file or a directory "
                                f"written by datasets.Dataset.save_to_disk)")
    keep = tuple(columns) + tuple(optional)
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(p))
        except FileNotFoundError as e:
            raise DataError(f"{p}: not a Hugging Face datasets directory ({e})") from None
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise DataError(f"{p}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        present = list(ds.column_names)
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"{p}: missing column(s) {', '.join(missing)}; columns present: {', '.join(present)}")
        rows = ds.select_columns([c for c in keep if c in present]).to_list()
    else:
        rows = []
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{p}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
                missing = [c for c in columns if c not in row]
                if missing:
                    raise DataError(f"{p}:{lineno}: missing column(s) {', '.join(missing)}; "
                                    f"columns present: {', '.join(row) or '(none)'}")
                rows.append({c: row[c] for c in keep if c in row})
    if not rows:
        raise DataError(f"{p}: the dataset is empty")
    return rows


def load_sft(path) -> list[dict]:
    """SFT examples {prompt, response} from a JSONL file or a saved HF dataset."""
    return read_records(path, SFT_COLUMNS)


def load_pairs(path) -> list[dict]:
    """Preference pairs {prompt, chosen, rejected[, ref_chosen_logps, ref_rejected_logps]}."""
    return read_records(path, PAIR_COLUMNS, REF_COLUMNS)


# --- tokenisation -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised SFT example; `index` is its row in the source."""

    prompt: np.ndarray
    response: np.ndarray
    index: int

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One tokenised preference pair; `ref_logps` = (chosen, rejected) summed reference log-probs, or None."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    index: int
    ref_logps: tuple[float, float] | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def _check_tokenizer(tokenizer):
    if tokenizer is None:
        raise DataError("the policy has no tokenizer; training on text needs one (load a model directory with tokenizer files)")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no chat template; set tokenizer.chat_template "
                        f"(or add chat_template.jinja to the model directory)")
    if tokenizer.eos_token is None:
        raise DataError("tokenizer has no eos_token; responses must end with EOS")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as a user turn plus the assistant header (the text the model continues).

    Rendered by `jaxsr.chat.render_user_turn`, as the sampler renders it, so that a pair is trained on the
    very prompt tokens its responses were generated from.
    """
    return tokenizer(render_user_turn(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """Response text + EOS: the model must learn to stop."""
    return tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def _room(prompt_len: int, response_lens: Sequence[int], max_length: int, overlong: str, counts) -> int | None:
    """Response tokens that fit after the prompt (None: skip the item, counted in `counts`)."""
    if prompt_len >= max_length:  # no room for even one response token; never cut a prompt
        counts["prompt_too_long"] += 1
        return None
    room = max_length - prompt_len
    if max(response_lens) <= room:
        return room
    if overlong == "drop":
        counts["dropped_overlong"] += 1
        return None
    counts["truncated"] += 1
    return room


def _text(r: dict, key: str, i: int, where: str) -> str:
    v = r[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: row {i} column {key!r} must be a string, got {type(v).__name__} {v!r}")
    return v


def _blank(text: str) -> bool:
    return not text.strip()


def tokenize_sft(tokenizer, records: Iterable[dict], *, max_length: int, overlong: str = "truncate",
                 where: str = "SFT data") -> tuple[list[Example], collections.Counter]:
    """Tokenised examples and the counts of skipped/truncated ones (also logged)."""
    _check_tokenizer(tokenizer)
    counts, out = collections.Counter(), []
    records = list(records)
    for i, r in enumerate(records):
        prompt, response = _text(r, "prompt", i, where), _text(r, "response", i, where)
        if _blank(response):
            counts["empty_response"] += 1
            continue
        p = prompt_ids(tokenizer, prompt)
        resp = response_ids(tokenizer, response)
        room = _room(len(p), [len(resp)], max_length, overlong, counts)
        if room is None:
            continue
        out.append(Example(np.asarray(p, np.int32), np.asarray(resp[:room], np.int32), i))
    _report(where, "examples", len(records), len(out), counts)
    return out, counts


def _ref_values(r: dict, i: int, where: str) -> tuple[float, float]:
    vals = []
    for c in REF_COLUMNS:
        v = r.get(c)
        if v is None or not math.isfinite(float(v)):
            raise DataError(f"{where}: row {i} has no finite {c} ({v!r}); reference='precomputed' needs "
                            f"{' and '.join(REF_COLUMNS)} on every pair (see jaxsr.train.reference_logps), "
                            f"or set reference=on_the_fly")
        vals.append(float(v))
    return vals[0], vals[1]


def tokenize_pairs(tokenizer, records: Iterable[dict], *, max_length: int, overlong: str = "truncate",
                   need_ref: bool = False, where: str = "preference pairs") -> tuple[list[Pair], collections.Counter]:
    """Tokenised pairs and the counts of skipped/truncated ones (also logged).

    Chosen and rejected are cut to the same room after their shared prompt. With `need_ref`, every kept
    pair must carry finite reference log-probs (sums over the same, possibly truncated, response tokens).
    """
    _check_tokenizer(tokenizer)
    records = list(records)
    if need_ref and records and not any(c in records[0] for c in REF_COLUMNS):
        raise DataError(f"{where}: reference='precomputed' but the pairs have no {' / '.join(REF_COLUMNS)} columns; "
                        f"compute them with jaxsr.train.reference_logps(M_t, pairs) or set reference=on_the_fly")
    counts, out = collections.Counter(), []
    for i, r in enumerate(records):
        prompt, chosen, rejected = (_text(r, k, i, where) for k in PAIR_COLUMNS)
        if _blank(chosen) or _blank(rejected):
            counts["empty_response"] += 1
            continue
        if chosen == rejected:
            counts["identical"] += 1
            continue
        p = prompt_ids(tokenizer, prompt)
        c, rj = response_ids(tokenizer, chosen), response_ids(tokenizer, rejected)
        room = _room(len(p), [len(c), len(rj)], max_length, overlong, counts)
        if room is None:
            continue
        c, rj = c[:room], rj[:room]
        if c == rj:
            counts["identical_after_truncation"] += 1
            continue
        ref = _ref_values(r, i, where) if need_ref else None
        out.append(Pair(np.asarray(p, np.int32), np.asarray(c, np.int32), np.asarray(rj, np.int32), i, ref))
    _report(where, "pairs", len(records), len(out), counts)
    return out, counts


def _report(where: str, noun: str, total: int, kept: int, counts) -> None:
    skipped = {k: v for k, v in counts.items() if k in SKIP_REASONS and v}
    parts = [f"{v} {SKIP_REASONS[k]}" for k, v in skipped.items()]
    if counts.get("truncated"):
        parts.append(f"{counts['truncated']} truncated to max_length (response cut, prompt kept)")
    log.info("%s: %d of %d %s kept%s", where, kept, total, noun, ("; " + "; ".join(parts)) if parts else "")
    if total == 0:
        raise DataError(f"{where}: the dataset is empty")
    if kept == 0:
        raise DataError(f"{where}: no usable {noun}: all {total} were skipped ({'; '.join(parts)})")


def fingerprint(items: Sequence[Example | Pair]) -> str:
    """A hash of the token ids (and reference log-probs): a resumed run must see the same data."""
    h = hashlib.sha256()
    for it in items:
        for f in dataclasses.fields(it):
            v = getattr(it, f.name)
            h.update(v.tobytes() if isinstance(v, np.ndarray) else repr(v).encode())
            h.update(b"|")
    return h.hexdigest()[:16]


# --- order --------------------------------------------------------------------------------------------------

def bucket(n: int, cap: int | None = None, min_bucket: int = MIN_BUCKET, *, fine: bool = False) -> int:
    """The padded length for n tokens (training rows and the sampler's prompts and new tokens alike): a power
    of two (at least min_bucket), never above cap (when given and n fits).

    fine: also 1.5 times a power of two (16, 24, 32, 48, 64, 96, ...): at most a third of a row is padding,
    for twice the number of shapes to compile (still logarithmic in the lengths seen).
    """
    b = max(min_bucket, 1 << max(n - 1, 0).bit_length())
    if fine and b >= 2 * min_bucket and n <= 3 * b // 4:
        b = 3 * b // 4
    return b if cap is None else max(n, min(b, cap))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # A fresh generator per (seed, epoch): the order never depends on how many steps ran before.
    return np.random.default_rng([seed, epoch]).permutation(n)


def pack(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy in-order packing of items into rows of at most `capacity` tokens."""
    rows, cur, used = [], [], 0
    for i in order:
        if cur and used + lengths[i] > capacity:
            rows.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += lengths[i]
    if cur:
        rows.append(cur)
    return rows


class StepPlan:
    """Which items each optimizer step sees: rows of item indices, a pure function of (seed, epoch).

    Each step takes `batch_size` rows in epoch order (the last step of an epoch may have fewer; the batch
    is padded with empty rows). A row is one item, or several with `pack_capacity` (packed SFT).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, epochs: int = 1, max_steps: int = 0,
                 pack_capacity: int | None = None):
        if not len(lengths):
            raise DataError("no items to train on")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.pack_capacity = pack_capacity
        self._rows: tuple[int, list[list[int]]] | None = None  # the last epoch asked for
        self._steps: dict[int, int] = {}  # steps per epoch (packing makes it vary)
        if max_steps > 0:
            self.total_steps = max_steps
        else:
            self.total_steps = sum(self.steps_in_epoch(e) for e in range(epochs))

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if self._rows is None or self._rows[0] != epoch:
            order = epoch_permutation(self.seed, epoch, len(self.lengths))
            if self.pack_capacity:
                rows = pack(order, self.lengths, self.pack_capacity)
            else:
                rows = [[int(i)] for i in order]
            self._rows = (epoch, rows)
        return self._rows[1]

    def steps_in_epoch(self, epoch: int) -> int:
        if not self.pack_capacity:
            return -(-len(self.lengths) // self.batch_size)
        if epoch not in self._steps:
            self._steps[epoch] = -(-len(self.epoch_rows(epoch)) // self.batch_size)
        return self._steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index of the batch within the epoch) of 0-based step `step`."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def rows(self, step: int) -> list[list[int]]:
        epoch, k = self.locate(step)
        return self.epoch_rows(epoch)[k * self.batch_size:(k + 1) * self.batch_size]


# --- batches ------------------------------------------------------------------------------------------------

def _row_layout(segments: Sequence[tuple[np.ndarray, np.ndarray]]):
    """Tokens, per-segment positions, segment ids and scored (position, token) of one (packed) row."""
    ids, pos, seg, tpos, tids = [], [], [], [], []
    for k, (p, r) in enumerate(segments):
        start = len(ids)
        n = len(p) + len(r)
        ids += list(p) + list(r)
        pos += range(n)
        seg += [k + 1] * n
        # The hidden state at token t predicts token t+1: response token j is scored at start + len(p) - 1 + j.
        tpos += range(start + len(p) - 1, start + n - 1)
        tids += list(r)
    return ids, pos, seg, tpos, tids


def _fill(rows_layout, T: int, R: int, pad_id: int, extra: str | None = None, k: int | None = None) -> dict[str, np.ndarray]:
    """Padded arrays of rows laid out as (ids, positions, per-token ids, target slots, target tokens).

    `extra` names the per-token ids (`segment_ids` of packed rows, `branch` of shared-prompt rows; None: not
    stored). Targets are one sequence per row ([n, R]) or, with `k`, lists of k sequences ([n, k, R]).
    """
    n = len(rows_layout)
    t_shape = (n, R) if k is None else (n, k, R)
    out = {"ids": np.full((n, T), pad_id, np.int32), "positions": np.zeros((n, T), np.int32),
           "mask": np.zeros((n, T), bool), "target_pos": np.zeros(t_shape, np.int32),
           "target_ids": np.zeros(t_shape, np.int32), "target_mask": np.zeros(t_shape, bool)}
    if extra:
        out[extra] = np.zeros((n, T), np.int32)
    for i, (ids, pos, tok_ids, tpos, tids) in enumerate(rows_layout):
        out["ids"][i, :len(ids)] = ids
        out["positions"][i, :len(ids)] = pos
        out["mask"][i, :len(ids)] = True
        if extra:
            out[extra][i, :len(tok_ids)] = tok_ids
        for at, tp, ti in ([((i,), tpos, tids)] if k is None else [((i, j), tpos[j], tids[j]) for j in range(k)]):
            out["target_pos"][at][:len(tp)] = tp
            out["target_ids"][at][:len(ti)] = ti
            out["target_mask"][at][:len(ti)] = True
    return out


def _microbatches(arrays: dict[str, np.ndarray], batch_size: int, grad_accum: int, multiple: int, fill) -> dict[str, np.ndarray]:
    """[n, ...] rows (n <= batch_size) -> [A, b, ...]: A = grad_accum micro-batches of b rows each.

    Missing rows (the end of an epoch) become empty rows; b is batch_size / A rounded up to a multiple of
    the data-parallel device count, so every step of a run has one shape per length bucket.
    """
    per = batch_size // grad_accum
    b = -(-per // multiple) * multiple
    out = {}
    for k, a in arrays.items():
        full = np.full((grad_accum, b) + a.shape[1:], fill.get(k, 0), a.dtype)
        for m in range(grad_accum):
            chunk = a[m * per:(m + 1) * per]
            full[m, :len(chunk)] = chunk
        out[k] = full
    return out


def sft_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], *, batch_size: int, grad_accum: int = 1,
              multiple: int = 1, max_length: int, pad_id: int = 0, packed: bool = False) -> dict[str, np.ndarray]:
    """One SFT optimizer step: `rows` lists example indices per row (several per row when packed)."""
    layout = [_row_layout([(examples[i].prompt, examples[i].response) for i in row]) for row in rows]
    T = bucket(max(len(l[0]) for l in layout), max_length)
    R = bucket(max(len(l[4]) for l in layout), T)
    arrays = _fill(layout, T, R, pad_id, "segment_ids" if packed else None)
    return _microbatches(arrays, batch_size, grad_accum, multiple, {"ids": pad_id})


def _shared_prompt_layout(p: Pair):
    """One row prompt + chosen + rejected: tokens, positions, branch ids (0 prompt, 1 chosen, 2 rejected) and
    the scored (slot, token) of each response, [2] lists."""
    P, C, R = len(p.prompt), len(p.chosen), len(p.rejected)
    ids = np.concatenate([p.prompt, p.chosen, p.rejected])
    pos = np.concatenate([np.arange(P + C), np.arange(P, P + R)])
    branch = np.repeat([0, 1, 2], [P, C, R])
    # The first token of either response is predicted by the last prompt token; the rest by their own branch.
    tpos = [np.arange(P - 1, P - 1 + C), np.concatenate([[P - 1], np.arange(P + C, P + C + R - 1)])[:R]]
    return ids, pos, branch, tpos, [p.chosen, p.rejected]


def _shared_prompt_batch(pairs: Sequence[Pair], idx: Sequence[int], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    layout = [_shared_prompt_layout(pairs[i]) for i in idx]
    # A row holds up to two responses after its prompt; fine buckets, since 3 of 4 halves is the common case.
    T = bucket(max(len(l[0]) for l in layout), 2 * max_length, fine=True)
    R = bucket(max(len(t) for l in layout for t in l[4]), max_length)
    return _fill(layout, T, R, pad_id, "branch", k=2)


def pair_batch(pairs: Sequence[Pair], rows: Sequence[Sequence[int]], *, batch_size: int, grad_accum: int = 1,
               multiple: int = 1, max_length: int, pad_id: int = 0, shared_prompt: bool = False) -> dict[str, np.ndarray]:
    """One DPO optimizer step: rows of one pair each.

    Default: chosen and rejected as two sequences on an axis of size 2 (`ids` [A, b, 2, T]). shared_prompt:
    one row prompt + chosen + rejected (`ids` [A, b, T], plus `branch` ids; see
    `decoder.attention_mask`), so the prompt is computed once per pair; the scored targets stay
    [A, b, 2, R]. Both give the same log-probs.
    """
    idx = [row[0] for row in rows]
    if shared_prompt:
        arrays = _shared_prompt_batch(pairs, idx, max_length, pad_id)
    else:
        layout = [_row_layout([(pairs[i].prompt, resp)]) for i in idx for resp in (pairs[i].chosen, pairs[i].rejected)]
        T = bucket(max(len(l[0]) for l in layout), max_length)
        R = bucket(max(len(l[4]) for l in layout), T)
        flat = _fill(layout, T, R, pad_id)
        arrays = {k: v.reshape((len(idx), 2) + v.shape[1:]) for k, v in flat.items()}
    arrays["weight"] = np.ones(len(idx), np.float32)
    refs = [pairs[i].ref_logps for i in idx]
    arrays["ref_logps"] = np.asarray([r if r is not None else (0.0, 0.0) for r in refs], np.float32).reshape(len(idx), 2)
    return _microbatches(arrays, batch_size, grad_accum, multiple, {"ids": pad_id})


def num_tokens(batch: dict[str, np.ndarray]) -> int:
    """Real (non-padding) tokens in a batch, prompts included."""
    return int(batch["mask"].sum())
