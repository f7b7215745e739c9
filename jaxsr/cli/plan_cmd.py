"""`jaxsr plan`: per-device memory of a config's training and sampling, and whether it fits."""

from __future__ import annotations

import json

from ..plan import (ACCELERATORS_GIB, EXIT_DOES_NOT_FIT, default_devices, format_plan, local_accelerator,
                    plan_memory, resolve_model)
from .common import load


def cmd_plan(args) -> int:
    run_cfg = load(args)
    model_cfg, source = resolve_model(run_cfg)
    accelerator = args.accelerator or getattr(run_cfg.mesh, "accelerator", "") or local_accelerator()
    devices = args.devices or default_devices(run_cfg.mesh)
    p = plan_memory(model_cfg, run_cfg, devices=devices, accelerator=accelerator)
    p["source"] = source
    print(json.dumps(p, indent=2) if args.json else format_plan(p, source))
    if not args.devices and not args.json:
        print(f"(planned for {devices} devices, the fewest the mesh allows; pass --devices N for a larger slice)")
    return 0 if p["fits"] else EXIT_DOES_NOT_FIT


def add_parsers(sub, add_config_args) -> None:
    p = sub.add_parser("plan", help="per-device memory of a config on an accelerator; exit 0 if it fits, 3 if not")
    p.add_argument("--accelerator", choices=sorted(ACCELERATORS_GIB) + ["cpu"],
                   help="device type (default: mesh.accelerator if the config has it, else this host's device)")
    p.add_argument("--devices", type=int, help="number of devices (default: the fewest the configured mesh allows)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_args(p)
    p.set_defaults(fn=cmd_plan)
