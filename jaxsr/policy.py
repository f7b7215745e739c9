"""A Policy is M_t: config + sharded parameters + tokenizer. Load it from HF or a jaxsr checkpoint, save it back.

A jaxsr checkpoint directory holds `jaxsr_model.json` (our config and the original HF config), `params/`
(an Orbax checkpoint, restorable onto any mesh), `tokenizer/` and `generation_config.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from . import distributed
from .model import decoder, hf
from .model.config import ConfigError, ModelConfig, read_hf_config
from .model.sharding import (DEFAULT_RULES, ShardingRules, batch_multiple, batch_sharding, default_mesh,
                             named_sharding)

log = logging.getLogger(__name__)

JAXSR_MODEL_FILE = "jaxsr_model.json"
FORMAT_VERSION = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Policy:
    """M_t. `params` is the decoder's parameter tree, already placed on `mesh`.

    Attributes:
      config: the architecture.
      params: nested dict of jax.Arrays (see `jaxsr.model.decoder.param_shapes`).
      tokenizer: a transformers tokenizer, or None for a weights-only directory.
      mesh: the (data, fsdp, tensor) mesh the parameters live on.
      dtype: compute dtype name ("float32" or "bfloat16"): the matmuls' operands and the KV cache. The
        parameters keep their own storage dtype (`param_dtype`); training updates them there (float32 master
        weights) and inference uses `for_compute()`, a copy in `dtype` made once.
      hf_config: the config.json the model came from (kept so export writes back fields we do not model).
      generation_config: generation_config.json contents (EOS ids, ...), or {}.
      rules: the logical-axis rules `params` are sharded by on `mesh`.
      decode_tensor: the tensor-parallel size of the sampler's layout (`for_decode`); None: chosen from the
        devices and the model.
      attention: how a chunk attends to its own keys in training, log-probs and prefill: xla, splash, cudnn or
        auto (splash on TPU, cudnn on an NVIDIA GPU where it applies; jaxsr/model/attention_kernels.py).
    """

    config: ModelConfig
    params: decoder.Params
    tokenizer: Any
    mesh: jax.sharding.Mesh
    dtype: str = "float32"
    hf_config: dict | None = None
    generation_config: dict = dataclasses.field(default_factory=dict)
    rules: ShardingRules = DEFAULT_RULES
    decode_tensor: int | None = None
    attention: str = "auto"
    # The copies for_compute() and for_decode() made; dataclasses.replace (with_params, a trained policy) drops them.
    _compute: "Policy | None" = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _decode: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def param_dtype(self) -> str:
        """The dtype the parameters are stored (and, in training, updated) in."""
        return jnp.dtype(jax.tree.leaves(self.params)[0].dtype).name

    def for_compute(self) -> "Policy":
        """This policy with its parameters in the compute dtype, for sampling and log-probs; the copy is made on
        the first call and kept (the policy itself when storage and compute dtypes agree)."""
        if self.param_dtype == self.dtype:
            return self
        if self._compute is None:
            self._compute = self.with_params(_cast(self.params, self.dtype, param_shardings(self.config, self.mesh,
                                                                                            self.rules)))
        return self._compute

    def for_decode(self):
        """The sampler's copy of this policy (`jaxsr.decode_layout.DecodeModel`): the parameters in the compute
        dtype, tensor-parallel without FSDP on a (data, 1, decode_tensor) mesh of the same devices. Made on the
        first call and kept until `release_decode()` (or a `with_params`, which makes a new policy)."""
        from .decode_layout import build  # the sampler's layer, below this one

        if self._decode is None:
            self._decode = build(self, self.decode_tensor)
        return self._decode

    def release_decode(self) -> None:
        """Frees the sampler's copy (before training from this policy, which needs the memory)."""
        self._decode = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The tokenizer's EOS, generation_config's and config.json's, in that order, without duplicates."""
        ids: list[int] = []
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        gen = self.generation_config.get("eos_token_id")
        ids += [int(i) for i in (gen if isinstance(gen, list) else [gen] if gen is not None else [])]
        ids += list(self.config.eos_token_ids)
        return tuple(dict.fromkeys(ids))

    @property
    def pad_token_id(self) -> int:
        for cand in (getattr(self.tokenizer, "pad_token_id", None), self.config.pad_token_id,
                     self.generation_config.get("pad_token_id")):
            if cand is not None:
                return int(cand)
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def with_params(self, params: decoder.Params) -> "Policy":
        return dataclasses.replace(self, params=params)


def param_shardings(cfg: ModelConfig, mesh, rules: ShardingRules = DEFAULT_RULES):
    shapes, axes = decoder.param_shapes(cfg), decoder.param_logical_axes(cfg)

    def one(path, shape, logical):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        return named_sharding(mesh, logical, shape, name, rules)

    return jax.tree.map_with_path(one, shapes, axes, is_leaf=lambda x: isinstance(x, tuple))


