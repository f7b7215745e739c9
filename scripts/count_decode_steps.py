"""Decode steps and prefill tokens of one iteration's candidate or judge stage, counted by the sampler, and whether
the rows match the run's own output: exact counts, no timing (docs/sampling.md#decode-steps).

Runs the stage function itself (`jaxsr.selfreward.generate_candidates` / `judge_candidates`) on a finished run
directory's M_t and inputs, into a scratch directory, with `generate(..., stats=...)` recording every chunk; then
compares the rows it wrote with the run's (the same seeds, so any difference is a change of the sampler).

    jaxsr run --stop-after iteration1/judgements run_dir=runs/micro         # the default config's iteration 1
    python scripts/count_decode_steps.py runs/micro --stage judgements      # [--config FILE] [key=value ...]
    python scripts/count_decode_steps.py runs/micro --stage judgements sample.share_prefixes=false   # before

Prints one JSON line: chunks, sum of decode steps, sum of batch x steps (row-steps, padding included), sum of
the chunks' longest rows, the rows' own sampled tokens (EOS included: what continuous batching would decode);
prefill: the prompt tokens the prefills ran (`prefill_tokens`, the shared prefix
once per call included), the padded positions they computed (`prefill_positions`: rows x prompt bucket, + the
prefix bucket once per call), and the tokens of the calls' distinct prompts with a shared prefix counted once
(`distinct_prompt_tokens`, what a prefill that repeats nothing would run); and rows that differ from the run's
(in `judge_text` / `response`, and in `score`).
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
    import jaxsr.data
    from jaxsr import artifacts, backends, loop, selfreward
    from jaxsr.config import load_config

    cfg = load_config(args.config, [f"run_dir={args.run_dir}", *args.overrides])
    ctx = loop.context(cfg)
    t = args.iteration
    chunks, calls = [], []

    def counting_generate(policy, prompts, **kw):
        stats = {}
        out = jaxsr.sample.generate(policy, prompts, stats=stats, progress=False, **kw)
        chunks.extend(stats["chunks"])
        distinct = {tuple(p) for p in prompts}
        n = jaxsr.sample._common_prefix([list(p) for p in distinct])
        n = n if n >= jaxsr.sample.MIN_SHARED_PREFIX else 0
        calls.append({"prefix_tokens": stats["prefix_tokens"],
                      "prefix_positions": jaxsr.data.bucket(stats["prefix_tokens"], fine=True) if stats["prefix_tokens"] else 0,
                      "distinct": n + sum(len(p) - n for p in distinct),
                      "sampled": sum(len(c.token_ids) + (c.finish_reason == "eos") for row in out for c in row)})
        return out

    backends.generate = counting_generate  # what the built-in backend calls
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
        "sampled_tokens": sum(c["sampled"] for c in calls),
        "share_prefixes": cfg.sample.share_prefixes,
        "prefill_tokens": sum(c["prefill_tokens"] for c in chunks) + sum(c["prefix_tokens"] for c in calls),
        "prefill_positions": sum(c["prefill_rows"] * c["prompt_bucket"] for c in chunks)
        + sum(c["prefix_positions"] for c in calls),
        "distinct_prompt_tokens": sum(c["distinct"] for c in calls),
        "rows_differing": sum(a[text] != b[text] for a, b in zip(new, old)) + abs(len(new) - len(old)),
    }
    if args.stage == "judgements":
        result["scores_differing"] = sum(a["score"] != b["score"] for a, b in zip(new, old))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
