"""The splash attention kernel (jaxsr/model/attention_kernels.py) against the XLA path, in Pallas interpret mode on
CPU: forward and gradients in float32, for every mask kind it takes over; the option's choice rules; and, with libtpu,
an ahead-of-time compile of a sharded training step for a TPU topology with the kernel in it."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsr.model import ShardingError, decoder, make_mesh
from jaxsr.model.attention_kernels import block_size, kernel_for, splash_attention
from kernel_checks import assert_close, assert_loss_and_gradients_equal_xla, prefill_with_and_without, tiny

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install jaxsr[tpu])")


def _reference(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, valid_BxT, segment_ids_BxT, sliding_window):
    T, E = q_BxTxHxE.shape[1], q_BxTxHxE.shape[3]
    mask = decoder.attention_mask(jnp.arange(T), valid_BxT, sliding_window, segment_ids_BxT)
    return decoder._gqa_attention(q_BxTxHxE, k_BxTxKxE.transpose(0, 2, 3, 1), v_BxTxKxE.swapaxes(1, 2), mask,
                                  E ** -0.5)


def _rows(T):
    """Per-row validity of a batch of 4: whole, right-padded, left-padded, all padding (a batch-padding row)."""
    valid_BxT = np.ones((4, T), bool)
    valid_BxT[1, T - 57:] = False
    valid_BxT[2, :33] = False
    valid_BxT[3] = False
    return valid_BxT


def _packed(T):
    """Packed rows: runs of segment ids 1, 2, ... of uneven lengths, 0 on the trailing padding."""
    seg_BxT = np.zeros((2, T), np.int32)
    for b, cuts in enumerate(([0, 70, 150, 190, T - 20], [0, 129, 131, T])):
        for i, (s, e) in enumerate(zip(cuts[:-1], cuts[1:])):
            seg_BxT[b, s:e] = i + 1
    return seg_BxT != 0, seg_BxT


CASES = {
    # name: (T, H, K, rows, sliding_window); rows: whole, ragged (`_rows`) or packed (`_packed`)
    "causal": (256, 4, 4, "whole", None),
    "padded": (256, 2, 2, "ragged", None),
    "packed": (256, 2, 2, "packed", None),
    "sliding_window": (256, 2, 2, "ragged", 48),
    "gqa": (256, 4, 2, "ragged", None),
    "unaligned_T": (200, 4, 1, "ragged", 80),  # T padded to the block (256) and cut back; one kv head
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_equals_xla_forward_and_gradient(case):
    T, H, K, rows, window = CASES[case]
    E = 32
    if rows == "packed":
        valid_BxT, seg_BxT = _packed(T)
    else:
        valid_BxT, seg_BxT = (_rows(T) if rows == "ragged" else np.ones((2, T), bool)), None
    B = valid_BxT.shape[0]
    r = np.random.default_rng(sum(map(ord, case)))
    q, k, v = (jnp.asarray(r.normal(size=(B, T, n, E)), jnp.float32) for n in (H, K, K))
    # Only real queries' outputs are compared (and carry a cotangent): padding queries' outputs are discarded by the
    # model in both paths (the XLA path gives them a uniform softmax, splash their own padding segment).
    w_BxTx1x1 = jnp.asarray(valid_BxT)[:, :, None, None]
    g = jnp.asarray(r.normal(size=(B, T, H, E)), jnp.float32) * w_BxTx1x1
    seg = None if seg_BxT is None else jnp.asarray(seg_BxT)
    ref = functools.partial(_reference, valid_BxT=jnp.asarray(valid_BxT), segment_ids_BxT=seg, sliding_window=window)
    ours = functools.partial(splash_attention, valid_BxT=jnp.asarray(valid_BxT), scale=E ** -0.5,
                             segment_ids_BxT=seg, sliding_window=window, interpret=True, block=128)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * g)

    out_ref, out = jax.jit(ref)(q, k, v), jax.jit(ours)(q, k, v)
    assert out.shape == out_ref.shape == (B, T, H, E)
    assert_close(out * w_BxTx1x1, out_ref * w_BxTx1x1, f"{case} forward")
    grads_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
    grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", grads, grads_ref):
        assert_close(a, b, f"{case} d{name}")


def test_sharded_splash_equals_unsharded():
    """Under a (data 2, fsdp 2, tensor 2) mesh the kernel runs per device under shard_map: rows over data x fsdp,
    4 query heads and 2 kv heads over tensor (each device's query heads read its own kv head)."""
    T, H, K, E = 128, 4, 2, 32
    valid_BxT = np.ones((4, T), bool)
    valid_BxT[1, 100:] = False
    valid_BxT[2, :20] = False
    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.normal(size=(4, T, n, E)), jnp.float32) for n in (H, K, K))
    valid = jnp.asarray(valid_BxT)
    mesh = make_mesh(2, 2, 2)
    plain = jax.jit(lambda q, k, v: splash_attention(q, k, v, valid, E ** -0.5, interpret=True))(q, k, v)
    sharded = jax.jit(lambda q, k, v: splash_attention(q, k, v, valid, E ** -0.5, mesh=mesh, interpret=True))(q, k, v)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(plain))
    with pytest.raises(ShardingError, match="num_kv_heads=1 is not divisible by mesh axis 'tensor'"):
        splash_attention(q, k[:, :, :1], v[:, :, :1], valid, E ** -0.5, mesh=mesh, interpret=True)