def _resolve_mesh(mesh, cfg: ModelConfig):
    if mesh is None:
        return default_mesh(cfg.hidden_size)
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")


def _cast(params: decoder.Params, dtype: str, shardings) -> decoder.Params:
    return jax.jit(lambda p: jax.tree.map(lambda a: a.astype(DTYPES[dtype]), p), out_shardings=shardings)(params)


def _check_dtype(dtype: str) -> str:
    dtype = str(getattr(dtype, "__name__", dtype))
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return dtype


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / f).is_file() for f in files):
        log.warning("%s: no tokenizer files; the policy has no tokenizer (token-id prompts still work)", path)
        return None
    return AutoTokenizer.from_pretrained(str(path))


def load_tokenizer(path):
    """The tokenizer of a model directory, jaxsr checkpoint or hub name, without its weights (None: it has none)."""
    p = Path(path)
    if (p / JAXSR_MODEL_FILE).is_file():
        p = p / "tokenizer"
        return _load_tokenizer(p) if p.is_dir() else None
    if p.is_dir():
        return _load_tokenizer(p)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{path}: no tokenizer in a local model directory or on the Hugging Face hub "
                                f"({reason})") from None


def _read_json(path: Path) -> dict:
    return hf.read_json_object(path, ConfigError) if path.is_file() else {}


