"""jaxsr.policy.load_policy from the three layouts it reads (one safetensors file, sharded + index, a jaxsr
checkpoint) and its errors. The single-file load is checked against transformers in test_model.py; here the
layouts are checked against it and against the stored tensors."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxsr
from jaxsr.model.hf import INDEX_FILE, SINGLE_FILE, WeightError

FAMILY = "llama3"


def _split_into_shards(src, out, n=3) -> dict:
    """`src`'s model directory with its tensors spread over n shards + an index, as save_pretrained writes them."""
    shutil.copytree(src, out)
    tensors = load_file(out / SINGLE_FILE)
    (out / SINGLE_FILE).unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n]}
        save_file(part, out / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    total = sum(t.nbytes for t in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return weight_map


def _host(params):
    return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def single_dir(fixtures_dir):
    return fixtures_dir / "hf" / FAMILY


@pytest.fixture(scope="module")
def sharded_dir(single_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "model"
    _split_into_shards(single_dir, out)
    return out


@pytest.fixture(scope="module")
def single_policy(single_dir):
    return jaxsr.load_policy(single_dir)


@pytest.fixture
def sharded_copy(single_dir, tmp_path):
    """A sharded copy to break; returns (directory, weight_map)."""
    out = tmp_path / "model"
    return out, _split_into_shards(single_dir, out)


def test_single_file_params_are_the_stored_tensors(single_dir, single_policy):
    stored = load_file(single_dir / SINGLE_FILE)
    params = _host(single_policy.params)
    np.testing.assert_array_equal(params["embed"], stored["model.embed_tokens.weight"])
    for i in range(single_policy.config.num_layers):
        np.testing.assert_array_equal(params["layers"]["w_up"][i], stored[f"model.layers.{i}.mlp.up_proj.weight"].T)
    assert single_policy.tokenizer is not None


def test_sharded_directory_loads_the_same_model(single_dir, sharded_dir, single_policy):
    assert len(list(sharded_dir.glob("model-*.safetensors"))) == 3 and not (sharded_dir / SINGLE_FILE).exists()
    sharded = jaxsr.load_policy(sharded_dir)
    assert sharded.config == single_policy.config
    jax.tree.map(np.testing.assert_array_equal, _host(sharded.params), _host(single_policy.params))
    ref = np.load(single_dir / "reference.npz")
    np.testing.assert_array_equal(jaxsr.forward_logits(sharded, ref["input_ids"], ref["attention_mask"]),
                                  jaxsr.forward_logits(single_policy, ref["input_ids"], ref["attention_mask"]))


def test_jaxsr_checkpoint_loads_the_same_model(single_dir, single_policy, tmp_path):
    ckpt = jaxsr.save_checkpoint(single_policy, tmp_path / "ckpt")
    loaded = jaxsr.load_policy(ckpt)
    assert loaded.config == single_policy.config and loaded.dtype == "float32"
    assert loaded.hf_config == single_policy.hf_config
    assert loaded.generation_config == single_policy.generation_config
    assert loaded.eos_token_ids == single_policy.eos_token_ids
    assert loaded.tokenizer.encode("hello world") == single_policy.tokenizer.encode("hello world")
    jax.tree.map(np.testing.assert_array_equal, _host(loaded.params), _host(single_policy.params))
    ref = np.load(single_dir / "reference.npz")
    np.testing.assert_array_equal(jaxsr.forward_logits(loaded, ref["input_ids"], ref["attention_mask"]),
                                  jaxsr.forward_logits(single_policy, ref["input_ids"], ref["attention_mask"]))


def test_weights_only_directory_has_no_tokenizer(single_dir, single_policy, tmp_path):
    for name in ("config.json", SINGLE_FILE):
        shutil.copy(single_dir / name, tmp_path / name)
    policy = jaxsr.load_policy(tmp_path)
    assert policy.tokenizer is None and policy.generation_config == {}
    jax.tree.map(np.testing.assert_array_equal, _host(policy.params), _host(single_policy.params))


def test_directory_without_config_json_names_it(single_dir, tmp_path):
    shutil.copy(single_dir / SINGLE_FILE, tmp_path / SINGLE_FILE)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'config.json'}: no config.json"):
        jaxsr.load_policy(tmp_path)


def test_tensor_missing_from_a_shard_is_named(sharded_copy):
    d, weight_map = sharded_copy
    name = "model.layers.1.self_attn.v_proj.weight"
    shard = d / weight_map.pop(name)
    save_file({k: v for k, v in load_file(shard).items() if k != name}, shard)
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightError, match=f"{d}: tensors missing for this config.json: .*{name}"):
        jaxsr.load_policy(d)


def test_tensor_with_wrong_shape_in_a_shard_names_file_and_shapes(sharded_copy):
    d, weight_map = sharded_copy
    name = "model.layers.0.mlp.down_proj.weight"
    shard = d / weight_map[name]
    tensors = load_file(shard)
    expected = tensors[name].shape
    tensors[name] = np.zeros((expected[0], expected[1] + 1), np.float32)
    save_file(tensors, shard)
    with pytest.raises(WeightError, match=rf"{shard}: tensor {name} has shape \({expected[0]}, {expected[1] + 1}\), "
                                          rf"expected \({expected[0]}, {expected[1]}\)"):
        jaxsr.load_policy(d)


@pytest.mark.parametrize("path", ["does_not_exist", "./no/such/model", "/no/such/model"])
def test_nonexistent_local_path_is_named(path):
    with pytest.raises(FileNotFoundError, match=f"{path}: no such model directory"):
        jaxsr.load_policy(path)


@pytest.mark.parametrize("dtype", ["float16", "int8", "fp16"])
def test_bad_dtype_names_the_allowed_ones(single_dir, dtype):
    with pytest.raises(ValueError, match=f"dtype '{dtype}' is not supported; allowed: float32, bfloat16"):
        jaxsr.load_policy(single_dir, dtype=dtype)


def test_index_pointing_at_the_wrong_shard_names_both(sharded_copy):
    d, weight_map = sharded_copy
    name = "model.norm.weight"
    right = weight_map[name]
    wrong = next(f for f in set(weight_map.values()) if f != right)
    weight_map[name] = wrong
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightError, match=f"tensor {name} is not in {d / wrong}, the shard that {d / INDEX_FILE} "
                                          f"maps it to"):
        jaxsr.load_policy(d)


