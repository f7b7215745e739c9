"""`jaxsr run`: M0 -> SFT -> M1, then prompts -> candidates -> judgements -> pairs -> DPO -> M_{t+1}, evaluated.

The run directory holds everything; `manifest.json` records the resolved config, package versions, each stage's
status and the hashes of its outputs. Every stage is idempotent: a finished stage is skipped, an interrupted one
resumes from its own shards or step checkpoints, so rerunning the same command after a kill loses at most the work
since the last committed shard or checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import time
from pathlib import Path

import numpy as np

from . import artifacts, distributed, evaluate, selfreward
from .config import JaxsrConfig, to_dict
from .policy import Policy, load_policy, random_policy

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


# Config keys that do not change what a run computes: a run may resume with other values (another port, more hosts).
_NOT_IDENTITY = ("distributed.",)


class Manifest:
    """The run's config, versions and stage status. Every process holds the same copy (process 0 reads the
    file and sends it to the others, so they agree on which stages are done); process 0 writes it."""

    def __init__(self, run_dir: Path, cfg: JaxsrConfig):
        self.path = run_dir / MANIFEST
        want = to_dict(cfg)
        saved = json.loads(self.path.read_text()) if distributed.is_primary() and self.path.is_file() else None
        saved = distributed.broadcast_json(saved)
        if saved is not None:
            self.data = saved
            have, new = _flatten(self.data["config"]), _flatten(want)
            diff = sorted(k for k in set(have) | set(new) if have.get(k, "<unset>") != new.get(k, "<unset>")
                          and not k.startswith(_NOT_IDENTITY))
            if diff:
                detail = ", ".join(f"{k}: {have.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in diff[:10])
                raise ConfigMismatch(f"{run_dir} was started with a different config ({len(diff)} keys differ: {detail}); "
                                     f"use another run_dir or the original config")
        else:
            self.data = {"config": want, "seed": cfg.seed, "versions": _versions(), "stages": {},
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
            "inputs": {k: path_hash(v) for k, v in (inputs or {}).items()},
            "outputs": {k: path_hash(v) for k, v in outputs.items()}, **info}
        self.save()


# --- the run ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunPaths:
    root: Path

    def data(self, split: str) -> Path:
        return self.root / "data" / split

    def model(self, t: int) -> Path:
        return self.root / "models" / f"M{t}"

    def stage(self, t: int, name: str) -> Path:
        return self.root / f"iteration{t}" / name

    def train(self, name: str) -> Path:
        return self.root / "train" / name

    def eval(self, t: int) -> Path:
        return self.root / "eval" / f"M{t}.json"


def _initial_policy(cfg: JaxsrConfig, mesh) -> Policy:
    if cfg.model.path:
        return load_policy(cfg.model.path, dtype=cfg.model.dtype, mesh=mesh)
    from transformers import AutoTokenizer

    from .model.config import ModelConfig
    from .world import load_tokenizer

    tok = load_tokenizer() if cfg.model.tokenizer == "world" else AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    a = cfg.model.architecture
    mcfg = ModelConfig(model_type=a.model_type, vocab_size=len(tok), hidden_size=a.hidden_size,
                       intermediate_size=a.intermediate_size, num_layers=a.num_layers, num_heads=a.num_heads,
                       num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                       max_position_embeddings=a.max_position_embeddings, rope_theta=a.rope_theta,
                       tie_word_embeddings=a.tie_word_embeddings, bos_token_id=tok.bos_token_id,
                       eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    if mesh is None:
        mesh = cfg.mesh.build(mcfg.hidden_size)
    return random_policy(mcfg, seed=cfg.model.init_seed, dtype=cfg.model.dtype, mesh=mesh, tokenizer=tok)


def prepare_data(cfg: JaxsrConfig, paths: RunPaths) -> dict[str, Path]:
    """Seed splits under run_dir/data: ift, eft (SFT data), seed_prompts, and eval / rm_eval when available."""
    from datasets import Dataset

    def save(name, ds: Dataset):
        w = artifacts.ShardedWriter(paths.data(name), shard_size=max(1, len(ds)))
        if w.done_rows() == 0:
            w.extend(ds.to_list())
        w.finalize()

    if cfg.data.source == "world":
        from .world.data import build_world

        splits = build_world(seed=cfg.seed, num_ift=cfg.data.world_ift, num_eft=cfg.data.world_eft,
                             num_eval=cfg.data.world_eval, num_rm_eval=cfg.data.world_rm_eval)
        for name in ("ift", "eft", "eval", "rm_eval", "seed_prompts"):
            save(name, splits[name])
    elif cfg.data.source == "oasst":
        from .oasst import build_oasst_seeds

        seeds = build_oasst_seeds(cfg.data.oasst_path, num_ift=cfg.data.num_ift)
        save("ift", seeds["ift"].select_columns(["prompt", "response"]))
        save("rm_eval", seeds["rm_eval"])
        save("seed_prompts", Dataset.from_dict({"prompt": seeds["ift"]["prompt"]}))
        if cfg.data.eft_path:
            from .data import load_sft

            save("eft", Dataset.from_list(load_sft(cfg.data.eft_path)))
    else:
        from .data import load_sft

        save("ift", Dataset.from_list(load_sft(cfg.data.ift_path)))
        if cfg.data.eft_path:
            save("eft", Dataset.from_list(load_sft(cfg.data.eft_path)))
        prompts = [r["prompt"] for r in load_sft(cfg.data.prompts_path or cfg.data.ift_path)]
        save("seed_prompts", Dataset.from_dict({"prompt": prompts}))
    return {p.name: p for p in (paths.root / "data").iterdir() if p.is_dir()}


def _sft_records(paths: RunPaths) -> list[dict]:
    rows = artifacts.read_dataset(paths.data("ift")).select_columns(["prompt", "response"]).to_list()
    if paths.data("eft").is_dir():
        rows += artifacts.read_dataset(paths.data("eft")).select_columns(["prompt", "response"]).to_list()
    return rows


def evaluate_policy(policy: Policy, cfg: JaxsrConfig, paths: RunPaths, t: int) -> dict:
    """World score on held-out instructions (greedy) and the judge's agreement with reference rankings."""
    from .chat import chat_token_ids
    from .judge import aggregate_scores, load_judge_template, parse_score
    from .sample import generate

    out: dict = {"iteration": t}
    if paths.data("eval").is_dir():
        from .world.tasks import grade

        rows = artifacts.read_dataset(paths.data("eval")).to_list()
        ids = chat_token_ids(policy.tokenizer, [r["instruction"] for r in rows])
        comps = generate(policy, ids, max_new_tokens=cfg.loop.eval_max_new_tokens, temperature=0.0)
        scores = [grade(json.loads(r["spec"]), c[0].text)[0] for r, c in zip(rows, comps)]
        out |= evaluate.world_metrics(scores)
        out["eval_mean_tokens"] = float(np.mean([len(c[0].token_ids) for c in comps]))
        out["samples"] = [{"instruction": r["instruction"], "response": c[0].text, "score": s}
                          for r, c, s in list(zip(rows, comps, scores))[:5]]
    if paths.data("rm_eval").is_dir():
        rows = artifacts.read_dataset(paths.data("rm_eval")).to_list()
        template = load_judge_template(cfg.judge.template)
        k = cfg.judge.num_judgements if cfg.judge.mode == "sampled" else 1
        reqs, owners = [], []
        for i, r in enumerate(rows):
            for j, cand in enumerate(r["candidates"] if "candidates" in r else r["responses"]):
                reqs.append(selfreward.judge_request_ids(policy, template, r.get("instruction") or r["prompt"], cand,
                                                         cfg.judge.max_new_tokens))
                owners.append((i, j))
        comps = generate(policy, [q[0] for q in reqs], num_samples=k, max_new_tokens=cfg.judge.max_new_tokens,
                         temperature=cfg.judge.temperature, top_p=cfg.judge.top_p, seed=cfg.seed + 7 * t)
        model_scores = [[None] * len(r["candidates"] if "candidates" in r else r["responses"]) for r in rows]
        failures = 0
        expected = (iter(selfreward.expected_scores(policy, [q[0] for q in reqs], [c[0].text for c in comps]))
                    if cfg.judge.mode == "expected" else None)
        for (i, j), cs in zip(owners, comps):
            if expected is not None:
                parsed = [next(expected)[0]]
                s = parsed[0]
            else:
                parsed = [parse_score(c.text) for c in cs]
                s = aggregate_scores(parsed)
            failures += sum(p is None for p in parsed)
            model_scores[i][j] = s
        ref = [r["scores"] if "scores" in r else evaluate.scores_from_ranks(r["ranks"]) for r in rows]
        rm = evaluate.reward_model_report(model_scores, ref)
        out |= {"judge_pairwise_accuracy": rm.get("pairwise_accuracy"), "judge_five_best": rm.get("five_best"),
                "judge_exact_match": rm.get("exact_match"), "judge_spearman": rm.get("spearman"),
                "judge_kendall_tau": rm.get("kendall_tau"),
                "judge_eval_parse_failure_rate": failures / max(1, len(comps) * k)}
    return out


