"""The sampler's own layout: M_t's weights cast to the compute dtype and resharded once for decoding.

Training keeps the weights FSDP-sharded, which a decode step would all-gather at every token. The decode layout
has no FSDP: heads, kv heads and the MLP width are split over a `tensor` axis (the vocabulary too when it
divides), the model dimension is whole, and the other devices hold data-parallel replicas that split the rows.
When `tensor` is a multiple of num_kv_heads, each kv head is repeated `tensor / num_kv_heads` times so that every
device holds the one kv head its query heads read. See docs/sampling.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp

from .model import decoder
from .model.config import ModelConfig
from .model.sharding import DECODE_TENSOR_CAP, ShardingRules, decode_rules, decode_tensor_size, make_mesh
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
      attention: the prefill's attention, the policy's (xla, splash, cudnn or auto).
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


def decode_sizes(cfg: ModelConfig, devices: int, tensor: int | None = None, *,
                 local_devices: int | None = None) -> dict[str, int]:
    """{data, fsdp: 1, tensor} of the decode mesh over `devices` devices; tensor=None: `decode_tensor_size`'s
    choice, capped at `local_devices` (one process's devices; None: this run's, all of them with one process) so
    that tensor parallelism stays on a host's fast interconnect."""
    if local_devices is None:
        local_devices = jax.local_device_count() if jax.process_count() > 1 else devices
    t = decode_tensor_size(devices, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tensor,
                           cap=min(DECODE_TENSOR_CAP, local_devices))
    return {"data": devices // t, "fsdp": 1, "tensor": t}


def decode_layout_rules(cfg: ModelConfig, tensor: int) -> ShardingRules:
    """`decode_rules` for `cfg` at decode tensor size `tensor` (the vocabulary over `tensor` when it divides)."""
    return decode_rules(vocab_over_tensor=cfg.vocab_size % tensor == 0)


def decode_mesh(cfg: ModelConfig, devices, tensor: int | None = None) -> jax.sharding.Mesh:
    """The (data, 1, tensor) mesh over `devices` (`decode_sizes`). One process's devices: those of the process
    `devices[0]` belongs to when they span several processes (as on a pod; also the abstract devices of a TPU
    topology, jaxsr.plan_compile), else all of them."""
    devices = list(devices)
    return make_mesh(**decode_sizes(cfg, len(devices), tensor, local_devices=process_devices(devices)),
                     devices=devices)


def process_devices(devices) -> int:
    """How many of `devices` one process holds (that of `devices[0]`): all of them when they are one process's."""
    per_process = collections.Counter(getattr(d, "process_index", 0) for d in devices)
    return per_process[getattr(devices[0], "process_index", 0)] if len(per_process) > 1 else len(devices)


def decode_target(cfg: ModelConfig, devices, tensor: int | None = None):
    """(mesh, rules, decoded config, kv_repeat) of the decode layout over `devices`: where `build` puts M_t."""
    mesh = decode_mesh(cfg, devices, tensor)
    dcfg, repeat = decode_config(cfg, mesh.shape["tensor"])
    return mesh, decode_layout_rules(cfg, mesh.shape["tensor"]), dcfg, repeat


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


def prepare_fn(cfg: ModelConfig, mesh, rules: ShardingRules, repeat: int, dtype: str):
    """The jitted first step of `build`, on the policy's own layout (`mesh`, `rules`): the parameters cast to
    `dtype`, kv heads repeated `repeat` times, layers split. Donates nothing: the policy keeps its parameters."""
    dcfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * repeat)
    return jax.jit(functools.partial(_prepare, num_layers=cfg.num_layers, repeat=repeat, dtype=dtype),
                   in_shardings=(param_shardings(cfg, mesh, rules),),
                   out_shardings=layer_param_shardings(dcfg, mesh, rules))


def build(policy: Policy, tensor: int | None = None) -> DecodeModel:
    """`policy` in the decode layout (`tensor`: the tensor-parallel size, None: chosen from the devices and the
    model). Costs one extra copy of the weights, in the compute dtype, at 1/tensor of them per device; while it
    is made, the prepared copy on the policy's layout and the decode copy are both live."""
    cfg = policy.config
    mesh, rules, dcfg, repeat = decode_target(cfg, policy.mesh.devices.flat, tensor)
    # Cast, repeat and split where the weights are (jit needs one device order for its inputs and outputs; the
    # decode mesh may order the same devices differently), then move each array to its decode sharding.
    prepared = prepare_fn(cfg, policy.mesh, policy.rules, repeat, policy.dtype)(policy.params)
    params = jax.device_put(prepared, layer_param_shardings(dcfg, mesh, rules))
    return DecodeModel(dcfg, params, mesh, rules, policy.dtype, repeat, policy.attention)


def device_put_shardings(src, dst):
    """The input shardings of the program `jax.device_put` compiles to move arrays from `src` to `dst` shardings
    of the same devices (jax._src.dispatch._different_device_order_reshard): when the device orders differ, the
    source layout relabelled onto the target's device order, so that an identity jit from these to `dst` is the
    same reshard (jaxsr.plan_compile compiles `build`'s move this way)."""
    from jax.sharding import Mesh, NamedSharding

    def one(s, d):
        if s._internal_device_list == d._internal_device_list:
            return s
        ids = None if s.is_fully_replicated else tuple(
            {dev: i for i, dev in enumerate(d._internal_device_list)}[dev] for dev in s._internal_device_list)
        mesh = Mesh(d.mesh.devices.reshape(s.mesh.axis_sizes), s.mesh.axis_names)
        return NamedSharding(mesh, s.spec, memory_kind=d.memory_kind, _logical_device_ids=ids)

    return jax.tree.map(one, src, dst)
