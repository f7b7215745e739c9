"""`jaxsr run` (the whole stage graph), one command per data stage (`jaxsr prompts|sample|judge|pairs`), `jaxsr eval`."""

from __future__ import annotations

import json

from .common import load


def cmd_run(args) -> int:
    from .. import distributed, loop

    cfg = load(args, default=True)
    distributed.initialize(cfg.distributed)
    loop.run(cfg, stop_after=args.stop_after, force_lock=args.force_lock)
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
    for name, stage in GRAPH.commands().items():
        p = sub.add_parser(name, help=f"{stage.help} (config section: {stage.section})")
        add_config_args(p)
        p.add_argument("--iteration", type=int, default=1, help="t: uses run_dir/models/M{t}")
        p.set_defaults(fn=_stage_command(stage))
    p = sub.add_parser("eval", help="evaluate M_t checkpoints of a run: the environment's score, judge metrics")
    add_config_args(p)
    p.add_argument("--models", type=int, nargs="*", help="model indices t (default: all present)")
    p.set_defaults(fn=cmd_eval)
