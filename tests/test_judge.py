import math

import pytest

from jaxsr.judge import (
    PAPER_JUDGE_TEMPLATE,
    aggregate_scores,
    load_judge_template,
    parse_score,
    render_judge_prompt,
)

# Figure 2 of Yuan et al. (2024), copied by hand from docs/PAPER.md §2; the file
# shipped in jaxsr/templates/ must match it character for character.
PAPER_FIG2 = """\
Review the user’s question and the corresponding response using the additive 5-point
scoring system described below. Points are accumulated based on the satisfaction of each
criterion:
- Add 1 point if the response is relevant and provides some information related to
the user’s inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user’s question,
but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user’s question in a
useful way, regardless of whether it seems to have been written by an AI Assistant or if it
has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant’s perspective,
addressing the user’s question directly and comprehensively, and is well-organized and
helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user’s question
by an AI Assistant, without extraneous information, reflecting expert knowledge, and
demonstrating a high-quality, engaging, and insightful answer.

User: <INSTRUCTION_HERE>
<response><RESPONSE_HERE></response>

After examining the user’s instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: “Score: <total points>”

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as
necessary. To evaluate the response in alignment with this additive scoring model, we’ll
systematically attribute points based on the outlined criteria."""


# ---------------------------------------------------------------- parse_score


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 4", 4.0),
        ("score: 3", 3.0),
        ("SCORE: 2", 2.0),
        ("Score:4", 4.0),
        ("Score : 4", 4.0),
        ("Score=4", 4.0),
        ("Score：4", 4.0),  # full-width colon
        ("Score: 0", 0.0),
        ("Score: 5", 5.0),
        ("Score: 3.5", 3.5),
        ("Score: 4.50", 4.5),
        ("Score: .5", 0.5),
        ("Score: 4.", 4.0),  # sentence-final period is punctuation
        ("Score: 4!", 4.0),
        ("Score: 4, because it is helpful.", 4.0),
        ("Score: 4 points", 4.0),
        ("Score:\n4", 4.0),
        ("Total score: 3", 3.0),
        ("Final Score: 2", 2.0),
        ("sub-score: 1", 1.0),
    ],
)
def test_parse_score_plain(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("**Score:** 4", 4.0),
        ("**Score: 4**", 4.0),
        ("Score: **4**", 4.0),
        ("**Score**: 4", 4.0),
        ("__Score__: 4", 4.0),
        ("*Score:* _3_", 3.0),
        ("Score: `2`", 2.0),
        ("### Score: 5", 5.0),
        ("Score: **4**/5", 4.0),
    ],
)
def test_parse_score_markdown(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 4/5", 4.0),
        ("Score: 4 / 5", 4.0),
        ("Score: 4 out of 5", 4.0),
        ("Score: 4 OUT OF 5", 4.0),
        ("Score: 3.5/5.0", 3.5),
        ("Score: 0/5", 0.0),
        ("Score: 4/10", None),  # another scale is not rescaled
        ("Score: 8/10", None),
        ("Score: 4 out of 10", None),
        ("Score: 5/4", None),
    ],
)
def test_parse_score_denominator(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "score: 10",
        "Score: 7",
        "Score: 5.5",
        "Score: 5.01",
        "Score: -1",
        "Score: +4",
        "Score: −2",  # unicode minus
        "Score: four",
        "Score: <total points>",
        "Score:",
        "Score: ",
        "Score: N/A",
        "Score: 3-4",  # a range is no single score
        "Score: 3 - 4",
        "Score: 1+1+1",
        "Score: 4,5",  # decimal comma is ambiguous
        "Score: ４",  # full-width digit: not an ASCII number
        "Score: ...4",
    ],
)
def test_parse_score_invalid_value_is_none(text):
    assert parse_score(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "The response is great. I give it 4 points.",
        "I would give a score of 4.",
        "Scores: 3",  # plural is not the requested marker
        "scores: 3",
        "Subscore: 3",
        "Scoreboard: 4",
        "Score 4",  # no colon
    ],
)
def test_parse_score_no_marker_is_none(text):
    assert parse_score(text) is None


@pytest.mark.parametrize("value", [None, b"Score: 4", 4, 4.0, True, ["Score: 4"], {"Score": 4}])
def test_parse_score_non_str_is_none(value):
    assert parse_score(value) is None


def test_last_marker_wins():
    text = (
        "The response is relevant (Score: 1 so far) and addresses most of the question, "
        "so I would first think Score: 2; it is also useful.\n\nScore: 4"
    )
    assert parse_score(text) == 4.0


