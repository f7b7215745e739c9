"""The cuDNN attention path (jaxsr/model/attention_kernels.py, `cudnn_attention`) against the XLA path on CPU.

cuDNN needs an NVIDIA GPU, so these tests set `attention_kernels.CUDNN_IMPLEMENTATION` to "xla": jax computes the
same `jax.nn.dot_product_attention` call (causal, sequence lengths, window) with XLA, and everything jaxsr adds
around it (rotating each row's real tokens to slot 0, zeroing padding queries, NaN for rows it cannot express,
shard_map over rows and heads) is checked against `decoder._gqa_attention` with `decoder.attention_mask`: forward
and gradients in float32. The choice rules and errors are checked with the real implementation ("cudnn")."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsr.model import ShardingError, ShardingRules, attention_kernels, decoder, make_mesh
from jaxsr.model.attention_kernels import CUDNN_MAX_HEAD_DIM, cudnn_attention, kernel_for, rotate_rows
from kernel_checks import assert_close, assert_loss_and_gradients_equal_xla, prefill_with_and_without, tiny


@pytest.fixture
def xla_stand_in(monkeypatch):
    monkeypatch.setattr(attention_kernels, "CUDNN_IMPLEMENTATION", "xla")


def _reference(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, valid_BxT, sliding_window):
    T, E = q_BxTxHxE.shape[1], q_BxTxHxE.shape[3]
    mask = decoder.attention_mask(jnp.arange(T), valid_BxT, sliding_window)
    return decoder._gqa_attention(q_BxTxHxE, k_BxTxKxE.transpose(0, 2, 3, 1), v_BxTxKxE.swapaxes(1, 2), mask,
                                  E ** -0.5)


def _rows(T, B=8):
    """Per-row validity: whole, right-padded, left-padded, all padding, a single token at either end, and again."""
    valid_BxT = np.ones((B, T), bool)
    valid_BxT[1, T - 23:] = False
    valid_BxT[2, :11] = False
    valid_BxT[3] = False
    valid_BxT[4, 1:] = False
    valid_BxT[5, :-1] = False
    valid_BxT[6, :5] = False
    valid_BxT[7, T - 9:] = False
    return valid_BxT


CASES = {
    # name: (H, K, sliding_window, mesh (data, fsdp, tensor) or None)
    "causal": (4, 4, None, None),
    "sliding_window": (4, 4, 13, None),
    "gqa": (4, 2, None, None),
    "gqa_window_mqa": (4, 1, 7, None),
    "data2_tensor4": (8, 4, None, (2, 1, 4)),
    "fsdp8_window": (4, 2, 13, (1, 8, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_equals_xla_forward_and_gradient(case, xla_stand_in):
    H, K, window, mesh_shape = CASES[case]
    T, E = 48, 16
    valid_BxT = _rows(T)
    B = valid_BxT.shape[0]
    r = np.random.default_rng(sum(map(ord, case)))
    q, k, v = (jnp.asarray(r.normal(size=(B, T, n, E)), jnp.float32) for n in (H, K, K))
    valid = jnp.asarray(valid_BxT)
    # Only real queries carry a cotangent: padding queries' outputs are discarded by the model (0 here; the XLA
    # path gives them a uniform softmax).
    w_BxTx1x1 = valid[:, :, None, None]
    g = jnp.asarray(r.normal(size=(B, T, H, E)), jnp.float32) * w_BxTx1x1
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    ref = functools.partial(_reference, valid_BxT=valid, sliding_window=window)
    ours = functools.partial(cudnn_attention, valid_BxT=valid, scale=E ** -0.5, sliding_window=window, mesh=mesh)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * g)

    out_ref, out = jax.jit(ref)(q, k, v), jax.jit(ours)(q, k, v)
    assert out.shape == out_ref.shape == (B, T, H, E) and out.dtype == q.dtype
    assert_close(out * w_BxTx1x1, out_ref * w_BxTx1x1, f"{case} forward")
    assert not np.asarray(out)[~valid_BxT].any()  # padding queries: 0
    grads_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
    grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", grads, grads_ref):
        assert_close(a, b, f"{case} d{name}")


def test_sharded_cudnn_runs_per_device(xla_stand_in):
    """Under a mesh the call runs under shard_map (rows over data x fsdp, heads over tensor): the same numbers as
    without one, and a dimension that does not divide its axis is refused, not replicated."""
    T, H, K, E = 32, 4, 4, 16
    valid = jnp.asarray(_rows(T))
    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.normal(size=(8, T, n, E)), jnp.float32) for n in (H, K, K))
    mesh = make_mesh(2, 1, 4)
    plain = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, valid, E ** -0.5))(q, k, v)
    sharded = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, valid, E ** -0.5, mesh=mesh))(q, k, v)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), rtol=1e-6, atol=1e-6)
    hlo = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, valid, E ** -0.5, mesh=mesh)).lower(q, k, v).as_text()
    assert "shard_map" in hlo or "manual" in hlo
    with pytest.raises(ShardingError, match="cuDNN attention: num_kv_heads=2 is not divisible by mesh axis 'tensor'"):
        cudnn_attention(q, k[:, :, :2], v[:, :, :2], valid, E ** -0.5, mesh=mesh)
    with pytest.raises(ShardingError, match="cuDNN attention needs heads and kv heads on the same mesh axis"):
        cudnn_attention(q, k, v, valid, E ** -0.5, mesh=mesh, rules=ShardingRules(kv_heads=None))


def test_a_row_of_several_runs_is_nan(xla_stand_in):
    """Real tokens in two runs (a hole) have no sequence length cuDNN could take (padding on both sides is one run):
    the whole row is NaN (loud), the other rows are exact."""
    T, E = 16, 8
    valid_BxT = np.ones((3, T), bool)
    valid_BxT[0, 5:9] = False  # a hole
    valid_BxT[1, :3] = valid_BxT[1, -2:] = False  # padding on both sides: one run, fine
    valid_BxT[2, [0, 15]] = True
    valid_BxT[2, 1:15] = False  # two single tokens
    r = np.random.default_rng(2)
    q, k, v = (jnp.asarray(r.normal(size=(3, T, 2, E)), jnp.float32) for _ in range(3))
    out = np.asarray(cudnn_attention(q, k, v, jnp.asarray(valid_BxT), E ** -0.5))
    assert np.isnan(out[0]).all() and np.isnan(out[2]).all()
    ref = np.asarray(_reference(q, k, v, jnp.asarray(valid_BxT), None))
    assert_close(out[1][valid_BxT[1]], ref[1][valid_BxT[1]], "one run")


def test_rotate_rows_and_its_gradient():
    x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    shift = jnp.asarray([2, 4], jnp.int32)
    want = np.stack([np.roll(np.asarray(x[b]), -int(s), axis=0) for b, s in enumerate(shift)])
    np.testing.assert_array_equal(np.asarray(rotate_rows(x, shift)), want)
    np.testing.assert_array_equal(np.asarray(rotate_rows(rotate_rows(x, shift), -shift)), np.asarray(x))
    w = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(rotate_rows(x, shift) * w))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(rotate_rows(w, -shift)))  # the inverse rotation


# --- the choice and its errors (the real implementation) ------------------------------------------------------------

def choose(attention, platform, *, branch=False, packed=False, dtype=jnp.bfloat16, head_dim=128):
    return kernel_for(attention, platform, branch=branch, packed=packed, dtype=dtype, head_dim=head_dim)


def test_auto_picks_cudnn_on_gpu_where_it_applies():
    assert choose("auto", "gpu") == "cudnn" and choose("auto", "gpu", dtype=jnp.float16, head_dim=64) == "cudnn"
    assert choose("auto", "gpu", dtype=jnp.float32) == "xla"
    assert choose("auto", "gpu", head_dim=CUDNN_MAX_HEAD_DIM + 64) == "xla"
    assert choose("auto", "gpu", head_dim=36) == "xla"  # not a multiple of 8
    assert choose("auto", "gpu", packed=True) == "xla" and choose("auto", "gpu", branch=True) == "xla"
    assert choose("auto", "rocm") == "xla"  # an AMD GPU: no cuDNN
    assert choose("auto", "cpu") == "xla" and choose("auto", "tpu") == "splash"
    assert choose("xla", "gpu") == "xla" and choose("cudnn", "gpu") == "cudnn"


def test_auto_on_cpu_is_xla_even_with_the_stand_in(xla_stand_in):
    assert choose("auto", "cpu", dtype=jnp.float32) == "xla"
    assert choose("cudnn", "cpu", dtype=jnp.float32) == "cudnn"  # the stand-in lifts cuDNN's own requirements


@pytest.mark.parametrize("kw, match", [
    (dict(platform="gpu", dtype=jnp.float32),
     r"attention='cudnn': cuDNN flash attention takes bfloat16 or float16, and the activations are float32 "
     r"\(model.dtype\); set model.attention=auto .* or model.attention=xla"),
    (dict(platform="gpu", head_dim=256), r"takes head_dim <= 128, a multiple of 8, not 256"),
    (dict(platform="cpu"), r"cuDNN runs on NVIDIA GPUs, and these devices are cpu"),
    (dict(platform="gpu", packed=True), r"cannot run packed rows .* set sft.packing=false or model.attention=auto"),
    (dict(platform="gpu", branch=True), r"attention='cudnn' cannot run a shared-prefix DPO row .* "
                                        r"set dpo.shared_prompt=false"),
])
def test_explicit_cudnn_refuses_what_it_cannot_run(kw, match):
    with pytest.raises(ValueError, match=match):
        choose("cudnn", kw.pop("platform"), **kw)


def test_the_real_cudnn_does_not_lower_on_cpu():
    """With the real implementation, a direct call on CPU fails while tracing or lowering (no cuDNN), and the model
    with attention=cudnn is refused before it gets there."""
    q = jnp.zeros((2, 16, 2, 16), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        jax.jit(lambda q: cudnn_attention(q, q, q, jnp.ones((2, 16), bool), 0.25)).lower(q).compile()
    cfg = tiny()
    params = decoder.init_params(cfg, jax.random.key(0))
    ids, mask = _batch(16)
    with pytest.raises(ValueError, match="cuDNN runs on NVIDIA GPUs, and these devices are cpu"):
        decoder.forward(params, cfg, ids, mask, attention="cudnn")
    auto = decoder.forward(params, cfg, ids, mask, attention="auto", dtype=jnp.bfloat16)
    xla = decoder.forward(params, cfg, ids, mask, attention="xla", dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))


def test_packed_rows_are_refused_by_the_function(xla_stand_in):
    q = jnp.zeros((1, 8, 1, 8))
    with pytest.raises(ValueError, match="set sft.packing=false"):
        cudnn_attention(q, q, q, jnp.ones((1, 8), bool), 1.0, segment_ids_BxT=jnp.zeros((1, 8), jnp.int32))


# --- the whole model ---------------------------------------------------------------------------------------------

def _batch(T=40):
    r = np.random.default_rng(3)
    ids = jnp.asarray(r.integers(0, 97, (4, T)), jnp.int32)
    mask = np.ones((4, T), bool)
    mask[1, T - 13:] = False  # right padding (training rows)
    mask[2, :9] = False  # left padding (prompts)
    mask[3] = False  # an empty batch-padding row
    return ids, jnp.asarray(mask)


@pytest.mark.parametrize("window", [None, 11])
def test_model_loss_and_gradient_with_cudnn_equal_xla(window, xla_stand_in):
    """The loss of real tokens and its gradient w.r.t. every parameter, on a (data 2, fsdp 2, tensor 2) mesh."""
    cfg = tiny(sliding_window=window)
    mesh = make_mesh(2, 2, 2)
    params = decoder.init_params(cfg, jax.random.key(1), std=0.2)
    ids, mask = _batch()

    def loss(params, attention):
        logits = decoder.forward(params, cfg, ids, mask, attention=attention, mesh=mesh)
        logp = jax.nn.log_softmax(logits[:, :-1])
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(tok * (mask[:, 1:] & mask[:, :-1]))

    assert_loss_and_gradients_equal_xla(loss, params, "cudnn")


def test_prefill_with_cudnn_equals_xla(xla_stand_in):
    """A prefill into an empty cache (left-padded prompts): hidden states of real tokens."""
    cfg = tiny()
    params = decoder.init_params(cfg, jax.random.key(2), std=0.2)
    ids, mask = _batch(24)
    (h_ref, _), (h, _) = prefill_with_and_without(params, cfg, ids, mask, "cudnn", new_slots=8)
    m = np.asarray(mask)
    assert_close(np.asarray(h)[m], np.asarray(h_ref)[m], "hidden states")


def test_model_refuses_packed_and_shared_prompt_rows_and_auto_falls_back(xla_stand_in):
    cfg = tiny()
    params = decoder.init_params(cfg, jax.random.key(0))
    ids = jnp.zeros((2, 16), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], 2, axis=0))
    with pytest.raises(ValueError, match="set sft.packing=false"):
        decoder.forward(params, cfg, ids, None, seg, attention="cudnn")
    branch = jnp.asarray(np.repeat([[0] * 8 + [1] * 4 + [2] * 4], 2, axis=0))
    pos = jnp.asarray(np.repeat([list(range(12)) + list(range(8, 12))], 2, axis=0))
    valid = jnp.ones((2, 16), bool)
    with pytest.raises(ValueError, match="set dpo.shared_prompt=false"):
        decoder.hidden_states(params, cfg, ids, pos, valid, branch_ids_BxT=branch, attention="cudnn")
    # auto never picks cuDNN on CPU; on a GPU these rows would take the XLA path (test_auto_picks_cudnn_on_gpu...).
    auto, _ = decoder.hidden_states(params, cfg, ids, pos, valid, branch_ids_BxT=branch, attention="auto")
    xla, _ = decoder.hidden_states(params, cfg, ids, pos, valid, branch_ids_BxT=branch, attention="xla")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
