"""`jaxsr plan`: per-device memory of a config's training and sampling, and whether it fits."""

from __future__ import annotations


def add_parsers(sub, add_config_args) -> None:
    from .. import plan

    plan.register_cli(sub, add_config_args)  # moved here once the mesh refactor lands
