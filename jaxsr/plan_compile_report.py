"""`jaxsr plan --compile`'s text report: the per-program table and the derived figures of a `compile_plan` result
(jaxsr/plan_compile.py compiles; this renders)."""

from __future__ import annotations

from .hlo_text import COLLECTIVES
from .plan import GiB, USABLE_FRACTION


def format_compile_plan(p: dict, source: str) -> str:
    big = max(q["total_bytes"] for q in p["programs"].values()) >= GiB
    unit, div = ("GiB", GiB) if big else ("MiB", 2**20)
    g = lambda x: f"{'-':>9}" if x is None else f"{x / div:9.2f}"  # noqa: E731
    ms = lambda x: f"{x * 1e3:8.2f}" if x >= 0 else f"{'n/a':>8}"  # noqa: E731
    m_, d_ = p["mesh"], p["decode_mesh"]
    lines = [f"model     {source}: {p['hand']['model']['num_params']:,} parameters",
             f"topology  {p['topology']} ({p['jax_topology']} x {p['num_slices']} slice(s)): {p['devices']} x "
             f"{p['device_kind']}, {p['hbm_bytes'] / GiB:.0f} GiB HBM each, {p['usable_bytes'] / GiB:.1f} GiB usable "
             f"at {USABLE_FRACTION:.0%}",
             f"mesh      data={m_['data']} fsdp={m_['fsdp']} tensor={m_['tensor']}; compute {p['hand']['dtype']}, "
             f"storage {p['hand']['param_dtype']}; remat {p['hand']['remat']}",
             f"sampler   decode layout data={d_['data']} tensor={d_['tensor']} (kv heads x{p['kv_repeat']}); chunk "
             f"{p['sampler_shape']['rows']} rows x ({p['sampler_shape']['prompt']} + {p['sampler_shape']['new']}) slots",
             "", f"per device ({unit})  arguments   outputs   aliased temporary  held-out     total  hand-plan  fits"
             f"    TFLOP  GB-accessed   xla-ms loops  compile-s"]
    for name, q in p["programs"].items():
        m = q["memory"]
        lines.append(f"{name:<15}{g(m['argument'])} {g(m['output'])} {g(m['alias'])} {g(m['temp'])} "
                     f"{g(q['held_outside'])} {g(q['total_bytes'])}  {g(q['hand_bytes'])} {'yes' if q['fits'] else 'NO':>5}"
                     f" {q['flops'] / 1e12:8.3f} {q['bytes_accessed'] / 1e9:12.3f} {ms(q['optimal_seconds'])}"
                     f" {q['while_loops']:5d} {q['compile_seconds']:10.1f}")
    lines += ["", "total = arguments + outputs - aliased + temporary (XLA's memory analysis) + held-out (M_t's parameters"
              " and compute copy, which the run keeps outside the program); hand-plan: jaxsr plan's peak of that phase.",
              "TFLOP, GB-accessed, xla-ms: XLA's cost analysis, which counts the body of each of the program's while "
              "loops (column loops) once and gives custom calls no FLOPs and a negative time (n/a)."]
    pre = p["programs"].get("prefill", {})
    if "prefill_variant_bytes" in pre:
        lines += ["prefill: the larger of " + ", ".join(f"{k} {v / div:.2f} {unit}" for k, v in
                                                       pre["prefill_variant_bytes"].items())
                  + f" (program bytes; the row shows {pre['prefill_variant']})"]
    d, dec = p["programs"].get("dpo_step", {}), p["programs"].get("decode")
    if "cost_all_layers" in d:
        c, n = d["cost_all_layers"], p["devices"]
        mfu = "n/a (XLA's time is negative)" if d["mfu_estimate"] is None else f"{d['mfu_estimate']:.1%}"
        calls = ", ".join(f"{k} x{v}" for k, v in c["custom_calls"].items()) or "none"
        lines += [f"DPO step cost (1- and 2-layer unrolled variants without windowed einsums, extrapolated over "
                  f"{p['hand']['model']['layers']} layers and the micro-batches; loops left in them: "
                  f"{c['while_loops']}; custom calls, not costed: {calls}):",
                  f"  FLOPs per device: XLA {c['flops'] / 1e12:.3f} T; executed by jaxsr's step as counted by hand "
                  f"(causal blocks, remat {p['hand']['remat']}) {d['executed_flops'] / n / 1e12:.3f} T "
                  f"(XLA / hand {c['flops'] * n / d['executed_flops']:.2f}); model FLOPs (6 N tokens + attention) "
                  f"{d['model_flops'] / n / 1e12:.3f} T (XLA / model {c['flops'] * n / d['model_flops']:.2f})",
                  f"  MFU estimate: model FLOPs / {n} chips / XLA's time {ms(c['optimal_seconds']).strip()} ms / "
                  f"{p['peak_flops'] / 1e12:.0f} TFLOP/s = {mfu}; roofline bound (model or XLA FLOPs at peak, HBM "
                  f"traffic {c['hbm_bytes'] / 1e9:.1f} GB at {p['hbm_bandwidth'] / 1e9:.0f} GB/s, no "
                  f"communication): {d['mfu_roofline_bound']:.1%}"]
    if dec is not None:
        loop = dec["loop_collectives"]
        w_kv = dec["weights_bytes"] + dec["kv_cache_bytes"]
        lines += [f"decode step (decode layout), per device: weights {dec['weights_bytes'] / GiB:.4f} + KV cache "
                  f"{dec['kv_cache_bytes'] / GiB:.4f} = {w_kv / GiB:.4f} GiB; the loop body reads "
                  f"{dec['hbm_read_bytes'] / GiB:.4f} GiB from HBM ({dec['hbm_read_ratio']:.2f}x) and writes "
                  f"{dec['hbm_write_bytes'] / GiB:.4f} GiB ({dec['hbm_traffic_ratio']:.2f}x both); XLA's bytes accessed "
                  f"{dec['bytes_accessed'] / GiB:.4f} GiB ({dec['xla_bytes_ratio']:.2f}x: every memory space, the "
                  f"set-up before the loop too); loops nested in the body (sampling, counted once): "
                  f"{loop['nested_while_loops']}",
                  "decode loop body collectives: " + ", ".join(
                      f"{k} {loop[k]['count']} ({loop[k]['bytes'] / 2**20:.2f} MiB)" for k in COLLECTIVES)
                  + f"; weight-sized all-gathers: {dec['weight_sized_all_gathers']}"]
    bad = [f"{n} needs {q['total_bytes'] / GiB:.2f} GiB per device" for n, q in p["programs"].items() if not q["fits"]]
    lines.append(f"\nverdict: {'FITS' if p['fits'] else 'DOES NOT FIT'}"
                 + (f" ({'; '.join(bad)}; {p['usable_bytes'] / GiB:.1f} GiB usable on {p['chip']})" if bad else ""))
    return "\n".join(lines)
