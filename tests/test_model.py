"""The decoder against transformers' float32 logits (fixtures), sharding, HF import/export and bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxsr
from jaxsr.cli import main as cli_main
from jaxsr.model import ConfigError, ModelConfig, ShardingError, from_hf_dict, make_mesh, to_hf_dict
from jaxsr.model.hf import WeightError
from jaxsr.model.sharding import mesh_axis_sizes, mesh_from_sizes

FAMILIES = ["llama2", "llama3", "llama_linear_bias", "mistral", "qwen2", "qwen3"]


def rel_err(ours, ref, mask):
    return float(np.abs(ours - ref)[mask].max() / np.abs(ref).max())


def one_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, fixtures_dir):
    d = fixtures_dir / "hf" / family
    ref = np.load(d / "reference.npz")
    policy = jaxsr.load_policy(d)
    assert policy.mesh.devices.size == 8
    logits = jaxsr.forward_logits(policy, ref["input_ids"], ref["attention_mask"])
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    # Padded query positions are garbage in both implementations; compare real tokens.
    assert rel_err(logits, ref["logits"], ref["attention_mask"].astype(bool)) < 1e-4


@pytest.mark.parametrize("family,mesh_shape", [("llama3", (1, 4, 2)), ("qwen3", (2, 2, 2)), ("mistral", (1, 8, 1))])
def test_sharded_forward_equals_single_device(family, mesh_shape, fixtures_dir):
    d = fixtures_dir / "hf" / family
    ref = np.load(d / "reference.npz")
    single = jaxsr.forward_logits(jaxsr.load_policy(d, mesh=one_device_mesh()), ref["input_ids"], ref["attention_mask"])
    policy = jaxsr.load_policy(d, mesh=make_mesh(*mesh_shape))
    wq = policy.params["layers"]["wq"]
    assert len(wq.sharding.device_set) == 8 and wq.sharding.spec[1] == "fsdp"
    sharded = jaxsr.forward_logits(policy, ref["input_ids"], ref["attention_mask"])
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_each_device_holds_only_its_shard(fixtures_dir):
    policy = jaxsr.load_policy(fixtures_dir / "hf" / "llama3", mesh=make_mesh(1, 4, 2))
    w = policy.params["layers"]["w_gate"]  # [L, D, F] over (None, fsdp, tensor)
    L, D, F = w.shape
    assert {s.data.shape for s in w.addressable_shards} == {(L, D // 4, F // 2)}


def test_batch_not_divisible_by_devices(fixtures_dir):
    d = fixtures_dir / "hf" / "qwen2"
    ref = np.load(d / "reference.npz")
    policy = jaxsr.load_policy(d, mesh=make_mesh(data=8))
    full = jaxsr.forward_logits(policy, ref["input_ids"], ref["attention_mask"])
    part = jaxsr.forward_logits(policy, ref["input_ids"][:3], ref["attention_mask"][:3])
    np.testing.assert_allclose(part, full[:3], atol=1e-6)


@pytest.mark.parametrize("family", ["llama_linear_bias", "qwen3"])
def test_export_round_trip(family, fixtures_dir, tmp_path):
    d = fixtures_dir / "hf" / family
    ref = np.load(d / "reference.npz")
    policy = jaxsr.load_policy(d)
    out = jaxsr.save_hf(policy, tmp_path / "hf", max_shard_bytes=40_000)  # force several shards + index
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    original = load_file(d / "model.safetensors")
    exported = {}
    for f in files:
        exported.update(load_file(out / f))
    # transformers reads tensors by name: the same names and bits mean the same model for it.
    assert set(exported) == set(original)
    for k in original:
        assert exported[k].dtype == original[k].dtype and np.array_equal(exported[k], original[k]), k
    assert json.loads((out / "config.json").read_text())["model_type"] == json.loads((d / "config.json").read_text())["model_type"]
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    again = jaxsr.forward_logits(jaxsr.load_policy(out), ref["input_ids"], ref["attention_mask"])
    assert rel_err(again, ref["logits"], ref["attention_mask"].astype(bool)) < 1e-4


def test_cli_convert_export_bit_for_bit(fixtures_dir, tmp_path, capsys):
    d = fixtures_dir / "hf" / "llama3"
    assert cli_main(["convert", str(d), str(tmp_path / "ckpt")]) == 0
    assert cli_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    # A jaxsr checkpoint loads onto another mesh with the same numbers.
    ref = np.load(d / "reference.npz")
    policy = jaxsr.load_policy(tmp_path / "ckpt", mesh=make_mesh(2, 2, 2))
    logits = jaxsr.forward_logits(policy, ref["input_ids"], ref["attention_mask"])
    assert rel_err(logits, ref["logits"], ref["attention_mask"].astype(bool)) < 1e-4


def test_bfloat16_load_and_export(fixtures_dir, tmp_path):
    d = fixtures_dir / "hf" / "qwen2"
    ref = np.load(d / "reference.npz")
    policy = jaxsr.load_policy(d, dtype="bfloat16")
    assert policy.params["embed"].dtype == jax.numpy.bfloat16
    logits = jaxsr.forward_logits(policy, ref["input_ids"], ref["attention_mask"])
    # bf16 has ~3 significant digits; this checks wiring, not precision.
    assert rel_err(logits, ref["logits"], ref["attention_mask"].astype(bool)) < 5e-2
    out = jaxsr.save_hf(policy, tmp_path / "bf16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert str(load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype) == "bfloat16"


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip_through_transformers(family, fixtures_dir):
    from transformers import AutoConfig

    hf = json.loads((fixtures_dir / "hf" / family / "config.json").read_text())
    cfg = from_hf_dict(hf)
    exported = to_hf_dict(cfg)
    spec = {k: v for k, v in exported.items() if k not in ("architectures", "model_type", "dtype", "torch_dtype")}
    back = from_hf_dict(AutoConfig.for_model(cfg.model_type, **spec).to_dict())
    for field in ModelConfig.__dataclass_fields__:
        assert getattr(back, field) == getattr(cfg, field), field


def test_policy_metadata(fixtures_dir):
    policy = jaxsr.load_policy(fixtures_dir / "hf" / "qwen3")
    assert policy.tokenizer is not None and policy.tokenizer.chat_template
    assert policy.eos_token_ids == (2,)
    assert policy.config.num_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(policy.params))


def test_nnx_module_matches_pure_forward(fixtures_dir):
    from flax import nnx

    from jaxsr.model import Decoder, forward

    policy = jaxsr.load_policy(fixtures_dir / "hf" / "llama2", mesh=one_device_mesh())
    module = Decoder(policy.config, params=policy.params)
    ids = np.arange(1, 9, dtype=np.int32)[None]
    via_nnx = np.asarray(nnx.jit(lambda m, x: m(x))(module, ids))
    pure = np.asarray(jax.jit(lambda p, x: forward(p, policy.config, x))(policy.params, ids))
    # Two separately compiled programs may fuse float ops differently: equal up to float32 rounding.
    np.testing.assert_allclose(via_nnx, pure, rtol=0, atol=1e-6 * np.abs(pure).max())


def test_low_precision_matmul_gradients_match_a_float32_reference():
    """`decoder.matmul` in bfloat16 (custom VJP: low-precision operands, float32 products): its value and both
    gradients equal float32 dots of the bfloat16-rounded operands, and come back in the inputs' dtypes."""
    import jax.numpy as jnp

    from jaxsr.model.decoder import matmul

    rng = np.random.default_rng(0)
    x, w, r = (rng.standard_normal(s).astype(np.float32) for s in ((24, 16), (16, 40), (24, 40)))
    bf = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    loss = lambda x, w: (matmul(x, w, jnp.bfloat16, jnp.float32) * r).sum()  # noqa: E731
    value, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    xb, wb, rb = bf(x), bf(w), bf(r)  # the cotangent (r) is rounded to bfloat16 before the products too
    np.testing.assert_allclose(float(value), float(((xb.astype(np.float64) @ wb) * r).sum()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), rb.astype(np.float64) @ wb.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), xb.T.astype(np.float64) @ rb, rtol=1e-5, atol=1e-5)
    # bfloat16 inputs get bfloat16 gradients; a float32 matmul is a plain float32 dot.
    _, (dxb, dwb) = jax.value_and_grad(lambda x, w: matmul(x, w).astype(jnp.float32).sum(), argnums=(0, 1))(
        jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    assert dxb.dtype == jnp.bfloat16 and dwb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(matmul(jnp.asarray(x), jnp.asarray(w))), np.asarray(jnp.dot(x, w)))


