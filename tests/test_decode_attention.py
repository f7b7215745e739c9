"""The Pallas decode-attention kernel (jaxsr/model/decode_attention.py): equal to the XLA path's decode step
(Pallas interpret mode on CPU), never touching the cache's blocks after the current slot (or before a sliding
window), the same completions through `jaxsr.generate` on a sharded decode layout, and lowered for a TPU topology
by an ahead-of-time compile."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsr.model import decode_attention as da
from jaxsr.model import decoder
from jaxsr.model.attention_kernels import decode_kernel_for
from jaxsr.model.config import ModelConfig
from kernel_checks import assert_close

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU topology needs libtpu (the tpu extra)")


def _layer(B, K, G, E, S, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, K * G, E)), dtype)
    k = jnp.asarray(r.normal(size=(B, K, E, S)), dtype)
    v = jnp.asarray(r.normal(size=(B, K, S, E)), dtype)
    # Ragged rows: row 0 a left-padded prompt, row 1 a shared prefix with padding, then a prompt; row 2 all real.
    valid = np.zeros((B, S), bool)
    valid[0, 40:] = True
    valid[1, 3:20] = True
    valid[1, 70:] = True
    valid[2:] = True
    return q, k, v, valid


def _xla(q, k, v, valid, slot, window):
    mask = decoder.attention_mask(jnp.array([slot]), jnp.asarray(valid), window)
    return decoder._gqa_attention(q[:, None], k, v, mask, q.shape[-1] ** -0.5)[:, 0]


@pytest.mark.parametrize("B, K, G, E, S, block, window", [
    (4, 2, 3, 16, 512, 128, None),   # grouped queries, 4 blocks, 4 rows per grid step
    (3, 1, 1, 32, 384, 128, 100),    # one query head per kv head, 3 rows (one per step), a sliding window
    (8, 2, 2, 16, 96, None, None),   # a cache no 128-block divides: one block of all 96 slots
    (2, 4, 2, 16, 512, 256, 300),
])
def test_the_kernel_equals_the_xla_decode_step_at_every_kind_of_slot(B, K, G, E, S, block, window):
    q, k, v, valid = _layer(B, K, G, E, S)
    blk = block or da.block_for(S)
    for slot in sorted({70, blk - 1, blk, S - blk + 5, S - 1} & set(range(70, S))):
        val = valid.copy()
        val[:, slot + 1:] = False  # the new-token slots after the current one are empty
        val[:, slot] = True  # this step's own token
        ours = da.decode_attention(q, k, v, jnp.asarray(val), slot, E ** -0.5, sliding_window=window,
                                   interpret=True, block=block)
        assert_close(ours, _xla(q, k, v, val, slot, window), f"slot {slot}, block {blk}, window {window}")


def test_blocks_after_the_slot_and_before_the_window_are_never_read():
    """NaN in every block after the current slot's (and before the window's first): a kernel that read them into
    its arithmetic would return NaN (p = 0 times NaN), the XLA path does; this one returns the clean answer."""
    B, K, G, E, S, block, window = 2, 2, 2, 16, 1024, 128, 200
    q, k, v, valid = _layer(B, K, G, E, S)
    slot = 420  # block 3; the window starts at slot 221, in block 1
    valid[:, slot + 1:] = False
    clean = _xla(q, k, v, valid, slot, window)
    poisoned_k, poisoned_v = k.at[..., 512:].set(jnp.nan), v.at[:, :, 512:].set(jnp.nan)
    poisoned_k, poisoned_v = poisoned_k.at[..., :128].set(jnp.nan), poisoned_v.at[:, :, :128].set(jnp.nan)
    ours = da.decode_attention(q, poisoned_k, poisoned_v, jnp.asarray(valid), slot, E ** -0.5, sliding_window=window,
                               interpret=True, block=block)
    assert_close(ours, clean, "poisoned unread blocks")
    assert np.isnan(np.asarray(_xla(q, poisoned_k, poisoned_v, valid, slot, window))).any()  # the XLA path reads all


def test_block_bounds_and_what_each_grid_step_reads():
    bounds = da.block_bounds(420, 1024, 128, None)
    assert bounds.tolist() == [0, 3, 420]
    # Grid steps 4..7 ask for block 3 again: the pipeline copies nothing for them.
    assert [int(da.block_read(j, bounds)) for j in range(8)] == [0, 1, 2, 3, 3, 3, 3, 3]
    windowed = da.block_bounds(420, 1024, 128, 200)  # keys 221..420
    assert windowed.tolist() == [1, 3, 420]
    assert [int(da.block_read(j, windowed)) for j in range(8)] == [1, 1, 2, 3, 3, 3, 3, 3]
    assert da.block_bounds(0, 256, 128, 8).tolist() == [0, 0, 0]
    assert [da.block_for(s) for s in (1024, 768, 384, 96, 1152)] == [512, 256, 128, 96, 128]


def test_the_choice_rules():
    assert decode_kernel_for("auto", "tpu") == "pallas" and decode_kernel_for("splash", "cpu") == "pallas"
    assert {decode_kernel_for(a, p) for a in ("auto", "xla", "cudnn") for p in ("cpu", "gpu", "rocm")} == {"xla"}
    assert decode_kernel_for("xla", "tpu") == "xla" and decode_kernel_for("cudnn", "tpu") == "xla"
    with pytest.raises(ValueError, match="not an attention implementation"):
        decode_kernel_for("flash", "tpu")


# --- through the sampler ------------------------------------------------------------------------------------------

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=256, sliding_window=24)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_with_the_kernel_gives_the_xla_paths_completions_on_data_2_x_tensor_4(temperature):
    """Ragged prompts, a shared prefix, several samples per prompt, a sliding window shorter than the rows: the
    decode layout data 2 x tensor 4 with the kernel in every decode step (and splash in the prefill), against the
    XLA path. Same tokens; log-probabilities within float32 rounding."""
    from jaxsr.policy import random_policy
    from jaxsr.sample import generate

    base = dataclasses.replace(random_policy(CFG, seed=3), decode_tensor=4)
    prefix = list(range(3, 21))
    prompts = [prefix + [30, 31, 32], prefix + [40], prefix + list(range(50, 62)), prefix + [70, 71]]
    out = {}
    for attention in ("xla", "splash"):
        policy = dataclasses.replace(base, attention=attention)
        assert dict(policy.for_decode().mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
        out[attention] = generate(policy, prompts, num_samples=3, max_new_tokens=[20, 9, 14, 20],
                                  temperature=temperature, seed=5, eos_token_ids=[], progress=False)
    for a, b in zip(out["xla"], out["splash"]):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=1e-4, atol=1e-5)


# --- ahead of time, for a TPU topology ----------------------------------------------------------------------------

@needs_libtpu
def test_the_decode_loop_with_the_kernel_compiles_for_tpu():
    """The sampler's decode program on v5e:2x2 (decode layout tensor 4) in bfloat16: with model.attention=auto the
    loop body holds the kernel's Mosaic custom call (one per layer) and no weight-sized all-gather; with xla none."""
    from jaxsr import decode_layout, plan_compile, sampler
    from jaxsr.next_token import sampling_mode

    cfg = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=8, num_kv_heads=4, head_dim=64, max_position_embeddings=1024)
    devices = plan_compile.abstract_devices(plan_compile.parse_topology("v5e:2x2"))
    mesh, rules, dcfg, _ = decode_layout.decode_target(cfg, devices)
    mode = sampling_mode(0.7, 0.9, 0, cfg.vocab_size)
    hlo = {a: sampler.decode_program(dcfg, mesh, "bfloat16", rules, mode, 16, 256, 256, sampler.EOS_SLOTS, (1, 2),
                                     attention=a).as_text() for a in ("auto", "xla")}
    assert hlo["auto"].count("jaxsr_decode_attention") >= cfg.num_layers
    assert "tpu_custom_call" in hlo["auto"] and "tpu_custom_call" not in hlo["xla"]
    weight = cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim // 4  # the smallest weight, per device
    gathers = plan_compile.loop_collectives(hlo["auto"])["all_gathers"]
    assert [n for n in gathers if n >= weight] == []


