"""`jaxsr plan`: per-device memory of a run (weights, AdamW state, gradients, activations, logits, KV cache).

Every figure is computed from the same `param_shapes` / `param_logical_axes` / `ShardingRules` the run uses,
so the parameter and optimizer rows are exact; activations are an estimate whose formulas are in
`_activation_bytes` and docs/launch.md. Exit code 0: fits, 3: does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

GiB = 2**30
EXIT_DOES_NOT_FIT = 3
# Fraction of device memory a run may plan to use: the rest covers XLA scratch, fragmentation and the runtime.
# scripts/launch_gpu.sh sets XLA_PYTHON_CLIENT_MEM_FRACTION to the same value (JAX's default is 0.75).
USABLE_FRACTION = 0.9
ACCELERATORS_GIB = {"tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32, "h100": 80, "h200": 141,
                    "a100-40": 40, "a100-80": 80}  # plus "cpu": this host's RAM
_DEVICE_KINDS = {"tpu v4": "tpu-v4", "tpu v5 lite": "tpu-v5e", "tpu v5e": "tpu-v5e", "tpu v5p": "tpu-v5p",
                 "tpu v5": "tpu-v5p", "tpu v6 lite": "tpu-v6e", "tpu v6e": "tpu-v6e", "h100": "h100", "h200": "h200",
                 "a100-sxm4-40gb": "a100-40", "a100-pcie-40gb": "a100-40", "a100": "a100-80", "cpu": "cpu"}
# Devices of one host, which cap the sampler's tensor-parallel size (`decode_layout.decode_sizes`): a TPU VM of a
# multi-host slice has 4 chips, as the abstract devices `jaxsr plan --compile` builds (libtpu's default host bounds
# 2x2x1) do; any other device: all of them on one host (GPU hosts of 8 change nothing: the cap is 8 anyway).
HOST_DEVICES = {"tpu-v4": 4, "tpu-v5e": 4, "tpu-v5p": 4, "tpu-v6e": 4}


def _hf(model_type, V, D, F, L, H, K, ctx, eps, theta, **extra) -> dict:
    return {"model_type": model_type, "vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
            "num_attention_heads": H, "num_key_value_heads": K, "max_position_embeddings": ctx, "rms_norm_eps": eps,
            "rope_theta": theta, "hidden_act": "silu", **extra}


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
# config.json fields of hub models, so shipped configs can be planned offline (the chat/instruct variants share them).
KNOWN_ARCHITECTURES = {
    "meta-llama/Llama-2-7b-hf": _hf("llama", 32000, 4096, 11008, 32, 32, 32, 4096, 1e-5, 1e4),
    "meta-llama/Llama-2-70b-hf": _hf("llama", 32000, 8192, 28672, 80, 64, 8, 4096, 1e-5, 1e4),
    "meta-llama/Meta-Llama-3-8B": _hf("llama", 128256, 4096, 14336, 32, 32, 8, 8192, 1e-5, 5e5),
    "meta-llama/Llama-3.1-8B": _hf("llama", 128256, 4096, 14336, 32, 32, 8, 131072, 1e-5, 5e5, rope_scaling=_LLAMA31_ROPE),
    "meta-llama/Llama-3.1-70B": _hf("llama", 128256, 8192, 28672, 80, 64, 8, 131072, 1e-5, 5e5, rope_scaling=_LLAMA31_ROPE),
    "mistralai/Mistral-7B-v0.1": _hf("mistral", 32000, 4096, 14336, 32, 32, 8, 32768, 1e-5, 1e4, sliding_window=4096),
    "Qwen/Qwen2.5-0.5B-Instruct": _hf("qwen2", 151936, 896, 4864, 24, 14, 2, 32768, 1e-6, 1e6, tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": _hf("qwen2", 151936, 1536, 8960, 28, 12, 2, 32768, 1e-6, 1e6, tie_word_embeddings=True),
    "Qwen/Qwen3-0.6B": _hf("qwen3", 151936, 1024, 3072, 28, 16, 8, 40960, 1e-6, 1e6, head_dim=128, tie_word_embeddings=True),
}
for _base, _aliases in {"meta-llama/Llama-2-7b-hf": ["meta-llama/Llama-2-7b-chat-hf"],
                        "meta-llama/Llama-2-70b-hf": ["meta-llama/Llama-2-70b-chat-hf"],
                        "meta-llama/Meta-Llama-3-8B": ["meta-llama/Meta-Llama-3-8B-Instruct"],
                        "meta-llama/Llama-3.1-8B": ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B"],
                        "meta-llama/Llama-3.1-70B": ["meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Meta-Llama-3.1-70B"],
                        "Qwen/Qwen2.5-0.5B-Instruct": ["Qwen/Qwen2.5-0.5B"], "Qwen/Qwen2.5-1.5B-Instruct": ["Qwen/Qwen2.5-1.5B"]}.items():
    KNOWN_ARCHITECTURES |= {a: KNOWN_ARCHITECTURES[_base] for a in _aliases}


def resolve_model(run_cfg):
    """(ModelConfig, where it came from) for `model.path`, without network access."""
    if not run_cfg.model.path:
        return _from_scratch(run_cfg), f"model.architecture (tokenizer {run_cfg.model.tokenizer})"
    return resolve_model_path(run_cfg.model.path, "model.path")


def resolve_model_path(path: str, key: str):
    """(ModelConfig, where it came from) of the model at `path` (a directory, a cached or built-in hub name), the
    value of config key `key`, without network access."""
    from .model.config import ModelConfig, from_hf_dict, read_hf_config
    from .policy import JAXSR_MODEL_FILE

    p = Path(path).expanduser()
    if (p / JAXSR_MODEL_FILE).is_file():
        return ModelConfig.from_dict(json.loads((p / JAXSR_MODEL_FILE).read_text())["model"]), str(p)
    if p.is_dir():
        return read_hf_config(p)[0], str(p / "config.json")
    if path.count("/") == 1:  # a hub name: its config.json may already be in the local HF cache
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if isinstance(cached, str):
            return from_hf_dict(json.loads(Path(cached).read_text()), where=cached), cached
    if path in KNOWN_ARCHITECTURES:
        return from_hf_dict(KNOWN_ARCHITECTURES[path], where=f"built-in architecture {path}"), f"built-in table ({path})"
    raise ValueError(f"{key}={path!r} is neither a local model directory nor a cached or built-in hub model; "
                     f"download it (huggingface-cli download {path} config.json) or use one of: {', '.join(sorted(KNOWN_ARCHITECTURES))}")


def _from_scratch(run_cfg):
    """The random M0 the loop builds when model.path is empty (pipeline.initial_policy): vocabulary from the tokenizer."""
    from transformers import AutoTokenizer

    from .envs import from_config
    from .model.config import ModelConfig

    section = run_cfg.model
    tok = from_config(run_cfg).tokenizer() if section.tokenizer == "env" else AutoTokenizer.from_pretrained(section.tokenizer)
    a = section.architecture
    return ModelConfig(model_type=a.model_type, vocab_size=len(tok), hidden_size=a.hidden_size,
                       intermediate_size=a.intermediate_size, num_layers=a.num_layers, num_heads=a.num_heads,
                       num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, max_position_embeddings=a.max_position_embeddings,
                       rope_theta=a.rope_theta, tie_word_embeddings=a.tie_word_embeddings)


def accelerator_bytes(name: str) -> int:
    if name == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if name not in ACCELERATORS_GIB:
        raise ValueError(f"unknown accelerator {name!r}; choose one of {sorted(ACCELERATORS_GIB) + ['cpu']}")
    return ACCELERATORS_GIB[name] * GiB


def local_accelerator() -> str:
    import jax

    kind = jax.devices()[0].device_kind.lower()
    for key, name in _DEVICE_KINDS.items():  # most specific keys first
        if key in kind:
            return name
    raise ValueError(f"cannot tell the memory of local device kind {kind!r}; pass --accelerator (one of {sorted(ACCELERATORS_GIB)})")


def mesh_sizes(mesh_cfg, devices: int, embed_dim: int) -> dict[str, int]:
    """The (data, fsdp, tensor) sizes the run's mesh would have on `devices` devices, without any devices."""
    from .model.sharding import ShardingError, mesh_axis_sizes

    try:
        return mesh_axis_sizes(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices, embed_dim)
    except ShardingError as e:
        raise ValueError(f"mesh {dataclasses.asdict(mesh_cfg)} does not fit {devices} devices ({e}); "
                         f"pass --devices a multiple of {default_devices(mesh_cfg)}") from None


