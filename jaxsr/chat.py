"""Chat formatting: one user turn rendered with the tokenizer's chat template, ready for `generate`.

The template carries the special tokens (BOS, role markers), so the rendered text is tokenised with
`add_special_tokens=False`: adding them again would double the BOS of Llama-style templates. `set_chat_template`
is the one place a run's `model.chat_template` is put on a tokenizer.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigValueError

# The names `model.chat_template` takes for the templates shipped in jaxsr/templates/.
CHAT_TEMPLATES = {"llama2": "llama2_chat.jinja"}
# A user message no template writes by itself: a template that renders it lacks a slot for the content.
_PROBE = "jaxsr chat template probe 7361"


def _messages(text: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": text}]


def render_user_turn(tokenizer: Any, text: str, *, system: str | None = None) -> str:
    """`text` as a user turn (after an optional system turn) followed by the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat_template; load a chat model's tokenizer or set "
                         "model.chat_template (a shipped template such as llama2, or a .jinja file)")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return tokenizer.apply_chat_template(_messages(text, system), tokenize=False, add_generation_prompt=True)


def chat_token_ids(tokenizer: Any, texts: Sequence[str], *, system: str | None = None) -> list[list[int]]:
    """Token ids of each text rendered by `render_user_turn` (for `generate`'s token-id prompts)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings; wrap a single text in a list")
    rendered = [render_user_turn(tokenizer, t, system=system) for t in texts]
    if not rendered:
        return []
    return [list(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def chat_template_source(spec: str) -> str:
    """The Jinja text `model.chat_template` names: a shipped template (CHAT_TEMPLATES) or a .jinja file."""
    if spec in CHAT_TEMPLATES:
        return (resources.files("jaxsr") / "templates" / CHAT_TEMPLATES[spec]).read_text()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model.chat_template={spec!r}: no such file; use a shipped template "
                                f"({', '.join(CHAT_TEMPLATES)}) or the path of a .jinja file")
    return path.read_text()


def set_chat_template(tokenizer: Any, spec: str, *, model: str) -> Any:
    """`tokenizer` with `model.chat_template` = `spec` applied ("": the tokenizer's own), after checking that the
    template renders a user message's text. `model` names the model in errors."""
    if tokenizer is None:
        raise ConfigValueError(f"model {model!r} has no tokenizer files; a run needs one (add them to the model "
                               f"directory, or for a from-scratch M0 set model.tokenizer)")
    if spec:
        tokenizer.chat_template = chat_template_source(spec)
        which = f"chat template {spec!r} (model.chat_template)"
    elif not getattr(tokenizer, "chat_template", None):
        raise ConfigValueError(f"model {model!r}: its tokenizer has no chat template (a base model's tokenizer); set "
                               f"model.chat_template to a shipped template ({', '.join(CHAT_TEMPLATES)}) or the path "
                               f"of a .jinja file")
    else:
        which = f"the chat template of model {model!r}"
    from jinja2 import TemplateError

    try:
        rendered = render_user_turn(tokenizer, _PROBE)
    except TemplateError as e:
        raise ConfigValueError(f"{which} fails to render a user turn: {e}") from None
    if _PROBE not in rendered:
        raise ConfigValueError(f"{which} has no slot for the message content: a user turn {_PROBE!r} rendered as "
                               f"{rendered!r} (a template writes each message's {{{{ message['content'] }}}})")
    return tokenizer


def load_chat_tokenizer(path, model) -> Any:
    """The tokenizer of the model at `path` (directory, jaxsr checkpoint or hub name) with `model.chat_template`
    applied, without loading the weights."""
    from .policy import load_tokenizer

    return set_chat_template(load_tokenizer(path), model.chat_template, model=str(path))


def load_chat_policy(path, model, mesh, *, sample_only: bool = False, decode_tensor: int | None = None):
    """A policy of the run (M0 from `model.path`, or M_t) with `model`'s dtypes and chat template; the tokenizer is
    checked before the weights load. `sample_only`: a model that never trains (a fixed judge) is stored in the
    compute dtype, without float32 master weights. `decode_tensor`: the sampler's tensor-parallel size
    (`sample.decode_tensor`; None: automatic)."""
    import dataclasses

    from .policy import load_policy

    tokenizer = load_chat_tokenizer(path, model)
    dtypes = {"dtype": model.dtype, "param_dtype": model.dtype} if sample_only else model.dtypes
    return dataclasses.replace(load_policy(path, **dtypes, mesh=mesh), tokenizer=tokenizer, decode_tensor=decode_tensor,
                               attention=model.attention)
