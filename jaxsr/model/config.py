"""The decoder's hyperparameters, and the mapping from Hugging Face config.json to them.

One dataclass covers Llama 2/3/3.1+, Mistral, Qwen2/2.5 and Qwen3: the families differ only in a
handful of switches (biases, q/k norms, tied embeddings, RoPE scaling, sliding window).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(ValueError):
    """A model configuration that jaxsr cannot represent; the message names the key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder.

    Attributes:
      model_type: HF family name; decides the defaults of the switches below and the export class.
      attention_bias: bias on q/k/v projections (Qwen2, or Llama with `attention_bias`).
      o_bias: bias on the output projection (Llama's `attention_bias` covers o_proj too; Qwen2 does not).
      qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
      rope_scaling: None, or a dict with `rope_type` in SUPPORTED_ROPE_TYPES and its parameters.
      sliding_window: attend to at most this many previous positions (Mistral v0.1), or None.
    """

    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model config key {name!r} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention needs it)")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(f"unsupported rope type {rope_type!r} in rope_scaling; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def num_params(self) -> int:
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        attn += (h * hd + 2 * kv * hd if self.attention_bias else 0) + (d if self.o_bias else 0) + (2 * hd if self.qk_norm else 0)
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * per_layer + self.vocab_size * d + head + d

    def __hash__(self):
        # rope_scaling is a dict; hash the canonical JSON so configs can key jit caches.
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; allowed: {sorted(fields)}")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32 like transformers, with Llama 3 or linear scaling applied."""
    dim = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))).astype(np.float32)
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


# --- Hugging Face config.json <-> ModelConfig -------------------------------------------------------------

_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "default": (),
}


def _rope_from_hf(hf: dict, where: str) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters` (theta included); older files have rope_theta + rope_scaling.
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**legacy, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: unsupported rope type {rope_type!r} (key rope_parameters.rope_type / rope_scaling.type); "
                          f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    missing = [k for k in _ROPE_KEYS[rope_type] if k not in merged]
    if missing:
        raise ConfigError(f"{where}: rope type {rope_type!r} needs keys {missing} in rope_parameters/rope_scaling")
    scaling = {"rope_type": rope_type, **{k: merged[k] for k in _ROPE_KEYS[rope_type]}}
    return float(theta), scaling


def _as_id_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, (list, tuple)):
        return tuple(int(i) for i in x)
    return (int(x),)


def from_hf_dict(hf: dict, where: str = "config.json") -> ModelConfig:
    """Maps a Hugging Face config.json dict to a ModelConfig, raising ConfigError that names `where` and the key."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: unsupported hidden_act {act!r}; supported: 'silu'")

    def need(key):
        if key not in hf:
            raise ConfigError(f"{where}: missing key {key!r} (needed for model_type {model_type!r})")
        return hf[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = hf.get("head_dim") or hidden // heads
    theta, scaling = _rope_from_hf(hf, where)
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported for {model_type} (per-layer windows); set it to false")
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias covers all four.
        attention_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def to_hf_dict(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """A config.json dict that transformers' AutoConfig reads back into the same architecture."""
    out: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                         else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)),
        "pad_token_id": cfg.pad_token_id,
        "attention_dropout": 0.0,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if cfg.model_type in ("llama", "qwen3"):
        out["attention_bias"] = cfg.o_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
        out["sliding_window"] = None
    return out


def read_hf_config(model_dir: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory {model_dir} (expected a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_dict(hf, where=str(path)), hf
