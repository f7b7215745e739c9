"""docs/launch.md's compiled-plan tables: `jaxsr plan --config C --compile --json` for every shipped accelerator
config (the configs/*.yaml that name a `mesh.topology`), each on its own topology, rendered as markdown.

Each config is compiled in its own process (as a user would run it), timed, and its JSON kept with --json-dir, so
the tables can be rendered again from the saved JSON without compiling (--from-json). The header names the commit,
the machine and the date. Needs libtpu (pip install 'jaxsr[tpu]'); no TPU.

  python scripts/plan_tables.py                                   # all accelerator configs, markdown on stdout
  python scripts/plan_tables.py --configs configs/llama3.1_8b.yaml --json-dir /tmp/plans
  python scripts/plan_tables.py --from-json /tmp/plans            # render saved plans again
  python scripts/plan_tables.py --configs configs/paper_llama2_70b.yaml --programs decode   # only some programs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
PROGRAMS = ("sft_step", "dpo_step", "reference", "decode_cast", "reshard", "prefill", "decode")


def accelerator_configs() -> list[Path]:
    """The shipped configs that name the slice they are sized for (tests/test_plan.py checks every config but the
    CPU ones does)."""
    sys.path.insert(0, str(REPO))
    from jaxsr.config import load_config

    return [p for p in sorted((REPO / "configs").glob("*.yaml")) if load_config(p).mesh.topology]


def compile_one(config: Path, json_dir: Path | None, timeout: float, programs: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "jaxsr.cli", "plan", "--config", str(config), "--compile", "--json"]
    cmd += ["--programs", programs] if programs else []
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": config.name, "error": f"not finished within {timeout:.0f} s"}
    wall = time.perf_counter() - t
    if r.returncode not in (0, 3):
        return {"config": config.name, "error": f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"}
    p = json.loads(r.stdout) | {"config": config.name, "exit_code": r.returncode, "wall_seconds": wall,
                                "provenance": provenance()}
    if json_dir is not None:
        json_dir.mkdir(parents=True, exist_ok=True)
        (json_dir / f"{config.stem}.json").write_text(json.dumps(p, indent=1))
    return p


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def table(p: dict) -> str:
    if "error" in p:
        return f"### `configs/{p['config']}`\n\nNo compiled plan: {p['error']}.\n"
    h, ms, dm = p["hand"], p["mesh"], p["decode_mesh"]
    only = "" if set(p["programs"]) == set(PROGRAMS) else f" (only {', '.join(p['programs'])})"
    lines = [f"### `configs/{p['config']}` on {p['topology']}",
             "",
             f"{h['model']['num_params'] / 1e9:.2f} B parameters; {p['devices']} x {p['device_kind']} "
             f"({p['hbm_bytes'] / GiB:.0f} GiB HBM, {p['usable_bytes'] / GiB:.1f} GiB usable at 90%); mesh data "
             f"{ms['data']} x fsdp {ms['fsdp']} x tensor {ms['tensor']}; compute {h['dtype']}, storage "
             f"{h['param_dtype']}, remat {h['remat']}; sampler on its decode layout data {dm['data']} x tensor "
             f"{dm['tensor']} (kv heads x{p['kv_repeat']}), chunk {p['sampler_shape']['rows']} rows x "
             f"({p['sampler_shape']['prompt']} + {p['sampler_shape']['new']}) slots. `jaxsr plan --compile`{only} exit "
             f"code {p['exit_code']} ({'fits' if p['fits'] else 'DOES NOT FIT'}), {p['wall_seconds']:.0f} s in all.",
             "",
             "| program | XLA: arguments + outputs - aliased + temporaries (GiB) | + held outside (GiB) | total (GiB) "
             "| fits | hand plan (GiB) | hand plan error | compile (s) |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for name in PROGRAMS:
        q = p["programs"].get(name)
        if q is None:
            continue
        err = "-" if q["hand_bytes"] is None else f"{(q['hand_bytes'] - q['total_bytes']) / q['total_bytes']:+.0%}"
        lines.append(f"| {name} | {_gib(q['program_bytes'])} | {_gib(q['held_outside'])} | {_gib(q['total_bytes'])} "
                     f"| {'yes' if q['fits'] else '**no**'} | {_gib(q['hand_bytes'])} | {err} | "
                     f"{q['compile_seconds']:.0f} |")
    d, dec = p["programs"].get("dpo_step", {}), p["programs"].get("decode")
    lines.append("")
    if "cost_all_layers" in d:
        c, n = d["cost_all_layers"], p["devices"]
        calls = ", ".join(f"{k} x{v}" for k, v in c["custom_calls"].items()) or "none"
        lines.append(f"- DPO step FLOPs per chip (XLA's, from 1- and 2-layer variants without windowed einsums, "
                     f"extrapolated; loops left: {c['while_loops']}; custom calls it does not cost: {calls}): "
                     f"**{c['flops'] / 1e12:.1f} TFLOP**; jaxsr's step counted by hand (causal blocks, remat "
                     f"{h['remat']}): {d['executed_flops'] / n / 1e12:.1f} (XLA / hand "
                     f"{c['flops'] * n / d['executed_flops']:.2f}); model FLOPs (6 N tokens + attention): "
                     f"{d['model_flops'] / n / 1e12:.1f} (XLA / model {c['flops'] * n / d['model_flops']:.2f})")
        if d["mfu_estimate"] is None:
            lines.append(f"- DPO step MFU from XLA's time: n/a (XLA gave {c['optimal_seconds']:.0f} s: a negative "
                         f"time means it could not cost some ops, such as the custom calls above)")
        else:
            lines.append(f"- DPO step MFU from XLA's time: **{d['mfu_estimate']:.1%}** = {d['model_flops'] / 1e12:.1f} "
                         f"model TFLOP / {n} chips / {c['optimal_seconds'] * 1e3:.0f} ms / "
                         f"{p['peak_flops'] / 1e12:.0f} TFLOP/s")
        lines.append(f"- DPO step MFU at a roofline (an upper bound: the longest of the model's or XLA's FLOPs at "
                     f"peak and the HBM traffic, {c['hbm_bytes'] / 1e9:.0f} GB per chip (XLA's bytes accessed, every "
                     f"memory: {c['bytes_accessed'] / 1e9:.0f} GB), at {p['hbm_bandwidth'] / 1e9:.0f} GB/s; no "
                     f"communication): **{d['mfu_roofline_bound']:.1%}**")
    if dec is not None:
        coll = dec["loop_collectives"]
        lines.append(f"- decode step per chip: weights {dec['weights_bytes'] / GiB:.2f} + KV cache "
                     f"{dec['kv_cache_bytes'] / GiB:.2f} GiB; HBM reads {dec['hbm_read_bytes'] / GiB:.2f} GiB "
                     f"(**{dec['hbm_read_ratio']:.2f}x**), reads + writes {dec['hbm_traffic_ratio']:.2f}x; XLA's bytes "
                     f"accessed {dec['xla_bytes_ratio']:.2f}x; collectives in the loop body: "
                     + ", ".join(f"{k} {coll[k]['count']} ({coll[k]['bytes'] / 2**20:.1f} MiB)" for k in
                                 ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
                                 if coll[k]["count"])
                     + f"; weight-sized all-gathers: {dec['weight_sized_all_gathers']}")
    return "\n".join(lines) + "\n"


def provenance() -> dict:
    """The commit, machine and date a plan is made on (kept in its JSON, so --from-json renders the same header)."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain",
                                                                                         "--untracked-files=no") else "")
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    try:
        from importlib.metadata import version

        libtpu = version("libtpu")
    except Exception:  # noqa: BLE001
        libtpu = "?"
    return {"commit": commit, "machine": f"{platform.node()} ({os.cpu_count()} x {cpu or platform.processor()})",
            "date": datetime.date.today().isoformat(), "libtpu": libtpu}


