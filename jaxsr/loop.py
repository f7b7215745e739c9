"""`jaxsr run`: the stage graph (jaxsr.pipeline.GRAPH) over one run directory, resumable.

The run directory holds everything; `manifest.json` records the resolved config, package versions, each stage's
status and the hashes of its inputs and outputs. Every stage is idempotent: a finished stage is skipped, an
interrupted one resumes from its own shards or step checkpoints, so rerunning the same command after a kill loses
at most the work since the last committed shard or checkpoint. One process owns a run directory at a time
(jaxsr.runlock).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import time
from pathlib import Path

from . import artifacts, distributed
from .config import JaxsrConfig, to_dict
from .stages import Context, Graph, RunPaths, rows_of

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PACKAGES = ("jaxsr", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "numpy")


class ConfigMismatch(ValueError):
    """The run directory was made with another config; the message lists the differing keys."""


# --- manifest ---------------------------------------------------------------------------------------------------

def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def path_hash(path: Path) -> str:
    """Content hash of a file or directory tree (datasets use their committed content hash)."""
    path = Path(path)
    if (path / artifacts.COMPLETE).is_file():
        return "sha256:" + json.loads((path / artifacts.COMPLETE).read_text())["sha256"]
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def source_commit() -> str | None:
    """The git commit of the jaxsr source a run uses (with "+dirty" for uncommitted changes), or None outside a git
    checkout (an installed wheel): docs generated from runs name it (scripts/results_md.py)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "jaxsr"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


# Config keys that do not change what a run computes: a run may resume with other values (another port, more hosts,
# the slice a config is sized for).
_NOT_IDENTITY = ("distributed.", "mesh.topology")


class Manifest:
    """The run's config, versions and stage status. Every process holds the same copy (process 0 reads the
    file and sends it to the others, so they agree on which stages are done); process 0 writes it."""

    def __init__(self, run_dir: Path, cfg: JaxsrConfig):
        self.path = run_dir / MANIFEST
        self._hashes: dict[str, str] = {}
        want = to_dict(cfg)
        saved = json.loads(self.path.read_text()) if distributed.is_primary() and self.path.is_file() else None
        saved = distributed.broadcast_json(saved)
        if saved is not None:
            self.data = saved
            have, new = _flatten(self.data["config"]), _flatten(want)
            # A key added to jaxsr after the run started, at its default, is what the run computed all along.
            defaults = _flatten(to_dict(JaxsrConfig()))
            diff = sorted(k for k in set(have) | set(new) if have.get(k, "<unset>") != new.get(k, "<unset>")
                          and not k.startswith(_NOT_IDENTITY)
                          and not (k not in have and k in defaults and new[k] == defaults[k]))
            if diff:
                detail = ", ".join(f"{k}: {have.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in diff[:10])
                raise ConfigMismatch(f"{run_dir} was started with a different config ({len(diff)} keys differ: {detail}); "
                                     f"use another run_dir or the original config")
        else:
            self.data = {"config": want, "seed": cfg.seed, "versions": _versions(), "commit": source_commit(),
                         "stages": {},
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.save()

    def save(self):
        artifacts.write_json_atomic(self.path, self.data)

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def mark(self, stage: str, outputs: dict[str, Path], inputs: dict[str, Path] | None = None, **info):
        if not distributed.is_primary():  # the same decision as process 0's, without hashing the files again
            self.data["stages"][stage] = {"status": "done"}
            return
        self.data["stages"][stage] = {
            "status": "done", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            # Outputs first: a grown input (Stage.grows) is hashed afresh as an output, then reused as an input.
            "outputs": {k: self._hash(v, fresh=True) for k, v in outputs.items()},
            "inputs": {k: self._hash(v) for k, v in (inputs or {}).items()}, **info}
        self.save()

    def _hash(self, path: Path, fresh: bool = False) -> str:
        # An input is usually an earlier stage's output: reuse its hash rather than read a large checkpoint again.
        key = str(Path(path).absolute())
        if fresh or key not in self._hashes:
            self._hashes[key] = path_hash(path)
        return self._hashes[key]


# --- the run ------------------------------------------------------------------------------------------------------

def run_mesh(cfg: JaxsrConfig):
    """The configured mesh; None (each model's default mesh, chosen when it loads) when `mesh:` is unset and
    M0 comes from `model.path`. Raises before any compilation when the mesh does not fit the devices."""
    if cfg.model.path and not cfg.mesh.is_set:
        return None
    return cfg.mesh.build(cfg.model.architecture.hidden_size)


def context(cfg: JaxsrConfig, mesh=None) -> Context:
    """The context stages run in: config, run paths, mesh (default `run_mesh(cfg)`) and environment."""
    from .envs import from_config

    cfg.check_run()  # settings that contradict each other in a run fail before any I/O or compute
    return Context(cfg=cfg, paths=RunPaths(Path(cfg.run_dir)), mesh=run_mesh(cfg) if mesh is None else mesh,
                   env=from_config(cfg))


def run(cfg: JaxsrConfig, *, mesh=None, stop_after: str | None = None, graph: Graph | None = None,
        force_lock: bool = False) -> list[dict]:
    """Runs (or resumes) the whole graph and returns the per-model report rows.

    mesh: None = `run_mesh(cfg)`. With several processes every process calls it with the same config; they
    run every stage together and process 0 writes the run directory (see jaxsr.distributed).
    stop_after: a stage's manifest key (e.g. iteration1/judgements): exit after it, for debugging.
    force_lock: take over a lock whose holder cannot be checked (jaxsr.runlock).
    """
    from .pipeline import GRAPH, report_rows
    from .runlock import RunLock

    graph = graph or GRAPH
    ctx = context(cfg, mesh)
    if ctx.mesh is not None:
        distributed.check_batches({"sft": cfg.sft, "dpo": cfg.dpo}, ctx.mesh)
    root = ctx.paths.root
    with RunLock(root, primary=distributed.is_primary(), force=force_lock):
        manifest = Manifest(root, cfg)
        if manifest.done("report"):
            log.info("%s: run already complete (M1..M%d); nothing to do", root, cfg.loop.iterations)
            if distributed.is_primary():
                print(f"run {root} is already complete; nothing to do. Report: {root / 'report.md'}")
            return report_rows(ctx)  # what the finished run returned (report.json leaves out the sample answers)
        for phase, t, stage in graph.schedule(cfg.loop.iterations, cfg):
            key = stage.key(phase, t)
            if manifest.done(key):
                continue
            _run_stage(ctx.at(stage, t), key, manifest)
            if stop_after == key:
                raise SystemExit(f"stopped after stage {key} (stop_after)")
        return report_rows(ctx)


def _run_stage(ctx: Context, key: str, manifest: Manifest) -> None:
    stage, t0 = ctx.stage, time.time()
    log.info("stage %s: start", key)
    result = stage.run(ctx) or {}
    distributed.barrier(f"stage {key}")  # all outputs written before anyone hashes or reads them
    seconds = round(time.time() - t0, 1)
    named = lambda names: dict(ctx.paths.artifact(n, ctx.t) for n in names)  # noqa: E731
    outputs = named(stage.writes)
    # An input another stage writes only under some configs (judge_pairs, meta.enabled) is recorded when it exists.
    inputs = {n: p for n, p in named(stage.reads).items() if p.exists()}
    manifest.mark(key, outputs | named(stage.grows), inputs or None, seconds=seconds, result=result)
    rows = [f"{n} {r} rows" for n, p in outputs.items() if (r := rows_of(p)) is not None]
    log.info("stage %s: done in %.1f s%s", key, seconds, f" ({', '.join(rows)})" if rows else "")
