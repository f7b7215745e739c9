"""One device mesh (`data`, `fsdp`, `tensor`) and the few logical-axis rules that place every array on it.

Weights are sharded FSDP x tensor-parallel: the model dimension (`embed`) over `fsdp`, heads / MLP width /
vocabulary over `tensor`. Batches go over `data` x `fsdp`. Norm scales and biases are small and replicated
on purpose (rule `norm` / `bias` -> None). A dimension that does not divide its mesh axis is an error,
never a silent replication.

Decoding has its own layout (`decode_rules`, `decode_tensor_size`): no FSDP (a weight sharded over `fsdp`
is all-gathered by every decode step), heads and MLP over `tensor`, rows over `data`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")


class ShardingError(ValueError):
    """An array or mesh that does not fit; the message names the tensor, the dimension and the mesh axis."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical dimension name -> mesh axis (or axes, or None for replicated)."""

    batch: tuple[str, ...] | str | None = BATCH
    embed: str | None = "fsdp"
    heads: str | None = "tensor"
    kv_heads: str | None = "tensor"
    mlp: str | None = "tensor"
    vocab: str | None = "tensor"
    layers: None = None
    head_dim: None = None
    seq: None = None
    norm: None = None  # RMSNorm scales: tiny, replicated by rule.
    bias: None = None  # projection biases: tiny, replicated by rule.

    def spec(self, logical: Sequence[str | None]) -> P:
        axes = [getattr(self, name) if name is not None else None for name in logical]
        used = [a for ax in axes if ax is not None for a in ((ax,) if isinstance(ax, str) else ax)]
        if len(used) != len(set(used)):
            raise ShardingError(f"logical axes {tuple(logical)} map a mesh axis twice: {axes}")
        return P(*axes)


DEFAULT_RULES = ShardingRules()


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[a] for a in names)


def named_sharding(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int], name: str,
                   rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """The NamedSharding of tensor `name`, after checking each dimension divides its mesh axis."""
    spec = rules.spec(logical)
    if len(spec) != len(shape):
        raise ShardingError(f"tensor {name!r} has shape {tuple(shape)} but logical axes {tuple(logical)}")
    for dim, (size, axis, lname) in enumerate(zip(shape, spec, logical)):
        n = _axis_size(mesh, axis)
        if size % n:
            raise ShardingError(
                f"tensor {name!r} dimension {dim} ({lname}={size}) is not divisible by mesh axis {axis!r} (size {n}); "
                f"choose a mesh whose {axis!r} size divides {size}")
    return NamedSharding(mesh, spec)


def _resolve_sizes(sizes: dict[str, int], n: int, where: str) -> dict[str, int]:
    """`sizes` with its -1 (at most one) replaced by the rest of the `n` devices; their product must be n."""
    sizes = dict(sizes)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"mesh sizes {sizes}: at most one axis may be -1")
    bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
    if bad:
        raise ShardingError(f"mesh sizes {bad} must be positive or -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise ShardingError(f"mesh sizes {sizes}: the {where} are not divisible by {fixed}")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ShardingError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
                            f"{math.prod(sizes.values())} devices, but there are {where}")
    return sizes