@needs_libtpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,slots,window,dtype", [
    (14, 2, 64, 2048, None, "bfloat16"),    # Qwen2.5-0.5B: 7 query heads per kv head (not a power of two)
    (32, 8, 128, 3072, None, "bfloat16"),   # Llama 3.1 8B: head_dim 128, 6 blocks of 512
    (16, 4, 64, 1536, 512, "bfloat16"),     # Mistral-like sliding window
    (8, 2, 128, 1000, None, "float32"),     # a cache no block divides: one block of all 1,000 slots
])
def test_the_kernel_lowers_for_tpu_at_real_model_shapes(heads, kv_heads, head_dim, slots, window, dtype):
    """Mosaic accepts the kernel's blocks for the head counts, head sizes, GQA ratios and cache lengths of real
    models (its tiling rules bind on the last two dimensions of every block), sharded over v5e:2x2 as data 2 x
    tensor 2: an ahead-of-time compile holds the kernel's custom call."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsr import plan_compile
    from jaxsr.model import make_mesh

    mesh = make_mesh(2, 1, 2, devices=plan_compile.abstract_devices(plan_compile.parse_topology("v5e:2x2")))
    rows, batch = 16, ("data", "fsdp")

    def arg(shape, spec, dt=dtype):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=NamedSharding(mesh, spec))

    q = arg((rows, heads, head_dim), P(batch, "tensor", None))
    k = arg((rows, kv_heads, head_dim, slots), P(batch, "tensor", None, None))
    v = arg((rows, kv_heads, slots, head_dim), P(batch, "tensor", None, None))
    valid = arg((rows, slots), P(batch, None), "bool")
    slot = arg((), P(), "int32")
    attend = jax.jit(lambda q, k, v, valid, slot: da.decode_attention(
        q, k, v, valid, slot, head_dim ** -0.5, sliding_window=window, mesh=mesh))
    hlo = attend.lower(q, k, v, valid, slot).compile().as_text()
    assert "jaxsr_decode_attention" in hlo and "tpu_custom_call" in hlo