def _stats(path: Path) -> dict:
    f = path / "stats.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def run_mesh(cfg: JaxsrConfig):
    """The configured mesh; None (each model's default mesh, chosen when it loads) when `mesh:` is unset and
    M0 comes from `model.path`. Raises before any compilation when the mesh does not fit the devices."""
    m = cfg.mesh
    if cfg.model.path and m.data is None and m.fsdp is None and m.tensor is None:
        return None
    return m.build(cfg.model.architecture.hidden_size)


def run(cfg: JaxsrConfig, *, mesh=None, stop_after: str | None = None) -> list[dict]:
    """Runs (or resumes) the whole loop and returns the per-model report rows.

    mesh: None = `run_mesh(cfg)`. With several processes every process calls it with the same config; they
    run every stage together and process 0 writes the run directory (see jaxsr.distributed).
    """
    from .report import write_report
    from .train import train_dpo, train_sft

    if mesh is None:
        mesh = run_mesh(cfg)
    if mesh is not None:
        distributed.check_batches({"sft": cfg.sft, "dpo": cfg.dpo}, mesh)
    paths = RunPaths(Path(cfg.run_dir))
    if distributed.is_primary():
        paths.root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(paths.root, cfg)
    T = cfg.loop.iterations
    if manifest.done("report"):
        log.info("%s: run already complete (M1..M%d); nothing to do", paths.root, T)
        if distributed.is_primary():
            print(f"run {paths.root} is already complete; nothing to do. Report: {paths.root / 'report.md'}")
        return json.loads((paths.root / "report.json").read_text())

    def stage(name, fn, outputs, inputs=None, **info):
        if manifest.done(name):
            return
        log.info("stage %s", name)
        t0 = time.time()
        result = fn() or {}
        distributed.barrier(f"stage {name}")  # all outputs written before anyone hashes or reads them
        manifest.mark(name, outputs, inputs, seconds=round(time.time() - t0, 1), result=result, **info)
        if stop_after == name:
            raise SystemExit(f"stopped after stage {name} (stop_after)")

    stage("data", lambda: {"splits": sorted(prepare_data(cfg, paths))}, {"data": paths.root / "data"})

    def sft():
        m0 = _initial_policy(cfg, mesh)
        m1 = train_sft(m0, _sft_records(paths), cfg.sft, paths.train("sft"), remat=cfg.model.remat)
        _promote(paths.train("sft") / "final", paths.model(1))

    stage("sft", sft, {"M1": paths.model(1)}, {"data": paths.root / "data"})
    policy_cache: dict[int, Policy] = {}

    def policy_of(t):
        if t not in policy_cache:
            policy_cache.clear()
            policy_cache[t] = load_policy(paths.model(t), dtype=cfg.model.dtype, mesh=mesh)
        return policy_cache[t]

    def do_eval(t):
        res = evaluate_policy(policy_of(t), cfg, paths, t)
        artifacts.write_json_atomic(paths.eval(t), res)

    stage("eval/M1", lambda: do_eval(1), {"eval": paths.eval(1)}, {"M1": paths.model(1)})
    seed_prompts = artifacts.read_dataset(paths.data("seed_prompts"))["prompt"]
    for t in range(1, T):
        p = lambda name: paths.stage(t, name)  # noqa: E731
        stage(f"iteration{t}/prompts", lambda: selfreward.generate_prompts(
            _prompt_generator(cfg, policy_of(t), mesh), seed_prompts, p("prompts"), cfg, t,
            held_out=_held_out_instructions(paths)),
            {"prompts": p("prompts")}, {f"M{t}": paths.model(t)})
        stage(f"iteration{t}/candidates", lambda: selfreward.generate_candidates(
            policy_of(t), p("prompts"), p("candidates"), cfg, t), {"candidates": p("candidates")}, {"prompts": p("prompts")})
        stage(f"iteration{t}/judgements", lambda: selfreward.judge_candidates(
            policy_of(t), p("candidates"), p("judgements"), cfg, t), {"judgements": p("judgements")},
            {"candidates": p("candidates")})
        stage(f"iteration{t}/pairs", lambda: selfreward.build_pairs(
            policy_of(t), p("candidates"), p("judgements"), p("pairs"), cfg, t), {"pairs": p("pairs")},
            {"judgements": p("judgements")})

        def dpo():
            pairs = artifacts.read_dataset(p("pairs")).to_list()
            if not pairs:
                raise RuntimeError(f"iteration {t}: no preference pairs (see {p('pairs') / 'stats.json'} and "
                                   f"{p('judgements') / 'stats.json'}); cannot train M{t + 1}")
            train_dpo(policy_of(t), pairs, cfg.dpo, paths.train(f"dpo{t}"), remat=cfg.model.remat)
            _promote(paths.train(f"dpo{t}") / "final", paths.model(t + 1))

        stage(f"iteration{t}/dpo", dpo, {f"M{t + 1}": paths.model(t + 1)}, {"pairs": p("pairs")})
        stage(f"eval/M{t + 1}", lambda: do_eval(t + 1), {"eval": paths.eval(t + 1)}, {f"M{t + 1}": paths.model(t + 1)})

    rows = report_rows(cfg, paths)
    stage("report", lambda: write_report(rows, paths.root, cfg.name) if distributed.is_primary() else {},
          {"report": paths.root / "report.json"})
    return rows


