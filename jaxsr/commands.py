"""Subcommands beyond convert/export; each stage module adds its own `register_cli(sub, add_config_args)`."""

from __future__ import annotations

import importlib

# Modules that define `register_cli`; missing ones are skipped so the CLI works while stages land.
STAGE_MODULES = ("jaxsr.train", "jaxsr.loop", "jaxsr.plan")


def register(sub, add_config_args) -> None:
    for name in STAGE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        if hasattr(mod, "register_cli"):
            mod.register_cli(sub, add_config_args)
