"""Chat formatting: one user turn rendered with the tokenizer's own chat template, ready for `generate`.

The template carries the special tokens (BOS, role markers), so the rendered text is tokenised with
`add_special_tokens=False`: adding them again would double the BOS of Llama-style templates.
"""

from __future__ import annotations

from typing import Any, Sequence


def _messages(text: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": text}]


def render_user_turn(tokenizer: Any, text: str, *, system: str | None = None) -> str:
    """`text` as a user turn (after an optional system turn) followed by the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat_template; load a chat model's tokenizer or set "
                         "tokenizer.chat_template to a Jinja template")
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
