"""M_t as a judge: the chat-templated judge request, K sampled judgements or one expected judgement per request
(`judge.mode`), and the expected score's digit probabilities. The judgements stage (`jaxsr.selfreward`), the EFT
judge, evaluation's rm_eval and the meta-judge all judge through `judge`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import backends
from .chat import chat_token_ids
from .config import JudgeSection
from .judge import parse_score, render_judge_prompt
from .judge_scores import digit_id_table
from .policy import Policy
from .sample import DEFAULT_MAX_BATCH_ROWS


def judge_request_ids(policy: Policy, template: str, instruction: str, response: str, max_new_tokens: int
                      ) -> tuple[list[int], bool]:
    """The chat-templated judge request, truncating the response (never the instruction) to fit the context."""
    tok = policy.tokenizer
    limit = policy.config.max_position_embeddings - max_new_tokens
    ids = chat_token_ids(tok, [render_judge_prompt(template, instruction, response)])[0]
    if len(ids) <= limit:
        return ids, False
    overhead = len(chat_token_ids(tok, [render_judge_prompt(template, instruction, "")])[0])
    resp_ids = tok(response, add_special_tokens=False)["input_ids"]
    keep = limit - overhead
    if keep <= 0:
        raise ValueError(f"judge request for instruction {instruction[:60]!r} does not fit the context "
                         f"({overhead} tokens without the response, limit {limit}); shorten judge.max_new_tokens")
    # Token boundaries can shift after decoding, so shrink until the rendered request fits.
    while keep > 0:
        cut = tok.decode(resp_ids[:keep], skip_special_tokens=True)
        ids = chat_token_ids(tok, [render_judge_prompt(template, instruction, cut)])[0]
        if len(ids) <= limit:
            return ids, True
        keep -= max(1, len(ids) - limit)
    return chat_token_ids(tok, [render_judge_prompt(template, instruction, "")])[0], True


def expected_scores(policy: Policy, request_ids: Sequence[Sequence[int]], justifications: Sequence[str], *,
                    backend: backends.Backend | None = None) -> list[tuple[float | None, list[float]]]:
    """Probability-weighted mean of 0-5 for the token after "Score:" (the `expected` judge mode), batched.

    Each row is request + justification cut after its last "Score:" (appended when missing); rows are
    left-padded to a power-of-two length so the next-token distribution of every row is at the last position
    and few shapes get compiled. `backend` gives the digit probabilities (default: the built-in one's).
    """
    tok = policy.tokenizer
    ctx = policy.config.max_position_embeddings
    rows = []
    for req, text in zip(request_ids, justifications):
        idx = text.lower().rfind("score:")
        prefix = text[: idx + len("score:")] if idx >= 0 else text.rstrip() + "\nScore:"
        rows.append((list(req) + tok(prefix, add_special_tokens=False)["input_ids"])[-ctx:])
    if not rows:
        return []
    length = min(ctx, max(16, 1 << (max(len(r) for r in rows) - 1).bit_length()))
    ids = np.full((len(rows), length), policy.pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = True
    return [_expected(m) for m in (backends.builtin() if backend is None else backend).digit_masses(policy, ids, mask)]


def _expected(mass_6) -> tuple[float | None, list[float]]:
    """(probability-weighted mean of 0-5, the six masses as floats); None when no digit has mass."""
    mass = [float(m) for m in mass_6]
    total = sum(mass)
    return (sum(k * m for k, m in enumerate(mass)) / total if total > 0 else None), mass


def judge(policy: Policy, request_ids: Sequence[Sequence[int]], sec: JudgeSection, seed: int, *,
          max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, backend: backends.Backend | None = None
          ) -> list[list[tuple[str, float | None, list[float]]]]:
    """M_t's judgements of each request: K sampled ones (`sampled`) or one with its expected score (`expected`),
    as (text, score or None, digit probabilities 0-5 or []). max_batch_rows: rows per chunk of the sampler
    (`sample.max_batch_rows`); backend: the sampler (default: the built-in one)."""
    backend = backends.builtin() if backend is None else backend
    k = sec.num_judgements if sec.mode == "sampled" else 1
    # Stop where the score is read: after "Score: d" (sampled) or "score:" (expected, see expected_scores).
    stop = ("score" if sec.mode == "sampled" else "score_marker") if sec.stop_at_score else None
    # The expected judge's digit probabilities come from the sampling pass itself when it stopped right after
    # "score:" (the built-in sampler); the other rows get them from a second forward (expected_scores).
    digits = (digit_id_table(policy.tokenizer) if sec.mode == "expected" and stop and backend.captures_after_stop
              else None)
    outs = backend.generate(policy, request_ids, num_samples=k, max_new_tokens=sec.max_new_tokens,
                            temperature=sec.temperature, top_p=sec.top_p, seed=seed, max_batch_rows=max_batch_rows,
                            stop=stop, after_stop_probs=digits)
    if sec.mode == "expected":
        same_pass = [o[0].after_stop_probs if o[0].after_stop_probs is not None
                     and o[0].text.lower().endswith("score:") else None for o in outs]
        rest = [i for i, m in enumerate(same_pass) if m is None]
        second = dict(zip(rest, expected_scores(policy, [request_ids[i] for i in rest], [outs[i][0].text for i in rest],
                                                 backend=backend)))
        expected = [second[i] if m is None else _expected(m) for i, m in enumerate(same_pass)]
        return [[(o[0].text, score, mass)] for o, (score, mass) in zip(outs, expected)]
    return [[(c.text, parse_score(c.text), []) for c in o] for o in outs]