def default_devices(mesh_cfg) -> int:
    """The fewest devices the configured mesh allows (a -1 or unset axis counts 1)."""
    return math.prod(v for v in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor) if v not in (None, -1))


def param_elements_per_device(model_cfg, sizes: dict[str, int], rules=None) -> tuple[int, int]:
    """(elements of all parameters on one device, of which replicated): each dim divided by its mesh axis size."""
    import jax

    from .model.decoder import param_logical_axes, param_shapes
    from .model.sharding import DEFAULT_RULES, ShardingError

    rules = rules or DEFAULT_RULES
    is_tuple = lambda x: isinstance(x, tuple)  # noqa: E731
    shapes = jax.tree_util.tree_flatten_with_path(param_shapes(model_cfg), is_leaf=is_tuple)[0]
    axes = jax.tree.leaves(param_logical_axes(model_cfg), is_leaf=is_tuple)
    total = replicated = 0
    for (path, shape), logical in zip(shapes, axes):
        n = 1
        for size, axis, lname in zip(shape, rules.spec(logical), logical):
            div = math.prod(sizes[a] for a in ((axis,) if isinstance(axis, str) else axis or ()))
            if size % div:
                raise ShardingError(f"tensor {jax.tree_util.keystr(path)} dimension {lname}={size} is not divisible by "
                                    f"mesh axis {axis!r} (size {div}); choose a mesh whose {axis!r} size divides {size}")
            n *= size // div
        total += n
        replicated += n if n == math.prod(shape) else 0
    return total, replicated


