"""Self-Instruct prompt generation: the 8-shot prompt and the filters (paper §2.2, PAPER.md §1, §7.4).

The few-shot prompt is Self-Instruct's template for non-classification tasks with
"Task N:" numbering. ``templates/selfinstruct.txt`` holds the header and a
``<TASKS_HERE>`` slot; the slot is filled with one line per demonstration and an
open last line the generator continues::

    Come up with a series of tasks:
    Task 1: <demonstration, whitespace collapsed to single spaces>
    ...
    Task 8: <demonstration>
    Task 9:

Pure Python on purpose, like ``judge.py``: this is string work around the sampler.
"""

from __future__ import annotations

import re
from importlib import resources

from rouge_score import scoring, tokenizers

TASKS_SLOT = "<TASKS_HERE>"

# Self-Instruct's keyword filter as extended by Stanford Alpaca: tasks a text-only
# model cannot do (see, draw, play, open files, browse).
DEFAULT_BLOCKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)

# The "Task N:" marker the generator writes to start its next task ("Task 10 :" too).
_TASK_MARKER = re.compile(r"\bTask[ \t]*\d+[ \t]*:")


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _normalise(text: str) -> str:
    return _collapse(text).lower()


def _read_template(text: str) -> str:
    # Files end with a newline by convention; it is not part of the prompt.
    return text[:-1] if text.endswith("\n") else text


SELFINSTRUCT_TEMPLATE = _read_template(
    (resources.files(__package__) / "templates" / "selfinstruct.txt").read_text(encoding="utf-8")
)


def _unique(texts) -> list[str]:
    # Order-preserving: a set would make sampling depend on string hashing, which
    # changes between processes.
    first: dict[str, str] = {}
    for text in texts:
        first.setdefault(_normalise(text), _collapse(text))
    first.pop("", None)
    return list(first.values())


def build_fewshot_prompt(
    seed_prompts, generated_prompts, rng, *, num_seed: int = 6, num_generated: int = 2, template: str | None = None
) -> str:
    """The Self-Instruct few-shot prompt: ``num_generated`` demonstrations drawn from
    ``generated_prompts`` (seeds fill in while there are fewer) and the rest from
    ``seed_prompts``, shuffled, no example twice; deterministic given ``rng``
    (a ``random.Random``)."""
    template = SELFINSTRUCT_TEMPLATE if template is None else template
    if TASKS_SLOT not in template:
        raise ValueError(f"self-instruct template has no {TASKS_SLOT} slot for the numbered tasks")
    generated = _unique(generated_prompts)
    chosen = rng.sample(generated, min(num_generated, len(generated)))
    taken = {_normalise(t) for t in chosen}
    seeds = [t for t in _unique(seed_prompts) if _normalise(t) not in taken]
    need = num_seed + num_generated - len(chosen)
    if len(seeds) < need:
        raise ValueError(
            f"need {need} distinct seed prompts for a {num_seed + num_generated}-shot prompt "
            f"({len(chosen)} generated so far), but only {len(seeds)} are available"
        )
    chosen += rng.sample(seeds, need)
    rng.shuffle(chosen)
    lines = [f"Task {i}: {text}" for i, text in enumerate(chosen, 1)] + [f"Task {len(chosen) + 1}:"]
    return template.replace(TASKS_SLOT, "\n".join(lines))


def extract_instruction(generated_text: str) -> str | None:
    """The first task in a continuation of the few-shot prompt: the text up to the
    next "Task N:" marker or blank line, stripped; None if that is empty."""
    text = generated_text.lstrip()
    # Some generators restate the open marker ("Task 9: ...") before the task.
    if (lead := _TASK_MARKER.match(text)) is not None:
        text = text[lead.end():]
    if (stop := _TASK_MARKER.search(text)) is not None:
        text = text[: stop.start()]
    text = re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0].strip()
    return text or None