def test_index_with_a_list_weight_map_names_the_index(sharded_copy):
    d, weight_map = sharded_copy
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": sorted(weight_map)}))
    with pytest.raises(WeightError, match=f"{d / INDEX_FILE}: 'weight_map' is a JSON list; expected a JSON object "
                                          f"whose 'weight_map' maps tensor name -> shard file"):
        jaxsr.load_policy(d)


def test_index_holding_a_list_names_the_index(sharded_copy):
    d, weight_map = sharded_copy
    (d / INDEX_FILE).write_text(json.dumps(sorted(weight_map)))
    with pytest.raises(WeightError, match=f"{d / INDEX_FILE}: the file holds a JSON list; expected a JSON object "
                                          f"whose 'weight_map'"):
        jaxsr.load_policy(d)


def test_truncated_safetensors_file_is_named(single_dir, tmp_path):
    shutil.copy(single_dir / "config.json", tmp_path / "config.json")
    (tmp_path / SINGLE_FILE).write_bytes((single_dir / SINGLE_FILE).read_bytes()[:1000])
    with pytest.raises(WeightError, match=f"{tmp_path / SINGLE_FILE}: not a readable safetensors file"):
        jaxsr.load_policy(tmp_path)


def test_corrupt_jaxsr_model_json_is_named(tmp_path):
    (tmp_path / "jaxsr_model.json").write_text("{")
    with pytest.raises(ValueError, match=f"{tmp_path / 'jaxsr_model.json'}: not valid JSON"):
        jaxsr.load_policy(tmp_path)


def test_jaxsr_model_json_without_model_is_named(tmp_path):
    (tmp_path / "jaxsr_model.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'jaxsr_model.json'}.*'model'"):
        jaxsr.load_policy(tmp_path)


def test_unknown_hub_name_offline_is_named(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import, and the tokenizer tests have imported it already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="org/does-not-exist: neither a local model directory nor a Hugging "
                                                "Face hub model that is cached or can be downloaded now"):
        jaxsr.load_policy("org/does-not-exist")