def optimizer_dtypes(run_cfg, dtype) -> list:
    """Dtypes of the per-parameter AdamW buffers jaxsr's optimizer really allocates (mu, nu, ...)."""
    import jax

    from .train_state import make_optimizer

    tx, _ = make_optimizer(run_cfg.dpo, max(1000, run_cfg.dpo.warmup_steps + 1))
    probe = (3, 5, 7)
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct(probe, dtype)})
    return [leaf.dtype for leaf in jax.tree.leaves(state) if leaf.shape == probe]


def _activation_bytes(m, remat: str, rows: int, T: int, b: int, t: int) -> int:
    """Activation bytes of one micro-batch of `rows` sequences of T tokens on one device (b bytes per element).

    Per token and layer, with tensor-parallel width t ([B,T,D] tensors are replicated over `tensor`):
      every = b*(8D + 3(H+K)E/t + 6F/t)      x, norms and their float32 parts, projections, residual; q, k, v,
              + (5+b)*H*S/t                  roped q, k, attention output; gate, up, sigmoid, silu, product;
                                             float32 logits, mask, probabilities of the attention: S keys
                                             per query on average (causal blocks, decoder.query_blocks)
      saved = every (none) | b*(3D + (H+2K)E/t + 2F/t) (dots: layer input + weight-matmul outputs)
              | b*D (full: only the layer input)
    activations = rows*T*(L*saved + [every if remat != none: the layer recomputed in the backward pass]).
    """
    from .model.decoder import query_blocks

    D, H, K, E, F, L = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size, m.num_layers
    S = sum((j - i) * j for i, j in query_blocks(T)) // T
    every = b * (8 * D + 3 * (H + K) * E // t + 6 * F // t) + (5 + b) * H * S // t
    saved = {"none": every, "dots": b * (3 * D + (H + 2 * K) * E // t + 2 * F // t), "full": b * D}[remat]
    return rows * T * (L * saved + (every if remat != "none" else 0))


def plan_memory(model_cfg, run_cfg, *, devices: int, accelerator: str, local_devices: int | None = None) -> dict:
    """Per-device bytes of each buffer of SFT, DPO and sampling, and whether the largest peak fits.
    local_devices: the devices of one process (None: `HOST_DEVICES` of the accelerator, else all)."""
    import numpy as np

    from .policy import DTYPES
    from .data import bucket

    m = model_cfg
    # b: bytes of the compute dtype (activations, KV cache); pb: of the storage dtype (params, AdamW state).
    b, pb = (np.dtype(DTYPES[d]).itemsize for d in (run_cfg.model.dtype, run_cfg.model.param_dtype))
    sizes = mesh_sizes(run_cfg.mesh, devices, m.hidden_size)
    t, dp = sizes["tensor"], sizes["data"] * sizes["fsdp"]  # batches are split over data x fsdp
    elems, repl = param_elements_per_device(m, sizes)
    moments = optimizer_dtypes(run_cfg, DTYPES[run_cfg.model.param_dtype])
    out = {"params": elems * pb, "optimizer": elems * sum(np.dtype(d).itemsize for d in moments),
           # Policy.for_compute: the parameters in the compute dtype for reference log-probs (and judge scores),
           # made once per loaded model and kept with it (so also through the DPO that follows in the same process).
           "compute_params": elems * b if b != pb else 0,
           # float32 accumulation (train.batch_grads); with grad_accum > 1 the micro-batch's gradient too.
           "gradients": elems * 4 * (2 if run_cfg.dpo.grad_accum > 1 or run_cfg.sft.grad_accum > 1 else 1),
           "reference": elems * pb if run_cfg.dpo.reference == "on_the_fly" else 0,
           # Training's FSDP all-gathers, in the storage dtype.
           "gathered_weights": _gathered_bytes(m, t, pb)}
    rows = {}
    for stage in ("sft", "dpo"):
        sec = getattr(run_cfg, stage)
        per = -(-(sec.batch_size // sec.grad_accum) // dp) * dp  # rounded up to the data-parallel size (data._microbatches)
        seqs, T = 1, sec.max_length
        if stage == "dpo":
            # A pair is one row of prompt + chosen + rejected (dpo.shared_prompt; at most 2 x max_length tokens,
            # since each response fits max_length with the prompt) or two rows of max_length.
            seqs, T = (1, 2 * T) if sec.shared_prompt else (2, T)
        rows[stage] = seqs * per // dp
        out[f"{stage}_activations"] = _activation_bytes(m, run_cfg.model.remat, rows[stage], T, b, t)
        # float32 logits [B,T,V] and their gradient (an upper bound: train scores response positions only).
        out[f"{stage}_logits"] = 2 * rows[stage] * T * m.vocab_size * 4 // t
    s = run_cfg.sample
    new = max(s.max_new_tokens, run_cfg.judge.max_new_tokens, run_cfg.prompts.max_new_tokens)
    # A prompt is at most a training example long (judge prompts hold a whole response): the upper bound.
    slots = bucket(max(run_cfg.sft.max_length, run_cfg.dpo.max_length), fine=True) + bucket(new, fine=True)
    # The sampler runs on its own layout (Policy.for_decode, jaxsr.decode_layout): a compute-dtype copy of the
    # weights, tensor-parallel and replicated over `data`; rows and the KV cache split over data x tensor.
    local = local_devices or min(devices, HOST_DEVICES.get(accelerator, devices))
    decode = lambda mc: _decode_bytes(mc, sizes, devices, local, s.decode_tensor, b, s.max_batch_rows, slots)  # noqa: E731
    own = decode(m)
    dsizes, rows["sample"] = own.pop("mesh"), own.pop("rows")
    own["sample_logits"] = own.pop("logits")
    out |= own
    held = out["params"] + out["compute_params"]
    train = held + out["gathered_weights"] + out["optimizer"] + out["gradients"]
    peaks = {"sft": train + out["sft_activations"] + out["sft_logits"],
             "dpo": train + out["reference"] + out["dpo_activations"] + out["dpo_logits"],
             # decode_layout.build: the cast copy on the policy's layout and the decode copy, both live.
             "to_decode": held + out["decode_prepared"] + out["decode_params"],
             "sample": held + out["decode_params"] + out["kv_cache"] + out["sample_logits"]}
    gen, judge = _other_models(run_cfg)
    if gen is not None:
        # The fixed generator (stored in the compute dtype) has the devices to itself: M_t is released before it
        # loads (selfreward._prompts).
        g = {"params": param_elements_per_device(gen, sizes)[0] * b, **decode(gen)}
        del g["mesh"], g["rows"]
        out |= {f"generator_{k}": v for k, v in g.items()}
        peaks["prompts"] = g["params"] + g["decode_params"] + max(g["decode_prepared"], g["kv_cache"] + g["logits"])
    if run_cfg.dpo.eval_every:
        # Checkpoint selection runs inside DPO (jaxsr.selection): the training state stays; one decode copy at a
        # time beside it (each made through a cast copy): M_t's, then the checkpoint's under test, then the
        # judge's (a fixed judge model, whose weights stay loaded through DPO, or M_t).
        out["selection_checkpoint"] = out["decode_params"]
        if judge is not None:
            j = {"params": param_elements_per_device(judge, sizes)[0] * b, **decode(judge)}
        else:
            j = {"params": 0, "decode_params": out["decode_params"], "decode_prepared": out["decode_prepared"],
                 "kv_cache": out["kv_cache"], "logits": out["sample_logits"]}
        out |= {f"selection_judge_{k}": j[k] for k in ("params", "decode_params", "kv_cache", "logits")}
        answering = out["decode_params"] + max(out["decode_prepared"], out["kv_cache"] + out["sample_logits"])
        judging = j["decode_params"] + max(j["decode_prepared"], j["kv_cache"] + j["logits"])
        peaks["selection"] = train + j["params"] + max(answering, judging)
    capacity = accelerator_bytes(accelerator)
    usable = int(capacity * USABLE_FRACTION)
    return {"model": {"model_type": m.model_type, "num_params": m.num_params, "layers": m.num_layers,
                      "hidden": m.hidden_size, "heads": m.num_heads, "kv_heads": m.num_kv_heads, "vocab": m.vocab_size},
            "accelerator": accelerator, "device_bytes": capacity, "usable_bytes": usable, "devices": devices,
            "mesh": sizes, "decode_mesh": dsizes, "dtype": run_cfg.model.dtype, "param_dtype": run_cfg.model.param_dtype,
            "remat": run_cfg.model.remat, "optimizer_dtypes": [np.dtype(d).name for d in moments],
            "replicated_param_elements": repl, "rows_per_device": rows, "kv_slots": slots,
            "bytes": out, "peaks": peaks, "peak": max(peaks.values()), "fits": max(peaks.values()) <= usable}


def _other_models(run_cfg):
    """ModelConfigs of the fixed prompt generator and selection judge (None: M_t plays that part or an environment's
    sampler does)."""
    gen = run_cfg.prompts.generator
    judge = run_cfg.dpo.selection_judge if run_cfg.dpo.eval_every else ""
    return (resolve_model_path(gen, "prompts.generator")[0] if gen not in ("", "env") else None,
            resolve_model_path(judge, "dpo.selection_judge")[0] if judge else None)


def _gathered_bytes(m, t: int, nbytes: int) -> int:
    """FSDP all-gathers one layer (two in flight) and the vocabulary matrix, each still split over `tensor`."""
    per_layer = m.num_params - m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2) - m.hidden_size
    return nbytes * (2 * per_layer // m.num_layers + m.vocab_size * m.hidden_size) // t


def _decode_bytes(m, sizes, devices: int, local_devices: int, tensor, b: int, max_rows: int, slots: int) -> dict:
    """Per-device bytes of model `m` sampling on its decode layout (`decode_layout.build`), in compute bytes `b`:
    its decode copy, the cast copy on the training layout `sizes` while that is made, and the KV cache and
    float32 logits of `max_rows` rows of `slots` positions; with the decode mesh and the rows per device."""
    from .decode_layout import decode_config, decode_layout_rules, decode_sizes

    dsizes = decode_sizes(m, devices, tensor, local_devices=local_devices)
    t = dsizes["tensor"]
    dcfg, _ = decode_config(m, t)  # kv heads repeated up to `t`
    rows = -(-max_rows // dsizes["data"])  # the sampler's chunk: a multiple of data, split over it
    vocab_shards = t if m.vocab_size % t == 0 else 1
    return {"mesh": dsizes, "rows": rows,
            "decode_params": param_elements_per_device(dcfg, dsizes, decode_layout_rules(m, t))[0] * b,
            "decode_prepared": param_elements_per_device(dcfg, sizes)[0] * b,
            "kv_cache": 2 * dcfg.num_layers * rows * slots * (dcfg.num_kv_heads // t) * dcfg.head_dim * b,
            "logits": rows * m.vocab_size * 4 // vocab_shards}


def format_plan(p: dict, source: str) -> str:
    g = lambda x: f"{x / GiB:10.2f}"  # noqa: E731
    bt, r, ms, dm = p["bytes"], p["rows_per_device"], p["mesh"], p["decode_mesh"]
    rows = [(f"parameters ({p['param_dtype']} storage)", bt["params"]),
            ("optimizer: AdamW " + " + ".join(p["optimizer_dtypes"]) + " moments", bt["optimizer"]),
            (f"{p['dtype']} copy of the parameters for inference", bt["compute_params"]),
            ("gradients (float32 accumulation)", bt["gradients"]),
            ("DPO reference params (dpo.reference=on_the_fly)", bt["reference"]),
            ("training: all-gathered weights (2 layers + vocab matrix)", bt["gathered_weights"]),
            (f"SFT activations ({r['sft']} rows/device, remat={p['remat']})", bt["sft_activations"]),
            ("SFT logits + grad [B,T,V] float32", bt["sft_logits"]),
            (f"DPO activations ({r['dpo']} rows/device, remat={p['remat']})", bt["dpo_activations"]),
            ("DPO logits + grad [B,T,V] float32", bt["dpo_logits"]),
            (f"sampler's decode copy ({p['dtype']}, data {dm['data']} x tensor {dm['tensor']})", bt["decode_params"]),
            ("  its cast copy on the training layout, while it is made", bt["decode_prepared"]),
            (f"KV cache ({r['sample']} rows/device x {p['kv_slots']} slots)", bt["kv_cache"]),
            ("sampling logits [B,V] float32", bt["sample_logits"])]
    if "generator_params" in bt:
        rows += [(f"prompt generator: parameters ({p['dtype']})", bt["generator_params"]),
                 ("prompt generator: decode copy", bt["generator_decode_params"]),
                 ("prompt generator: KV cache + logits", bt["generator_kv_cache"] + bt["generator_logits"])]
    if "selection_checkpoint" in bt:
        rows += [(f"selection: checkpoint under test ({p['dtype']} copy)", bt["selection_checkpoint"]),
                 (f"selection: judge parameters ({p['dtype']}; 0 = M_t judges)", bt["selection_judge_params"]),
                 ("selection: judge decode copy", bt["selection_judge_decode_params"]),
                 ("selection: judge KV cache + logits", bt["selection_judge_kv_cache"] + bt["selection_judge_logits"])]
    lines = [f"model     {source}: {p['model']['model_type']}, {p['model']['num_params']:,} parameters",
             f"hardware  {p['devices']} x {p['accelerator']} ({p['device_bytes'] / GiB:.1f} GiB each, "
             f"{p['usable_bytes'] / GiB:.1f} GiB usable at {USABLE_FRACTION:.0%})",
             f"mesh      data={ms['data']} fsdp={ms['fsdp']} tensor={ms['tensor']}; compute {p['dtype']}, storage {p['param_dtype']}; remat {p['remat']}",
             "", f"{'per device':<56}{'GiB':>10}"]
    lines += [f"{name:<56}{g(v)}" for name, v in rows]
    lines += [""] + [f"{'peak ' + k:<56}{g(v)}" for k, v in p["peaks"].items()]
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(f"\nverdict: {verdict} (peak {p['peak'] / GiB:.2f} GiB of {p['usable_bytes'] / GiB:.1f} GiB usable per device)")
    return "\n".join(lines)
