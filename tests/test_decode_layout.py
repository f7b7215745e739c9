"""The sampler's decode layout: how its mesh is chosen, that its weights are the policy's, and that its compiled
decode loop never all-gathers a weight (read from the optimized HLO), where the training layout gathers them all."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from jaxsr.model import decoder
from jaxsr.model.config import ModelConfig
from jaxsr.model.sharding import ShardingError, decode_tensor_size
from jaxsr.next_token import sampling_mode
from jaxsr.policy import random_policy
from jaxsr.sampler import EOS_SLOTS, programs

# Every weight matrix is larger than any activation a decode step of B = 8 rows could gather: the largest is a
# row's logits (8 x V = 2,112 elements) against the smallest weight (wk / wv: D x K x E = 4,096).
CFG = ModelConfig(model_type="llama", vocab_size=264, hidden_size=64, intermediate_size=192, num_layers=2,
                  num_heads=8, num_kv_heads=4, head_dim=16, max_position_embeddings=128)
B, P, N = 8, 16, 16


# --- reading optimized HLO ---------------------------------------------------------------------------------

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(")
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the ENTRY computation's name."""
    comps, entry, name = {}, None, None
    for line in hlo.splitlines():
        if name is None:
            m = _HEADER.match(line)
            if m and line.rstrip().endswith("{"):
                name = m.group(2)
                comps[name] = []
                entry = name if m.group(1) else entry
        elif line.startswith("}"):
            name = None
        else:
            comps[name].append(line)
    return comps, entry


def _called(lines: list[str]) -> set[str]:
    out = set()
    for line in lines:
        for one, many in _CALLED.findall(line):
            out |= {one} if one else {n.strip().lstrip("%") for n in many.split(",")}
    return out


def loop_body(hlo: str) -> list[str]:
    """The instruction lines of the decode loop: the body and condition of every `while` in ENTRY, and every
    computation they call, transitively (the sampler's own inner loops included)."""
    comps, entry = computations(hlo)
    todo = set().union(*(_called([line]) for line in comps[entry] if " while(" in line))
    assert todo, "no while loop in the decode program's ENTRY computation"
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo |= _called(comps[name])
    return [line for name in seen for line in comps[name]]


def all_gathers(lines: list[str]) -> list[tuple[tuple[int, ...], str]]:
    """(the gathered result's shape, the line) of every all-gather among `lines` (of a tuple result: its largest)."""
    out = []
    for line in lines:
        m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(m.group(1))]
            out.append((max(shapes, key=np.prod), line.strip()[:150]))
    return out


# The weight matrices, one layer's of each kind (norm scales and biases are replicated in every layout).
SHAPES = decoder.param_shapes(CFG)
MATRICES = {name: shape[1:] for name, shape in SHAPES["layers"].items() if len(shape) >= 3}
MATRICES |= {name: SHAPES[name] for name in ("embed", "lm_head")}


PER_LAYER = sum(int(np.prod(s)) for n, s in MATRICES.items() if n not in ("embed", "lm_head"))
WEIGHT_BYTES = 4 * (CFG.num_layers * PER_LAYER + 2 * CFG.vocab_size * CFG.hidden_size)  # float32


def weight_sized(lines: list[str]) -> list[str]:
    """The all-gathers among `lines` whose result is as large as a weight matrix or larger."""
    smallest = min(int(np.prod(shape)) for shape in MATRICES.values())
    return [line for shape, line in all_gathers(lines) if np.prod(shape) >= smallest]


