"""`jaxsr plan --compile`: ahead-of-time compiles of an iteration's programs for TPU topologies (needs libtpu:
pip install jaxsr[tpu]); the tests that compile are skipped without it."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_tpu_extra_pins_the_constrained_jax():
    # libtpu must match jaxlib; jax[tpu]==<version> pins the matching libtpu, so the extra follows constraints.txt.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = re.search(r"^jax==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert extras["tpu"] == [f"jax[tpu]=={pinned}"]


import importlib.util  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from jaxsr import plan_compile  # noqa: E402
from jaxsr.cli import main as cli_main  # noqa: E402
from jaxsr.config import load_config  # noqa: E402
from jaxsr.plan import EXIT_DOES_NOT_FIT, resolve_model  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install jaxsr[tpu])")
# The tiny model (configs' default architecture, D 128) with 2 layers and short lengths so that compiles stay fast.
SMALL = ["model.architecture.num_layers=2", "mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2", "model.remat=full",
         "sft.max_length=64", "dpo.max_length=64", "sft.batch_size=8", "dpo.batch_size=8", "dpo.grad_accum=2", "sample.max_batch_rows=16",
         "sample.max_new_tokens=16", "judge.max_new_tokens=16", "prompts.max_new_tokens=16"]


def test_topology_names():
    t = plan_compile.parse_topology("v5p-128")
    assert (t.grid, t.chips, t.num_slices, t.hbm_bytes) == ("v5p:4x4x4", 64, 1, 95 * 2**30)  # 128 TensorCores
    assert plan_compile.parse_topology("v5e-8").grid == "v5e:2x4"
    assert plan_compile.parse_topology("v6e-16").grid == "v6e:4x4"
    t = plan_compile.parse_topology("2xv5p-64")
    assert (t.grid, t.num_slices, t.chips) == ("v5p:2x4x4", 2, 64)
    assert plan_compile.parse_topology("v5e:2x2").chips == 4
    with pytest.raises(ValueError, match="v5p-6 is not a slice"):
        plan_compile.parse_topology("v5p-6")
    with pytest.raises(ValueError, match="expected e.g. v5e-8"):
        plan_compile.parse_topology("h100-8")


def test_compile_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    rc = cli_main(["plan", "--compile", "--topology", "v5e:2x2"] + SMALL)
    assert rc == 2 and "pip install 'jaxsr[tpu]'" in capsys.readouterr().err
    assert cli_main(["plan", "--compile"]) == 2 and "--compile needs --topology or mesh.topology" in capsys.readouterr().err


def test_compile_takes_the_configs_topology_unless_given(monkeypatch, capsys):
    seen = []

    def fake(model_cfg, run_cfg, topology, **kw):
        seen.append(topology)
        raise plan_compile.CompileUnavailable("stop here")

    monkeypatch.setattr(plan_compile, "compile_plan", fake)
    assert cli_main(["plan", "--compile", "mesh.topology=v5e-8"] + SMALL) == 2
    assert cli_main(["plan", "--compile", "--topology", "v5e:2x2", "mesh.topology=v5e-8"] + SMALL) == 2
    assert seen == ["v5e-8", "v5e:2x2"]
    capsys.readouterr()
    assert cli_main(["plan", "--compile"] + SMALL) == 2
    assert "--compile needs --topology or mesh.topology" in capsys.readouterr().err


def test_programs_option_compiles_only_the_named_programs(monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown program.*decoder; choose from sft_step"):
        plan_compile.compile_plan(None, None, "v5e:2x2", programs=("decoder",))
    seen = []

    def fake(model_cfg, run_cfg, topology, **kw):
        seen.append(kw["programs"])
        raise plan_compile.CompileUnavailable("stop here")

    monkeypatch.setattr(plan_compile, "compile_plan", fake)
    assert cli_main(["plan", "--compile", "--topology", "v5e:2x2", "--programs", "decode, reshard,decode"] + SMALL) == 2
    assert cli_main(["plan", "--compile", "--topology", "v5e:2x2"] + SMALL) == 2
    assert seen == [("decode", "reshard"), plan_compile.PROGRAMS]
    capsys.readouterr()
    assert cli_main(["plan", "--programs", "decode"] + SMALL) == 2
    assert "--programs goes with --compile" in capsys.readouterr().err


def test_the_iterations_programs_compile_on_this_hosts_devices():
    """No libtpu needed: the same program builders compiled for the 8 CPU devices (tests/conftest.py), so a change
    to the sampler's or the trainer's signatures fails here and not only where libtpu is installed."""
    import jax

    run = load_config(None, SMALL)
    p = plan_compile.compile_plan(resolve_model(run)[0], run, "v5e:2x2", devices=jax.devices())
    assert p["devices"] == 8 and p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(p["programs"]) == set(plan_compile.PROGRAMS)
    assert all(q["total_bytes"] > 0 for q in p["programs"].values())
    # The sampler's programs run on the decode layout Policy.for_decode picks on these devices: tensor 4 (the 4
    # heads; 2 kv heads repeated twice), data 2.
    assert p["decode_mesh"] == {"data": 2, "fsdp": 1, "tensor": 4} and p["kv_repeat"] == 2
    dec = p["programs"]["decode"]
    assert dec["loop_collectives"]["while_loops"] >= 1 and dec["weight_sized_all_gathers"] == 0
    assert p["programs"]["dpo_step"]["cost_all_layers"]["flops"] > 0


def decode_weights_by_hand(m, tensor: int, nbytes: int) -> int:
    """Per-device bytes of the decode layout's weights of a Llama-shaped model (no biases): every matrix split over
    `tensor` (kv heads repeated up to it, the vocabulary when it divides), norm scales whole."""
    K = max(m.num_kv_heads, tensor)
    per_layer = (m.hidden_size * (m.num_heads + 2 * K) * m.head_dim + m.num_heads * m.head_dim * m.hidden_size
                 + 3 * m.hidden_size * m.intermediate_size) // tensor + 2 * m.hidden_size
    vocab = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    vocab //= tensor if m.vocab_size % tensor == 0 else 1
    return nbytes * (m.num_layers * per_layer + vocab + m.hidden_size)


@pytest.fixture(scope="module")
def one_slice():
    run = load_config(None, SMALL)
    return plan_compile.compile_plan(resolve_model(run)[0], run, "v5e:2x2")


# Hand planner's peak of a phase / compiled total of its program. Wide on purpose: this model's per-device buffers
# are a few MiB, where XLA:TPU's fixed scratch, (8, 128) tile padding and small buffers kept in on-chip VMEM (not
# counted as HBM temporaries) dominate; measured 0.30 to 2.9 (docs/launch.md section 5). It catches a missing or
# doubled whole-model buffer, not the activation formula, which tests/test_plan.py checks on XLA:CPU.
BAND = (0.25, 4.0)


@needs_libtpu
def test_tiny_model_compiles_for_v5e_2x2_and_the_hand_plan_is_near(one_slice):
    p = one_slice
    assert p["devices"] == 4 and p["device_kind"] == "TPU v5 lite" and p["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert set(p["programs"]) == set(plan_compile.PROGRAMS) and p["fits"]
    ratios = {n: q["hand_bytes"] / q["total_bytes"] for n, q in p["programs"].items() if q["hand_bytes"]}
    print("hand / compiled", ratios)
    assert all(BAND[0] < r < BAND[1] for r in ratios.values()), ratios


@needs_libtpu
def test_the_decode_program_is_the_decode_layouts(one_slice):
    """The sampler's programs are compiled on the layout the run reshards to: tensor-parallel, no FSDP, so the
    decode loop all-gathers no weight; its bytes per step are set against that layout's per-device weights."""
    p, run = one_slice, load_config(None, SMALL)
    m = resolve_model(run)[0]
    assert p["decode_mesh"] == {"data": 1, "fsdp": 1, "tensor": 4} and p["kv_repeat"] == 2
    dec = p["programs"]["decode"]
    loop = dec["loop_collectives"]
    assert loop["while_loops"] >= 1 and dec["bytes_accessed"] > 0
    # No all-gather in the loop body makes a weight: the largest it makes is far below the smallest matrix.
    smallest = min(m.hidden_size * m.num_kv_heads * m.head_dim, m.hidden_size * m.intermediate_size)
    assert dec["weight_sized_all_gathers"] == 0 and max(loop["all_gathers"], default=0) < smallest
    # The tensor-parallel matmuls end in all-reduces of activations: at least two per layer.
    assert loop["all-reduce"]["count"] >= 2 * m.num_layers
    # float32 (the default compute dtype): weights split 4 ways; KV: 16 rows x 80 slots x (4 kv heads / 4) x E.
    assert dec["weights_bytes"] == decode_weights_by_hand(m, 4, 4) == p["hand"]["bytes"]["decode_params"]
    assert dec["kv_cache_bytes"] == 2 * m.num_layers * 16 * (64 + 16) * 1 * m.head_dim * 4
    w_kv = dec["weights_bytes"] + dec["kv_cache_bytes"]
    assert dec["hbm_read_ratio"] == dec["hbm_read_bytes"] / w_kv and dec["xla_bytes_ratio"] == dec["bytes_accessed"] / w_kv
    assert 0 < dec["hbm_read_bytes"] <= dec["bytes_accessed"]
    # The reshard takes the cast copy on the training layout and returns the decode copy: both live at once (XLA
    # pads the small norm scales to its (8, 128) tiles: a few hundred bytes more).
    r, cast = p["programs"]["reshard"], p["programs"]["decode_cast"]
    assert abs(r["memory"]["argument"] - cast["memory"]["output"]) < 0.01 * cast["memory"]["output"]
    assert dec["weights_bytes"] <= r["memory"]["output"] < 1.01 * dec["weights_bytes"]


