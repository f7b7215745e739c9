"""Hugging Face safetensors <-> jaxsr parameters.

Import never builds the model on one device: each parameter is created with
`jax.make_array_from_callback`, and each device's callback reads only its slice of the stored tensor
(`safe_open(...).get_slice`), so a host touches only the bytes of its own shards.
Export walks the layers one at a time, gathers each tensor to the host, and writes safetensors shards.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..distributed import to_host
from .config import ModelConfig, to_hf_dict
from .decoder import Params, param_logical_axes, param_shapes
from .sharding import DEFAULT_RULES, ShardingRules, named_sharding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightError(ValueError):
    """A weight file or tensor that does not match the config; the message names the file and tensor."""


# Our tensor = reshape(transpose?(HF tensor)). Each entry: HF name suffix, whether the HF matrix is
# stored (out, in) and must be transposed, and how our trailing dims group into the HF (in, out) dims.
_LAYER_MAP = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "b_gate": ("mlp.gate_proj.bias", False),
    "b_up": ("mlp.up_proj.bias", False),
    "b_down": ("mlp.down_proj.bias", False),
}
_TOP_MAP = {"embed": ("model.embed_tokens.weight", False), "final_norm": ("model.norm.weight", False),
            "lm_head": ("lm_head.weight", True)}
# How many of our (per-layer) dims form the HF "in" dim when transposed, e.g. wo [H, E, D] = o_proj.T
# reshaped: in = (H, E), out = (D,).
_IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1, "lm_head": 1}
# q/k/v biases are [H, E] here and flat [H * E] in HF.
_FLAT_BIAS = {"bq", "bk", "bv"}


def hf_name(name: str, layer: int | None) -> str:
    if layer is None:
        return _TOP_MAP[name][0]
    return f"model.layers.{layer}.{_LAYER_MAP[name][0]}"


def _transposed(name: str) -> bool:
    return (_TOP_MAP.get(name) or _LAYER_MAP[name])[1]


def hf_shape(name: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for one of our (per-layer) tensor shapes."""
    if not _transposed(name):
        return (math.prod(our_shape),) if name in _FLAT_BIAS else tuple(our_shape)
    k = _IN_DIMS[name]
    return (math.prod(our_shape[k:]), math.prod(our_shape[:k]))


def to_hf(name: str, ours: np.ndarray) -> np.ndarray:
    """One of our per-layer tensors as HF stores it."""
    if not _transposed(name):
        return ours.reshape(-1) if name in _FLAT_BIAS else ours
    k = _IN_DIMS[name]
    return np.ascontiguousarray(ours.reshape(math.prod(ours.shape[:k]), -1).T)


def read_json_object(path: Path, error: type[ValueError] = WeightError, expected: str = "expected a JSON object") -> dict:
    """The JSON object stored in `path`; raises `error` naming the file when it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}); {expected}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the file holds a JSON {type(data).__name__}; {expected}")
    return data


def _read_weight_map(index: Path) -> dict[str, str]:
    expected = "expected a JSON object whose 'weight_map' maps tensor name -> shard file"
    data = read_json_object(index, WeightError, expected)
    if "weight_map" not in data:
        raise WeightError(f"{index}: no 'weight_map' key; {expected}")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise WeightError(f"{index}: 'weight_map' is a JSON {type(weight_map).__name__}; {expected}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise WeightError(f"{index}: 'weight_map' maps {name} to {shard!r}; {expected}")
    return weight_map


def _open(path: Path):
    try:
        return safe_open(path, "numpy")
    except SafetensorError as e:
        raise WeightError(f"{path}: not a readable safetensors file ({e})") from None


class SafetensorsReader:
    """Index of tensor name -> file over one or many safetensors files in a model directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        single = self.dir / SINGLE_FILE
        self.index = index if index.is_file() else None
        if self.index:
            self.files = {k: self.dir / v for k, v in _read_weight_map(index).items()}
            for f in sorted(set(self.files.values())):
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: listed in {index} but missing")
        elif single.is_file():
            with _open(single) as f:
                self.files = {k: single for k in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors")) or ["none"]
            raise FileNotFoundError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors files found: {', '.join(found)}); "
                                    f"jaxsr reads Hugging Face weights in safetensors format only")
        self._handles: dict[Path, tuple[object, set[str]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, path: Path):
        if path not in self._handles:
            handle = _open(path)
            self._handles[path] = handle, set(handle.keys())
        return self._handles[path]

    def slice(self, name: str):
        if name not in self.files:
            raise WeightError(f"{self.dir}: tensor {name!r} is missing from the safetensors files")
        path = self.files[name]
        handle, names = self._handle(path)
        if name not in names:  # only an index can point at the wrong file
            raise WeightError(f"tensor {name} is not in {path}, the shard that {self.index} maps it to")
        return handle.get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())


def _flat_range(slices: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, tuple[slice, ...]]:
    """A group of our dims (row-major) maps to one flat HF dim: the flat range to read, and the slices left to apply."""
    full = [s == slice(None) or (s.start in (None, 0) and s.stop in (None, n)) for s, n in zip(slices, shape)]
    inner = math.prod(shape[1:])
    if all(full[1:]):
        s0 = slices[0].indices(shape[0])
        return slice(s0[0] * inner, s0[1] * inner), (slice(None),) * len(shape)
    return slice(None), slices


