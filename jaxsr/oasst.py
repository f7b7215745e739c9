"""Seed data from Open Assistant (oasst1/oasst2 message tables): IFT examples, EFT inputs and the RM eval set.

Paper §3.1.1: IFT = first-turn English prompts with their rank-0 human reply; EFT = first-turn prompts with
several human-ranked replies, split into train and eval (the eval split is the reward-modelling test set).
docs/evaluation.md lists every filter in the order it applies.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import datasets

from .data import DataError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("message_id", "parent_id", "message_tree_id", "text", "role", "lang", "rank", "deleted")
OPTIONAL_COLUMNS = ("review_result",)
_PARQUET = (".parquet",)
_JSON = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def _files_of(path: Path) -> tuple[str, list[str]]:
    """(builder name, files) for a parquet/JSON(L) file or a directory of them."""
    if path.is_file():
        for builder, exts in (("parquet", _PARQUET), ("json", _JSON)):
            if path.name.endswith(exts):
                return builder, [str(path)]
        raise DataError(f"{path}: not a parquet or JSON/JSONL file (expected one of {', '.join(_PARQUET + _JSON)})")
    found = {b: sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(exts))
             for b, exts in (("parquet", _PARQUET), ("json", _JSON))}
    if found["parquet"] and found["json"]:
        # Reading both would double-count every message when they hold the same table.
        raise DataError(f"{path}: holds both parquet and JSON files; pass one file or a directory of one format")
    for builder, files in found.items():
        if files:
            return builder, files
    raise DataError(f"{path}: no parquet or JSON/JSONL files in this directory")


def load_oasst(source, *, split: str = "train", cache_dir: str | None = None) -> tuple[datasets.Dataset, str]:
    """The message table and a name for it in error messages.

    `source`: a `datasets.Dataset`; a local parquet/JSON(L) file, a list of them, or a directory; otherwise a
    Hugging Face hub name ("OpenAssistant/oasst1") read with `split`.
    """
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"DatasetDict has no split {split!r} (splits: {', '.join(source)})")
        return source[split], f"in-memory dataset (split {split})"
    if isinstance(source, datasets.Dataset):
        return source, "in-memory dataset"
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        kinds = {_files_of(p)[0] for p in paths}
        if len(kinds) != 1:
            raise DataError(f"{', '.join(map(str, paths))}: mixes parquet and JSON files; pass one format")
        builder, files = kinds.pop(), [f for p in paths for f in _files_of(p)[1]]
    else:
        path = Path(os.fspath(source))
        if path.exists():
            builder, files = _files_of(path)
        elif str(path).endswith(_PARQUET + _JSON) or path.is_absolute() or str(source).startswith("."):
            raise FileNotFoundError(f"{path}: no such file or directory (expected oasst parquet/JSONL files)")
        else:
            log.info("loading %s (split %s) from the Hugging Face hub", source, split)
            return datasets.load_dataset(str(source), split=split, cache_dir=cache_dir), f"{source} (split {split})"
    ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    return ds, ", ".join(files)


def in_eval_split(key: str, eval_fraction: float, split_seed: int) -> bool:
    """Whether `key` (a tree id, a prompt) falls on the eval side: a hash of the key, not a shuffle, so a key's side
    never depends on row order or on which other keys are present (oasst1 and oasst2 put a shared tree on the same
    side)."""
    h = hashlib.sha256(f"{split_seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < eval_fraction


def _rank(x) -> int | None:
    # Rank is int32 in the hub schema but becomes float (NaN for missing) after a trip through pandas.
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return int(x)


def build_oasst_seeds(source, *, num_ift: int | None = 3200, lang: str | None = "en", eval_fraction: float = 0.25,
                      split_seed: int = 0, ift_excludes_eval: bool = True, split: str = "train",
                      cache_dir: str | None = None) -> dict[str, Any]:
    """IFT, EFT-train and RM-eval datasets from an Open Assistant message table.

    Returns {"ift": Dataset(prompt, response, message_tree_id), "eft_train" and "rm_eval":
    Dataset(prompt, responses, ranks, message_tree_id) with responses sorted best first (rank 0 = best),
    "stats": dict of counts}. `ift_excludes_eval` keeps RM-eval prompts out of the SFT data, so Table 4
    numbers are not measured on prompts whose best reply the model was trained on. `lang=None` keeps all.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    ds, where = load_oasst(source, split=split, cache_dir=cache_dir)
    present = list(ds.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise DataError(f"{where}: not an Open Assistant message table: missing column(s) {', '.join(missing)}; "
                        f"columns present: {', '.join(present) or '(none)'} "
                        f"(expected at least {', '.join(REQUIRED_COLUMNS)})")
    rows = ds.select_columns([c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in present]).to_list()
    stats = {"rows": len(rows), "deleted": 0, "failed_review": 0, "first_turn_prompts": 0, "other_lang": 0,
             "prompts": 0, "unranked_replies": 0}
    roots, replies = [], {}
    for r in rows:
        if r["deleted"]:
            stats["deleted"] += 1
            continue
        if r.get("review_result") is False:  # None = not reviewed yet, which oasst still exports
            stats["failed_review"] += 1
            continue
        if r["role"] == "prompter" and r["parent_id"] is None:
            stats["first_turn_prompts"] += 1
            if lang is not None and r["lang"] != lang:
                stats["other_lang"] += 1
                continue
            roots.append(r)
        elif r["role"] == "assistant" and r["parent_id"] is not None:
            replies.setdefault(r["parent_id"], []).append(r)
    stats["prompts"] = len(roots)
    # Broken trees: replies whose parent message is not in the table (a truncated or filtered export) are skipped.
    ids = {r["message_id"] for r in rows}
    stats["orphan_replies"] = sum(len(reps) for parent, reps in replies.items() if parent not in ids)

    ift, eft_train, rm_eval = [], [], []
    stats.update(ift_candidates=0, ift_held_out=0, no_rank0_reply=0, eft_too_few_ranked=0)
    for root in roots:
        ranked = []
        for rep in replies.get(root["message_id"], []):
            rank = _rank(rep["rank"])
            if rank is None:
                stats["unranked_replies"] += 1
            else:
                ranked.append((rank, rep["text"]))
        ranked.sort(key=lambda x: x[0])  # stable: equal ranks keep table order
        tree = root["message_tree_id"]
        in_eval = in_eval_split(tree, eval_fraction, split_seed)
        if ranked and ranked[0][0] == 0:
            # Exactly rank 0: when the rank-0 reply was deleted, rank 1 is not promoted to "best".
            stats["ift_candidates"] += 1
            if in_eval and ift_excludes_eval:
                stats["ift_held_out"] += 1
            elif num_ift is None or len(ift) < num_ift:
                ift.append({"prompt": root["text"], "response": ranked[0][1], "message_tree_id": tree})
        else:
            stats["no_rank0_reply"] += 1
        if len(ranked) < 2:
            stats["eft_too_few_ranked"] += 1
            continue
        (rm_eval if in_eval else eft_train).append({
            "prompt": root["text"], "responses": [t for _, t in ranked], "ranks": [k for k, _ in ranked],
            "message_tree_id": tree})
    stats.update(ift=len(ift), eft_train=len(eft_train), rm_eval=len(rm_eval),
                 eft_train_responses=sum(len(e["responses"]) for e in eft_train),
                 rm_eval_responses=sum(len(e["responses"]) for e in rm_eval))
    if not stats["ift_candidates"]:
        raise DataError(f"{where}: no IFT example: no first-turn prompt has a reply of rank 0 ({stats['prompts']} "
                        f"prompts, {stats['unranked_replies']} unranked replies, {stats['orphan_replies']} replies "
                        f"whose parent is missing); Open Assistant exports without ranks (or with lang!={lang!r} "
                        f"only) cannot seed SFT. Stats: {stats}")
    if num_ift is not None and len(ift) < num_ift:
        log.warning("%s: only %d IFT examples (asked for %d); see stats %s", where, len(ift), num_ift, stats)

    ift_features = datasets.Features({k: datasets.Value("string") for k in ("prompt", "response", "message_tree_id")})
    eft_features = datasets.Features({"prompt": datasets.Value("string"),
                                      "responses": datasets.List(datasets.Value("string")),
                                      "ranks": datasets.List(datasets.Value("int32")),
                                      "message_tree_id": datasets.Value("string")})
    def table(recs, features):  # from_dict, because from_list cannot build an empty dataset with features
        return datasets.Dataset.from_dict({k: [r[k] for r in recs] for k in features}, features=features)

    return {"ift": table(ift, ift_features), "eft_train": table(eft_train, eft_features),
            "rm_eval": table(rm_eval, eft_features), "stats": stats}
