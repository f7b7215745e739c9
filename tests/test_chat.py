"""jaxsr.chat: model.chat_template resolution, the shipped Llama 2 template against Meta's documented format, and
the errors for a tokenizer that cannot render chats (raised before any weights load)."""

import shutil
import types

import pytest
from transformers import AutoTokenizer

from jaxsr import loop
from jaxsr.chat import CHAT_TEMPLATES, load_chat_tokenizer, render_user_turn, set_chat_template
from jaxsr.config import ConfigValueError, load_config



@pytest.fixture
def tok(fixtures_dir):
    return AutoTokenizer.from_pretrained(fixtures_dir / "hf" / "llama2")  # bos <s>, eos </s>


@pytest.fixture
def base_model(fixtures_dir, tmp_path):
    """The llama2 fixture as a base model: its tokenizer without any chat template."""
    d = tmp_path / "base"
    shutil.copytree(fixtures_dir / "hf" / "llama2", d)
    (d / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(d).chat_template is None
    return d


def _model(chat_template=""):
    return types.SimpleNamespace(chat_template=chat_template)


def test_shipped_name_sets_the_shipped_file(tok):
    from importlib import resources

    set_chat_template(tok, "llama2", model="m")
    assert CHAT_TEMPLATES["llama2"] == "llama2_chat.jinja"
    assert tok.chat_template == (resources.files("jaxsr") / "templates" / "llama2_chat.jinja").read_text()


def test_template_file_path(tok, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    set_chat_template(tok, str(path), model="m")
    assert render_user_turn(tok, "Hi") == "<user>Hi<assistant>"
    with pytest.raises(FileNotFoundError, match=r"model.chat_template='.*nope.jinja': no such file; use a shipped "
                                                r"template \(llama2\)"):
        set_chat_template(tok, str(tmp_path / "nope.jinja"), model="m")


def test_a_template_without_a_content_slot_is_an_error_naming_it(tok, tmp_path):
    path = tmp_path / "noslot.jinja"
    path.write_text("{{ bos_token }}[INST] {% for m in messages %}{{ m['role'] }}{% endfor %} [/INST]")
    with pytest.raises(ConfigValueError, match=rf"chat template '{path}' \(model.chat_template\) has no slot for "
                                               r"the message content"):
        set_chat_template(tok, str(path), model="m")


def test_unknown_template_name_fails_at_config_time():
    with pytest.raises(ConfigValueError, match=r"model.chat_template='llama3' is neither a shipped template \(llama2\) "
                                               r"nor the path of a .jinja file"):
        load_config(None, ["model.chat_template=llama3"])


def test_base_tokenizer_without_template_names_the_model_and_the_key(base_model):
    with pytest.raises(ConfigValueError, match=rf"model '{base_model}': its tokenizer has no chat template \(a base "
                                               r"model's tokenizer\); set model.chat_template to a shipped template "
                                               r"\(llama2\) or the path of a .jinja file"):
        load_chat_tokenizer(base_model, _model())
    assert load_chat_tokenizer(base_model, _model("llama2")).chat_template


def test_the_run_fails_on_a_base_tokenizer_in_its_first_stage(base_model, tmp_path):
    # files with no ift_path fails as soon as the data stage asks it for seed data: the tokenizer check comes first.
    over = [f"run_dir={tmp_path / 'run'}", f"model.path={base_model}", "data.source=files"]
    with pytest.raises(ConfigValueError, match="its tokenizer has no chat template"):
        loop.run(load_config(None, over))
    with pytest.raises(ConfigValueError, match="data.source=files needs data.options.ift_path"):
        loop.run(load_config(None, over + ["model.chat_template=llama2", f"run_dir={tmp_path / 'run2'}"]))


# Meta's documented Llama 2 chat format (llama repo, chat_completion; the model card's "Intended Use"): a user turn is
# BOS "[INST] " + text.strip() + " [/INST]"; an answer " " + text.strip() + " " EOS; a system prompt is put at the start
# of the first user turn as "<<SYS>>\n" + system + "\n<</SYS>>\n\n".
def test_llama2_user_turn(tok):
    set_chat_template(tok, "llama2", model="m")
    assert render_user_turn(tok, "What is 2 + 2?") == "<s>[INST] What is 2 + 2? [/INST]"
    assert render_user_turn(tok, "  padded \n") == "<s>[INST] padded [/INST]"


def test_llama2_user_turn_with_a_system_prompt(tok):
    set_chat_template(tok, "llama2", model="m")
    assert (render_user_turn(tok, "What is 2 + 2?", system="Answer briefly.")
            == "<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat is 2 + 2? [/INST]")


def test_llama2_dialogue_and_token_ids(tok):
    set_chat_template(tok, "llama2", model="m")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello "}, {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s>[INST] Hi [/INST] Hello </s><s>[INST] Bye [/INST]"
    ids = tok(render_user_turn(tok, "Hi"), add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, once
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="alternate"):
        tok.apply_chat_template(msgs[1:], tokenize=False)
