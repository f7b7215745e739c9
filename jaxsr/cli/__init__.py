"""The `jaxsr` command line: all argument parsing lives in this package; commands call library functions.

    jaxsr/cli/model_cmds.py   convert, export          jaxsr/cli/run_cmds.py    run, the per-stage commands, eval
    jaxsr/cli/train_cmds.py   sft, dpo                 jaxsr/cli/plan_cmd.py    plan
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..runlock import RunDirLocked
from . import model_cmds, plan_cmd, run_cmds, train_cmds

log = logging.getLogger("jaxsr")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jaxsr",
        description="Self-Rewarding Language Models in JAX: sample, self-judge, pair and DPO-train M_t into M_{t+1}.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def add_config_args(p):
        p.add_argument("--config", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    for module in (model_cmds, run_cmds, train_cmds, plan_cmd):
        module.add_parsers(sub, add_config_args)
    return ap


def main(argv=None) -> int:
    from ..hostmem import tune_allocator

    tune_allocator()  # before JAX starts its threads (see jaxsr.hostmem)
    ap = build_parser()
    args = ap.parse_args(argv)
    _setup_logging(args.verbose)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 0
    enable_compilation_cache()
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RunDirLocked) as e:
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


def compilation_cache_dir() -> Path | None:
    """Where compiled XLA programs persist across processes: $JAXSR_CACHE_DIR, else $XDG_CACHE_HOME/jaxsr/xla
    (~/.cache/jaxsr/xla); None when JAXSR_COMPILATION_CACHE=0 switches it off."""
    if os.environ.get("JAXSR_COMPILATION_CACHE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if os.environ.get("JAXSR_CACHE_DIR"):
        return Path(os.environ["JAXSR_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxsr" / "xla"


def enable_compilation_cache() -> Path | None:
    """JAX's persistent compilation cache in `compilation_cache_dir()`, set once at CLI start (before anything
    compiles), so a resumed or repeated run loads its prefill, decode and training steps instead of compiling them."""
    path = compilation_cache_dir()
    if path is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX's defaults skip programs that compile in under a second; the sampler's per-shape programs on CPU are
    # often just below that, and every one of them is compiled again in a resumed run.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _setup_logging(verbose: bool) -> None:
    """jaxsr's INFO lines (stage start and end, resume points) on stderr; Orbax's per-save INFO lines off."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # absl (under Orbax) may have installed a root handler already, making basicConfig a no-op; the level of
    # jaxsr's own logger decides either way.
    logging.getLogger("jaxsr").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("absl").setLevel(logging.WARNING)


def _exit_if_multiprocess(message: str, code: int, *, show_traceback: bool) -> None:
    """With several processes, end this one now (see jaxsr.distributed.exit_on_error): the others are, or soon
    will be, waiting for it in a collective, and a normal exit would wait for them at JAX's shutdown barrier."""
    if "jax" not in sys.modules:
        return
    from ..distributed import exit_on_error, is_multiprocess

    if is_multiprocess():
        if show_traceback:
            import traceback

            traceback.print_exc()
        exit_on_error(message, code)


if __name__ == "__main__":
    sys.exit(main())
