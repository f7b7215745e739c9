"""YAML config files and `key.sub=value` overrides (the MaxText/OmegaConf convention) -> jaxsr.config dataclasses.

An unknown key names the closest valid one (a key of the same name in another section first), a bad value names
the key; nothing runs before the whole config is valid.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors


class ConfigValueError(ValueError):
    """A configuration key with a bad value or an unknown name."""


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            out.append(full)
            out += _all_keys(node[k], full + ".")
    return out


def unknown_key_error(schema: DictConfig, key: str) -> ConfigValueError:
    keys = _all_keys(schema)
    # A key of the same name in another section (sft.beta -> dpo.beta) beats any spelling match.
    leaf = key.rsplit(".", 1)[-1]
    close = ([k for k in keys if "." in key and k.rsplit(".", 1)[-1] == leaf]
             or difflib.get_close_matches(key, keys, n=1, cutoff=0.6))
    hint = f"; did you mean {close[0]!r}?" if close else ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    while parent and parent not in keys:  # a misspelt section: list what its parent (at worst the top level) allows
        parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    siblings = sorted(k.rsplit(".", 1)[-1] for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent)
    return ConfigValueError(f"unknown key {key!r}{hint} (allowed{' under ' + repr(parent) if parent else ''}: {', '.join(siblings)})")


def _flat_keys(d: Any, prefix: str = "") -> list[str]:
    if not isinstance(d, dict):
        return [prefix.rstrip(".")]
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.")
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, schema=None):
    """YAML file (optional) + `key.sub=value` overrides -> validated dataclass (default: JaxsrConfig).
    Raises ConfigValueError."""
    from .config import JaxsrConfig  # not at the top: jaxsr.config imports this module

    base = OmegaConf.structured(schema or JaxsrConfig)
    layers = []
    name = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        loaded = OmegaConf.load(p)
        if not isinstance(loaded, DictConfig):
            raise ConfigValueError(f"{p}: expected a YAML mapping at the top level")
        layers.append((str(p), loaded))
        name = p.stem
    for item in overrides:
        if "=" not in item:
            raise ConfigValueError(f"override {item!r} must look like key.sub=value")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    merged = base
    for where, layer in layers:
        plain = OmegaConf.to_container(layer)
        for key in _flat_keys(plain):
            if key.startswith("data.options."):
                continue  # the environment's own keys, checked against its Options when the config is built
            if OmegaConf.select(base, key, default="__missing__") == "__missing__":
                raise ConfigValueError(f"{where}: {unknown_key_error(base, key)}")
        try:
            merged = OmegaConf.merge(merged, layer)
        except oc_errors.ValidationError as e:
            raise ConfigValueError(f"{where}: bad value for {e.full_key!r}: {e.msg.splitlines()[0]}") from None
    if name and "name" not in OmegaConf.to_container(layers[0][1]) and not any(o.startswith("name=") for o in overrides):
        merged.name = name
    try:
        return OmegaConf.to_object(merged)
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigValueError(f"bad config: {e}") from None


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
