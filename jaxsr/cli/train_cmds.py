"""`jaxsr sft` and `jaxsr dpo`: one training stage on JSONL / HF-datasets data."""

from __future__ import annotations


def add_parsers(sub, add_config_args) -> None:
    from .. import train

    train.register_cli(sub, add_config_args)  # moved here once the objectives refactor lands