def _read_layer_slice(reader: SafetensorsReader, name: str, layer: int | None, shape: tuple[int, ...],
                      index: tuple[slice, ...], dtype) -> np.ndarray:
    """Our tensor[index] for one layer (or a top-level tensor), reading only the needed part of the file."""
    key = hf_name(name, layer)
    stored = reader.shape(key)
    expected = hf_shape(name, shape)
    if stored != expected:
        raise WeightError(f"{reader.files[key]}: tensor {key} has shape {stored}, expected {expected} from config.json")
    sl = reader.slice(key)
    if not _transposed(name):
        if name not in _FLAT_BIAS:
            arr = sl[index]
        else:  # q/k/v biases [H*E] -> [H, E]
            flat, rest = _flat_range(index, shape)
            part = sl[flat]
            arr = part.reshape((-1,) + shape[1:])[rest]
    else:
        k = _IN_DIMS[name]
        in_shape, out_shape = shape[:k], shape[k:]
        in_flat, in_rest = _flat_range(index[:k], in_shape)
        out_flat, out_rest = _flat_range(index[k:], out_shape)
        part = sl[out_flat, in_flat]  # HF layout (out, in)
        in_lead = part.shape[1] // math.prod(in_shape[1:])
        out_lead = part.shape[0] // math.prod(out_shape[1:])
        arr = part.T.reshape((in_lead,) + in_shape[1:] + (out_lead,) + out_shape[1:])
        arr = arr[in_rest + out_rest] if (any(s != slice(None) for s in in_rest + out_rest)) else arr
    return np.asarray(arr).astype(dtype)


def load_params(model_dir: str | Path, cfg: ModelConfig, mesh, dtype, rules: ShardingRules = DEFAULT_RULES) -> Params:
    """Reads HF safetensors straight onto their target shardings on `mesh`."""
    reader = SafetensorsReader(model_dir)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if str(np.dtype(dtype)) == "bfloat16" else np.dtype(dtype)
    shapes, axes = param_shapes(cfg), param_logical_axes(cfg)
    names = [hf_name(n, None) for n in shapes if n != "layers"] + [
        hf_name(n, i) for n in shapes["layers"] for i in range(cfg.num_layers)]
    missing = [n for n in names if n not in reader]
    if missing:
        raise WeightError(f"{model_dir}: tensors missing for this config.json: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def make(name, shape, logical, stacked):
        sharding = named_sharding(mesh, logical, shape, ("layers." if stacked else "") + name, rules)

        def callback(index):
            if not stacked:
                return _read_layer_slice(reader, name, None, shape, tuple(index), np_dtype)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([_read_layer_slice(reader, name, i, shape[1:], tuple(index[1:]), np_dtype) for i in layers])

        return jax.make_array_from_callback(shape, sharding, callback)

    out = {n: make(n, shapes[n], axes[n], False) for n in shapes if n != "layers"}
    out["layers"] = {n: make(n, shapes["layers"][n], axes["layers"][n], True) for n in shapes["layers"]}
    return out


def iter_hf_tensors(params: Params, cfg: ModelConfig, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every tensor, one layer at a time so host memory stays at one tensor."""
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
    yield hf_name("embed", None), cast(to_host(params["embed"]))
    for i in range(cfg.num_layers):
        for name, arr in params["layers"].items():
            yield hf_name(name, i), cast(to_hf(name, to_host(arr[i])))
    yield hf_name("final_norm", None), cast(to_host(params["final_norm"]))
    if not cfg.tie_word_embeddings:
        yield hf_name("lm_head", None), cast(to_hf("lm_head", to_host(params["lm_head"])))


def save_hf_weights(params: Params, cfg: ModelConfig, out_dir: str | Path, *, dtype=None,
                    max_shard_bytes: int = 2 * 1024**3, write: bool = True) -> list[str]:
    """Writes safetensors shards (+ an index when there are several) and returns their file names.

    Every process must call it (gathers are collective); only the one with `write=True` writes. Shards are
    written under temporary names and renamed at the end, so a crash never leaves a half-valid directory.
    """
    out_dir = Path(out_dir)
    shard_keys: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    current_bytes, total_bytes = 0, 0

    def flush():
        nonlocal current, current_bytes
        if current and write:
            save_file(current, out_dir / f"shard-{len(shard_keys):05d}.tmp", metadata={"format": "pt"})
        shard_keys.append(list(current))
        current, current_bytes = {}, 0

    for key, arr in iter_hf_tensors(params, cfg, dtype):
        if current and current_bytes + arr.nbytes > max_shard_bytes:
            flush()
        current[key] = arr
        current_bytes += arr.nbytes
        total_bytes += arr.nbytes
    flush()
    n = len(shard_keys)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if not write:
        return names
    for i, name in enumerate(names):
        os.replace(out_dir / f"shard-{i:05d}.tmp", out_dir / name)
    if n > 1:
        weight_map = {k: name for keys, name in zip(shard_keys, names) for k in keys}
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
    return names


def hf_config_for_export(cfg: ModelConfig, original: dict | None, dtype: str) -> dict:
    """The original config.json when the model came from HF (keeps fields we do not model), else one built from cfg."""
    if original:
        out = dict(original)
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
        return out
    return to_hf_dict(cfg, dtype)
