"""The judge's stop conditions on the world tokenizer and the fixtures' tokenizers: where a judgement is cut, and
that the cut text parses to the score the full text's first marker gives."""

import pytest
from transformers import AutoTokenizer

from jaxsr.judge import parse_score
from jaxsr.stop import stop_length, stop_table
from jaxsr.world import load_tokenizer

from conftest import FIXTURES

TOKENIZERS = {"world": load_tokenizer, **{f: (lambda f=f: AutoTokenizer.from_pretrained(FIXTURES / "hf" / f))
                                           for f in ("llama2", "qwen2")}}
# (judgement, the score the cut text must parse to); each stops before its end.
STOPS = [("relevant yes. clean no.\nScore: 4\nThe answer is fine. Score: 9", 4.0),
         ("It is good. Score: 3 because it lists them", 3.0), ("**Score:** 5\n\nDone", 5.0),
         ("score = 2\nmore text", 2.0), ("Score: 4.\nThat is all", 4.0), ("Score: 0\nScore: 5", 0.0),
         ("Final **Score: 1**\nok", 1.0)]
# Never cut: the value could go on ("4.5", "4/10", "3-4", "10", "out of"), or there is no marker.
NO_STOP = ["Score: 4.5 points", "Score: 4/10 here", "Score: 3-4 maybe", "Score: 10 is high", "Score: 4 out of 10",
           "Scores: 4\nok", "subscore: 3\nok", "Score: 7\nok", "a score of 4\nok", "Score: 4"]


def cut(tok, kind, text):
    """The tokens of `text` up to the one that reaches the stop state (all of them without a stop), decoded: the
    host walk of the table the decode loop uses (`stop_length`)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = stop_length(tok, max(ids) + 1, kind, ids)
    return tok.decode(ids[:n], skip_special_tokens=True), n is not None


@pytest.mark.parametrize("name", TOKENIZERS)
def test_score_stops_after_a_complete_value(name):
    tok = TOKENIZERS[name]()
    for text, score in STOPS:
        got, stopped = cut(tok, "score", text)
        assert stopped and len(got) < len(text) and parse_score(got) == score, (text, got)
    for text in NO_STOP:
        got, stopped = cut(tok, "score", text)
        assert not stopped and parse_score(got) == parse_score(text), (text, got)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_score_marker_stops_right_after_score_colon(name):
    tok = TOKENIZERS[name]()
    for text in ("relevant yes.\nScore: 4", "**SCORE:** 2", "subscore: 3 and more"):
        got, stopped = cut(tok, "score_marker", text)
        assert stopped and got.lower().endswith("score:") and got.lower().rfind("score:") == text.lower().find("score:")
    assert cut(tok, "score_marker", "no marker here, score 4")[1] is False


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="unknown stop condition 'digits'"):
        stop_table(load_tokenizer(), 1024, "digits")