def _prompt_generator(cfg: JaxsrConfig, policy: Policy, mesh) -> Policy:
    # The paper generates prompts with a fixed model; by default jaxsr uses M_t itself ("world" needs no model).
    if cfg.prompts.generator and cfg.prompts.generator != "world":
        return load_policy(cfg.prompts.generator, dtype=cfg.model.dtype, mesh=mesh)
    return policy


def _held_out_instructions(paths: RunPaths) -> list[str]:
    out = []
    for split, col in (("eval", "instruction"), ("rm_eval", "instruction"), ("rm_eval", "prompt")):
        if paths.data(split).is_dir():
            ds = artifacts.read_dataset(paths.data(split))
            if col in ds.column_names:
                out += ds[col]
    return out


def _promote(src: Path, dst: Path):
    """The iteration checkpoint M_t: the training stage's final params-only checkpoint, moved into models/."""
    if distributed.is_primary():
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            src.rename(dst)
    distributed.barrier(f"promote {dst}")


def report_rows(cfg: JaxsrConfig, paths: RunPaths) -> list[dict]:
    rows = []
    for t in range(1, cfg.loop.iterations + 1):
        ev = json.loads(paths.eval(t).read_text()) if paths.eval(t).is_file() else {"iteration": t}
        stages = {name: _stats(paths.stage(t, name)) for name in ("prompts", "candidates", "judgements", "pairs")}
        summary = evaluate.iteration_summary(stages)
        row = {"iteration": t, "model": f"M{t}",
               "world_score": ev.get("world_score"), "world_perfect": ev.get("world_perfect"),
               "judge_pairwise_accuracy": ev.get("judge_pairwise_accuracy"),
               "judge_five_best": ev.get("judge_five_best"), "judge_exact_match": ev.get("judge_exact_match"),
               "judge_spearman": ev.get("judge_spearman"), "judge_kendall_tau": ev.get("judge_kendall_tau"),
               "eval_mean_tokens": ev.get("eval_mean_tokens"),
               "prompts": stages["prompts"].get("prompts"), "pairs": summary.get("pairs"),
               "tie_rate": summary.get("tie_rate"), "parse_failure_rate": summary.get("parse_failure_rate"),
               "mean_chosen_tokens": summary.get("mean_chosen_tokens"),
               "mean_rejected_tokens": summary.get("mean_rejected_tokens"),
               "samples": ev.get("samples", [])}
        rows.append(row)
    return rows


