"""jaxsr.hlo_text on hand-written optimized HLO: the loops XLA's cost analysis counts once, the collectives in
the decode loop, and the custom calls it does not cost."""

import importlib.util

import pytest

from jaxsr import hlo_text

HLO = """HloModule m

%fused (p: bf16[4,8]) -> bf16[8,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  ROOT %ag = bf16[8,8]{1,0} all-gather(%p), dimensions={0}
}

%inner_body (s: (s32[], f32[16])) -> (s32[], f32[16]) {
  %g = f32[16]{0} custom-call(%x), custom_call_target="GatherScatterIndicesBitpacked"
}

%inner_cond (s: (s32[], f32[16])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%body (s: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %f = bf16[8,8]{1,0} fusion(%x), kind=kCustom, calls=%fused
  %ars = (f32[16]{0}, f32[16]{0}) all-reduce-start(%y), to_apply=%add
  %ard = f32[16]{0} all-reduce-done(%ars)
  %agd = ((bf16[2,1024]{1,0}), bf16[4,1024]{1,0}) all-gather-start(%z), dimensions={0}
  %inner = (s32[], f32[16]) while(%t2), condition=%inner_cond, body=%inner_body
}

%cond (s: (s32[], bf16[4,8])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: bf16[4,8]) -> bf16[4,8] {
  %before = bf16[8,8]{1,0} all-gather(%a), dimensions={0}
  %alloc = f32[4]{0} custom-call(), custom_call_target="AllocateBuffer"
  %w = (s32[], bf16[4,8]) while(%t), condition=%cond, body=%body
}
"""


def test_collectives_of_the_loop_body_and_what_they_make():
    c = hlo_text.loop_collectives(HLO)
    assert c["while_loops"] == 1 and c["nested_while_loops"] == 1
    # The fusion's gather (8 x 8) and the async one's result (4 x 1024), not the gather before the loop.
    assert c["all-gather"] == {"count": 2, "bytes": 8 * 8 * 2 + 4 * 1024 * 2}
    assert sorted(c["all_gathers"]) == [64, 4096]
    assert c["all-reduce"] == {"count": 1, "bytes": 16 * 4}  # the -start counted once, its result alone
    assert c["reduce-scatter"]["count"] == 0


def test_loops_and_custom_calls_xla_does_not_cost():
    assert hlo_text.while_loops(HLO) == {"count": 2, "top": 1}
    assert hlo_text.custom_calls(HLO) == {"GatherScatterIndicesBitpacked": 1}  # AllocateBuffer is bookkeeping
    assert hlo_text.array_bytes("(bf16[2,3]{1,0}, f32[4]{0}, pred[])") == 2 * 3 * 2 + 4 * 4 + 1


# A decode-like loop body with XLA:TPU's memory spaces: S(1) is on-chip memory, no S(n) is HBM.
HBM_HLO = """HloModule m

%fused_dus (p0: bf16[8,64], p1: bf16[8,1], p2: s32[]) -> bf16[8,64] {
  %p0 = bf16[8,64]{1,0} parameter(0)
  %p1 = bf16[8,1]{1,0:S(1)} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = bf16[8,64]{1,0} dynamic-update-slice(%p0, %p1, %z, %p2)
}

%fused_ds (p0: f32[100,16], p1: s32[]) -> f32[4,16] {
  %p0 = f32[100,16]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[4,16]{1,0:S(1)} dynamic-slice(%p0, %p1, %z), dynamic_slice_sizes={4,16}
}

%fused_dot (p0: bf16[8,64], p1: bf16[64,32]) -> f32[8,32] {
  %p0 = bf16[8,64]{1,0:S(1)} parameter(0)
  %p1 = bf16[64,32]{1,0:S(1)} parameter(1)
  ROOT %dot = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (s: (s32[], bf16[64,32], bf16[8,64], f32[100,16], bf16[8,64], bf16[8,1])) -> (s32[]) {
  %s = (s32[], bf16[64,32]{1,0}, bf16[8,64]{1,0}, f32[100,16]{1,0}, bf16[8,64]{1,0:S(1)}, bf16[8,1]{1,0:S(1)}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %w = bf16[64,32]{1,0} get-tuple-element(%s), index=1
  %kv = bf16[8,64]{1,0} get-tuple-element(%s), index=2
  %tab = f32[100,16]{1,0} get-tuple-element(%s), index=3
  %x = bf16[8,64]{1,0:S(1)} get-tuple-element(%s), index=4
  %upd = bf16[8,1]{1,0:S(1)} get-tuple-element(%s), index=5
  %cs = (bf16[64,32]{1,0:S(1)}, bf16[64,32]{1,0}, u32[]) copy-start(%w)
  %cd = bf16[64,32]{1,0:S(1)} copy-done(%cs)
  %f1 = bf16[8,64]{1,0} fusion(%kv, %upd, %i), kind=kLoop, calls=%fused_dus
  %ev = (bf16[8,64]{1,0}, bf16[8,64]{1,0:S(1)}, u32[]) copy-start(%x)
  %evd = bf16[8,64]{1,0} copy-done(%ev)
  %f2 = f32[4,16]{1,0:S(1)} fusion(%tab, %i), kind=kLoop, calls=%fused_ds
  %ss = ((f32[100,16]{1,0}), f32[50,16]{1,0:S(1)}, s32[]) slice-start(%tab), slice={[0:50], [0:16]}
  %sd = f32[50,16]{1,0:S(1)} slice-done(%ss)
  %f3 = f32[8,32]{1,0} fusion(%x, %cd), kind=kOutput, calls=%fused_dot
  ROOT %t = (s32[]) tuple(%i)
}

%cond (s: (s32[])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: (s32[])) -> (s32[]) {
  %w = (s32[]) while(%a), condition=%cond, body=%body
}
"""


