"""The sampler's own layout: M_t's weights cast to the compute dtype and resharded once for decoding.

Training keeps the weights FSDP-sharded, which a decode step would all-gather at every token. The decode layout
has no FSDP: heads, kv heads and the MLP width are split over a `tensor` axis (the vocabulary too when it
divides), the model dimension is whole, and the other devices hold data-parallel replicas that split the rows.
When `tensor` is a multiple of num_kv_heads, each kv head is repeated `tensor / num_kv_heads` times so that every
device holds the one kv head its query heads read. See docs/sampling.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .model import decoder
from .model.config import ModelConfig
from .model.sharding import ShardingRules, decode_rules, decode_tensor_size, make_mesh
from .policy import DTYPES, Policy, param_shardings


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeModel:
    """M_t as the sampler runs it (`Policy.for_decode()`).

    Attributes:
      config: the architecture as decoded: the policy's, with num_kv_heads multiplied by `kv_repeat`.
      params: the parameters in `dtype`, with `layers` as one dict per layer (`decoder.unstack_layers`): a decode
        loop then reads each layer's weights in place instead of slicing a stacked array every step.
      mesh: the (data, fsdp = 1, tensor) mesh over the policy's devices.
      rules: `decode_rules`: what `params`, the KV cache, the rows and the activations are sharded by.
      dtype: the compute dtype name (the matmuls' operands and the KV cache).
      kv_repeat: how many times each kv head is repeated (1: none).
      attention: the prefill's attention, the policy's (xla, splash or auto).
    """

    config: ModelConfig
    params: decoder.Params
    mesh: jax.sharding.Mesh
    rules: ShardingRules
    dtype: str
    kv_repeat: int
    attention: str = "xla"

    @property
    def tensor(self) -> int:
        return self.mesh.shape["tensor"]


def layer_param_shardings(cfg: ModelConfig, mesh, rules: ShardingRules):
    """Shardings of `decoder.unstack_layers`' output: `param_shardings`, per layer without the layer axis."""
    stacked = param_shardings(cfg, mesh, rules)
    per_layer = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s.spec[1:])),
                             stacked["layers"])
    return {**stacked, "layers": [per_layer] * cfg.num_layers}


def decode_config(cfg: ModelConfig, tensor: int) -> tuple[ModelConfig, int]:
    """(the decoded architecture, kv_repeat) for decode tensor size `tensor`."""
    repeat = max(1, tensor // cfg.num_kv_heads)
    return dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * repeat), repeat


def decode_mesh(cfg: ModelConfig, devices, tensor: int | None = None) -> jax.sharding.Mesh:
    """The (data, 1, tensor) mesh over `devices`; tensor=None: `decode_tensor_size`'s choice, capped at one
    process's devices so that tensor parallelism stays on a host's fast interconnect."""
    devices = list(devices)
    cap = min(8, jax.local_device_count()) if jax.process_count() > 1 else 8
    t = decode_tensor_size(len(devices), cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tensor, cap=cap)
    return make_mesh(data=len(devices) // t, fsdp=1, tensor=t, devices=devices)


def _prepare(params, *, num_layers: int, repeat: int, dtype: str):
    # One pass on the policy's own layout: cast, repeat the kv heads, split the layers.
    params = jax.tree.map(lambda a: a.astype(DTYPES[dtype]), params)
    if repeat > 1:
        layers = dict(params["layers"])
        for name, axis in (("wk", 2), ("wv", 2), ("bk", 1), ("bv", 1)):
            if name in layers:  # [L, D, K, E] weights and [L, K, E] biases; head k becomes heads k*r .. k*r + r - 1
                layers[name] = jnp.repeat(layers[name], repeat, axis=axis)
        params = {**params, "layers": layers}
    return decoder.unstack_layers(params, num_layers)


def build(policy: Policy, tensor: int | None = None) -> DecodeModel:
    """`policy` in the decode layout (`tensor`: the tensor-parallel size, None: chosen from the devices and the
    model). Costs one extra copy of the weights, in the compute dtype, at 1/tensor of them per device."""
    cfg = policy.config
    mesh = decode_mesh(cfg, policy.mesh.devices.flat, tensor)
    rules = decode_rules(vocab_over_tensor=cfg.vocab_size % mesh.shape["tensor"] == 0)
    dcfg, repeat = decode_config(cfg, mesh.shape["tensor"])
    # Cast, repeat and split where the weights are (jit needs one device order for its inputs and outputs; the
    # decode mesh may order the same devices differently), then move each array to its decode sharding.
    prepare = jax.jit(functools.partial(_prepare, num_layers=cfg.num_layers, repeat=repeat, dtype=policy.dtype),
                      in_shardings=(param_shardings(cfg, policy.mesh, policy.rules),),
                      out_shardings=layer_param_shardings(dcfg, policy.mesh, policy.rules))
    params = jax.device_put(prepare(policy.params), layer_param_shardings(dcfg, mesh, rules))
    return DecodeModel(dcfg, params, mesh, rules, policy.dtype, repeat, policy.attention)