@pytest.mark.parametrize("T", [100, 192])
def test_causal_query_blocks_equal_naive_attention(T):
    """Attention computed block by block over the queries (each block skips the keys after it) equals a naive
    float64 softmax over every key that the mask allows, for padded rows, packed segments, and a shared
    prefix with two branches under a sliding window; its gradient equals the full-square attention's."""
    import jax.numpy as jnp

    from jaxsr.model import decoder

    blocks = decoder.query_blocks(T)
    assert len(blocks) > 1 and blocks[0][0] == 0 and blocks[-1][1] == T
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    rng = np.random.default_rng(T)
    B, H, K, E = 3, 4, 2, 8
    q = rng.standard_normal((B, T, H, E)).astype(np.float32)
    k = rng.standard_normal((B, K, E, T)).astype(np.float32)
    v = rng.standard_normal((B, K, T, E)).astype(np.float32)
    valid = np.ones((B, T), bool)
    valid[1, T - 37:] = False  # a padded row
    segments = np.repeat(np.arange(4), -(-T // 4))[None, :T].repeat(B, 0)
    branch = np.zeros((B, T), np.int32)
    branch[:, T // 3:2 * T // 3], branch[:, 2 * T // 3:] = 1, 2
    positions = np.arange(T)[None].repeat(B, 0)
    positions[:, 2 * T // 3:] -= 2 * T // 3 - T // 3  # the second branch continues from the prefix too
    masks = {"padding": decoder.attention_mask(jnp.arange(T), valid, None),
             "segments": decoder.attention_mask(jnp.arange(T), valid, None, segment_ids_BxT=segments),
             "branches+window": decoder.attention_mask(jnp.arange(T), valid, 23, branch_ids_BxT=branch,
                                                      positions_BxT=positions)}
    for name, mask in masks.items():
        m = np.asarray(mask)[:, 0]  # [B, T, S]
        s = np.einsum("btkge,bkes->bkgts", q.reshape(B, T, K, H // K, E).astype(np.float64), k) * E ** -0.5
        s = np.where(m[:, None, None], s, -np.inf)
        with np.errstate(invalid="ignore"):  # rows without keys: NaN, left out below
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
        naive = np.einsum("bkgts,bkse->btkge", p, v).reshape(B, T, H, E)
        real = m.any(-1)  # queries with at least one key (a padding query's output is unused)
        out = decoder._gqa_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, E ** -0.5, causal_blocks=True)
        np.testing.assert_allclose(np.asarray(out)[real], naive[real], rtol=1e-5, atol=1e-5, err_msg=name)
        w = rng.standard_normal(q.shape).astype(np.float32) * real[..., None, None]
        grads = [jax.grad(lambda q, k, v, c=c: (decoder._gqa_attention(q, k, v, mask, E ** -0.5, causal_blocks=c)
                                                * w).sum(), argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k),
                                                                                jnp.asarray(v)) for c in (True, False)]
        for g_blocks, g_full in zip(*grads):
            np.testing.assert_allclose(np.asarray(g_blocks), np.asarray(g_full), rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_compute_on_cpu_keeps_float32_activations(fixtures_dir):
    """On CPU a bfloat16 forward casts only matmul operands (activations stay float32): its logits are close to
    the float32 ones, closer than bfloat16 rounding of every activation would allow."""
    import jax.numpy as jnp

    from jaxsr.model import decoder

    assert decoder.activation_dtype(jnp.bfloat16, one_device_mesh()) == jnp.float32
    assert decoder.activation_dtype(jnp.float32) == jnp.float32
    policy = jaxsr.load_policy(fixtures_dir / "hf" / "llama3", mesh=one_device_mesh())
    ids = np.arange(1, 17, dtype=np.int32)[None]
    f32 = np.asarray(decoder.forward(policy.params, policy.config, ids))
    b16 = np.asarray(decoder.forward(policy.params, policy.config, ids, dtype=jnp.bfloat16))
    assert b16.dtype == np.float32
    rel = np.abs(b16 - f32).max() / np.abs(f32).max()
    assert 0 < rel < 2e-2, rel


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.fixture
def model_copy(fixtures_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(fixtures_dir / "hf" / "llama3", d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        jaxsr.load_policy(model_copy)


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        jaxsr.load_policy(model_copy)


def test_missing_shard_listed_in_index(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        jaxsr.load_policy(model_copy)


def test_unsupported_model_type(model_copy):
    edit_config(model_copy, model_type="gpt2")
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        jaxsr.load_policy(model_copy)


def test_unsupported_rope_type(model_copy):
    edit_config(model_copy, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}, rope_scaling=None)
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        jaxsr.load_policy(model_copy)


def test_missing_config_key(model_copy):
    edit_config(model_copy, hidden_size=None)
    with pytest.raises(ConfigError, match="hidden_size"):
        jaxsr.load_policy(model_copy)


def test_tensor_shape_mismatch(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 33), np.float32)
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(WeightError, match=r"model.layers.1.mlp.up_proj.weight has shape \(64, 33\), expected \(64, 32\)"):
        jaxsr.load_policy(model_copy)


def test_missing_tensor(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(WeightError, match="model.layers.0.self_attn.k_proj.weight"):
        jaxsr.load_policy(model_copy)


def test_mesh_size_not_device_count():
    with pytest.raises(ShardingError, match="3 devices, but there are 8"):
        make_mesh(data=3, fsdp=1, tensor=1)


# (data, fsdp, tensor, embed_dim) of a `mesh:` section (None = unset) -> sizes on 8 devices, worked out by hand.
MESH_SECTIONS = [
    ((None, None, None, 64), {"data": 1, "fsdp": 8, "tensor": 1}),  # unset: FSDP over gcd(8, 64)
    ((None, None, None, 12), {"data": 2, "fsdp": 4, "tensor": 1}),  # gcd(8, 12) = 4
    ((None, None, None, 7), {"data": 8, "fsdp": 1, "tensor": 1}),
    ((None, 2, None, 64), {"data": 4, "fsdp": 2, "tensor": 1}),  # data: the rest; tensor: 1
    ((None, None, 2, 64), {"data": 4, "fsdp": 1, "tensor": 2}),
    ((1, -1, 2, 64), {"data": 1, "fsdp": 4, "tensor": 2}),
    ((-1, 2, 2, 64), {"data": 2, "fsdp": 2, "tensor": 2}),
]


@pytest.mark.parametrize("section,want", MESH_SECTIONS)
def test_mesh_from_sizes_and_mesh_axis_sizes_agree(section, want):
    data, fsdp, tensor, embed_dim = section
    assert mesh_axis_sizes(data, fsdp, tensor, 8, embed_dim) == want
    assert dict(mesh_from_sizes(data, fsdp, tensor, embed_dim).shape) == want


@pytest.mark.parametrize("section", [(2, None, None), (None, 3, None), (-1, -1, 2)])
def test_mesh_sections_that_do_not_fit(section):
    with pytest.raises(ShardingError, match="8 devices|at most one axis"):
        mesh_axis_sizes(*section, 8, 64)
    with pytest.raises(ShardingError, match="8 devices|at most one axis"):
        mesh_from_sizes(*section, 64)


def test_mesh_axis_does_not_divide_tensor(fixtures_dir):
    # llama_linear_bias has one kv head: tensor parallelism over 2 cannot split it.
    with pytest.raises(ShardingError, match=r"layers.wk.*kv_heads=1.*'tensor' \(size 2\)"):
        jaxsr.load_policy(fixtures_dir / "hf" / "llama_linear_bias", mesh=make_mesh(1, 4, 2))


def test_bad_dtype(fixtures_dir):
    with pytest.raises(ValueError, match="float16"):
        jaxsr.load_policy(fixtures_dir / "hf" / "llama2", dtype="float16")


def test_default_mesh_loads_odd_model_dims(tmp_path):
    # hidden 36 on 8 devices: fsdp = gcd(8, 36) = 4, data = 2; any model loads on any device count.
    cfg = ModelConfig(vocab_size=50, hidden_size=36, intermediate_size=20, num_layers=1, num_heads=3, num_kv_heads=1,
                      head_dim=12)
    policy = jaxsr.random_policy(cfg)
    assert dict(policy.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert jaxsr.forward_logits(policy, np.ones((1, 5), np.int32)).shape == (1, 5, 50)