def header(plans: list[dict]) -> str:
    made = sorted({json.dumps(p["provenance"], sort_keys=True) for p in plans if "provenance" in p})
    made = [json.loads(m) for m in made] or [provenance()]
    where = "; ".join(f"commit {m['commit']} on {m['machine']}, {m['date']}, libtpu {m['libtpu']}" for m in made)
    jax_v = next((p["jax"] for p in plans if "jax" in p), "?")
    return (f"Made by `python scripts/plan_tables.py` at {where}, jax {jax_v}. Memory is XLA's memory analysis per "
            f"device; \"held outside\" is what the run keeps loaded beside the program (M_t's parameters and their "
            f"compute copy); hand plan error = (`jaxsr plan`'s peak of that phase - compiled total) / compiled total. "
            f"Compile times are of that host.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", type=Path, help="default: every shipped config with a mesh.topology")
    ap.add_argument("--json-dir", type=Path, help="keep each config's `jaxsr plan --compile --json` output here")
    ap.add_argument("--from-json", type=Path, help="render the JSON files of a --json-dir instead of compiling")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per config (default 3600)")
    ap.add_argument("--programs", help="compile only these programs (jaxsr plan --programs), e.g. decode")
    args = ap.parse_args(argv)
    if args.from_json:
        plans = [json.loads(f.read_text()) for f in sorted(args.from_json.glob("*.json"))]
    else:
        plans = []
        for config in args.configs or accelerator_configs():
            print(f"compiling {config} ...", file=sys.stderr, flush=True)
            plans.append(compile_one(config.resolve(), args.json_dir, args.timeout, args.programs))
            print(f"  {plans[-1].get('wall_seconds', 0):.0f} s {plans[-1].get('error', '')}", file=sys.stderr)
    print(header(plans))
    print("\n".join(table(p) for p in plans))
    return 0 if all(p.get("fits") for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