# --- CLI ----------------------------------------------------------------------------------------------------------

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def _load(args) -> JaxsrConfig:
    from .config import load_config

    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return load_config(path, args.overrides)


def _cmd_run(args) -> int:
    cfg = _load(args)
    distributed.initialize(cfg.distributed)
    run(cfg, stop_after=args.stop_after)
    return 0


def _cmd_stage(name: str):
    def cmd(args) -> int:
        cfg = _load(args)
        distributed.initialize(cfg.distributed)
        paths = RunPaths(Path(cfg.run_dir))
        t = args.iteration
        if not paths.model(t).is_dir():
            raise FileNotFoundError(f"{paths.model(t)}: no checkpoint of M{t} (run `jaxsr run` up to it first)")
        mesh = run_mesh(cfg)
        policy = load_policy(paths.model(t), dtype=cfg.model.dtype, mesh=mesh)
        p = lambda s: paths.stage(t, s)  # noqa: E731
        if name == "prompts":
            seeds = artifacts.read_dataset(paths.data("seed_prompts"))["prompt"]
            stats = selfreward.generate_prompts(_prompt_generator(cfg, policy, mesh), seeds, p("prompts"), cfg, t,
                                                held_out=_held_out_instructions(paths))
        elif name == "sample":
            stats = selfreward.generate_candidates(policy, p("prompts"), p("candidates"), cfg, t)
        elif name == "judge":
            stats = selfreward.judge_candidates(policy, p("candidates"), p("judgements"), cfg, t)
        else:
            stats = selfreward.build_pairs(policy, p("candidates"), p("judgements"), p("pairs"), cfg, t)
        if distributed.is_primary():
            print(json.dumps(stats, indent=2))
        return 0

    return cmd