def _where(n: int, all_devices: bool) -> str:
    if not all_devices or jax.process_count() == 1:
        return f"{n} devices"
    return f"{n} devices ({jax.process_count()} processes x {jax.local_device_count()} devices each)"


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 for "the rest"."""
    all_devices = devices is None
    devices = list(jax.devices() if devices is None else devices)
    sizes = _resolve_sizes({"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}, len(devices),
                           _where(len(devices), all_devices))
    return Mesh(device_grid(tuple(sizes.values()), devices), MESH_AXES)


def device_grid(shape: tuple[int, int, int], devices: Sequence) -> np.ndarray:
    """`devices` arranged as a (data, fsdp, tensor) grid of `shape`: the one layout function of real runs and of
    ahead-of-time compiles for abstract TPU topologies (jaxsr.plan_compile), so both get the same collectives.

    TPU (and several processes): `mesh_utils.create_device_mesh` puts neighbouring chips on the inner axes (splitting
    a physical axis only when the sizes ask for it). Several slices (multi-slice, devices with a `slice_index`):
    `create_hybrid_device_mesh` with the data axis across slices (only data parallelism crosses the slices' network,
    DCN) and fsdp x tensor within each. One CPU/GPU process: the devices in order.
    """
    from jax.experimental import mesh_utils

    devices = list(devices)
    slices = len({getattr(d, "slice_index", 0) or 0 for d in devices})
    if slices > 1:
        if shape[0] % slices:
            raise ShardingError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} over {slices} slices: data "
                                f"must be a multiple of {slices} (data parallelism spans the slices' network; fsdp and "
                                f"tensor stay within a slice of {len(devices) // slices} devices)")
        return mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices,
                                                    allow_split_physical_axes=True)
    if devices[0].platform == "tpu" or jax.process_count() > 1:
        try:
            return mesh_utils.create_device_mesh(shape, devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            # An axis whose size is not a product of whole physical axes (tensor 8 on a 4x4x4 v5p) splits one.
            return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    return np.array(devices).reshape(shape)


def _axis_sizes(data: int | None, fsdp: int | None, tensor: int | None, n: int, embed_dim: int,
                where: str) -> dict[str, int]:
    if data is None and fsdp is None and tensor is None:
        # gcd(devices, embed_dim) divides both, so every supported model loads on any device count; tensor
        # parallelism (which needs heads to divide) is opt-in through the config.
        fsdp = math.gcd(n, int(embed_dim))
        return {"data": n // fsdp, "fsdp": fsdp, "tensor": 1}
    return _resolve_sizes({"data": -1 if data is None else int(data), "fsdp": int(fsdp or 1), "tensor": int(tensor or 1)},
                          n, where)


def mesh_axis_sizes(data: int | None, fsdp: int | None, tensor: int | None, devices: int,
                    embed_dim: int) -> dict[str, int]:
    """The {data, fsdp, tensor} sizes `mesh_from_sizes` picks on `devices` devices, computed without any devices.

    All three unset: FSDP over gcd(devices, embed_dim), data parallel over the rest. Otherwise an unset data
    is the rest of the devices (-1) and an unset fsdp or tensor is 1.
    """
    return _axis_sizes(data, fsdp, tensor, devices, embed_dim, f"{devices} devices")


def mesh_from_sizes(data: int | None, fsdp: int | None, tensor: int | None, embed_dim: int,
                    devices: Sequence | None = None) -> Mesh:
    """The mesh of a config's `mesh:` section (None = unset) over `devices` (default: all); see `mesh_axis_sizes`."""
    n = len(jax.devices() if devices is None else devices)
    return make_mesh(**_axis_sizes(data, fsdp, tensor, n, embed_dim, _where(n, devices is None)), devices=devices)


def default_mesh(embed_dim: int, devices: Sequence | None = None) -> Mesh:
    """FSDP over as many devices as divide the model dimension, data parallel over the rest."""
    return mesh_from_sizes(None, None, None, embed_dim, devices)


def batch_multiple(mesh: Mesh) -> int:
    """Batches are split over data x fsdp, so their size must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int | None = None, rules: ShardingRules = DEFAULT_RULES, *,
                   micro_axis: bool = False) -> NamedSharding:
    """Rows over `rules.batch`, every other axis whole. micro_axis: arrays are [A, b, ...] and the micro-batch
    axis A stays whole. ndim=None: one sharding for arrays of any rank (a batch dict's ids, masks and weights)."""
    lead = (None,) if micro_axis else ()
    rest = () if ndim is None else (None,) * (ndim - len(lead) - 1)
    return NamedSharding(mesh, P(*lead, rules.batch, *rest))


# --- the decode layout --------------------------------------------------------------------------------------

# Tensor parallelism beyond one host's chips crosses the slower network (DCN) at every layer of every step.
DECODE_TENSOR_CAP = 8


def decode_rules(vocab_over_tensor: bool = True) -> ShardingRules:
    """The sampler's rules: weights tensor-parallel (heads, kv heads, MLP width, and the vocabulary when it
    divides), the model dimension whole, rows over `data` (the decode mesh's `fsdp` is 1)."""
    return ShardingRules(embed=None, vocab="tensor" if vocab_over_tensor else None)


def _decode_tensor_fits(t: int, devices: int, num_heads: int, num_kv_heads: int, mlp: int) -> str | None:
    """Why `t` cannot be the decode tensor size (None: it can)."""
    if devices % t:
        return f"it does not divide the {devices} devices"
    if num_heads % t or mlp % t:
        return f"it must divide num_heads={num_heads} and intermediate_size={mlp}"
    if num_kv_heads % t and t % num_kv_heads:
        return f"num_kv_heads={num_kv_heads} must be a multiple of it or divide it (kv heads are then replicated)"
    return None


def decode_tensor_size(devices: int, num_heads: int, num_kv_heads: int, mlp: int, tensor: int | None = None,
                       cap: int = DECODE_TENSOR_CAP) -> int:
    """The decode mesh's `tensor` size: `tensor` when given (checked), else the largest t <= cap that divides
    the device count, num_heads and the MLP width, and either divides num_kv_heads or is a multiple of it (the
    kv heads are then repeated t / num_kv_heads times). The other devices hold data-parallel replicas."""
    if tensor is not None:
        why = _decode_tensor_fits(int(tensor), devices, num_heads, num_kv_heads, mlp) if tensor >= 1 else "it is < 1"
        if why:
            raise ShardingError(f"decode tensor size {tensor} does not fit: {why}")
        return int(tensor)
    return max(t for t in range(1, min(devices, cap) + 1)
               if _decode_tensor_fits(t, devices, num_heads, num_kv_heads, mlp) is None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
