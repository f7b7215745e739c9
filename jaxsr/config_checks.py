"""The value checks every config section uses (jaxsr/config.py, jaxsr/config_data.py): each error names the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .configfile import ConfigValueError


def choice(key: str, value, allowed: Sequence):
    if value not in allowed:
        raise ConfigValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def positive(key: str, value, *, zero_ok: bool = False):
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigValueError(f"{key}={value!r} must be {'>= 0' if zero_ok else '> 0'}")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(key: str, value: str) -> None:
    """A model the run loads by path (a fixed generator or judge): a Hugging Face model directory or a jaxsr
    checkpoint, with a tokenizer (it reads and writes text), or a hub name (checked when it loads)."""
    p = Path(value).expanduser()
    if not p.exists():
        if value.count("/") == 1 and not value.startswith((".", "/", "~")):
            return  # a hub name: resolved (from the cache or the hub) when the model loads
        raise ConfigValueError(f"{key}={value!r}: no such model directory (expected a Hugging Face model directory, "
                               f"a jaxsr checkpoint or a hub name such as meta-llama/Llama-2-70b-chat-hf)")
    jaxsr_checkpoint = (p / "jaxsr_model.json").is_file()
    if not jaxsr_checkpoint and not (p / "config.json").is_file():
        raise ConfigValueError(f"{key}={value!r}: not a model directory (no config.json, and no jaxsr_model.json "
                               f"of a jaxsr checkpoint)")
    tok = p / "tokenizer" if jaxsr_checkpoint else p
    if not any((tok / f).is_file() for f in _TOKENIZER_FILES):
        raise ConfigValueError(f"{key}={value!r}: the model has no tokenizer (none of {', '.join(_TOKENIZER_FILES)} "
                               f"in {tok}); it reads and writes text, so it needs its own")


def sampling(section: str, temperature: float, top_p: float) -> None:
    positive(f"{section}.temperature", temperature, zero_ok=True)
    if not 0 < top_p <= 1:
        raise ConfigValueError(f"{section}.top_p={top_p!r} must be in (0, 1]")


BUILTIN_BACKEND = "jaxsr"
_BACKEND_SPEC = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


def backend_spec(key: str, value: str) -> tuple[str, str] | None:
    """(module, attribute) of a "module:factory" sampling backend, None for the built-in one; the form only (the
    import is `jaxsr.backends.resolve`'s, when a run starts)."""
    if value == BUILTIN_BACKEND:
        return None
    m = _BACKEND_SPEC.match(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigValueError(f"{key}={value!r} is not a sampling backend; use {BUILTIN_BACKEND!r} (the built-in "
                               f"sampler) or 'module:factory', an importable module and a callable in it that returns "
                               f"a SamplingBackend (docs/sampling.md#backends)")
    return m["module"], m["attr"]
