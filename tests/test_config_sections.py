"""jaxsr.config's training sections: DPO-only keys under sft are errors that name the dpo key, checks name the section."""

import dataclasses
from pathlib import Path

import pytest

from jaxsr.config import ConfigValueError, DpoSection, SftSection, TrainSection, load_config, to_dict
from jaxsr.losses import LOSS_TYPES

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
DPO_ONLY = ("shared_prompt", "beta", "loss_type", "label_smoothing", "rpo_alpha", "reference", "eval_every", "selection_prompts",
            "selection_judge")


@pytest.mark.parametrize("key", DPO_ONLY)
def test_dpo_key_under_sft_is_unknown_and_names_the_dpo_key(key):
    with pytest.raises(ConfigValueError, match=rf"unknown key 'sft\.{key}'; did you mean 'dpo\.{key}'\?"):
        load_config(None, [f"sft.{key}=1"])


def test_packing_under_dpo_names_the_sft_key():
    with pytest.raises(ConfigValueError, match=r"unknown key 'dpo\.packing'; did you mean 'sft\.packing'\?"):
        load_config(TINY, ["dpo.packing=true"])



def test_sections_keep_the_common_keys_in_order_and_add_their_own():
    common = [f.name for f in dataclasses.fields(TrainSection)]
    assert [f.name for f in dataclasses.fields(SftSection)] == common + ["packing"]
    assert [f.name for f in dataclasses.fields(DpoSection)] == common + list(DPO_ONLY)
    d = to_dict(load_config(TINY))
    assert list(d["sft"]) == common + ["packing"] and d["sft"]["packing"] is True
    assert list(d["dpo"]) == common + list(DPO_ONLY) and d["dpo"]["beta"] == 0.1


@pytest.mark.parametrize("override, match", [
    ("sft.grad_accum=3", r"sft\.batch_size=16 is not divisible by sft\.grad_accum=3"),
    ("dpo.grad_accum=3", r"dpo\.batch_size=16 is not divisible by dpo\.grad_accum=3"),
    ("dpo.beta=0", r"dpo\.beta=0\.0 must be > 0"),
    ("dpo.reference=live", r"dpo\.reference='live' is not allowed; choose one of \['precomputed', 'on_the_fly'\]"),
    ("dpo.eval_every=-1", r"dpo\.eval_every=-1 must be >= 0"),
    ("dpo.selection_prompts=0", r"dpo\.selection_prompts=0 must be > 0"),
    ("dpo.selection_judge=/no/such/judge", r"dpo\.selection_judge='/no/such/judge' is not a model directory; use ''"),
])
def test_checks_name_the_section(override, match):
    with pytest.raises(ConfigValueError, match=match):
        load_config(None, [override])


def test_loss_types_come_from_the_losses_module():
    with pytest.raises(ConfigValueError, match=r"dpo\.loss_type='dpo' is not allowed") as e:
        load_config(None, ["dpo.loss_type=dpo"])
    assert str(list(LOSS_TYPES)) in str(e.value)
