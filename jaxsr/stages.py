"""The stage graph's parts: a `Stage` definition, the `Context` a stage runs in, and the resumable row map.

A stage is one definition: its name, the artifacts it reads and writes (names resolved to paths of the run
directory by `RunPaths.artifact`), its config section, and `run(ctx) -> stats`. The graph itself (which stages,
in which order) is `jaxsr.pipeline.GRAPH`; the loop, the per-stage commands, the manifest and the report read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from . import artifacts, distributed

log = logging.getLogger(__name__)

# Where each stage runs: once at the start (iteration 0: seed data, SFT -> M1), in every self-rewarding
# iteration t = 1 .. T-1 (M_t -> M_{t+1}), or once at the end.
PHASES = ("bootstrap", "iteration", "final")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the graph.

    Attributes:
      name: unique in its phase; with the iteration it names the stage's manifest entry and random stream.
      run: `run(ctx) -> stats dict` (or None); writes its outputs under `ctx.path(...)`.
      reads / writes: artifact names (`RunPaths.artifact`); what the manifest hashes and the stage's inputs.
      section: the config section the stage reads (documentation; `jaxsr <command> --help` names it).
      command: the name of its stand-alone CLI command (`jaxsr <command> --iteration t`), if it has one.
      per_model: the manifest key is `<name>/M{t+1}` (a stage about the model an iteration made) instead
        of `iteration{t}/<name>`; bootstrap and final stages use their bare name.
      when: `when(cfg) -> bool`; a stage whose `when` is false is left out of the run (no manifest entry).
      grows: artifacts of earlier stages this one may extend (the pairs stage with a pairs target extends the
        prompts, candidates and judgements); the manifest hashes them again with its outputs.
    """

    name: str
    run: Callable[["Context"], dict | None]
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    section: str | None = None
    command: str | None = None
    help: str = ""
    per_model: bool = False
    when: Callable[[Any], bool] | None = None
    grows: tuple[str, ...] = ()

    def enabled(self, cfg) -> bool:
        return self.when is None or bool(self.when(cfg))

    def key(self, phase: str, t: int) -> str:
        if self.per_model:
            return f"{self.name}/M{t + 1}"
        return f"iteration{t}/{self.name}" if phase == "iteration" else self.name


@dataclasses.dataclass
class RunPaths:
    root: Path

    def data(self, split: str) -> Path:
        return self.root / "data" / split

    def model(self, t: int | str) -> Path:
        """M_t's checkpoint, or a named model's (`baseline`: the SFT baseline)."""
        return self.root / "models" / (t if isinstance(t, str) else f"M{t}")

    def stage(self, t: int, name: str) -> Path:
        return self.root / f"iteration{t}" / name

    def train(self, name: str) -> Path:
        return self.root / "train" / name

    def eval(self, t: int | str) -> Path:
        return self.root / "eval" / f"{t if isinstance(t, str) else f'M{t}'}.json"

    def h2h(self, a: str, b: str) -> Path:
        """The head-to-head record of model `a` against model `b` (jaxsr.headtohead)."""
        return self.root / "eval" / f"h2h_{a}_vs_{b}.json"

    def artifact(self, name: str, t: int) -> tuple[str, Path]:
        """(display name, path) of an artifact as seen from iteration t: "M_t" is the model the iteration starts
        from, "M_next" the one it makes, "eval" the evaluation of M_next; other names are iteration t's
        stage outputs. "baseline" is the SFT baseline (M0 trained on IFT only), "baseline_eval" its evaluation,
        "eft" and "rm_eval" the seed splits that building EFT writes, "h2h" M_next against M_t."""
        if name == "data":
            return "data", self.root / "data"
        if name in ("eft", "rm_eval"):
            return name, self.data(name)
        if name == "baseline":
            return name, self.model(name)
        if name == "baseline_eval":
            return name, self.eval("baseline")
        if name == "M_t":
            return f"M{t}", self.model(t)
        if name == "M_next":
            return f"M{t + 1}", self.model(t + 1)
        if name == "eval":
            return "eval", self.eval(t + 1)
        if name == "h2h":
            return "h2h", self.h2h(f"M{t + 1}", f"M{t}")
        if name == "report":
            return "report", self.root / "report.json"
        return name, self.stage(t, name)