def _cmd_eval(args) -> int:
    cfg = _load(args)
    distributed.initialize(cfg.distributed)
    paths = RunPaths(Path(cfg.run_dir))
    models = args.models or [t for t in range(1, cfg.loop.iterations + 1) if paths.model(t).is_dir()]
    if not models:
        raise FileNotFoundError(f"{paths.root / 'models'}: no model checkpoints to evaluate")
    rows = []
    for t in models:
        res = evaluate_policy(load_policy(paths.model(t), dtype=cfg.model.dtype, mesh=run_mesh(cfg)), cfg, paths, t)
        artifacts.write_json_atomic(paths.eval(t), res)
        rows.append(res)
    from .report import table

    if distributed.is_primary():
        print(table([{**r, "model": f"M{r['iteration']}"} for r in rows]))
    return 0


def register_cli(sub, add_config_args) -> None:
    p = sub.add_parser("run", help="the whole self-rewarding loop M0 -> M1 (SFT) -> ... -> M_T (DPO), resumable")
    add_config_args(p)
    p.add_argument("--stop-after", help="stop after this stage (e.g. iteration1/judgements); for debugging")
    p.set_defaults(fn=_cmd_run)
    for name, text in (("prompts", "Self-Instruct prompts of iteration t (M_t as generator by default)"),
                       ("sample", "N candidate responses per prompt from M_t"),
                       ("judge", "M_t judges the candidates (LLM-as-a-Judge)"),
                       ("pairs", "best-vs-worst pairs with M_t's reference log-probs")):
        p = sub.add_parser(name, help=text)
        add_config_args(p)
        p.add_argument("--iteration", type=int, default=1, help="t: uses run_dir/models/M{t}")
        p.set_defaults(fn=_cmd_stage(name))
    p = sub.add_parser("eval", help="evaluate M_t checkpoints of a run: world score, judge metrics")
    add_config_args(p)
    p.add_argument("--models", type=int, nargs="*", help="model indices t (default: all present)")
    p.set_defaults(fn=_cmd_eval)
