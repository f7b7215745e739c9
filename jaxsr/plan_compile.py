"""`jaxsr plan --compile --topology T`: an iteration's programs compiled ahead of time for a TPU topology.

No TPU is needed: libtpu (pip install jaxsr[tpu]) describes the topology's chips as abstract devices, the mesh is
laid out over them by the run's own `sharding.device_grid`, and XLA's TPU compiler partitions, schedules and
assigns memory for the programs a pod would run, at their worst-case shapes: the SFT and DPO steps, the reference
log-probs forward, and the sampler's prefill and decode. Per program: XLA's per-device memory (arguments,
outputs, temporaries) plus what the run holds outside it, its FLOPs, bytes accessed and time estimate; derived: the
DPO step's model-FLOPs utilisation, the decode step's bytes against weights + KV cache, and the collectives inside
the decode loop. The hand planner (jaxsr.plan) stays the fast path and is printed beside each program.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
import re
import time

from .plan import EXIT_DOES_NOT_FIT, GiB, USABLE_FRACTION, mesh_sizes, param_elements_per_device, plan_memory

# chip generation -> (jax topology prefix, HBM GiB per chip, peak bfloat16 FLOP/s per chip, TensorCores counted by
# the Cloud TPU name's suffix per chip). Public Cloud TPU figures.
CHIPS = {"v5e": ("v5e", 16, 197e12, 1), "v5p": ("v5p", 95, 459e12, 2), "v6e": ("v6e", 32, 918e12, 1)}
# Chips -> the physical grid jax.experimental.topologies knows (2-D for the lite chips, 3-D for v5p).
_GRIDS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


class CompileUnavailable(RuntimeError):
    """libtpu is not installed, so no TPU topology can be described on this host."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (or several) to compile for."""

    name: str          # as given: v5p-128, v5e:2x2, 2xv5p-64
    chip: str          # v5e | v5p | v6e
    grid: str          # jax topology name of one slice, e.g. "v5p:4x4x4"
    num_slices: int

    @property
    def chips(self) -> int:
        return self.num_slices * math.prod(int(x) for x in self.grid.split(":")[1].split("x"))

    @property
    def hbm_bytes(self) -> int:
        return CHIPS[self.chip][1] * GiB

    @property
    def peak_flops(self) -> float:
        return CHIPS[self.chip][2]


def parse_topology(name: str) -> Topology:
    """`v5e-8`, `v5p-128` (Cloud TPU names: v5p's suffix counts TensorCores, 2 per chip), `v6e-16`, a jax topology
    name (`v5e:2x2`, `v5p:4x4x4`), either prefixed by `Nx` for N slices (`2xv5p-64`)."""
    m = re.fullmatch(r"(?:(\d+)x)?(v5e|v5p|v6e)(?:-(\d+)|:(\d+x\d+(?:x\d+)?))", name.strip().lower())
    if not m:
        raise ValueError(f"--topology {name!r}: expected e.g. v5e-8, v5p-128, v6e-16, v5e:2x2 or 2xv5p-64 "
                         f"(chips {', '.join(CHIPS)})")
    slices, chip, count, grid = int(m[1] or 1), m[2], m[3], m[4]
    if count is not None:
        chips, per_chip = divmod(int(count), CHIPS[chip][3])
        grids = _GRIDS_3D if chip == "v5p" else _GRIDS_2D
        if per_chip or chips not in grids:
            raise ValueError(f"--topology {name!r}: {chip}-{count} is not a slice jaxsr knows; "
                             f"known: {', '.join(f'{chip}-{n * CHIPS[chip][3]}' for n in grids)}")
        grid = grids[chips]
    if slices < 1:
        raise ValueError(f"--topology {name!r}: the number of slices must be at least 1")
    return Topology(name, chip, f"{chip}:{grid}", slices)


