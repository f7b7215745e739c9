"""LLM-as-a-Judge: the paper's additive 5-point prompt, score parsing, aggregation.

Pure Python on purpose: judging is string work around the sampler, and tests of
it should not need an accelerator stack.
"""

from __future__ import annotations

import math
import os
import re
from importlib import resources

INSTRUCTION_SLOT = "<INSTRUCTION_HERE>"
RESPONSE_SLOT = "<RESPONSE_HERE>"
_SLOTS = (INSTRUCTION_SLOT, RESPONSE_SLOT)

# Markdown emphasis/code marks and whitespace a judge may wrap around the marker
# or the number: **Score:** 4, **Score: 4**, Score: **4**, __Score__: `4`.
_DECOR = r"[\s*_`]*"
# "score" as a whole word (so "scores:", "subscore:" are not markers), then a colon
# (ASCII or full-width) or "=", as in the regex PAPER.md §2 recommends.
_MARKER = re.compile(r"(?<![a-z0-9])score(?![a-z0-9])" + _DECOR + r"[:：=]", re.IGNORECASE)
_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_VALUE = re.compile(
    _DECOR + rf"(?P<num>{_NUMBER})"
    # Only same-line text after the number: a list item on the next line ("- 1
    # point for ...") must not read as a range.
    + r"[ \t*_`]*"
    + rf"(?:(?:/|out[ \t]+of\b)[ \t]*(?P<den>{_NUMBER})"  # "4/5", "4 / 5", "4 out of 5"
    + r"|(?P<ambiguous>[-–+][ \t]*\d|,\d))?",  # "3-4", "1+1+1", "4,5": no single value
    re.IGNORECASE | re.ASCII,  # ASCII: \d is [0-9], so "４" is not read as 4
)
MAX_SCORE = 5.0


def parse_score(text) -> float | None:
    """The score of a judgement, or None when it has no valid one. Never raises.

    Rules:
    - The LAST ``Score:`` marker wins, because justifications often quote a score
      earlier; if that last marker is not followed by a valid value the result is
      None, even when an earlier marker was valid ("Score: 3 ... Score: 9" -> None).
    - Case-insensitive whole word ``score`` then ``:`` / ``=``; markdown marks and
      spaces may surround marker and number. "Scores: 3" and "a score of 4" are
      not markers.
    - The value is a plain non-negative decimal: "4", "3.5", ".5" (= 0.5); a
      trailing "." is punctuation ("Score: 4." -> 4.0). Signs, words and template
      echoes ("-1", "four", "<total points>") give None.
    - "x/5", "x / 5", "x out of 5" read as x; any other denominator ("4/10") gives
      None rather than a rescaled value. Ranges and sums ("3-4", "1+1") give None.
    - The value must lie in [0, 5].
    """
    if not isinstance(text, str):
        return None
    marker = None
    for marker in _MARKER.finditer(text):
        pass
    if marker is None:
        return None
    value = _VALUE.match(text, marker.end())
    if value is None or value["ambiguous"]:
        return None
    if value["den"] is not None and float(value["den"]) != MAX_SCORE:
        return None
    score = float(value["num"])
    return score if 0.0 <= score <= MAX_SCORE else None


def aggregate_scores(parsed) -> float | None:
    """Mean of the valid scores (None and NaN skipped); None if there are none.

    Skipping failures rather than scoring them 0 or -1 is what PAPER.md §2 and §7.4
    recommend: a format failure says nothing about the response.
    """
    valid = [float(s) for s in parsed if s is not None and not math.isnan(s)]
    return sum(valid) / len(valid) if valid else None


def _check_slots(template: str, where: str) -> None:
    for slot in _SLOTS:
        if slot not in template:
            raise ValueError(
                f"judge template {where} has no {slot} slot; a judge template needs both "
                f"{INSTRUCTION_SLOT} and {RESPONSE_SLOT}"
            )


def render_judge_prompt(template: str, instruction: str, response: str) -> str:
    """Fill the template's <INSTRUCTION_HERE> and <RESPONSE_HERE> slots."""
    _check_slots(template, "(given as text)")
    for name, value in (("instruction", instruction), ("response", response)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    # One pass over the template, so a slot name that appears inside the user's
    # instruction is left alone instead of being filled with the response.
    fill = {INSTRUCTION_SLOT: instruction, RESPONSE_SLOT: response}
    return re.sub("|".join(map(re.escape, _SLOTS)), lambda m: fill[m.group(0)], template)


# The Meta-Rewarding meta-judge's request (jaxsr.metareward, Wu et al. 2024): the judge's rubric with the
# instruction and response filled in, then two judgements of the response to compare.
JUDGEMENT_A, JUDGEMENT_B = "<JUDGEMENT_A_HERE>", "<JUDGEMENT_B_HERE>"
META_INSTRUCTION = (
    "\n\nReview the user's question and the corresponding response, along with two judgements of it. Decide which "
    "judgement is more accurate according to the rubric above.\n\nJudgement A:\n" + JUDGEMENT_A
    + "\n\nJudgement B:\n" + JUDGEMENT_B
    + '\n\nConclude with a clear statement of which judgement is better using the format: '
      '"Winner: [Judgement A | Judgement B]"')


def render_meta_prompt(judge_template: str, instruction: str, response: str, a: str, b: str) -> str:
    """The meta-judge's request: `judge_template` filled in, then judgements `a` and `b` to compare."""
    return render_judge_prompt(judge_template, instruction, response) + (
        META_INSTRUCTION.replace(JUDGEMENT_A, a).replace(JUDGEMENT_B, b))


def _read_template(text: str) -> str:
    # Files end with a newline by convention; it is not part of the prompt.
    return text[:-1] if text.endswith("\n") else text


def load_judge_template(path_or_name: str | os.PathLike) -> str:
    """The paper's template ("paper": Fig. 2) or a template file (an environment's own: jaxsr.envs)."""
    if path_or_name == "paper":
        return PAPER_JUDGE_TEMPLATE
    path = os.fspath(path_or_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"judge template file {path!r} does not exist; pass 'paper' for the built-in "
            f"template or the path of a text file with {INSTRUCTION_SLOT} and {RESPONSE_SLOT}"
        )
    with open(path, encoding="utf-8") as f:
        template = _read_template(f.read())
    _check_slots(template, repr(path))
    return template


# The paper's Figure 2 prompt, word for word (typographic quotes kept).
PAPER_JUDGE_TEMPLATE = _read_template(
    (resources.files(__package__) / "templates" / "judge_paper.txt").read_text(encoding="utf-8")
)