def test_hbm_traffic_of_a_loop_body_by_memory_space():
    got = hlo_text.loop_hbm_bytes(HBM_HLO)
    # Reads: the weight prefetched into S(1) once (64 x 32 bf16), the 4 rows the dynamic slice takes of the table
    # and the 50 the async slice takes, the loop index (twice); the in-place update reads no cache, the matmul
    # reads only S(1) copies.
    assert got["read"] == 64 * 32 * 2 + 4 * 16 * 4 + 50 * 16 * 4 + 2 * 4
    # Writes: the one updated cache slot, the evicted copy back to HBM, the matmul's result.
    assert got["write"] == 8 * 1 * 2 + 8 * 64 * 2 + 8 * 32 * 4
    # The whole program: its entry does nothing but the loop, whose body (and condition: a pred) it counts once.
    assert hlo_text.hbm_bytes(HBM_HLO) == {"read": got["read"], "write": got["write"] + 1}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install jaxsr[tpu])")
def test_hbm_traffic_of_a_compiled_tpu_decode_loop():
    """A decode-like loop compiled for v5e:2x2: per step each of 2 layers writes one slot of its cache (256 MiB per
    device, more than on-chip memory) and reads it whole once. The walk counts that cache once and the small
    weights at most once; XLA's bytes accessed counts the cache several times (the in-place update as a whole read
    and write, the prefetches and the reads of their copies)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxsr.plan_compile import abstract_devices, parse_topology

    mesh = Mesh(np.array(abstract_devices(parse_topology("v5e:2x2"))), ("t",))
    L, D, S, B = 2, 2048, 32768, 8
    cols, whole = NamedSharding(mesh, P(None, "t")), NamedSharding(mesh, P())
    ws = [jax.ShapeDtypeStruct((D, D), jnp.bfloat16, sharding=cols)] * L
    caches = [jax.ShapeDtypeStruct((B, S, D), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "t")))] * L

    def step(ws, caches, x):
        def body(c):
            i, x, caches = c
            out = []
            for w, kv in zip(ws, caches):
                h = jax.lax.with_sharding_constraint(x @ w, cols)
                kv = jax.lax.dynamic_update_slice_in_dim(kv, h[:, None, :], i, axis=1)
                a = jnp.einsum("bsd,bd->bs", kv, h)
                x = jax.lax.with_sharding_constraint(x + jnp.sum(a, axis=1, keepdims=True).astype(x.dtype), whole)
                out.append(kv)
            return i + 1, x, out
        return jax.lax.while_loop(lambda c: c[0] < 100, body, (0, x, caches))

    compiled = jax.jit(step, donate_argnums=1).lower(
        ws, caches, jax.ShapeDtypeStruct((B, D), jnp.bfloat16, sharding=whole)).compile()
    kv, weights = L * B * S * D // 4 * 2, L * D * D // 4 * 2  # per device
    got = hlo_text.loop_hbm_bytes(compiled.as_text())
    print({k: v / 2**20 for k, v in got.items()}, "MiB")
    assert kv <= got["read"] <= 1.01 * (kv + weights) and got["write"] < 2**20
    cost = compiled.cost_analysis()
    assert (cost[0] if isinstance(cost, list) else cost)["bytes accessed"] > 2 * kv
