"""Stop conditions the decode loop evaluates on the device: a character automaton over the generated text, run
one token at a time through a [vocab, states] table of next states computed once per tokenizer from each token's
text. A row stops after the token that takes it to the last state. See docs/sampling.md#stop-conditions.

Two automata serve the judge:
- `score`: the sampled judge's "Score: d" (d in 0-5, the marker as `jaxsr.judge.parse_score` reads it) followed by
  a character that ends the value ("\\n", a letter, ...). A digit followed by what could extend the value ("4.5",
  "4/10", "3-4", "10", "4 out of 10") does not stop, so the truncated text parses to the score the full text's
  first marker gives.
- `score_marker`: the expected judge's "score:" (case-insensitive, as `selfreward.expected_scores` finds it),
  where the digit probabilities are read.
"""

from __future__ import annotations

import weakref

import numpy as np

KINDS = ("score", "score_marker")
_DECOR = " \t\n\r\f\v*_`"  # parse_score's [\s*_`] around the marker
_LINE_DECOR = " \t*_`"  # ... and after the number (same line only)
_MARKS = ":=\uff1a"
_EXTENDS = "/-\u2013+,oO\ufffd"  # may continue a value ("4/5", "3-4", "4,5", "4 out of"); U+FFFD: a partial byte

# States of `score`. S0/W: outside a marker after a non-alphanumeric / alphanumeric character; S1-S4: "s" .. "scor";
# WORD: "score"; PRE: "score" + decoration; MARK: the marker (+ decoration); DIGIT: a digit 0-5 after it;
# DIGIT_SP: + same-line decoration; DOT: + "."; STOP.
S0, W, S1, S2, S3, S4, WORD, PRE, MARK, DIGIT, DIGIT_SP, DOT, STOP = range(13)


def _alnum(c: str) -> bool:
    return c.isalnum()  # unicode-wide: stricter than parse_score's [a-z0-9] boundary, so never a false marker


def _fresh(c: str, prev_alnum: bool) -> int:
    if c.lower() == "s" and not prev_alnum:
        return S1
    return W if _alnum(c) else S0


def _score_step(s: int, c: str) -> int:
    low = c.lower()
    if s in (S0, W):
        return _fresh(c, s == W)
    if S1 <= s <= S4:
        return s + 1 if low == "score"[s - S1 + 1] else _fresh(c, True)
    if s in (WORD, PRE):
        if s == WORD and _alnum(c):
            return W  # "scores:": not a whole word
        if c in _DECOR:
            return PRE
        return MARK if c in _MARKS else _fresh(c, False)
    if s == MARK:
        if c in _DECOR:
            return MARK
        return DIGIT if c in "012345" else _fresh(c, False)
    if s in (DIGIT, DIGIT_SP):
        if c in _LINE_DECOR:
            return DIGIT_SP
        if c == ".":
            return DOT
        if c.isdigit() or c in _EXTENDS:
            return _fresh(c, True)  # a longer number, a fraction, a range, "out of": no stop
        return STOP
    if s == DOT:
        return _fresh(c, True) if c.isdigit() or c == "\ufffd" else STOP
    raise AssertionError(s)


def _score_token(s: int, text: str) -> int:
    stopped = False
    for c in text:
        s = _score_step(s, c)
        if s == STOP:
            stopped, s = True, S0
    # A token that ends the value and then opens a new marker ("4\nScore:") does not stop: the cut text would end
    # on a marker without its value.
    return STOP if stopped and s not in (MARK, DIGIT, DIGIT_SP, DOT) else s


def _marker_token(s: int, text: str) -> int:
    # States 0-5: how much of "score" is matched; 6: "score:" (stop).
    for c in text.lower():
        if s == 6:
            return 6
        if s == 5 and c == ":":
            s = 6
        elif s < 5 and c == "score"[s]:
            s += 1
        else:
            s = 1 if c == "s" else 0
    return s


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each id's text as it reads inside a decoded completion (special tokens: ""); "" past the tokenizer."""
    n = min(len(tokenizer), vocab_size)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    prefix = tokenizer.decode(anchor, skip_special_tokens=True)
    # Decoded after an anchor, so a leading space survives (SentencePiece drops it at the start of a text).
    texts = tokenizer.batch_decode([anchor + [i] for i in range(n)], skip_special_tokens=True)
    out = [t[len(prefix):] if t.startswith(prefix) else t for t in texts]
    return out + [""] * (vocab_size - n)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# States of each kind's automaton (the last one: stop), i.e. the columns of its stop_table.
STATES = {"score": STOP + 1, "score_marker": 7}


def stop_table(tokenizer, vocab_size: int, kind: str) -> np.ndarray:
    """int32 [vocab_size, states]: the state after each token from each state; the last state is "stop".
    Computed once per tokenizer and kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown stop condition {kind!r}; expected one of {KINDS}")
    per_tok = _TABLES.setdefault(tokenizer, {})
    key = (kind, vocab_size)
    if key not in per_tok:
        step, states = (_score_token, STATES[kind]) if kind == "score" else (_marker_token, STATES[kind])
        memo: dict[str, list[int]] = {}
        table = np.empty((vocab_size, states), np.int32)
        for i, text in enumerate(token_texts(tokenizer, vocab_size)):
            if text not in memo:
                memo[text] = [step(s, text) for s in range(states - 1)] + [states - 1]
            table[i] = memo[text]
        per_tok[key] = table
    return per_tok[key]


def stop_length(tokenizer, vocab_size: int, kind: str, token_ids) -> int | None:
    """How many of `token_ids` a row keeps under stop condition `kind`: up to and including the token that reaches
    the stop state, as the decode loop cuts it; None when none does. For a backend that samples without the
    automaton (an external engine) and cuts afterwards."""
    table = stop_table(tokenizer, vocab_size, kind)
    state, last = 0, table.shape[1] - 1
    for k, i in enumerate(token_ids):
        state = table[min(int(i), vocab_size - 1), state]
        if state == last:
            return k + 1
    return None