@needs_libtpu
def test_the_dpo_steps_flops_count_every_layer_and_loop(one_slice):
    d = one_slice["programs"]["dpo_step"]
    c = d["cost_all_layers"]
    assert c["while_loops"] == 0  # the cost variants have no loop whose body XLA would count once
    assert c["flops"] > d["flops"] and 0 < d["mfu_estimate"] < 1 and 0 < d["mfu_roofline_bound"] <= 1
    assert 0 < c["hbm_bytes"] <= c["bytes_accessed"]
    # XLA's FLOPs against jaxsr's step counted by hand (causal blocks, remat=full recomputes the forward).
    ratio = c["flops"] * one_slice["devices"] / d["executed_flops"]
    print("XLA / hand-counted executed FLOPs", ratio)
    assert 0.9 < ratio < 1.2, ratio


def test_a_negative_variant_time_gives_no_mfu_even_when_the_extrapolation_is_positive():
    def variant(seconds, flops):
        return {"flops": flops, "bytes_accessed": 2.0, "hbm_bytes": 1.0, "optimal_seconds": seconds, "while_loops": 0,
                "custom_calls": {"SliceId": 1}}
    ok = plan_compile._extrapolate([variant(0.036, 8.0), variant(0.063, 15.0)], layers=80, accum=2)
    assert ok["optimal_seconds"] == pytest.approx(2 * (0.036 + 0.027 * 79)) and ok["flops"] == 2 * (8 + 7 * 79)
    # The 70B's DPO variants on 2xv5p-64 (cross-slice custom calls): both negative, their difference positive.
    bad = plan_compile._extrapolate([variant(-1.9616, 8.0), variant(-1.9345, 15.0)], layers=80, accum=1)
    assert bad["optimal_seconds"] == -1.9616 and bad["variant_seconds"] == [-1.9616, -1.9345]