def _resolve_path(path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        # A hub name: let huggingface_hub fetch it where the network allows.
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
        except (LocalEntryNotFoundError, RepositoryNotFoundError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"{path}: neither a local model directory nor a Hugging Face hub model that is "
                                    f"cached or can be downloaded now ({reason})") from None
    raise FileNotFoundError(f"{path}: no such model directory (expected a Hugging Face model directory or a jaxsr checkpoint)")


def load_policy(path, *, dtype: str = "float32", param_dtype: str | None = None, mesh=None,
                rules: ShardingRules = DEFAULT_RULES) -> Policy:
    """Loads an HF model directory (or hub name) or a jaxsr checkpoint onto `mesh` (default: all local devices).

    `dtype` is the compute dtype; the parameters are stored in `param_dtype` (default: `dtype`).
    """
    dtype = _check_dtype(dtype)
    param_dtype = _check_dtype(param_dtype or dtype)
    path = _resolve_path(path)
    if (path / JAXSR_MODEL_FILE).is_file():
        return _load_jaxsr(path, dtype, param_dtype, mesh, rules)
    cfg, hf_cfg = read_hf_config(path)
    mesh = _resolve_mesh(mesh, cfg)
    params = hf.load_params(path, cfg, mesh, DTYPES[param_dtype], rules)
    return Policy(cfg, params, _load_tokenizer(path), mesh, dtype, hf_cfg,
                  _read_json(path / "generation_config.json"), rules)


def random_policy(cfg: ModelConfig, *, seed: int = 0, dtype: str = "float32", param_dtype: str | None = None,
                  mesh=None, tokenizer=None, rules: ShardingRules = DEFAULT_RULES) -> Policy:
    """A freshly initialised policy (M0 of a from-scratch run), created directly on its shardings."""
    dtype = _check_dtype(dtype)
    param_dtype = _check_dtype(param_dtype or dtype)
    mesh = _resolve_mesh(mesh, cfg)
    init = jax.jit(functools.partial(decoder.init_params, cfg, dtype=DTYPES[param_dtype]),
                   out_shardings=param_shardings(cfg, mesh, rules))
    return Policy(cfg, init(jax.random.key(seed)), tokenizer, mesh, dtype, None, {}, rules)


# --- jaxsr checkpoints -------------------------------------------------------------------------------------

def save_checkpoint(policy: Policy, out_dir, *, extra: dict | None = None) -> Path:
    """Params-only jaxsr checkpoint (the iteration checkpoint M_t).

    All processes must call it: Orbax writes each process's shards; process 0 writes the metadata files.
    """
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: checkpoint directory exists and is not empty")
    # Every process has seen the directory empty before Orbax (process 0) creates anything in it.
    distributed.barrier(f"save {out}")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", policy.params)
        ckptr.wait_until_finished()
    if distributed.is_primary():
        # "dtype": the stored dtype of params/ (float32 master weights stay float32).
        meta = {"format": FORMAT_VERSION, "model": policy.config.to_dict(), "dtype": policy.param_dtype,
                "hf_config": policy.hf_config, "extra": extra or {}}
        if policy.tokenizer is not None:
            policy.tokenizer.save_pretrained(str(out / "tokenizer"))
        if policy.generation_config:
            (out / "generation_config.json").write_text(json.dumps(policy.generation_config, indent=2))
        # Written last: its presence marks a complete checkpoint.
        (out / JAXSR_MODEL_FILE).write_text(json.dumps(meta, indent=2))
    distributed.barrier(f"saved {out}")
    return out


def _load_jaxsr(path: Path, dtype: str, param_dtype: str, mesh, rules: ShardingRules) -> Policy:
    meta_file = path / JAXSR_MODEL_FILE
    meta = _read_json(meta_file)
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: checkpoint format {meta.get('format')!r}, this jaxsr reads {FORMAT_VERSION}")
    if not isinstance(meta.get("model"), dict):
        raise ConfigError(f"{meta_file}: key 'model' is missing or not a JSON object; expected the model config "
                          f"that save_checkpoint writes there")
    cfg = ModelConfig.from_dict(meta["model"])
    mesh = _resolve_mesh(mesh, cfg)
    shardings = param_shardings(cfg, mesh, rules)
    saved_dtype = DTYPES[meta.get("dtype", "float32")]
    abstract = jax.tree.map(lambda shape, s: jax.ShapeDtypeStruct(shape, saved_dtype, sharding=s),
                            decoder.param_shapes(cfg), shardings, is_leaf=lambda x: isinstance(x, tuple))
    params_dir = (path / "params").absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: missing (the checkpoint {path} is incomplete)")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir, abstract)
    if DTYPES[param_dtype] != saved_dtype:
        params = _cast(params, param_dtype, shardings)
    tok_dir = path / "tokenizer"
    tokenizer = _load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    return Policy(cfg, params, tokenizer, mesh, dtype, meta.get("hf_config"), _read_json(path / "generation_config.json"), rules)


def save_hf(policy: Policy, out_dir, *, dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Writes an HF model directory (safetensors, config.json, generation_config.json, tokenizer).

    All processes must call it: each tensor is gathered whole from every process, process 0 writes.
    """
    out = Path(out_dir)
    write = distributed.is_primary()
    if write:
        out.mkdir(parents=True, exist_ok=True)
    dtype = _check_dtype(dtype or policy.param_dtype)
    np_dtype = np.dtype(jnp.dtype(DTYPES[dtype]))
    hf.save_hf_weights(policy.params, policy.config, out, dtype=np_dtype, max_shard_bytes=max_shard_bytes, write=write)
    if write:
        cfg_dict = hf.hf_config_for_export(policy.config, policy.hf_config, dtype)
        (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        gen = dict(policy.generation_config) or {
            k: v for k, v in (("bos_token_id", policy.config.bos_token_id),
                              ("eos_token_id", list(policy.eos_token_ids) or None),
                              ("pad_token_id", policy.config.pad_token_id)) if v is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if policy.tokenizer is not None:
            policy.tokenizer.save_pretrained(str(out))
    distributed.barrier(f"saved {out}")
    return out


# --- forward -----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _forward_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, attention: str):
    # Parameters keep their FSDP x tensor shardings; the batch is split over data x fsdp.
    def fwd(params, ids_BxT, mask_BxT):
        return decoder.forward(params, cfg, ids_BxT, mask_BxT, dtype=DTYPES[dtype], mesh=mesh, rules=rules,
                               attention=attention)

    return jax.jit(
        fwd,
        in_shardings=(param_shardings(cfg, mesh, rules), batch_sharding(mesh, 2, rules), batch_sharding(mesh, 2, rules)),
        out_shardings=batch_sharding(mesh, 3, rules),
    )


def pad_batch(rows: np.ndarray, multiple: int, fill=0) -> np.ndarray:
    """Pads the leading (batch) dim up to a multiple of the data-parallel device count."""
    extra = -len(rows) % multiple
    if not extra:
        return rows
    return np.concatenate([rows, np.full((extra,) + rows.shape[1:], fill, rows.dtype)])


def forward_logits(policy: Policy, input_ids, attention_mask=None) -> np.ndarray:
    """float32 logits [batch, length, vocab] for a batch of token ids (padding marked by attention_mask).

    With several processes every process must call it with the same batch; each returns all the logits.
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, length], got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= policy.config.vocab_size):
        raise ValueError(f"input_ids must lie in [0, {policy.config.vocab_size}); got range [{ids.min()}, {ids.max()}]")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    policy = policy.for_compute()
    fn = _forward_fn(policy.config, policy.mesh, policy.dtype, policy.rules, policy.attention)
    return call_on_rows(policy, fn, ids, mask).astype(np.float32)


def call_on_rows(policy: Policy, fn, ids_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
    """`fn(policy.params, ids, mask)` (jitted, rows over the batch sharding) on rows padded to the data-parallel
    multiple; the result's rows on the host, padding stripped. Every process calls it with the same rows."""
    n, m = len(ids_BxT), batch_multiple(policy.mesh)
    b2 = batch_sharding(policy.mesh, 2, policy.rules)
    out = fn(policy.params, distributed.global_array(pad_batch(ids_BxT.astype(np.int32), m), b2),
             distributed.global_array(pad_batch(mask_BxT.astype(bool), m, True), b2))
    return distributed.to_host(out)[:n]
