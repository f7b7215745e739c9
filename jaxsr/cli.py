"""The `jaxsr` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("jaxsr")


def _stored_dtype(model_dir: Path) -> str:
    """The dtype an HF checkpoint was saved in, so `convert` keeps its bits (float16 widens to float32)."""
    from .policy import JAXSR_MODEL_FILE

    if (model_dir / JAXSR_MODEL_FILE).is_file():
        return json.loads((model_dir / JAXSR_MODEL_FILE).read_text()).get("dtype", "float32")
    cfg_path = model_dir / "config.json"
    hf = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return "bfloat16" if dtype == "bfloat16" else "float32"


def _mesh_from(args, embed_dim: int):
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    return cfg.mesh.build(embed_dim)


def _initialize(args) -> None:
    """jax.distributed from the `distributed.*` keys of --config / overrides (before any JAX device is used)."""
    from .config import load_config
    from .distributed import initialize

    if args.config or args.overrides:
        initialize(load_config(args.config, args.overrides).distributed)


def cmd_convert(args) -> int:
    from .model.config import read_hf_config
    from .policy import load_policy, save_checkpoint

    _initialize(args)
    src = Path(args.hf_dir)
    dtype = _stored_dtype(src) if args.dtype == "auto" else args.dtype
    model_cfg, _ = read_hf_config(src) if src.is_dir() else (None, None)
    mesh = _mesh_from(args, model_cfg.hidden_size) if model_cfg and (args.config or args.overrides) else None
    policy = load_policy(src, dtype=dtype, mesh=mesh)
    out = save_checkpoint(policy, args.out, extra={"converted_from": str(src)})
    from .distributed import is_primary

    if is_primary():
        print(f"wrote jaxsr checkpoint {out} ({policy.config.model_type}, {policy.config.num_params:,} parameters, {dtype})")
    return 0


def cmd_export(args) -> int:
    from .distributed import is_primary
    from .policy import JAXSR_MODEL_FILE, load_policy, save_hf

    _initialize(args)
    src = Path(args.ckpt)
    dtype = _stored_dtype(src) if args.dtype == "auto" else args.dtype
    mesh = None
    if (args.config or args.overrides) and (src / JAXSR_MODEL_FILE).is_file():
        mesh = _mesh_from(args, json.loads((src / JAXSR_MODEL_FILE).read_text())["model"]["hidden_size"])
    policy = load_policy(src, dtype=dtype, mesh=mesh)
    # Every process gathers each tensor whole; process 0 writes the files.
    out = save_hf(policy, args.out, max_shard_bytes=int(args.max_shard_mb * 2**20))
    if is_primary():
        print(f"wrote Hugging Face model directory {out} ({dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jaxsr",
        description="Self-Rewarding Language Models in JAX: sample, self-judge, pair and DPO-train M_t into M_{t+1}.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def add_config_args(p):
        p.add_argument("--config", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    p = sub.add_parser("convert", help="Hugging Face model directory -> jaxsr (Orbax) checkpoint")
    p.add_argument("hf_dir", help="HF model directory (config.json + safetensors), or a hub name")
    p.add_argument("out", help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="parameter dtype (auto: the dtype the checkpoint was saved in)")
    add_config_args(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export", help="jaxsr checkpoint -> Hugging Face model directory (safetensors)")
    p.add_argument("ckpt", help="jaxsr checkpoint directory")
    p.add_argument("out", help="output HF model directory")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--max-shard-mb", type=float, default=2048, help="largest safetensors shard, in MiB")
    add_config_args(p)  # mesh.* and distributed.* (several hosts export together)
    p.set_defaults(fn=cmd_export)

    from . import commands  # later stages register their subcommands here

    commands.register(sub, add_config_args)
    return ap


def main(argv=None) -> int:
    from .hostmem import tune_allocator

    tune_allocator()  # before JAX starts its threads (see jaxsr.hostmem)
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "fn", None):
        ap.print_help()
        return 0
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        # Configuration and input errors: one clear line, no traceback (use -v for it).
        _exit_if_multiprocess(f"jaxsr {args.command}: error: {e}", 2, show_traceback=args.verbose)
        if args.verbose:
            raise
        print(f"jaxsr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit:
        raise  # --stop-after and argparse: every process exits the same way
    except BaseException as e:
        _exit_if_multiprocess(f"jaxsr {args.command}: {type(e).__name__}: {e}", 1, show_traceback=True)
        raise


def _exit_if_multiprocess(message: str, code: int, *, show_traceback: bool) -> None:
    """With several processes, end this one now (see jaxsr.distributed.exit_on_error): the others are, or soon
    will be, waiting for it in a collective, and a normal exit would wait for them at JAX's shutdown barrier."""
    if "jax" not in sys.modules:
        return
    from .distributed import exit_on_error, is_multiprocess

    if is_multiprocess():
        if show_traceback:
            import traceback

            traceback.print_exc()
        exit_on_error(message, code)


if __name__ == "__main__":
    sys.exit(main())