# --- the programs ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy():
    p = random_policy(CFG)  # the default (training) mesh on 8 devices: fsdp 8
    assert dict(p.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    return p


MODE = sampling_mode(0.7, 0.9, 0, CFG.vocab_size)  # a sampled mode: the loop holds the whole draw


def compiled(cfg, mesh, dtype, rules):
    prefill, decode = programs(cfg, mesh, dtype, rules, MODE, B, P, N, EOS_SLOTS, (1, 2))
    return prefill.as_text(), decode.as_text(), decode


@pytest.mark.parametrize("tensor, data, kv_repeat", [(8, 1, 2), (4, 2, 1)])
def test_the_decode_loop_never_gathers_a_weight(policy, tensor, data, kv_repeat):
    model = dataclasses.replace(policy, decode_tensor=tensor).for_decode()
    assert dict(model.mesh.shape) == {"data": data, "fsdp": 1, "tensor": tensor}
    assert model.kv_repeat == kv_repeat and model.config.num_kv_heads == CFG.num_kv_heads * kv_repeat
    prefill, decode, program = compiled(model.config, model.mesh, model.dtype, model.rules)
    body = loop_body(decode)
    assert weight_sized(body) == []
    # Not hoisted out of the loop either (XLA hoists loop-invariant gathers), nor in the prefill.
    assert weight_sized(decode.splitlines()) == []
    assert weight_sized(prefill.splitlines()) == []
    # The loop is tensor-parallel: the row-parallel matmuls (wo, w_down) end in all-reduces of activations.
    assert sum(" all-reduce(" in line or "all-reduce-start(" in line for line in body) >= 2 * CFG.num_layers
    # What it does gather is activations of this device's rows (logits split over the vocabulary).
    assert all(shape[0] == B // data for shape, _ in all_gathers(body)), all_gathers(body)
    # No gathered copy of the model among the program's temporaries (the training layout's test below has one).
    assert program.memory_analysis().temp_size_in_bytes < WEIGHT_BYTES / 2


def test_a_shared_prefill_copies_rows_within_each_data_shard(policy):
    """The shared-prefix prefill (each distinct prompt once, copied into its samples' rows, behind a call-wide
    prefix) on data 2 x tensor 4: the copies stay on the device that holds the rows (no all-gather of the cache or
    of the prefix), and no weight is gathered."""
    model = dataclasses.replace(policy, decode_tensor=4).for_decode()
    prefill, decode = programs(model.config, model.mesh, model.dtype, model.rules, MODE, B, P, N, EOS_SLOTS, (1, 2),
                               "xla", B // 2, 16)
    hlo = prefill.as_text().splitlines()
    assert weight_sized(hlo) == []
    # No cache layer ([rows, kv heads, E, slots] or [rows, kv heads, slots, E]) is gathered: a row gather across the
    # data shards would all-gather them (checked by hand with a plain x[src_B]: one all-gather per cache array).
    assert [line for shape, line in all_gathers(hlo) if len(shape) == 4] == []
    assert not any("all-to-all" in line or "collective-permute" in line for line in hlo)
    assert weight_sized(loop_body(decode.as_text())) == []


def test_the_training_layout_gathers_every_weight(policy):
    """The same programs on the policy's own layout (FSDP 8), as the sampler ran before: each weight is
    all-gathered. XLA:CPU hoists these loop-invariant gathers out of the loop body, so the gathered copy of the
    whole model lives through the loop on every device (13.3 GiB of a v5e's 16 for Llama-3-8B, issue 15)."""
    _, decode, program = compiled(policy.config, policy.mesh, policy.dtype, policy.rules)
    gathered = weight_sized(decode.splitlines())
    # wq wk wv wo w_gate w_up w_down per layer, the embedding table and the LM head.
    assert len(gathered) >= CFG.num_layers * 7 + 2, gathered
    assert program.memory_analysis().temp_size_in_bytes >= WEIGHT_BYTES


def test_decode_weights_are_the_policy_weights_cast_and_repeated(policy):
    bf16 = dataclasses.replace(policy, dtype="bfloat16", decode_tensor=8)
    model = bf16.for_decode()
    assert bf16.for_decode() is model  # made once per policy
    full = jax.tree.map(np.asarray, policy.params)
    got = jax.tree.map(lambda a: np.asarray(a.astype(np.float32)), model.params)
    assert all(a.dtype == jax.numpy.bfloat16 for a in jax.tree.leaves(model.params))
    for i in range(CFG.num_layers):
        for name, want in full["layers"].items():
            want = want[i]
            if name in ("wk", "wv"):
                want = np.repeat(want, 2, axis=1)  # kv head k serves the query heads of devices 2k and 2k + 1
            np.testing.assert_array_equal(got["layers"][i][name], want.astype(jax.numpy.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(got["embed"], full["embed"].astype(jax.numpy.bfloat16).astype(np.float32))
    assert model.params["layers"][0]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    assert model.params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    bf16.release_decode()
    assert bf16.for_decode() is not model


@pytest.mark.parametrize("devices, heads, kv, mlp, want", [
    (8, 32, 8, 14336, 8),    # Llama-3-8B: tensor 8
    (8, 14, 2, 4864, 2),     # Qwen2.5-0.5B: 14 heads allow 2
    (8, 4, 2, 64, 4),        # the test fixtures: kv heads repeated twice
    (8, 4, 1, 64, 4),        # one kv head, repeated 4 times
    (64, 64, 8, 28672, 8),   # Llama-2-70B on 64 chips: capped at 8, data 8
    (6, 4, 2, 64, 2),        # 6 devices: 4 does not divide them
    (1, 4, 2, 64, 1),
])
def test_the_decode_tensor_size_is_chosen_from_the_devices_and_the_model(devices, heads, kv, mlp, want):
    assert decode_tensor_size(devices, heads, kv, mlp) == want


def test_a_decode_tensor_size_that_does_not_fit_names_why():
    with pytest.raises(ShardingError, match="num_heads=14"):
        decode_tensor_size(8, 14, 2, 4864, tensor=4)
    with pytest.raises(ShardingError, match="does not divide the 8 devices"):
        decode_tensor_size(8, 12, 12, 48, tensor=3)
    with pytest.raises(ShardingError, match="num_kv_heads=3"):
        decode_tensor_size(8, 12, 3, 48, tensor=2)


def test_the_tensor_cap_is_one_processs_devices():
    """Tensor parallelism stays within a process's devices when the mesh spans several (a pod's hosts; also the
    abstract devices of a TPU topology that jaxsr plan --compile builds: 4 chips per host)."""
    from types import SimpleNamespace

    from jaxsr.decode_layout import decode_sizes, process_devices

    pod = [SimpleNamespace(process_index=i // 4) for i in range(64)]
    assert process_devices(pod) == 4 and process_devices(pod[:4]) == 4 and process_devices(jax.devices()) == 8
    llama70 = dataclasses.replace(CFG, num_heads=64, num_kv_heads=8, intermediate_size=28672)
    assert decode_sizes(llama70, 64, local_devices=4) == {"data": 16, "fsdp": 1, "tensor": 4}
    assert decode_sizes(llama70, 64, local_devices=8) == {"data": 8, "fsdp": 1, "tensor": 8}
    assert decode_sizes(llama70, 64, 8, local_devices=4)["tensor"] == 8  # a given size is only checked
