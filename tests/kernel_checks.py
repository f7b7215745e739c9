"""What the attention-kernel tests (test_attention_kernels.py: splash; test_cudnn_attention.py: cuDNN) share: the
float32 agreement check, the tiny model, and the two whole-model comparisons of a kernel with the XLA path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.model import ModelConfig, decoder


def assert_close(ours, ref, what=""):
    """float32 agreement: max |difference| within 1e-5 of the reference's magnitude."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert np.isfinite(ours).all(), what
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= 1e-5 * scale, f"{what}: max |difference| {err:.3g} at magnitude {scale:.3g}"
    print(f"{what}: max |difference| {err:.3g} at magnitude {scale:.3g}")  # shown with pytest -s
    return err


def tiny(**kw):
    return ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, **kw)


def assert_loss_and_gradients_equal_xla(loss, params, kernel: str):
    """`loss(params, attention)` and its gradient w.r.t. every parameter with `attention=kernel` against xla."""
    grad = jax.jit(jax.value_and_grad(loss), static_argnames="attention")
    (l_ref, g_ref), (l_ours, g_ours) = grad(params, "xla"), grad(params, kernel)
    assert_close(l_ours, l_ref, "loss")
    for path, a in jax.tree_util.tree_leaves_with_path(g_ours):
        assert_close(a, functools.reduce(lambda t, k: t[k.key], path, g_ref), jax.tree_util.keystr(path))


def prefill_with_and_without(params, cfg, ids, mask, kernel: str, new_slots: int):
    """A prefill of left-padded prompts `ids` into an empty cache of P + `new_slots` slots, with xla and with
    `kernel`: ((hidden, cache) with xla, (hidden, cache) with the kernel)."""
    B, P = ids.shape
    valid_BxS = jnp.concatenate([mask, jnp.zeros((B, new_slots), bool)], axis=1)

    @functools.partial(jax.jit, static_argnames="attention")
    def prefill(params, attention):
        cache = decoder.KVCache.zeros(cfg, B, P + new_slots, jnp.float32)._replace(valid_BxS=valid_BxS)
        return decoder.hidden_states(params, cfg, ids, decoder.positions_from_mask(mask), valid_BxS, cache=cache,
                                     cache_index=0, attention=attention)

    return prefill(params, "xla"), prefill(params, kernel)