def stage_seed(run_seed: int, iteration: int, stage: str) -> int:
    """The base seed of a stage's random stream: a hash of (run seed, iteration, stage name), so adding, removing or
    reordering stages leaves every other stage's stream alone. Below 2**30: stages add chunk offsets to it."""
    digest = hashlib.sha256(f"jaxsr/{run_seed}/{iteration}/{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % (2**30)


@dataclasses.dataclass
class Context:
    """What a stage sees: the config, the run's paths and mesh, the environment, the iteration, its models."""

    cfg: Any
    paths: RunPaths
    mesh: Any
    env: Any
    t: int = 0
    stage: Stage | None = None
    _models: dict = dataclasses.field(default_factory=dict)
    # The sampling backend, made on first use; a dict so the contexts `at` derives share it.
    _backend: dict = dataclasses.field(default_factory=dict)

    def at(self, stage: Stage, t: int) -> "Context":
        return dataclasses.replace(self, stage=stage, t=t)

    def path(self, artifact: str) -> Path:
        return self.paths.artifact(artifact, self.t)[1]

    def seed(self, stream: str | None = None) -> int:
        return stage_seed(self.cfg.seed, self.t, stream or self.stage.name)

    def policy(self, t: int | None = None):
        """M_t (default: this iteration's) loaded onto the run's mesh, stored in model.param_dtype, computing in
        model.dtype, with model.chat_template; the last one loaded is kept (with the compute-dtype copy sampling
        makes of it)."""
        from .chat import load_chat_policy

        t = self.t if t is None else t
        if t not in self._models:
            self.release_models()
            self._models[t] = load_chat_policy(self.paths.model(t), self.cfg.model, self.mesh,
                                               decode_tensor=self.cfg.sample.decode_tensor)
        return self._models[t]

    def release_models(self) -> None:
        """Drops the loaded model, so that another one (a fixed generator or judge) has the devices to itself,
        and lets the sampling backend free its copy."""
        self._models.clear()
        if self._backend:
            self._backend["backend"].release()

    def backend(self):
        """The sampling backend `sample.backend` selects (`jaxsr.backends.Backend`), one per run: every stage that
        samples calls it."""
        from .backends import from_config

        if not self._backend:
            self._backend["backend"] = from_config(self.cfg)
        return self._backend["backend"]

    def split(self, name: str):
        """A seed split of run_dir/data as a datasets.Dataset, or None when the environment has none."""
        p = self.paths.data(name)
        return artifacts.read_dataset(p) if p.is_dir() else None


def map_rows(out_dir, items: Sequence, fn: Callable[[Sequence, int], list[dict]], *, chunk: int, rows_per_item: int,
             desc: str, unit: str, features=None) -> int:
    """Writes `fn(items[lo:hi], lo)` for consecutive chunks of `items` to a resumable dataset at `out_dir`.

    Each chunk's rows (`rows_per_item` per item) are one committed shard, so a rerun after a kill skips the
    chunks already on disk and redoes at most one. `fn` must depend on (chunk, lo) only, never on where a
    run resumed. `features`: the column types, when a chunk can leave a column all None. Returns the number of rows.
    """
    writer = artifacts.ShardedWriter(out_dir, shard_size=chunk * rows_per_item, features=features)
    start = writer.done_rows() // rows_per_item
    if start < len(items):
        writer.reopen()  # `items` grew since the dataset was finalized (the pairs target): append the rest
    bar = distributed.progress(len(items), initial=min(start, len(items)), desc=desc, unit=unit)
    # Chunks start where the committed rows end: every committed shard is a whole chunk, except the last one
    # before `items` grew, so a grown dataset continues without redoing (or duplicating) its last rows.
    for lo in range(start, len(items), chunk):
        hi = min(len(items), lo + chunk)
        rows = fn(items[lo:hi], lo)
        if len(rows) != (hi - lo) * rows_per_item:
            raise RuntimeError(f"{out_dir}: items {lo}..{hi - 1} gave {len(rows)} rows, expected "
                               f"{(hi - lo) * rows_per_item}")
        writer.extend(rows)
        bar.update(hi - lo)
    bar.close()
    return writer.finalize()["num_rows"]


def write_rows(out_dir, rows: list[dict], *, features=None) -> None:
    """`rows` as one committed dataset: all or none of them; a rerun after a kill keeps what was committed."""
    writer = artifacts.ShardedWriter(out_dir, shard_size=max(1, len(rows)), features=features)
    if writer.done_rows() == 0:
        writer.extend(rows)
    writer.finalize()


def rows_of(path: Path) -> int | None:
    """Rows of a finished dataset artifact (None for anything else), for the stage log lines."""
    done = Path(path) / artifacts.COMPLETE
    if done.is_file():
        return json.loads(done.read_text())["num_rows"]
    return None


@dataclasses.dataclass(frozen=True)
class Graph:
    """The stages of a run in order: `bootstrap` once (iteration 0), `iteration` for t = 1 .. T-1, `final` once."""

    bootstrap: tuple[Stage, ...]
    iteration: tuple[Stage, ...]
    final: tuple[Stage, ...]

    def __post_init__(self):
        for phase in PHASES:
            names = [s.name for s in getattr(self, phase)]
            if len(set(names)) != len(names):
                raise ValueError(f"stage graph: duplicate stage names in {phase}: {names}")

    def schedule(self, iterations: int, cfg=None):
        """(phase, t, stage) in execution order for a run of M1 .. M_iterations; with `cfg`, only the stages
        it enables."""
        on = lambda s: cfg is None or s.enabled(cfg)  # noqa: E731
        for s in filter(on, self.bootstrap):
            yield "bootstrap", 0, s
        for t in range(1, iterations):
            for s in filter(on, self.iteration):
                yield "iteration", t, s
        for s in filter(on, self.final):
            yield "final", iterations, s

    def insert(self, phase: str, stage: Stage, *, after: str) -> "Graph":
        """A new graph with `stage` placed after the stage named `after` in `phase`."""
        stages = list(getattr(self, phase))
        names = [s.name for s in stages]
        if after not in names:
            raise ValueError(f"stage graph: no stage {after!r} in {phase} (stages: {', '.join(names)})")
        stages.insert(names.index(after) + 1, stage)
        return dataclasses.replace(self, **{phase: tuple(stages)})

    def commands(self) -> dict[str, Stage]:
        """The stages that have a stand-alone command, by command name."""
        return {s.command: s for phase in PHASES for s in getattr(self, phase) if s.command}
