"""`jaxsr run` (the whole stage graph), `jaxsr sweep` (it over seeds), one command per data stage
(`jaxsr prompts|sample|judge|pairs`), `jaxsr eval` (also `jaxsr eval --head-to-head A B`)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import DEFAULT_CONFIG, load


def cmd_run(args) -> int:
    from .. import distributed, loop

    cfg = load(args, default=True)
    distributed.initialize(cfg.distributed)
    loop.run(cfg, stop_after=args.stop_after, force_lock=args.force_lock)
    return 0


def cmd_sweep(args) -> int:
    from ..sweep import run_sweep

    cfg = load(args, default=True)
    out = Path(args.out or f"{cfg.run_dir}_sweep")
    result = run_sweep(args.config or str(DEFAULT_CONFIG), args.overrides, args.seeds, args.controls, out)
    print((out / "sweep.md").read_text())
    print(f"sweep: {out / 'sweep.md'}  plot: {out / 'sweep.png'}  data: {out / 'sweep.json'} "
          f"({len(result['seeds'])} seeds x {len(result['variants'])} variants)")
    return 0


def _stage_command(stage):
    def cmd(args) -> int:
        from .. import distributed, loop

        cfg = load(args, default=True)
        distributed.initialize(cfg.distributed)
        ctx = loop.context(cfg)
        t = args.iteration
        if not ctx.paths.model(t).is_dir():
            raise FileNotFoundError(f"{ctx.paths.model(t)}: no checkpoint of M{t} (run `jaxsr run` up to it first)")
        stats = stage.run(ctx.at(stage, t))
        if distributed.is_primary():
            print(json.dumps(stats, indent=2))
        return 0

    return cmd


def cmd_eval(args) -> int:
    from .. import artifacts, distributed, loop
    from ..pipeline import evaluate_policy
    from ..report import table

    cfg = load(args, default=True)
    distributed.initialize(cfg.distributed)
    ctx = loop.context(cfg)
    if args.head_to_head:
        return _head_to_head(ctx, args)
    models = args.models or [t for t in range(1, cfg.loop.iterations + 1) if ctx.paths.model(t).is_dir()]
    if not models:
        raise FileNotFoundError(f"{ctx.paths.root / 'models'}: no model checkpoints to evaluate")
    rows = []
    for t in models:
        res = evaluate_policy(ctx.policy(t), ctx, t)
        artifacts.write_json_atomic(ctx.paths.eval(t), res)
        rows.append(res)
    if distributed.is_primary():
        print(table([{**r, "model": f"M{r['iteration']}"} for r in rows], ctx.env.report_columns))
    return 0


def _prompts_file(path) -> list[str]:
    """The instructions of a JSONL file (or a saved datasets directory) with an 'instruction' or 'prompt' string."""
    from ..data import read_records

    out = []
    for n, row in enumerate(read_records(path, (), optional=("instruction", "prompt")), 1):
        text = row.get("instruction") or row.get("prompt")
        if not isinstance(text, str):
            raise ValueError(f"{path}: record {n} has no 'instruction' or 'prompt' string")
        out.append(text)
    return out


def _head_to_head(ctx, args) -> int:
    from .. import distributed
    from ..headtohead import evaluate_pair, resolve_model, summary
    from ..pipeline import h2h_instructions

    a, b = (resolve_model(ctx, m) for m in args.head_to_head)
    judge = resolve_model(ctx, args.judge) if args.judge else None
    # Default prompts: the run's eval instructions, else its rm_eval prompts (oasst), as the run's h2h stage uses.
    instructions = _prompts_file(args.prompts) if args.prompts else h2h_instructions(ctx)
    res = evaluate_pair(ctx, a, b, instructions, judge=judge)
    if distributed.is_primary():
        print(summary(res))
        print(f"record: {ctx.paths.h2h(a[0], b[0])}  AlpacaEval outputs: {ctx.paths.root / 'eval' / 'alpaca_eval'}")
    return 0


def add_parsers(sub, add_config_args) -> None:
    from ..pipeline import GRAPH

    p = sub.add_parser("run", help="the whole self-rewarding loop M0 -> M1 (SFT) -> ... -> M_T (DPO), resumable")
    add_config_args(p)
    p.add_argument("--stop-after", metavar="STAGE",
                   help="stop after this stage (its manifest key, e.g. iteration1/judgements); for debugging")
    p.add_argument("--force-lock", action="store_true",
                   help="take over the run directory's lock even when its holder cannot be checked (another host); "
                        "only when you know that run has ended")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("sweep", help="the loop over several seeds (and the pair controls), resumable, with one "
                                     "aggregate report of mean ± sd per M_t")
    add_config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="run seeds (default 0 1 2 3 4)")
    p.add_argument("--controls", nargs="*", default=[], choices=["random", "oracle"],
                   help="also run these pair controls on the same seeds (pairs.control; the world)")
    p.add_argument("--out", help="sweep directory (default: <run_dir>_sweep); one run directory per variant and seed")
    p.set_defaults(fn=cmd_sweep)
    for name, stage in GRAPH.commands().items():
        p = sub.add_parser(name, help=f"{stage.help} (config section: {stage.section})")
        add_config_args(p)
        p.add_argument("--iteration", type=int, default=1, help="t: uses run_dir/models/M{t}")
        p.set_defaults(fn=_stage_command(stage))
    p = sub.add_parser("eval", help="evaluate M_t checkpoints of a run: the environment's score, judge metrics")
    add_config_args(p)
    p.add_argument("--models", type=int, nargs="*", help="model indices t (default: all present)")
    p.add_argument("--head-to-head", nargs=2, metavar=("A", "B"),
                   help="A against B instead (paper Fig. 3): each an iteration t of the run, a name under "
                        "run_dir/models, or a model directory; writes eval/h2h_<A>_vs_<B>.json and "
                        "eval/alpaca_eval/<model>.json")
    p.add_argument("--prompts", metavar="FILE", help="with --head-to-head: JSONL with 'instruction' or 'prompt' "
                                                     "(default: the run's eval split, else its rm_eval prompts)")
    p.add_argument("--judge", metavar="MODEL", help="with --head-to-head: the judge (default: A), named as A and B")
    p.set_defaults(fn=cmd_eval)