def use_splash(attention, platform, *, branch):
    return kernel_for(attention, platform, branch=branch, packed=False, dtype=jnp.float32, head_dim=32) == "splash"


def test_choice_rules():
    assert not use_splash("xla", "tpu", branch=False)
    assert use_splash("auto", "tpu", branch=False) and not use_splash("auto", "cpu", branch=False)
    assert not use_splash("auto", "tpu", branch=True)  # shared-prefix rows keep the XLA path
    assert use_splash("splash", "cpu", branch=False)  # interpret mode off TPU
    assert kernel_for("auto", "tpu", branch=False, packed=True, dtype=jnp.bfloat16, head_dim=256) == "splash"
    with pytest.raises(ValueError, match="dpo.shared_prompt=false"):
        use_splash("splash", "tpu", branch=True)
    with pytest.raises(ValueError, match=r"attention='flash' is not an attention implementation; choose one of"):
        use_splash("flash", "tpu", branch=False)
    assert [block_size(T) for T in (1, 128, 200, 256, 384, 512, 2048, 640)] == [128, 128, 256, 256, 128, 512, 512, 128]


# --- the whole model ---------------------------------------------------------------------------------------------

def _batch(T=160):
    r = np.random.default_rng(3)
    ids = jnp.asarray(r.integers(0, 97, (4, T)), jnp.int32)
    mask = np.ones((4, T), bool)
    mask[1, T - 41:] = False  # right padding (training rows)
    mask[2, :29] = False  # left padding (prompts)
    return ids, jnp.asarray(mask)


@pytest.mark.parametrize("window", [None, 40])
def test_forward_with_splash_equals_xla(window):
    cfg = tiny(sliding_window=window)
    params = decoder.init_params(cfg, jax.random.key(0), std=0.2)
    ids, mask = _batch()
    fwd = jax.jit(decoder.forward, static_argnames=("cfg", "attention"))
    ref = fwd(params, cfg, ids, mask, attention="xla")
    ours = fwd(params, cfg, ids, mask, attention="splash")
    m = np.asarray(mask)
    assert_close(np.asarray(ours)[m], np.asarray(ref)[m], "logits")


def test_packed_forward_and_gradient_with_splash_equal_xla():
    """Packed rows through the model: the loss of real tokens and its gradient w.r.t. every parameter."""
    cfg = tiny()
    params = decoder.init_params(cfg, jax.random.key(1), std=0.2)
    valid, seg = _packed(256)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 97, valid.shape), jnp.int32)

    def loss(params, attention):
        logits = decoder.forward(params, cfg, ids, jnp.asarray(valid), jnp.asarray(seg), attention=attention)
        logp = jax.nn.log_softmax(logits[:, :-1])
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(tok * valid[:, 1:])

    assert_loss_and_gradients_equal_xla(loss, params, "splash")


def test_prefill_with_splash_equals_xla():
    """A prefill into an empty cache (the sampler's, left-padded prompts): hidden states and the cache it writes."""
    cfg = tiny()
    params = decoder.init_params(cfg, jax.random.key(2), std=0.2)
    ids, mask = _batch(144)
    P = ids.shape[1]
    (h_ref, c_ref), (h, c) = prefill_with_and_without(params, cfg, ids, mask, "splash", new_slots=16)
    m = np.asarray(mask)
    assert_close(np.asarray(h)[m], np.asarray(h_ref)[m], "hidden states")
    for i in range(cfg.num_layers):  # keys [B, K, E, S] of real slots
        k, k_ref = (np.asarray(x.k_BxKxExS[i][..., :P]).transpose(0, 3, 1, 2) for x in (c, c_ref))
        assert_close(k[m], k_ref[m], f"layer {i} keys")


