"""Verifiable list-writing tasks: the instruction generator and the ground-truth grader.

A task asks for ``count`` words from one ``topic``, written in one ``case``, laid out in one
``format``, with an optional ``extra`` constraint. Its spec is a plain dict, so grading never
parses the instruction text::

    {"topic": "fruits", "count": 3, "case": "upper", "format": "numbered", "extra": "period"}
    "List 3 fruits in capital letters, as a numbered list, ending with a period."

The grader is additive, one point per criterion, in the order of the paper's rubric (docs/world.md):
relevant, topic, count, format, clean. Randomness always comes from a ``random.Random`` the caller
owns, and nothing iterates over a set, so a seed gives the same tasks in every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re

TOPICS: dict[str, tuple[str, ...]] = {
    # Single words, no word in two topics (no "orange", "lime", "turkey"), none in the Self-Instruct
    # keyword blocklist ("file", "map", "draw"), so membership decides relevance unambiguously.
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"),
    "animals": ("cat", "dog", "horse", "lion", "mouse", "sheep", "tiger", "zebra"),
    "colors": ("black", "blue", "brown", "green", "pink", "purple", "red", "white"),
    "countries": ("brazil", "canada", "china", "egypt", "france", "india", "japan", "peru"),
    "tools": ("axe", "drill", "hammer", "ladder", "rake", "saw", "shovel", "wrench"),
    "vehicles": ("boat", "bus", "car", "plane", "ship", "taxi", "train", "truck"),
}
WORD_TOPIC = {w: t for t, ws in TOPICS.items() for w in ws}
COUNTS = (2, 3, 4, 5)
CASES = ("lower", "upper", "title")
FORMATS = ("comma", "lines", "numbered", "brackets")
EXTRAS = ("none", "alphabetical", "period")
CRITERIA = ("relevant", "topic", "count", "format", "clean")

_CASE_TEXT = {"lower": ("in lowercase", "in small letters"), "upper": ("in uppercase", "in capital letters"),
              "title": ("capitalized", "with a capital first letter")}
_FORMAT_TEXT = {"comma": ("separated by commas", "as a comma separated list"),
                "lines": ("one per line", "each on its own line"),
                "numbered": ("as a numbered list", "numbered one per line"),
                "brackets": ("inside square brackets", "as a list in square brackets")}
_EXTRA_TEXT = {"none": ("",), "alphabetical": (", in alphabetical order", ", sorted alphabetically"),
               "period": (", ending with a period", ", with a period at the end")}
_TEMPLATES = (
    "List {count} {topic} {case}, {format}{extra}.",
    "Name exactly {count} {topic} {format}. Write them {case}{extra}.",
    "Give {count} {topic}, {format} and {case}{extra}.",
    "Write {count} different {topic} {case}{extra}, {format}.",
)
# Chatter lines hold no topic word, so the grader can tell them from the list itself.
CHATTER = ("Sure, here is the list:", "Here you go:", "Of course!", "Hope this helps!", "I like these a lot.",
           "That is all.", "Sure thing.")
_WORD = re.compile(r"[A-Za-z]+")
_W = r"[A-Za-z]+"
_FORMAT_RE = {"comma": re.compile(rf"{_W}(?: *, *{_W})*"), "lines": re.compile(_W),
              "brackets": re.compile(rf"\[ *{_W}(?: *, *{_W})* *\]")}


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """One instruction and the structured spec that grades it."""

    id: str
    instruction: str
    spec: dict


def render_instruction(spec: dict, rng: random.Random) -> str:
    """The spec as English, from a random template and random phrasings."""
    template = rng.choice(_TEMPLATES)
    return template.format(count=spec["count"], topic=spec["topic"], case=rng.choice(_CASE_TEXT[spec["case"]]),
                           format=rng.choice(_FORMAT_TEXT[spec["format"]]), extra=rng.choice(_EXTRA_TEXT[spec["extra"]]))


def sample_task(rng: random.Random) -> Task:
    """A uniformly random spec rendered from a random paraphrase template."""
    spec = {"topic": rng.choice(sorted(TOPICS)), "count": rng.choice(COUNTS), "case": rng.choice(CASES),
            "format": rng.choice(FORMATS), "extra": rng.choice(EXTRAS)}
    instruction = render_instruction(spec, rng)
    key = json.dumps(spec, sort_keys=True) + "\n" + instruction
    return Task(id="w" + hashlib.sha1(key.encode()).hexdigest()[:12], instruction=instruction, spec=spec)


def _spec(task_or_spec) -> dict:
    if isinstance(task_or_spec, Task):
        return task_or_spec.spec
    if isinstance(task_or_spec, str):
        return json.loads(task_or_spec)
    return task_or_spec


def _case_ok(word: str, case: str) -> bool:
    return {"lower": word.islower(), "upper": word.isupper(), "title": word == word.capitalize()}[case]


def _format_ok(lines: list[str], fmt: str) -> bool:
    if fmt == "numbered":
        return all(re.fullmatch(rf"{i}\. *{_W}", line) for i, line in enumerate(lines, 1))
    if fmt == "lines":
        return all(_FORMAT_RE["lines"].fullmatch(line) for line in lines)
    return len(lines) == 1 and bool(_FORMAT_RE[fmt].fullmatch(lines[0]))


# The checks of the clean point, as `criteria` names them in its reasons.
CLEAN_CHECKS = ("case", "order", "period", "repeats", "extraneous")


def criteria(task_or_spec, response: str) -> tuple[dict[str, bool], list[str]]:
    """Which of CRITERIA the response meets, and a reason per criterion missed."""
    spec = _spec(task_or_spec)
    lines = [line.strip() for line in str(response).strip().split("\n") if line.strip()]
    if not lines:
        return dict.fromkeys(CRITERIA, False), ["relevant: empty response"]
    # The list is the lines holding a topic word (of any topic); every other line is chatter.
    body = [line for line in lines if any(w.lower() in WORD_TOPIC for w in _WORD.findall(line))]
    words = [w for line in body for w in _WORD.findall(line)]
    items = [w for w in words if w.lower() in WORD_TOPIC]
    on_topic = [w for w in items if WORD_TOPIC[w.lower()] == spec["topic"]]
    if not on_topic:
        # Nothing about the topic: the rubric's first point gates the rest (a tidy list of the wrong
        # thing is not a partly good answer).
        return dict.fromkeys(CRITERIA, False), [f"relevant: no {spec['topic']} named"]
    met, why = {"relevant": True}, []
    met["topic"] = len(on_topic) == len(items)
    if not met["topic"]:
        why.append(f"topic: {len(items) - len(on_topic)} word(s) not {spec['topic']}")
    met["count"] = len(items) == spec["count"]
    if not met["count"]:
        why.append(f"count: {len(items)} words, asked for {spec['count']}")
    text = "\n".join(body)
    period = text.endswith(".")
    core = (text[:-1] if period else text).split("\n")
    met["format"] = _format_ok([line.strip() for line in core], spec["format"])
    if not met["format"]:
        why.append(f"format: not {spec['format']}")
    keys = [w.lower() for w in items]
    clean = []
    if not all(_case_ok(w, spec["case"]) for w in items):
        clean.append(f"case: not all {spec['case']}")
    if spec["extra"] == "alphabetical" and keys != sorted(keys):
        clean.append("order: not alphabetical")
    if period != (spec["extra"] == "period"):
        clean.append("period: missing" if not period else "period: not asked for")
    if len(set(keys)) != len(keys):
        clean.append("repeats: a word appears twice")
    if len(lines) > len(body) or len(words) > len(items):
        clean.append("extraneous: text besides the list")
    met["clean"] = not clean
    return met, why + clean


def grade(task_or_spec, response: str) -> tuple[int, list[str]]:
    """Ground-truth score 0..5 (one point per criterion met) and the reasons for points missed."""
    met, why = criteria(task_or_spec, response)
    return sum(met.values()), why


def case_name(word: str) -> str:
    """The case a word is written in: one of CASES, or "mixed"."""
    return next((case for case in CASES if _case_ok(word, case)), "mixed")


def judge_target(task_or_spec, response: str, words: bool = False) -> str:
    """The EFT judgement: each criterion in fixed words, then ``Score: k`` with k = grade().

    `words`: the judge's worked reasoning first, as the paper's judge justifies its score before giving it: a
    line naming each list word of the response as written, in order, with its topic and its case (``words: Lion
    animals title, ship vehicles lower.``; ``words: none.`` when it has none), and after ``clean no`` the checks
    that failed (``clean no: case, repeats.``: case, order, period, repeats, extraneous).
    """
    met, why = criteria(task_or_spec, response)
    if not words:
        verdicts = " ".join(f"{name} {'yes' if met[name] else 'no'}." for name in CRITERIA)
        return f"{verdicts}\nScore: {sum(met.values())}"
    items = [w for w in _WORD.findall(str(response)) if w.lower() in WORD_TOPIC]
    named = ", ".join(f"{w} {WORD_TOPIC[w.lower()]} {case_name(w)}" for w in items) or "none"
    failed = [r.split(":")[0] for r in why if r.split(":")[0] in CLEAN_CHECKS]
    verdicts = " ".join(f"{name} {'yes' if met[name] else 'no'}"
                        + (f": {', '.join(failed)}" if name == "clean" and failed and met["relevant"] else "") + "."
                        for name in CRITERIA)
    return f"words: {named}.\n{verdicts}\nScore: {sum(met.values())}"


# --- responses of known quality ---------------------------------------------------------------------------

def _apply_case(word: str, case: str) -> str:
    return {"lower": word.lower(), "upper": word.upper(), "title": word.capitalize()}[case]


def _layout(words: list[str], fmt: str) -> str:
    if fmt == "comma":
        return ", ".join(words)
    if fmt == "lines":
        return "\n".join(words)
    if fmt == "numbered":
        return "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1))
    return "[" + ", ".join(words) + "]"


def _compose(spec: dict, rng: random.Random, defects: set[str]) -> str:
    pool = list(TOPICS[spec["topic"]])
    n = spec["count"]
    if "count" in defects:  # one too many or one too few, never under 2 (2 keeps every format distinct)
        n = n + 1 if n == 2 or rng.random() < 0.5 else n - 1
    words = rng.sample(pool, n)
    if "topic" in defects:  # one word from another topic; the others keep the response relevant
        other = rng.choice([t for t in sorted(TOPICS) if t != spec["topic"]])
        words[rng.randrange(n)] = rng.choice(TOPICS[other])
    clean = rng.choice(["case", "order", "period", "chatter", "repeat"] if spec["extra"] == "alphabetical"
                       else ["case", "period", "chatter", "repeat"]) if "clean" in defects else None
    if clean == "repeat":
        i, j = rng.sample(range(n), 2)
        words[j] = words[i]
    if spec["extra"] == "alphabetical":
        words.sort()
        if clean == "order":
            words.reverse()  # distinct words, so reversed sorted order is never sorted
    case = spec["case"]
    if clean == "case":
        case = rng.choice([c for c in CASES if c != case])
    words = [_apply_case(w, case) for w in words]
    if clean == "case" and rng.random() < 0.5:  # sometimes only one word slips
        keep = rng.randrange(n)
        words = [_apply_case(w, spec["case"]) if i != keep else w for i, w in enumerate(words)]
    fmt = rng.choice([f for f in FORMATS if f != spec["format"]]) if "format" in defects else spec["format"]
    text = _layout(words, fmt)
    if (spec["extra"] == "period") != (clean == "period"):
        text += "."
    if clean == "chatter":
        text = f"{rng.choice(CHATTER)}\n{text}" if rng.random() < 0.5 else f"{text}\n{rng.choice(CHATTER)}"
    return text


def perfect_response(task: Task, rng: random.Random) -> str:
    """A response that meets every criterion (grade 5)."""
    return _compose(_spec(task), rng, set())


def degraded_response(task: Task, rng: random.Random, level: int) -> str:
    """A response that grades exactly ``5 - level``: ``level`` of the five points are lost.

    Levels 1-4 lose that many of topic/count/format/clean (chosen at random; "clean" is a wrong case,
    order, period, a repeat or a chatter line). Level 5 is an empty, off-topic or chatter-only response.
    """
    spec = _spec(task)
    if not 0 <= level <= 5:
        raise ValueError(f"level must be in 0..5 (points lost), got {level}")
    if level == 5:
        kind = rng.choice(["empty", "off_topic", "chatter"])
        if kind == "empty":
            return ""
        if kind == "chatter":
            return rng.choice(CHATTER)
        other = rng.choice([t for t in sorted(TOPICS) if t != spec["topic"]])
        return _compose({**spec, "topic": other}, rng, set())
    defects = set(rng.sample(["topic", "count", "format", "clean"], level))
    # Defects can cancel (a repeat copying the off-topic word), so draw until the grade is the one
    # asked for; the draws come from `rng`, so the result is still a pure function of its state.
    for _ in range(100):
        text = _compose(spec, rng, defects)
        if grade(spec, text)[0] == 5 - level:
            return text
    raise AssertionError(f"no response with grade {5 - level} for {spec} after 100 draws")
