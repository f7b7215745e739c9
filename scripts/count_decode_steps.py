"""Decode steps of one iteration's candidate or judge stage, counted by the sampler, and whether the rows match
the run's own output: exact counts, no timing (docs/sampling.md#decode-steps).

Runs the stage function itself (`jaxsr.selfreward.generate_candidates` / `judge_candidates`) on a finished run
directory's M_t and inputs, into a scratch directory, with `generate(..., stats=...)` recording every chunk; then
compares the rows it wrote with the run's (the same seeds, so any difference is a change of the sampler).

    jaxsr run --stop-after iteration1/judgements run_dir=runs/micro         # the default config's iteration 1
    python scripts/count_decode_steps.py runs/micro --stage judgements      # [--config FILE] [key=value ...]

Prints one JSON line: chunks, sum of decode steps, sum of batch x steps (row-steps, padding included), sum of
the rows' own sampled tokens, and rows that differ from the run's (in `judge_text` / `response`, and in `score`).
Run it with the same number of CPU cores as the run (the chunking follows `generate`'s default concurrency).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--stage", choices=("candidates", "judgements"), default="judgements")
    ap.add_argument("--iteration", type=int, default=1)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()

    import jaxsr.sample
    from jaxsr import artifacts, loop, selfreward
    from jaxsr.config import load_config

    cfg = load_config(args.config, [f"run_dir={args.run_dir}", *args.overrides])
    ctx = loop.context(cfg)
    t = args.iteration
    chunks = []

    def counting_generate(*a, **kw):
        stats = {}
        out = jaxsr.sample.generate(*a, stats=stats, progress=False, **kw)
        chunks.extend(stats["chunks"])
        return out

    selfreward.generate = counting_generate
    policy = ctx.policy(t)
    run_dir = ctx.paths.stage(t, args.stage)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / args.stage
        if args.stage == "candidates":
            selfreward.generate_candidates(policy, ctx.paths.stage(t, "prompts"), out, cfg, t)
            text = "response"
        else:
            template = selfreward.judge_template(ctx.at(selfreward.JUDGEMENTS, t))
            selfreward.judge_candidates(policy, ctx.paths.stage(t, "candidates"), out, cfg, t, template=template)
            text = "judge_text"
        new, old = artifacts.read_dataset(out).to_list(), artifacts.read_dataset(run_dir).to_list()
    result = {
        "stage": args.stage, "rows": len(new), "chunks": len(chunks),
        "decode_steps": sum(c["decode_steps"] for c in chunks),
        "row_steps": sum(c["batch"] * c["decode_steps"] for c in chunks),
        "longest_rows": sum(c["longest_row"] for c in chunks),
        "rows_differing": sum(a[text] != b[text] for a, b in zip(new, old)) + abs(len(new) - len(old)),
    }
    if args.stage == "judgements":
        result["scores_differing"] = sum(a["score"] != b["score"] for a, b in zip(new, old))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
