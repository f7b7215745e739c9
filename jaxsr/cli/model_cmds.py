"""`jaxsr convert` and `jaxsr export`: Hugging Face directories <-> jaxsr (Orbax) checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from .common import initialize, mesh_from_args


def _stored_dtype(model_dir: Path) -> str:
    """The dtype an HF checkpoint was saved in, so `convert` keeps its bits (float16 widens to float32)."""
    from ..policy import JAXSR_MODEL_FILE

    if (model_dir / JAXSR_MODEL_FILE).is_file():
        return json.loads((model_dir / JAXSR_MODEL_FILE).read_text()).get("dtype", "float32")
    cfg_path = model_dir / "config.json"
    hf = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return "bfloat16" if dtype == "bfloat16" else "float32"


def cmd_convert(args) -> int:
    from ..model.config import read_hf_config
    from ..policy import load_policy, save_checkpoint

    initialize(args)
    src = Path(args.hf_dir)
    dtype = _stored_dtype(src) if args.dtype == "auto" else args.dtype
    model_cfg, _ = read_hf_config(src) if src.is_dir() else (None, None)
    mesh = mesh_from_args(args, model_cfg.hidden_size) if model_cfg and (args.config or args.overrides) else None
    policy = load_policy(src, dtype=dtype, mesh=mesh)
    out = save_checkpoint(policy, args.out, extra={"converted_from": str(src)})
    from ..distributed import is_primary

    if is_primary():
        print(f"wrote jaxsr checkpoint {out} ({policy.config.model_type}, {policy.config.num_params:,} parameters, {dtype})")
    return 0


def cmd_export(args) -> int:
    from ..distributed import is_primary
    from ..policy import JAXSR_MODEL_FILE, load_policy, save_hf

    initialize(args)
    src = Path(args.ckpt)
    dtype = _stored_dtype(src) if args.dtype == "auto" else args.dtype
    mesh = None
    if (args.config or args.overrides) and (src / JAXSR_MODEL_FILE).is_file():
        mesh = mesh_from_args(args, json.loads((src / JAXSR_MODEL_FILE).read_text())["model"]["hidden_size"])
    policy = load_policy(src, dtype=dtype, mesh=mesh)
    # Every process gathers each tensor whole; process 0 writes the files.
    out = save_hf(policy, args.out, max_shard_bytes=int(args.max_shard_mb * 2**20))
    if is_primary():
        print(f"wrote Hugging Face model directory {out} ({dtype})")
    return 0


def add_parsers(sub, add_config_args) -> None:
    p = sub.add_parser("convert", help="Hugging Face model directory -> jaxsr (Orbax) checkpoint")
    p.add_argument("hf_dir", help="HF model directory (config.json + safetensors), or a hub name")
    p.add_argument("out", help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="parameter dtype (auto: the dtype the checkpoint was saved in)")
    add_config_args(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export", help="jaxsr checkpoint -> Hugging Face model directory (safetensors)")
    p.add_argument("ckpt", help="jaxsr checkpoint directory")
    p.add_argument("out", help="output HF model directory")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--max-shard-mb", type=float, default=2048, help="largest safetensors shard, in MiB")
    add_config_args(p)  # mesh.* and distributed.* (several hosts export together)
    p.set_defaults(fn=cmd_export)