def _lcs_length(masks: dict[str, int], length: int, tokens: list[str]) -> int:
    """Length of the longest common subsequence of a pre-tokenised text and ``tokens``.

    Bit-parallel (Crochemore et al. 2001): ``masks[t]`` has bit i set where the first
    text's token i is t. With tokens computed once per prompt this is ~100x faster
    than ``RougeScorer.score`` per pair (which re-tokenises and fills an O(n·m)
    table), and every candidate meets thousands of kept prompts; tests check it
    against ``RougeScorer.score``.
    """
    full = (1 << length) - 1
    v = full
    for t in tokens:
        if (m := masks.get(t)) is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return length - v.bit_count()


class PromptFilter:
    """Self-Instruct's filters over a stream of generated prompts.

    ``check(text)`` gives the first rejection reason or None; ``add(text)`` registers
    an accepted prompt, which later candidates are compared against together with
    ``existing`` (e.g. the seed prompts). ``counts`` tallies rejections by kind (the
    reason up to ":"). Reasons, in the order they are tested: "empty",
    "too_short" (< ``min_words`` words), "too_long" (> ``max_words``), "bad_start"
    (first character punctuation or non-ASCII, as in Self-Instruct),
    "blocklist:<word>", "duplicate" (same text ignoring case and whitespace),
    "rouge:<score>" (ROUGE-L F-measure >= ``max_rouge`` with some kept prompt).

    Self-Instruct itself keeps only prompts of more than 3 words; use
    ``min_words=4`` to match it exactly.
    """

    def __init__(self, *, max_rouge=0.7, min_words=3, max_words=150, blocklist=DEFAULT_BLOCKLIST, existing=()):
        self.max_rouge = max_rouge
        self.min_words = min_words
        self.max_words = max_words
        self.counts: dict[str, int] = {}
        # Longest first, so a phrase ("go to") wins over a listed word it starts with ("go").
        words = "|".join(map(re.escape, sorted(blocklist, key=len, reverse=True)))
        self._blocklist = re.compile(rf"\b({words})\b", re.IGNORECASE) if words else None
        # The tokenizer RougeScorer(["rougeL"], use_stemmer=False) uses.
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._seen: set[str] = set()
        self._kept: list[tuple[dict[str, int], int]] = []  # (token -> position bitmask, token count)
        for text in existing:
            self.add(text)

    def _reason(self, text: str) -> str | None:
        text = text.strip()
        if not text:
            return "empty"
        n_words = len(text.split())
        if n_words < self.min_words:
            return "too_short"
        if n_words > self.max_words:
            return "too_long"
        if not (text[0].isascii() and text[0].isalnum()):
            return "bad_start"
        if self._blocklist is not None and (hit := self._blocklist.search(text)):
            return f"blocklist:{hit.group(1).lower()}"
        if _normalise(text) in self._seen:
            return "duplicate"
        tokens = self._tokenizer.tokenize(text)  # not empty: the text starts with [A-Za-z0-9]
        n = len(tokens)
        for masks, length in self._kept:
            # lcs <= the shorter length: skip pairs whose lengths alone keep them
            # under the threshold (cheaper than the LCS, and common).
            short = min(length, n)
            if scoring.fmeasure(short / n, short / length) < self.max_rouge:
                continue
            lcs = _lcs_length(masks, length, tokens)
            # rouge_score's own formula, so scores match RougeScorer bit for bit.
            score = scoring.fmeasure(lcs / n, lcs / length)
            if score >= self.max_rouge:
                return f"rouge:{score:.3f}"
        return None

    def check(self, text: str) -> str | None:
        """The reason to reject ``text``, or None if it passes every filter."""
        reason = self._reason(text)
        if reason is not None:
            kind = reason.split(":", 1)[0]
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return reason

    def add(self, text: str) -> None:
        """Register a kept prompt: later candidates must differ from it."""
        self._seen.add(_normalise(text))
        tokens = self._tokenizer.tokenize(text)
        if tokens:
            masks: dict[str, int] = {}
            for i, t in enumerate(tokens):
                masks[t] = masks.get(t, 0) | (1 << i)
            self._kept.append((masks, len(tokens)))

    def __len__(self) -> int:
        return len(self._kept)
