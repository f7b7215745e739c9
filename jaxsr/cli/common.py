"""What several commands share: the config from --config and overrides, the mesh, jax.distributed."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def load(args, *, default: bool = False):
    """The config of `--config` and the overrides; with `default`, configs/tiny.yaml when --config is absent."""
    from ..config import load_config

    path = args.config or (DEFAULT_CONFIG if default and DEFAULT_CONFIG.is_file() else None)
    return load_config(path, args.overrides)


def initialize(args) -> None:
    """jax.distributed from the `distributed.*` keys of --config / overrides (before any JAX device is used)."""
    from ..distributed import initialize as init

    if args.config or args.overrides:
        init(load(args).distributed)


def mesh_from_args(args, embed_dim: int):
    return load(args).mesh.build(embed_dim)