@needs_libtpu
def test_a_program_that_does_not_fit_exits_3_naming_it(one_slice, monkeypatch, capsys):
    tight = json.loads(json.dumps(one_slice))
    tight["programs"]["dpo_step"]["fits"], tight["fits"] = False, False
    monkeypatch.setattr(plan_compile, "compile_plan", lambda *a, **k: tight)
    rc = cli_main(["plan", "--compile", "--topology", "v5e:2x2"] + SMALL)
    captured = capsys.readouterr()
    assert rc == EXIT_DOES_NOT_FIT and "verdict: DOES NOT FIT (dpo_step needs" in captured.out
    assert "dpo_step does not fit on v5e:2x2: dpo_step needs" in captured.err


@needs_libtpu
def test_two_slices_put_data_parallelism_across_slices():
    from jaxsr.decode_layout import decode_target
    from jaxsr.model.sharding import make_mesh

    run = load_config(None, SMALL)
    m = resolve_model(run)[0]
    devices = plan_compile.abstract_devices(plan_compile.parse_topology("2xv5e:2x2"))
    mesh = make_mesh(2, 2, 2, devices=devices)
    slices = [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)]
    assert slices == [{0}, {1}]  # each data index is one slice: fsdp and tensor never cross the slices' network
    d_mesh = decode_target(m, mesh.devices.flat)[0]
    assert dict(d_mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert [{d.slice_index for d in d_mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]  # so does decoding
    p = plan_compile.compile_plan(m, run, "2xv5e:2x2", devices=devices, programs=("dpo_step", "reshard", "decode"),
                                  derived=False)
    assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and p["fits"]
    assert p["decode_mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    ratios = {n: q["hand_bytes"] / q["total_bytes"] for n, q in p["programs"].items()}
    print("hand / compiled", ratios)
    assert all(BAND[0] < r < BAND[1] for r in ratios.values()), ratios
    dec = p["programs"]["decode"]
    assert dec["weight_sized_all_gathers"] == 0 and dec["weights_bytes"] == decode_weights_by_hand(m, 4, 4)