def abstract_devices(topo: Topology) -> list:
    """The topology's chips as abstract devices (no TPU needed; libtpu must be importable)."""
    if importlib.util.find_spec("libtpu") is None:
        raise CompileUnavailable("jaxsr plan --compile needs libtpu to compile for TPU topologies on this host: "
                                 "pip install 'jaxsr[tpu]' (or: pip install -c constraints.txt -e '.[tpu]')")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # tests and a running job may hold libtpu too
    from jax.experimental import topologies

    kw = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topo.grid, **kw).devices)


# --- the programs --------------------------------------------------------------------------------------------

def _sds(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _worst_items(section, kind: str):
    """Synthetic tokenised items at the longest shapes a run can feed: one prompt token, responses filling the row."""
    import numpy as np

    from . import data as data_lib

    one, n = np.ones(1, np.int32), section.max_length - 1
    if kind == "sft":
        return [data_lib.Example(one, np.ones(n, np.int32), i) for i in range(section.batch_size)]
    return [data_lib.Pair(one, np.ones(n, np.int32), np.ones(n, np.int32), i, (0.0, 0.0))
            for i in range(section.batch_size)]


def _step_program(kind: str, model_cfg, run_cfg, mesh, *, num_layers=None, micro_batch_only=False):
    """(jitted train step, abstract arguments) of the `kind` ("sft" | "dpo") step at its worst-case batch;
    num_layers (unrolled) and micro_batch_only give the cost variants of `_extrapolated_cost`."""
    import jax

    from . import train
    from .model.sharding import batch_multiple, batch_sharding, replicated
    from .objectives import dpo_objective, sft_objective
    from .policy import DTYPES, param_shardings
    from .train_state import abstract_state

    section = getattr(run_cfg, kind)
    cfg, unroll = model_cfg, None
    if num_layers is not None:
        cfg, unroll = dataclasses.replace(model_cfg, num_layers=num_layers), True
    if micro_batch_only:  # one micro-batch of the real size
        section = dataclasses.replace(section, batch_size=section.batch_size // section.grad_accum, grad_accum=1)
    objective = {"sft": sft_objective, "dpo": dpo_objective}[kind](section)
    dtype, pdtype = DTYPES[run_cfg.model.dtype], DTYPES[run_cfg.model.param_dtype]
    tx, schedule = train.make_optimizer(section, 1000)
    step, _, state_sh = train.make_step_fns(objective, cfg, mesh, tx, schedule, dtype=dtype, remat=run_cfg.model.remat,
                                            param_dtype=pdtype, unroll=unroll, attention=run_cfg.model.attention)
    host = objective.batches(_worst_items(section, kind), multiple=batch_multiple(mesh), pad_id=0)(
        [[i] for i in range(section.batch_size)])
    b_sh = batch_sharding(mesh, micro_axis=True)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh) for k, v in host.items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated(mesh))
    ref = None
    if objective.reference == "on_the_fly":
        ref = _sds(abstract_state(cfg, tx, pdtype, state_sh)["params"], param_shardings(cfg, mesh))
    return step, (abstract_state(cfg, tx, pdtype, state_sh), batch, rng, ref)


def _reference_program(model_cfg, run_cfg, mesh):
    """The reference log-probs forward (train.reference_logps) on one batch of the loop's size, compute dtype."""
    import jax

    from . import train
    from .model import decoder
    from .model.sharding import DEFAULT_RULES, batch_multiple, batch_sharding
    from .policy import DTYPES, param_shardings
    from .data import pair_batch

    sec = run_cfg.dpo
    size = inspect.signature(train.reference_logps).parameters["batch_size"].default  # as the pairs stage calls it
    fn = train._reference_fn(model_cfg, mesh, run_cfg.model.dtype, DEFAULT_RULES, run_cfg.model.attention)
    host = pair_batch(_worst_items(dataclasses.replace(sec, batch_size=size), "dpo"), [[i] for i in range(size)],
                      batch_size=size, multiple=batch_multiple(mesh), max_length=sec.max_length,
                      shared_prompt=sec.shared_prompt)
    keys = ("ids", "positions", "mask", "target_pos", "target_ids", "target_mask") + (("branch",) * sec.shared_prompt)
    rows = {k: jax.ShapeDtypeStruct(host[k][0].shape, host[k][0].dtype, sharding=batch_sharding(mesh)) for k in keys}
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, DTYPES[run_cfg.model.dtype], sharding=sh),
                          decoder.param_shapes(model_cfg), param_shardings(model_cfg, mesh),
                          is_leaf=lambda x: isinstance(x, tuple))
    return fn, (params, rows)


