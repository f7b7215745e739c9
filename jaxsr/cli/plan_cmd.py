"""`jaxsr plan`: per-device memory of a config's training and sampling, and whether it fits; with `--compile`,
proven by ahead-of-time compiles of the run's programs for a TPU topology (jaxsr.plan_compile)."""

from __future__ import annotations

import json
import sys

from ..plan import (ACCELERATORS_GIB, EXIT_DOES_NOT_FIT, default_devices, format_plan, local_accelerator,
                    plan_memory, resolve_model)
from .common import load


def cmd_plan(args) -> int:
    run_cfg = load(args)
    model_cfg, source = resolve_model(run_cfg)
    if args.compile or args.topology or args.programs:
        return _compile(args, run_cfg, model_cfg, source)
    topology = run_cfg.mesh.topology
    if topology and not (args.accelerator or args.devices):  # the slice the config is sized for
        from ..plan_compile import parse_topology

        topo = parse_topology(topology)
        accelerator, devices = f"tpu-{topo.chip}", topo.chips
    else:
        topology = ""
        accelerator = args.accelerator or local_accelerator()
        devices = args.devices or default_devices(run_cfg.mesh)
    p = plan_memory(model_cfg, run_cfg, devices=devices, accelerator=accelerator)
    p["source"] = source
    print(json.dumps(p, indent=2) if args.json else format_plan(p, source))
    if not args.json:
        if topology:
            print(f"(planned for the config's slice, mesh.topology={topology}: {devices} chips; prove it with "
                  f"jaxsr plan --compile)")
        elif not args.devices:
            print(f"(planned for {devices} devices, the fewest the mesh allows; pass --devices N for a larger slice)")
    return 0 if p["fits"] else EXIT_DOES_NOT_FIT


def _compile(args, run_cfg, model_cfg, source) -> int:
    for flag, value in (("--topology", args.topology), ("--programs", args.programs)):
        if value and not args.compile:
            raise ValueError(f"{flag} goes with --compile: jaxsr plan --compile {flag} {value}")
    topology = args.topology or run_cfg.mesh.topology
    if not topology:
        raise ValueError("--compile needs --topology or mesh.topology: the TPU slice to compile for (v5e-N, v5p-N, "
                         "v6e-N, or NxSLICE for N slices, e.g. 2xv5p-64)")
    if args.accelerator or args.devices:
        raise ValueError("--compile's topology names the chips and their number; leave out --accelerator and --devices")
    from .. import distributed
    from ..plan_compile import PROGRAMS, CompileUnavailable, compile_plan, parse_topology
    from ..plan_compile_report import format_compile_plan

    parse_topology(topology)  # a bad name fails before libtpu loads
    programs = tuple(dict.fromkeys(x.strip() for x in args.programs.split(",") if x.strip())) if args.programs else PROGRAMS
    if not distributed.tpu_chips_attached():
        import jax

        # Abstract TPU devices need no TPU backend; without this, JAX would probe libtpu for one (error lines).
        jax.config.update("jax_platforms", "cpu")
    try:
        p = compile_plan(model_cfg, run_cfg, topology, programs=programs)
    except CompileUnavailable as e:
        print(f"jaxsr plan: error: {e}", file=sys.stderr)
        return 2
    p["source"] = source
    print(json.dumps(p, indent=2, default=float) if args.json else format_compile_plan(p, source))
    if not p["fits"]:
        bad = [n for n, q in p["programs"].items() if not q["fits"]]
        print(f"jaxsr plan: {', '.join(bad)} does not fit on {topology}: "
              + "; ".join(f"{n} needs {p['programs'][n]['total_bytes'] / 2**30:.2f} GiB per device" for n in bad)
              + f" of {p['usable_bytes'] / 2**30:.1f} GiB usable", file=sys.stderr)
    return 0 if p["fits"] else EXIT_DOES_NOT_FIT


def add_parsers(sub, add_config_args) -> None:
    p = sub.add_parser("plan", help="per-device memory of a config on an accelerator; exit 0 if it fits, 3 if not")
    p.add_argument("--accelerator", choices=sorted(ACCELERATORS_GIB) + ["cpu"],
                   help="device type (default: the chip of mesh.topology if the config has one, else this host's device)")
    p.add_argument("--devices", type=int, help="number of devices (default: the chips of mesh.topology if the config "
                                                "has one, else the fewest the configured mesh allows)")
    p.add_argument("--compile", action="store_true", help="compile the run's programs ahead of time for --topology "
                                                          "(default mesh.topology; needs libtpu: pip install jaxsr[tpu])")
    p.add_argument("--topology", help="TPU slice for --compile (default: the config's mesh.topology): v5e-8, v5p-128, "
                                      "v6e-16, v5e:2x2, 2xv5p-64 (2 slices)")
    p.add_argument("--programs", help="with --compile: compile only these programs, comma-separated (default all: "
                                      "sft_step,dpo_step,reference,decode_cast,reshard,prefill,decode)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_args(p)
    p.set_defaults(fn=cmd_plan)
