"""`jaxsr plan --compile --topology T`: an iteration's programs compiled ahead of time for a TPU topology.

No TPU is needed: libtpu (pip install jaxsr[tpu]) describes the topology's chips as abstract devices, the mesh is
laid out over them by the run's own `sharding.device_grid`, and XLA's TPU compiler partitions, schedules and
assigns memory for the programs a pod would run, at their worst-case shapes: the SFT and DPO steps and the
reference log-probs forward on the training layout; the move of M_t's weights to the sampler's decode layout
(`decode_layout.build`: a cast on the training layout, then the reshard) and the sampler's prefill and decode on
that layout. Per program: XLA's per-device memory (arguments, outputs, temporaries) plus what the run holds outside
it, its FLOPs, bytes accessed and time estimate; derived: the DPO step's FLOPs (XLA's, corrected for the loops it
counts once, beside the model's) and model-FLOPs utilisation, the decode step's bytes against its weights + KV
cache, and the collectives inside the decode loop. The hand planner (jaxsr.plan) stays the fast path and is printed
beside each program.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
import re
import time

from .hlo_text import custom_calls, hbm_bytes, loop_collectives, loop_hbm_bytes, while_loops
from .plan import EXIT_DOES_NOT_FIT, GiB, USABLE_FRACTION, mesh_sizes, plan_memory

# chip generation -> (jax topology prefix, HBM GiB per chip, peak bfloat16 FLOP/s per chip, TensorCores counted by
# the Cloud TPU name's suffix per chip, HBM bytes/s per chip). Public Cloud TPU figures.
CHIPS = {"v5e": ("v5e", 16, 197e12, 1, 819e9), "v5p": ("v5p", 95, 459e12, 2, 2765e9),
         "v6e": ("v6e", 32, 918e12, 1, 1640e9)}
# Chips -> the physical grid jax.experimental.topologies knows (2-D for the lite chips, 3-D for v5p).
_GRIDS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
# XLA:TPU turns an FSDP all-gather + matmul (and matmul + reduce-scatter) into a "windowed einsum" while loop of
# partial matmuls and collective-permutes, whose body its cost analysis counts once: the DPO step's cost variants
# are compiled without it, i.e. with the all-gathers and matmuls as separate ops (the same FLOPs and HBM bytes).
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


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

    @property
    def hbm_bandwidth(self) -> float:
        return CHIPS[self.chip][4]


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
    """(rows, prompt bucket, new-token bucket) of the sampler's largest chunk on `mesh` (the decode layout's), as
    jaxsr.plan counts its KV cache."""
    from .data import bucket
    from .model.sharding import batch_multiple

    multiple = batch_multiple(mesh)
    new = max(run_cfg.sample.max_new_tokens, run_cfg.judge.max_new_tokens, run_cfg.prompts.max_new_tokens)
    return (-(-run_cfg.sample.max_batch_rows // multiple) * multiple,
            bucket(max(run_cfg.sft.max_length, run_cfg.dpo.max_length), fine=True), bucket(new, fine=True))


def _to_decode_programs(model_cfg, run_cfg, mesh, target):
    """{"decode_cast": (fn, args), "reshard": (fn, args)}: `decode_layout.build` from the training layout on `mesh`
    to `target` = decode_layout.decode_target(...): its jitted cast (the same `prepare_fn`), then the program
    `jax.device_put` runs to move the cast copy to the decode shardings (`device_put_shardings`; built per array,
    compiled here for all of them at once)."""
    import jax

    from .decode_layout import device_put_shardings, layer_param_shardings, prepare_fn
    from .model import decoder
    from .model.sharding import DEFAULT_RULES
    from .policy import DTYPES, param_shardings

    d_mesh, d_rules, dcfg, repeat = target
    dtype = run_cfg.model.dtype
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, DTYPES[run_cfg.model.param_dtype], sharding=sh),
                          decoder.param_shapes(model_cfg), param_shardings(model_cfg, mesh),
                          is_leaf=lambda x: isinstance(x, tuple))
    cast = prepare_fn(model_cfg, mesh, DEFAULT_RULES, repeat, dtype)
    prepared = jax.eval_shape(cast, params)
    src, dst = layer_param_shardings(dcfg, mesh, DEFAULT_RULES), layer_param_shardings(dcfg, d_mesh, d_rules)
    moved_in = device_put_shardings(src, dst)
    move = jax.jit(lambda tree: tree, in_shardings=(moved_in,), out_shardings=dst)
    return {"decode_cast": (cast, (params,)), "reshard": (move, (_sds(prepared, moved_in),))}


# --- what XLA says -------------------------------------------------------------------------------------------

def _analysis(compiled) -> dict:
    ma, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    hlo = compiled.as_text()
    return {"memory": mem, "program_bytes": mem["argument"] + mem["output"] - mem["alias"] + mem["temp"],
            "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
            "hbm_bytes": sum(hbm_bytes(hlo).values()), "while_loops": while_loops(hlo)["count"],
            "custom_calls": custom_calls(hlo)}


def _extrapolated_cost(kind: str, model_cfg, run_cfg, mesh) -> dict:
    """FLOPs, bytes and time of the whole step, which XLA does not give for the real program: its cost analysis
    counts a while body once whatever its trip count (the layer scan, the micro-batch scan, and XLA:TPU's
    windowed-einsum loops of FSDP matmuls). Two variants of one micro-batch with the layers unrolled, 1 and 2 of
    them, compiled without windowed einsums (`NO_WINDOWED_EINSUM`), have no loop left (`while_loops` says if one
    is): cost(L) = c1 + (c2 - c1) * (L - 1), times grad_accum micro-batches (which counts the AdamW update
    grad_accum times: a slight overestimate of the step)."""
    options = NO_WINDOWED_EINSUM if mesh.devices.flat[0].platform == "tpu" else {}  # XLA:CPU has no such loops
    c = []
    for layers in (1, 2):
        fn, args = _step_program(kind, model_cfg, run_cfg, mesh, num_layers=layers, micro_batch_only=True)
        c.append(_analysis(fn.lower(*args).compile(compiler_options=options)))
    return _extrapolate(c, model_cfg.num_layers, getattr(run_cfg, kind).grad_accum)


def _extrapolate(c: list[dict], layers: int, accum: int) -> dict:
    """The step's cost from the 1- and 2-layer variants' analyses `c`: cost(L) = c1 + (c2 - c1) * (L - 1), times
    `accum` micro-batches. XLA gives a negative time for a program with an op it cannot cost (custom calls, such as a
    multi-slice program's cross-slice `SliceId` and `ZeroCrop`); the difference of two such variants may still be
    positive (the 70B's on 2xv5p-64: -1.96 and -1.93 s, extrapolated to +0.18 s, an MFU of 542%), so when either
    variant's time is not positive the step's is the lower variant's: negative, i.e. no MFU from XLA's time."""
    out = {k: accum * (c[0][k] + (c[1][k] - c[0][k]) * (layers - 1))
           for k in ("flops", "bytes_accessed", "hbm_bytes", "optimal_seconds")}
    seconds = [x["optimal_seconds"] for x in c]
    if min(seconds) <= 0:
        out["optimal_seconds"] = min(seconds)
    return out | {"variant_seconds": seconds, "while_loops": max(x["while_loops"] for x in c),
                  "custom_calls": c[1]["custom_calls"]}


def _dpo_shape(m, sec):
    """(rows, tokens per row, scored tokens, matmul parameters outside the vocabulary matrices) of a DPO step."""
    T = 2 * sec.max_length if sec.shared_prompt else sec.max_length
    rows = sec.batch_size * (1 if sec.shared_prompt else 2)
    body = m.num_params - m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return rows, T, 2 * sec.batch_size * sec.max_length, body


def dpo_model_flops(m, sec) -> float:
    """Model FLOPs of one DPO step (PaLM's MFU convention: no rematerialisation, padding or reference forward when
    precomputed): 6 x matmul parameters x tokens + 6 x L x H x E x T per token (causal attention, fwd + bwd) +
    6 x V x D per scored token (the LM head only runs at response positions)."""
    rows, T, scored, body = _dpo_shape(m, sec)
    tokens = rows * T
    attn = 6 * m.num_layers * m.num_heads * m.head_dim * T
    fwd_bwd = 6 * body * tokens + attn * tokens + 6 * m.vocab_size * m.hidden_size * scored
    if sec.reference == "on_the_fly":
        fwd_bwd += (2 * body * tokens + attn / 3 * tokens + 2 * m.vocab_size * m.hidden_size * scored)
    return float(fwd_bwd)


def dpo_executed_flops(m, sec, remat: str) -> float:
    """The matmul FLOPs jaxsr's DPO step executes, by the same counts as `dpo_model_flops` plus what it leaves out:
    attention over causal query blocks (`decoder.query_blocks`: more than half of the T x T scores) and the
    recomputation of rematerialised layers (remat=full: the layer's forward again; dots: the attention matmuls,
    whose batch dimensions keep them out of the saved dots)."""
    from .model.decoder import query_blocks

    rows, T, scored, body = _dpo_shape(m, sec)
    pairs = sum((j - i) * j for i, j in query_blocks(T))  # (query, key) pairs scored per row and layer
    attn_fwd = 4 * m.num_layers * m.num_heads * m.head_dim * pairs * rows  # q.k and p.v
    fwd = 2 * body * rows * T + attn_fwd + 2 * m.vocab_size * m.hidden_size * scored
    recompute = {"none": 0, "dots": attn_fwd, "full": 2 * body * rows * T + attn_fwd}[remat]
    return float(3 * fwd + recompute + (fwd if sec.reference == "on_the_fly" else 0))


# --- the plan ------------------------------------------------------------------------------------------------

PROGRAMS = ("sft_step", "dpo_step", "reference", "decode_cast", "reshard", "prefill", "decode")


def _shard_bytes(tree) -> int:
    """Per-device bytes of abstract arrays on their shardings (every device holds the same shard size)."""
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compile_plan(model_cfg, run_cfg, topology: str, *, devices=None, programs: tuple[str, ...] = PROGRAMS,
                 derived: bool = True) -> dict:
    """Compiles the programs of an iteration (default: all, `PROGRAMS`) for `topology`; returns per-program numbers
    and whether all fit. `derived`: also the DPO step's cost over all layers (two more compiles) and its MFU."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown or not programs:
        raise ValueError(f"unknown program(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PROGRAMS)}")
    wanted = programs
    import jax

    from . import sampler, stop
    from .decode_layout import decode_target, process_devices
    from .model import decoder
    from .model.sharding import make_mesh
    from .model.sharding import batch_multiple
    from .next_token import sampling_mode
    from .sample import _batch_bucket

    topo = parse_topology(topology)
    devices = abstract_devices(topo) if devices is None else devices
    sizes = mesh_sizes(run_cfg.mesh, len(devices), model_cfg.hidden_size)
    mesh = make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
    # The sampler's layout over the training mesh's devices, chosen as Policy.for_decode chooses it.
    target = decode_target(model_cfg, mesh.devices.flat, run_cfg.sample.decode_tensor)
    d_mesh, d_rules, dcfg, _ = target
    hand = plan_memory(model_cfg, run_cfg, devices=len(devices), accelerator=f"tpu-{topo.chip}",
                       local_devices=process_devices(devices))
    hb = hand["bytes"]
    usable = int(topo.hbm_bytes * USABLE_FRACTION)
    # Held by the run outside each program (exact, from the hand planner's parameter rows): M_t's parameters and
    # their compute copy stay loaded while DPO trains a copy of them, while they are moved to the decode layout
    # (the cast's argument is the parameters themselves) and while the sampler runs on its decode copy.
    policy = hb["params"] + hb["compute_params"]
    held = {"sft_step": policy, "dpo_step": policy, "reference": hb["params"] if hb["compute_params"] else 0,
            "decode_cast": hb["compute_params"], "reshard": policy, "prefill": policy, "decode": policy}
    hand_peak = {"sft_step": hand["peaks"]["sft"], "dpo_step": hand["peaks"]["dpo"], "reference": None,
                 "decode_cast": None, "reshard": hand["peaks"]["to_decode"], "prefill": hand["peaks"]["sample"],
                 "decode": hand["peaks"]["sample"]}
    B, P, N = sampler_shape(run_cfg, d_mesh)
    s, j = run_cfg.sample, run_cfg.judge
    # The judge's stop automaton (selfreward.judge), a replicated [vocab, states] table, when it stops at the score.
    kind = ("score" if j.mode == "sampled" else "score_marker") if j.stop_at_score else None
    stop_shape = (model_cfg.vocab_size, stop.STATES[kind]) if kind else (1, 2)
    mode = sampling_mode(s.temperature, s.top_p, s.top_k, model_cfg.vocab_size)
    programs, compiled = {}, {}
    for name in PROGRAMS:
        if name not in wanted:
            continue
        t = time.perf_counter()
        if name == "prefill":
            # Two prefills run: every row's prompt (B rows), and the shared one (a chunk's distinct prompts,
            # at most B/2 rows, copied into the B rows of their samples: both caches live at once). The larger
            # is the one that must fit.
            variants = {"plain": sampler.prefill_program(dcfg, d_mesh, run_cfg.model.dtype, d_rules, B, P, N,
                                                         run_cfg.model.attention)}
            Bp = _batch_bucket(max(1, B // 2), batch_multiple(d_mesh), B)
            if Bp < B:
                variants[f"shared ({Bp} distinct prompts)"] = sampler.prefill_program(
                    dcfg, d_mesh, run_cfg.model.dtype, d_rules, B, P, N, run_cfg.model.attention, Bp)
            sizes_ = {k: _analysis(c)["program_bytes"] for k, c in variants.items()}
            variant = max(sizes_, key=sizes_.get)
            compiled[name] = variants[variant]
            prefill_variants = {"prefill_variant": variant, "prefill_variant_bytes": sizes_}
        elif name == "decode":
            # With model.attention auto (or splash) the loop's attention is the Pallas decode kernel, a custom call
            # whose cache operands the HBM walk counts whole: an upper bound (it reads only the filled blocks).
            compiled[name] = sampler.decode_program(dcfg, d_mesh, run_cfg.model.dtype, d_rules, mode, B, P, N,
                                                    sampler.EOS_SLOTS, stop_shape,
                                                    attention=run_cfg.model.attention)
        else:
            if name in ("sft_step", "dpo_step"):
                fn, args = _step_program(name[:3], model_cfg, run_cfg, mesh)
            elif name == "reference":
                fn, args = _reference_program(model_cfg, run_cfg, mesh)
            else:
                fn, args = _to_decode_programs(model_cfg, run_cfg, mesh, target)[name]
            compiled[name] = fn.lower(*args).compile()
        programs[name] = {"compile_seconds": time.perf_counter() - t}
        if name == "prefill":
            programs[name] |= prefill_variants
    for name, c in compiled.items():
        a = _analysis(c)
        total = a["program_bytes"] + held[name]
        programs[name] |= a | {"held_outside": held[name], "total_bytes": total, "fits": total <= usable,
                               "hand_bytes": hand_peak[name]}
    # Derived figures.
    if derived and "dpo_step" in programs:
        dpo = programs["dpo_step"]
        c = dpo["cost_all_layers"] = _extrapolated_cost("dpo", model_cfg, run_cfg, mesh)
        dpo["model_flops"] = dpo_model_flops(model_cfg, run_cfg.dpo)
        dpo["executed_flops"] = dpo_executed_flops(model_cfg, run_cfg.dpo, run_cfg.model.remat)
        at_peak = dpo["model_flops"] / len(devices) / topo.peak_flops  # seconds per step at 100% MFU
        secs = c["optimal_seconds"]
        # XLA gives a negative time when it cannot cost an op (cross-slice collectives, custom calls).
        dpo["mfu_estimate"] = at_peak / secs if secs > 0 else None
        # A bound that needs no time from XLA: the longest of the model's or XLA's FLOPs at peak and the HBM traffic
        # (hlo_text.hbm_bytes: XLA's bytes accessed also counts on-chip memory) at the HBM bandwidth (no
        # communication, perfect overlap).
        roof = max(at_peak, c["flops"] / topo.peak_flops, c["hbm_bytes"] / topo.hbm_bandwidth)
        dpo["mfu_roofline_bound"] = at_peak / roof
    if "decode" in programs:
        # Weights and KV cache per device from the decode program's own arguments and their shardings.
        weights = _shard_bytes(sampler._abstract_params(dcfg, d_mesh, run_cfg.model.dtype, d_rules))
        kv = 2 * dcfg.num_layers * math.prod(
            sampler._cache_sharding(d_mesh, d_rules).shard_shape((B, dcfg.num_kv_heads, dcfg.head_dim, P + N))) * \
            jax.numpy.dtype(run_cfg.model.dtype).itemsize
        dec, hlo = programs["decode"], compiled["decode"].as_text()
        loop, hbm = loop_collectives(hlo), loop_hbm_bytes(hlo)
        # A weight all-gathered over some of the `tensor` devices makes 2..tensor of its shards: an all-gather
        # whose result has that many elements is counted as one (activations, [rows, ...], have other sizes).
        t, shapes = d_mesh.shape["tensor"], decoder.param_shapes(dcfg)
        matrices = [s_[1:] for s_ in shapes["layers"].values() if len(s_) >= 3]
        matrices += [shapes[k] for k in ("embed", "lm_head") if k in shapes]
        weight_sizes = {math.prod(s_) * k // t for s_ in matrices for k in range(2, t + 1)} | {
            math.prod(s_) for s_ in matrices}
        dec |= {"weights_bytes": weights, "kv_cache_bytes": kv, "hbm_read_bytes": hbm["read"],
                "hbm_write_bytes": hbm["write"], "hbm_read_ratio": hbm["read"] / (weights + kv),
                "hbm_traffic_ratio": (hbm["read"] + hbm["write"]) / (weights + kv),
                "xla_bytes_ratio": dec["bytes_accessed"] / (weights + kv), "loop_collectives": loop,
                "weight_sized_all_gathers": sum(n in weight_sizes for n in loop["all_gathers"])}
    fits = all(p["fits"] for p in programs.values())
    return {"topology": topo.name, "jax_topology": topo.grid, "num_slices": topo.num_slices, "chip": topo.chip,
            "devices": len(devices), "device_kind": devices[0].device_kind, "hbm_bytes": topo.hbm_bytes,
            "peak_flops": topo.peak_flops, "hbm_bandwidth": topo.hbm_bandwidth,
            "usable_bytes": usable, "mesh": sizes, "decode_mesh": dict(d_mesh.shape), "kv_repeat": target[3],
            "sampler_shape": {"rows": B, "prompt": P, "new": N},
            "programs": programs, "fits": fits, "hand": hand, "jax": jax.__version__}


__all__ = ["CompileUnavailable", "EXIT_DOES_NOT_FIT", "NO_WINDOWED_EINSUM", "PROGRAMS", "Topology",
           "abstract_devices", "compile_plan", "dpo_executed_flops", "dpo_model_flops",
           "loop_collectives", "parse_topology"]