def sampler_shape(run_cfg, mesh) -> tuple[int, int, int]:
    """(rows, prompt bucket, new-token bucket) of the sampler's largest chunk, as jaxsr.plan counts its KV cache."""
    from .data import bucket
    from .model.sharding import batch_multiple

    multiple = batch_multiple(mesh)
    new = max(run_cfg.sample.max_new_tokens, run_cfg.judge.max_new_tokens, run_cfg.prompts.max_new_tokens)
    return (-(-run_cfg.sample.max_batch_rows // multiple) * multiple,
            bucket(max(run_cfg.sft.max_length, run_cfg.dpo.max_length), fine=True), bucket(new, fine=True))


# --- what XLA says -------------------------------------------------------------------------------------------

def _analysis(compiled) -> dict:
    ma, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    return {"memory": mem, "program_bytes": mem["argument"] + mem["output"] - mem["alias"] + mem["temp"],
            "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "optimal_seconds": float(cost.get("optimal_seconds", float("nan")))}


def _computations(hlo: str) -> dict[str, list[str]]:
    """Optimized HLO text -> {computation name: its instruction lines}."""
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m[1]
            comps[name] = []
        elif name is not None and line.strip() == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _bytes_of(type_str: str) -> int:
    sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
    total = 0
    for dt, dims in re.findall(r"\b(f32|s32|u32|bf16|f16|s8|u8|pred|f64|s64)\[([\d,]*)\]", type_str):
        total += sizes[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def loop_collectives(hlo: str) -> dict:
    """Collectives reachable from the bodies of the entry computation's while loops (the decode loop), by kind,
    with the bytes their results hold per execution of the body (async `-start` ops counted once)."""
    comps = _computations(hlo)
    entry = next((n for n in comps if re.search(rf"^ENTRY %?{re.escape(n)}\b", hlo, re.M)), None)
    bodies = [b for line in comps.get(entry, []) for b in re.findall(r"body=%?([\w.\-]+)", line)]
    seen, stack, out = set(), list(bodies), {k: {"count": 0, "bytes": 0} for k in _COLLECTIVES}
    while stack:
        c = stack.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            stack += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                stack += [x.strip().lstrip("%") for x in group.split(",")]
            m = re.search(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
                          r"(-start)?\(", line)
            if m:
                out[m[2]]["count"] += 1
                # An async -start returns (operands, result): its last array is what the collective makes.
                shapes = re.findall(r"\b(?:f32|s32|u32|bf16|f16|s8|u8|pred|f64|s64)\[[\d,]*\]", m[1])
                out[m[2]]["bytes"] += _bytes_of(shapes[-1] if m[3] and shapes else m[1])
    return {"while_loops": len(bodies), **out}


def _extrapolated_cost(kind: str, model_cfg, run_cfg, mesh) -> dict:
    """FLOPs, bytes and time of the whole step, which XLA does not give: it counts a scan / while body once whatever
    its trip count (the layer scan, the micro-batch scan). Two unrolled variants of one micro-batch, with 1 and 2
    layers, give cost(L) = c1 + (c2 - c1) * (L - 1); times grad_accum micro-batches (which counts the AdamW update
    grad_accum times: a slight overestimate of the step)."""
    c = []
    for layers in (1, 2):
        fn, args = _step_program(kind, model_cfg, run_cfg, mesh, num_layers=layers, micro_batch_only=True)
        c.append(_analysis(fn.lower(*args).compile()))
    L, A = model_cfg.num_layers, getattr(run_cfg, kind).grad_accum
    return {k: A * (c[0][k] + (c[1][k] - c[0][k]) * (L - 1)) for k in ("flops", "bytes_accessed", "optimal_seconds")}


def dpo_model_flops(m, sec) -> float:
    """Model FLOPs of one DPO step (PaLM's MFU convention: no rematerialisation, padding or reference forward when
    precomputed): 6 x matmul parameters x tokens + 6 x L x H x E x T per token (causal attention, fwd + bwd) +
    6 x V x D per scored token (the LM head only runs at response positions)."""
    T = 2 * sec.max_length if sec.shared_prompt else sec.max_length
    rows = sec.batch_size * (1 if sec.shared_prompt else 2)
    tokens, scored = rows * T, 2 * sec.batch_size * sec.max_length
    body = m.num_params - m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    attn = 6 * m.num_layers * m.num_heads * m.head_dim * T
    fwd_bwd = 6 * body * tokens + attn * tokens + 6 * m.vocab_size * m.hidden_size * scored
    if sec.reference == "on_the_fly":
        fwd_bwd += (2 * body * tokens + attn / 3 * tokens + 2 * m.vocab_size * m.hidden_size * scored)
    return float(fwd_bwd)


# --- the plan ------------------------------------------------------------------------------------------------

PROGRAMS = ("sft_step", "dpo_step", "reference", "prefill", "decode")


def compile_plan(model_cfg, run_cfg, topology: str, *, devices=None, programs: tuple[str, ...] = PROGRAMS,
                 derived: bool = True) -> dict:
    """Compiles the programs of an iteration (default: all) for `topology`; returns per-program numbers and whether
    all fit. `derived`: also the DPO step's cost over all layers (two more compiles) and its MFU estimate."""
    wanted = programs
    import jax

    from . import sampler, stop
    from .model.sharding import DEFAULT_RULES, make_mesh
    from .next_token import sampling_mode
    import numpy as np

    from .policy import DTYPES

    topo = parse_topology(topology)
    devices = abstract_devices(topo) if devices is None else devices
    sizes = mesh_sizes(run_cfg.mesh, len(devices), model_cfg.hidden_size)
    mesh = make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
    hand = plan_memory(model_cfg, run_cfg, devices=len(devices), accelerator=f"tpu-{topo.chip}")
    hb = hand["bytes"]
    usable = int(topo.hbm_bytes * USABLE_FRACTION)
    # Held by the run outside each program (exact, from the hand planner's parameter rows): M_t's parameters and
    # their compute copy stay loaded while DPO trains a copy of them and while the sampler runs on a per-layer copy.
    held = {"sft_step": hb["params"] + hb["compute_params"], "dpo_step": hb["params"] + hb["compute_params"],
            "reference": hb["params"] if hb["compute_params"] else 0,
            "prefill": hb["params"] + hb["compute_params"], "decode": hb["params"] + hb["compute_params"]}
    hand_peak = {"sft_step": hand["peaks"]["sft"], "dpo_step": hand["peaks"]["dpo"], "reference": None,
                 "prefill": hand["peaks"]["sample"], "decode": hand["peaks"]["sample"]}
    programs, compiled = {}, {}
    for kind in ("sft", "dpo"):
        name = f"{kind}_step"
        if name not in wanted:
            continue
        t = time.perf_counter()
        fn, args = _step_program(kind, model_cfg, run_cfg, mesh)
        compiled[name] = fn.lower(*args).compile()
        programs[name] = {"compile_seconds": time.perf_counter() - t}
    if "reference" in wanted:
        t = time.perf_counter()
        fn, args = _reference_program(model_cfg, run_cfg, mesh)
        compiled["reference"] = fn.lower(*args).compile()
        programs["reference"] = {"compile_seconds": time.perf_counter() - t}
    B, P, N = sampler_shape(run_cfg, mesh)
    if {"prefill", "decode"} & set(wanted):
        s, j = run_cfg.sample, run_cfg.judge
        # The judge's stop automaton (selfreward.judge), a replicated [vocab, states] table, when it stops at the score.
        kind = ("score" if j.mode == "sampled" else "score_marker") if j.stop_at_score else None
        stop_shape = (model_cfg.vocab_size, stop.STATES[kind]) if kind else (1, 2)
        t = time.perf_counter()
        compiled["prefill"], compiled["decode"] = sampler.programs(
            model_cfg, mesh, run_cfg.model.dtype, DEFAULT_RULES,
            sampling_mode(s.temperature, s.top_p, s.top_k, model_cfg.vocab_size), B, P, N, sampler.EOS_SLOTS,
            stop_shape, run_cfg.model.attention)
        programs["prefill"] = {"compile_seconds": time.perf_counter() - t}
        programs["decode"] = {"compile_seconds": 0.0}  # compiled with the prefill (sampler.programs)
    for name, c in compiled.items():
        a = _analysis(c)
        total = a["program_bytes"] + held[name]
        programs[name] |= a | {"held_outside": held[name], "total_bytes": total, "fits": total <= usable,
                               "hand_bytes": hand_peak[name]}
    # Derived figures.
    if derived and "dpo_step" in programs:
        dpo = programs["dpo_step"]
        dpo["cost_all_layers"] = _extrapolated_cost("dpo", model_cfg, run_cfg, mesh)
        dpo["model_flops"] = dpo_model_flops(model_cfg, run_cfg.dpo)
        secs = dpo["cost_all_layers"]["optimal_seconds"]
        # XLA gives a negative time when it cannot cost an op (about -1 s each: cross-slice collectives, custom calls).
        dpo["mfu_estimate"] = dpo["model_flops"] / len(devices) / topo.peak_flops / secs if secs > 0 else None
    if "decode" in programs:
        b = np.dtype(DTYPES[run_cfg.model.dtype]).itemsize
        dp, t_ = sizes["data"] * sizes["fsdp"], sizes["tensor"]
        weights = param_elements_per_device(model_cfg, sizes)[0] * b
        kv = 2 * model_cfg.num_layers * (B // dp) * (P + N) * (model_cfg.num_kv_heads // t_) * model_cfg.head_dim * b
        dec = programs["decode"]
        dec |= {"weights_bytes": weights, "kv_cache_bytes": kv,
                "bytes_per_step_ratio": dec["bytes_accessed"] / (weights + kv),
                "loop_collectives": loop_collectives(compiled["decode"].as_text())}
    fits = all(p["fits"] for p in programs.values())
    return {"topology": topo.name, "jax_topology": topo.grid, "num_slices": topo.num_slices, "chip": topo.chip,
            "devices": len(devices), "device_kind": devices[0].device_kind, "hbm_bytes": topo.hbm_bytes,
            "peak_flops": topo.peak_flops,
            "usable_bytes": usable, "mesh": sizes, "sampler_shape": {"rows": B, "prompt": P, "new": N},
            "programs": programs, "fits": fits, "hand": hand, "jax": jax.__version__}


def format_compile_plan(p: dict, source: str) -> str:
    big = max(q["total_bytes"] for q in p["programs"].values()) >= GiB
    unit, div = ("GiB", GiB) if big else ("MiB", 2**20)
    g = lambda x: f"{'-':>9}" if x is None else f"{x / div:9.2f}"  # noqa: E731
    ms = lambda x: f"{x * 1e3:8.2f}" if x >= 0 else f"{'n/a':>8}"  # noqa: E731
    m_ = p["mesh"]
    lines = [f"model     {source}: {p['hand']['model']['num_params']:,} parameters",
             f"topology  {p['topology']} ({p['jax_topology']} x {p['num_slices']} slice(s)): {p['devices']} x "
             f"{p['device_kind']}, {p['hbm_bytes'] / GiB:.0f} GiB HBM each, {p['usable_bytes'] / GiB:.1f} GiB usable "
             f"at {USABLE_FRACTION:.0%}",
             f"mesh      data={m_['data']} fsdp={m_['fsdp']} tensor={m_['tensor']}; compute {p['hand']['dtype']}, "
             f"storage {p['hand']['param_dtype']}; remat {p['hand']['remat']}; sampler chunk "
             f"{p['sampler_shape']['rows']} rows x ({p['sampler_shape']['prompt']} + {p['sampler_shape']['new']}) slots",
             "", f"per device ({unit})  arguments   outputs   aliased temporary  held-out     total  hand-plan  fits"
             f"    TFLOP  GB-accessed   xla-ms  compile-s"]
    for name, q in p["programs"].items():
        m = q["memory"]
        lines.append(f"{name:<15}{g(m['argument'])} {g(m['output'])} {g(m['alias'])} {g(m['temp'])} "
                     f"{g(q['held_outside'])} {g(q['total_bytes'])}  {g(q['hand_bytes'])} {'yes' if q['fits'] else 'NO':>5}"
                     f" {q['flops'] / 1e12:8.3f} {q['bytes_accessed'] / 1e9:12.3f} {ms(q['optimal_seconds'])}"
                     f" {q['compile_seconds']:10.1f}")
    lines += ["", "total = arguments + outputs - aliased + temporary (XLA's memory analysis) + held-out (M_t's parameters"
              " and compute copy, which the run keeps outside the program); hand-plan: jaxsr plan's peak of that phase.",
              "TFLOP, GB-accessed, xla-ms: XLA's cost analysis, which counts a scan / while body once (n/a: XLA gave a "
              "negative time, i.e. it could not cost some op)."]
    d, dec = p["programs"].get("dpo_step", {}), p["programs"].get("decode")
    if "cost_all_layers" in d:
        c = d["cost_all_layers"]
        mfu = "n/a" if d["mfu_estimate"] is None else f"{d['mfu_estimate']:.1%}"
        lines += [f"DPO step over all layers and micro-batches (1- and 2-layer unrolled variants, extrapolated): "
                  f"{c['flops'] / 1e12:.3f} TFLOP, {c['bytes_accessed'] / 1e9:.2f} GB, {ms(c['optimal_seconds']).strip()} ms"
                  f" per device", f"DPO step MFU estimate: {d['model_flops'] / 1e12:.2f} model TFLOP / {p['devices']} "
                  f"chips / {ms(c['optimal_seconds']).strip()} ms at {p['peak_flops'] / 1e12:.0f} TFLOP/s = {mfu}"]
    if dec is not None:
        lines += [f"decode step: {dec['bytes_accessed'] / GiB:.4f} GiB accessed per device vs weights "
                  f"{dec['weights_bytes'] / GiB:.4f} + KV cache {dec['kv_cache_bytes'] / GiB:.4f} GiB: "
                  f"{dec['bytes_per_step_ratio']:.2f}x",
                  "decode loop body collectives: " + ", ".join(
                      f"{k} {v['count']} ({v['bytes'] / 2**20:.2f} MiB)" for k, v in dec["loop_collectives"].items()
                      if k != "while_loops")]
    bad = [f"{n} needs {q['total_bytes'] / GiB:.2f} GiB per device" for n, q in p["programs"].items() if not q["fits"]]
    lines.append(f"\nverdict: {'FITS' if p['fits'] else 'DOES NOT FIT'}"
                 + (f" ({'; '.join(bad)}; {p['usable_bytes'] / GiB:.1f} GiB usable on {p['chip']})" if bad else ""))
    return "\n".join(lines)


__all__ = ["CompileUnavailable", "EXIT_DOES_NOT_FIT", "PROGRAMS", "Topology", "abstract_devices", "compile_plan",
           "format_compile_plan", "loop_collectives", "parse_topology"]