def test_last_marker_wins_even_when_invalid():
    # Falling back to the earlier 3 would hide a judge that ended on garbage.
    assert parse_score("Score: 3 ... on reflection, Score: 9") is None
    assert parse_score("Score: 3\nScore: <total points>") is None


def test_template_echo_then_score():
    echo = "Conclude with the score using the format: “Score: <total points>”\n"
    assert parse_score(echo + "Justification: fine.\nScore: 2") == 2.0
    assert parse_score("Justification: fine.\nScore: 2\n" + echo) is None


def test_list_item_after_score_is_not_a_range():
    assert parse_score("Score: 4\n- 1 point for relevance") == 4.0


def test_unicode_text():
    assert parse_score("Die Antwort ist hilfreich 👍 — 回答很好。\n**Score: 3**") == 3.0
    assert parse_score("Ответ хороший. Score: 5 ✅") == 5.0


def test_very_long_text():
    filler = "The answer is thorough and mentions Score: 1 in passing. " * 20_000
    assert len(filler) > 1_000_000
    assert parse_score(filler + "\nScore: 3") == 3.0
    assert parse_score(filler) == 1.0
    assert parse_score("*" * 200_000 + "Score:" + " " * 200_000) is None


# ----------------------------------------------------------- aggregate_scores


def test_aggregate_scores():
    assert aggregate_scores([4.0, 3.0, 2.0]) == 3.0
    assert aggregate_scores([4.0, None, 3.0]) == 3.5
    assert aggregate_scores([None, 5.0, None]) == 5.0
    assert aggregate_scores([math.nan, 2.0]) == 2.0
    assert aggregate_scores([None, None, None]) is None
    assert aggregate_scores([]) is None


def test_aggregate_of_parsed_judgements():
    judgements = ["Score: 4", "no marker here", "**Score:** 3/5"]
    assert aggregate_scores([parse_score(j) for j in judgements]) == 3.5


# ------------------------------------------------------------------ templates


def test_paper_template_is_figure_2_word_for_word():
    assert PAPER_JUDGE_TEMPLATE == PAPER_FIG2
    assert PAPER_JUDGE_TEMPLATE.count("<INSTRUCTION_HERE>") == 1
    assert PAPER_JUDGE_TEMPLATE.count("<RESPONSE_HERE>") == 1
    assert "“Score: <total points>”" in PAPER_JUDGE_TEMPLATE


def test_load_paper_template():
    assert load_judge_template("paper") == PAPER_FIG2


def test_render_paper_prompt():
    prompt = render_judge_prompt(PAPER_JUDGE_TEMPLATE, "What is 2+2?", "4")
    assert "User: What is 2+2?\n<response>4</response>\n\nAfter examining" in prompt
    assert "<INSTRUCTION_HERE>" not in prompt and "<RESPONSE_HERE>" not in prompt
    assert prompt.startswith("Review the user’s question")
    assert len(prompt) == len(PAPER_FIG2) - len("<INSTRUCTION_HERE><RESPONSE_HERE>") + len("What is 2+2?4")


def test_render_does_not_refill_slot_names_inside_the_instruction():
    template = "Q: <INSTRUCTION_HERE>\nA: <RESPONSE_HERE>"
    out = render_judge_prompt(template, "Explain <RESPONSE_HERE> tags", "They mark <INSTRUCTION_HERE>.")
    assert out == "Q: Explain <RESPONSE_HERE> tags\nA: They mark <INSTRUCTION_HERE>."


def test_render_missing_slot_names_it():
    with pytest.raises(ValueError, match="has no <RESPONSE_HERE> slot"):
        render_judge_prompt("Q: <INSTRUCTION_HERE>", "q", "a")
    with pytest.raises(ValueError, match="has no <INSTRUCTION_HERE> slot"):
        render_judge_prompt("A: <RESPONSE_HERE>", "q", "a")


def test_render_rejects_non_str():
    with pytest.raises(TypeError, match="response"):
        render_judge_prompt("<INSTRUCTION_HERE> <RESPONSE_HERE>", "q", None)


def test_load_template_from_path(tmp_path):
    path = tmp_path / "judge.txt"
    path.write_text("Rate <INSTRUCTION_HERE> / <RESPONSE_HERE>\n", encoding="utf-8")
    assert load_judge_template(path) == "Rate <INSTRUCTION_HERE> / <RESPONSE_HERE>"
    assert load_judge_template(str(path)) == "Rate <INSTRUCTION_HERE> / <RESPONSE_HERE>"


def test_load_template_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_judge_template(path)


def test_load_template_without_slot_names_path_and_slot(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("Rate <INSTRUCTION_HERE> please\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt.*has no <RESPONSE_HERE> slot"):
        load_judge_template(path)
