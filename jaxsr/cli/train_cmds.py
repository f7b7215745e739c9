"""`jaxsr sft` and `jaxsr dpo`: one training stage on JSONL / HF-datasets data."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from .common import load


def _cmd(stage: str, args) -> int:
    from .. import data as data_lib
    from .. import distributed
    from ..chat import load_chat_policy
    from ..loop import run_mesh
    from ..train import TrainingDiverged, train_dpo, train_sft, with_reference_logps

    cfg = load(args)
    distributed.initialize(cfg.distributed)
    section = getattr(cfg, stage)
    if not cfg.model.path:
        raise ValueError("model.path is required: pass model.path=DIR (a Hugging Face model directory or a jaxsr checkpoint)")
    out = Path(args.out)
    policy = load_chat_policy(cfg.model.path, cfg.model, run_mesh(cfg))
    distributed.check_batches({stage: section}, policy.mesh)
    try:
        if stage == "sft":
            train_sft(policy, data_lib.load_sft(args.data), section, out, remat=cfg.model.remat)
        else:
            records = data_lib.load_pairs(args.data)
            if section.reference == "precomputed" and not any(c in records[0] for c in data_lib.REF_COLUMNS):
                records = with_reference_logps(policy, records, section, out, str(args.data))
            train_dpo(policy, records, section, out, remat=cfg.model.remat)
    except TrainingDiverged as e:
        print(f"jaxsr {stage}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'final'}")
    return 0


def add_parsers(sub, add_config_args) -> None:
    for stage, text in (("sft", "supervised fine-tuning on {prompt, response} data (loss on the response)"),
                        ("dpo", "DPO on {prompt, chosen, rejected} pairs with pi_ref = the loaded model")):
        p = sub.add_parser(stage, help=text)
        p.add_argument("--data", required=True, help="JSONL file or Hugging Face datasets directory (save_to_disk)")
        p.add_argument("--out", required=True, help="work directory: steps/ checkpoints, metrics.jsonl, final/")
        add_config_args(p)
        p.set_defaults(fn=functools.partial(_cmd, stage))