def test_branch_rows_keep_the_xla_path():
    cfg = tiny()
    params = decoder.init_params(cfg, jax.random.key(0))
    ids = jnp.zeros((2, 16), jnp.int32)
    branch = jnp.asarray(np.repeat([[0] * 8 + [1] * 4 + [2] * 4], 2, axis=0))
    pos = jnp.asarray(np.repeat([list(range(12)) + list(range(8, 12))], 2, axis=0))
    kw = dict(branch_ids_BxT=branch)
    h_auto, _ = decoder.hidden_states(params, cfg, ids, pos, jnp.ones((2, 16), bool), attention="auto", **kw)
    h_xla, _ = decoder.hidden_states(params, cfg, ids, pos, jnp.ones((2, 16), bool), attention="xla", **kw)
    np.testing.assert_array_equal(np.asarray(h_auto), np.asarray(h_xla))
    with pytest.raises(ValueError, match="shared-prefix"):
        decoder.hidden_states(params, cfg, ids, pos, jnp.ones((2, 16), bool), attention="splash", **kw)


def test_sharded_dpo_step_with_splash_equals_xla(fixtures_dir):
    """The trainer's DPO step (two rows per pair) on a (data 2, fsdp 2, tensor 2) mesh: loss, metrics and gradient of
    every parameter with the kernel (under shard_map inside the step's jit) as with the XLA path."""
    import jaxsr
    from jaxsr import data, objectives, train
    from jaxsr.config import DpoSection

    pol = jaxsr.load_policy(fixtures_dir / "hf" / "llama3", mesh=make_mesh(2, 2, 2))  # 4 heads, 2 kv heads
    records = [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"not {w}, {u} instead", "ref_chosen_logps": -9.0,
                "ref_rejected_logps": -12.0} for w, u in (("yes", "no"), ("apple", "river"), ("stone", "cloud"))]
    pairs, _ = data.tokenize_pairs(pol.tokenizer, records, max_length=64, need_ref=True)
    section = DpoSection(batch_size=4, dropout=0.0, max_length=64, shared_prompt=False)
    tx, schedule = train.make_optimizer(section, 10)
    batch = data.pair_batch(pairs, [[0], [1], [2]], batch_size=4, max_length=64, shared_prompt=False)
    out = {}
    for attention in ("xla", "splash"):
        _, grads_fn, _ = train.make_step_fns(objectives.dpo_objective(section), pol.config, pol.mesh, tx, schedule,
                                             attention=attention)
        out[attention] = jax.jit(grads_fn)(pol.params, batch, None, None)
    (g_ref, m_ref), (g, m) = out["xla"], out["splash"]
    for k in m_ref:
        assert_close(m[k], m_ref[k], k)
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        assert_close(a, functools.reduce(lambda t, k: t[k.key], path, g_ref), jax.tree_util.keystr(path))


def test_the_option_reaches_the_policy_and_the_sampler(fixtures_dir):
    from jaxsr.chat import load_chat_policy
    from jaxsr.config import ModelSection

    pol = load_chat_policy(fixtures_dir / "hf" / "llama3", ModelSection(attention="splash"), make_mesh(2, 2, 2))
    assert pol.attention == "splash" and pol.with_params(pol.params).attention == "splash"
    assert pol.for_decode().attention == "splash"  # the prefill's


# --- ahead of time, for a TPU topology ----------------------------------------------------------------------------

@needs_libtpu
def test_sharded_training_step_with_splash_compiles_for_tpu():
    """The packed SFT step (forward and backward) of the tiny model for v5e:2x2 (mesh fsdp 2 x tensor 2): with
    model.attention=auto on TPU devices the kernel lowers through Mosaic under shard_map (the optimized HLO holds
    its custom call); with xla it does not."""
    from jaxsr import plan_compile
    from jaxsr.config import load_config
    from jaxsr.plan import resolve_model

    devices = plan_compile.abstract_devices(plan_compile.parse_topology("v5e:2x2"))
    hlo = {}
    for attention in ("auto", "xla"):
        run = load_config(None, ["model.architecture.num_layers=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                 "sft.max_length=192", "sft.batch_size=4", "sft.packing=true",
                                 f"model.attention={attention}"])
        mesh = make_mesh(1, 2, 2, devices=devices)
        step, args = plan_compile._step_program("sft", resolve_model(run)[0], run, mesh)
        hlo[attention] = step.lower(*args).compile().as_text()
    for kernel in ("splash_mha_fwd_segmented", "splash_mha_dq_segmented", "splash_mha_dkv_segmented"):
        assert kernel in hlo["auto"], kernel  # forward, and both halves of the backward pass
    assert "tpu_custom_call" in hlo["auto"] and "tpu_custom_call" not in hlo["xla"]
