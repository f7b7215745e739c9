"""Parameter storage vs compute dtype: the paper's DPO learning rate (1e-6) must move bfloat16-computed weights."""

import functools
import json
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxsr
from jaxsr import train
from jaxsr.config import DpoSection
from test_train import LLAMA3, one_device, pair_records

MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# The paper's DPO rate, held constant over 4 steps of 4 pairs; no dropout, so runs differ only in their arithmetic.
PAPER_DPO = DpoSection(lr=1e-6, final_lr=1e-7, schedule="constant", warmup_steps=0, batch_size=4, max_steps=4,
                       dropout=0.0, max_length=64, checkpoint_every=4)


@functools.lru_cache(maxsize=None)
def pairs_with_reference():
    policy = jaxsr.load_policy(LLAMA3, mesh=one_device())
    recs = pair_records(16)
    c, r = train.reference_logps(policy, recs, max_length=64)
    return [x | {"ref_chosen_logps": float(a), "ref_rejected_logps": float(b)} for x, a, b in zip(recs, c, r)]


@functools.lru_cache(maxsize=None)
def dpo_update(dtype: str, param_dtype: str, work_dir):
    """(starting params, trained params) as float64 numpy trees of a 4-step DPO run at lr 1e-6."""
    policy = jaxsr.load_policy(LLAMA3, dtype=dtype, param_dtype=param_dtype, mesh=one_device())
    trained = train.train_dpo(policy, pairs_with_reference(), PAPER_DPO, work_dir)
    as64 = lambda p: jax.tree.map(lambda a: np.asarray(a, np.float64), p)  # noqa: E731
    return as64(policy.params), as64(trained.params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return lambda dtype, param_dtype: dpo_update(dtype, param_dtype, tmp_path_factory.mktemp(f"{dtype}-{param_dtype}"))


def changed_fraction(before, after, name):
    return float((before["layers"][name] != after["layers"][name]).mean())


def test_bfloat16_compute_with_float32_storage_moves_every_matrix_at_the_paper_lr(runs):
    before, after = runs("bfloat16", "float32")
    for name in MATRICES:
        assert changed_fraction(before, after, name) >= 0.9, name
    # Against the float32-compute run. Each Adam step is lr * m/sqrt(v), a ratio independent of the gradient's
    # scale, so bfloat16 compute changes the update only through the gradient's relative error. bfloat16 rounds
    # each matmul operand to 8 significant bits (2^-9 relative); through two layers forward and back that
    # compounds to about 1% of the gradient's typical size (2^-7: measured median 0.7-0.8% here). So:
    # - the bulk: an element whose gradient is well above that noise gets the same update to ~1%; the median
    #   element's relative error must stay below 2^-5 (4x that);
    # - the whole update (2-norm): elements whose gradient is at the noise level can flip sign, an error of up to
    #   2 lr per step; they are a small fraction, measured 4-8% of the update's norm on this model. The bound
    #   0.15 is 2x that, and far from the failures it guards against: a lost update or one in the wrong
    #   direction or of twice the size all give >= 1.
    ref_before, ref_after = runs("float32", "float32")
    for name in MATRICES:
        np.testing.assert_array_equal(before["layers"][name], ref_before["layers"][name])
        got = after["layers"][name] - before["layers"][name]
        want = ref_after["layers"][name] - ref_before["layers"][name]
        moved = want != 0
        assert np.median(np.abs(got - want)[moved] / np.abs(want)[moved]) < 2**-5, name
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 0.15, (name, rel)
        # Four Adam steps of at most about lr each: the float32 run's update is a few lr.
        assert 1e-6 < np.abs(want).mean() < 4.5e-6, name


def test_bfloat16_storage_loses_the_paper_lr_updates(runs, caplog):
    # Documents why storage defaults to float32: a step of ~1e-6 is below half a bfloat16 ulp of weights of
    # |w| > ~5e-4 (half an ulp is |w| * 2^-9 to 2^-8), so it rounds away and M_{t+1} == M_t almost everywhere.
    with caplog.at_level("WARNING", logger="jaxsr.train"):
        before, after = runs("bfloat16", "bfloat16")
    for name in MATRICES:
        assert changed_fraction(before, after, name) < 0.1, name
    assert "param_dtype=bfloat16" in caplog.text and "lr 1e-06" in caplog.text


def test_dpo_final_checkpoint_keeps_float32_params(runs, tmp_path_factory):
    runs("bfloat16", "float32")
    final = next(p for p in tmp_path_factory.getbasetemp().glob("bfloat16-float32*/final"))
    assert json.loads((final / "jaxsr_model.json").read_text())["dtype"] == "float32"
    with ocp.StandardCheckpointer() as ckptr:  # the arrays Orbax wrote, not what a load casts them to
        stored = jax.tree.leaves(ckptr.metadata(final / "params").item_metadata)
    assert stored and all(np.dtype(m.dtype) == np.float32 for m in stored)
    # Loading it for bfloat16 compute keeps the float32 storage and makes one bfloat16 copy for inference.
    loaded = jaxsr.load_policy(final, dtype="bfloat16", param_dtype="float32", mesh=one_device())
    assert loaded.param_dtype == "float32" and loaded.params["embed"].dtype == np.float32
    compute = loaded.for_compute()
    assert compute is loaded.for_compute() and compute.params["embed"].dtype == jax.numpy.bfloat16


def test_the_loop_loads_m0_with_float32_storage_for_bfloat16_compute():
    from jaxsr import pipeline
    from jaxsr.config import load_config

    cfg = load_config(None, [f"model.path={LLAMA3}", "model.dtype=bfloat16"])
    policy = pipeline.initial_policy(types.SimpleNamespace(cfg=cfg, mesh=one_device()))
    assert (policy.dtype, policy.param_dtype) == ("bfloat16", "float32")
    explicit = load_config(None, [f"model.path={LLAMA3}", "model.dtype=bfloat16", "model.param_dtype=bfloat16"])
    assert pipeline.initial_policy(types.SimpleNamespace(cfg=explicit, mesh=one_device())).param_dtype == "bfloat16"
