"""jaxsr.config.load_config: YAML + overrides -> a validated config; every error names the key or file."""

import pathlib

import pytest

from jaxsr.config import CONFIG_DIR, ConfigValueError, JaxsrConfig, load_config


def _yaml(tmp_path, text, name="exp.yaml") -> pathlib.Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_nested_key_in_yaml_suggests_the_closest(tmp_path):
    p = _yaml(tmp_path, "dpo:\n  bta: 0.2\n")
    with pytest.raises(ConfigValueError, match=r"unknown key 'dpo.bta'; did you mean 'dpo.beta'\?") as e:
        load_config(p)
    assert str(p) in str(e.value)  # which layer had the typo


def test_unknown_nested_key_in_override_suggests_the_closest():
    with pytest.raises(ConfigValueError, match=r"command line: unknown key 'model.architecture.num_layer'; "
                                               r"did you mean 'model.architecture.num_layers'\?"):
        load_config(None, ["model.architecture.num_layer=3"])


def test_unknown_top_level_key_lists_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigValueError, match=r"unknown key 'frobnicate'.*allowed: .*\bjudge\b.*\bsample\b"):
        load_config(_yaml(tmp_path, "frobnicate: 1\n"))
    with pytest.raises(ConfigValueError, match=r"unknown key 'sampel.top_p'; did you mean 'sample.top_p'\?"):
        load_config(None, ["sampel.top_p=0.5"])


def test_misspelt_section_lists_the_sections():
    with pytest.raises(ConfigValueError) as e:
        load_config(None, ["sampel.top_p=0.5"])
    assert "allowed under 'sampel'" not in str(e.value) and "judge" in str(e.value)


def test_override_of_wrong_type_names_the_key():
    with pytest.raises(ConfigValueError, match=r"bad value for 'sft.batch_size'.*'abc'"):
        load_config(None, ["sft.batch_size=abc"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigValueError, match=r"override 'sft.batch_size' must look like key.sub=value"):
        load_config(None, ["sft.batch_size"])


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_config(missing)


def test_yaml_list_at_top_level_is_rejected(tmp_path):
    p = _yaml(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigValueError, match=f"{p}: expected a YAML mapping"):
        load_config(p)


@pytest.mark.parametrize("overrides, pattern", [
    (["judge.mode=foo"], r"judge.mode='foo' is not allowed; choose one of \['sampled', 'expected'\]"),
    (["sample.top_p=0"], r"sample.top_p=0.0 must be in \(0, 1\]"),
    (["sft.batch_size=10", "sft.grad_accum=3"], r"sft.batch_size=10 is not divisible by sft.grad_accum=3"),
    (["model.dtype=float16"], r"model.dtype='float16' is not allowed; choose one of \['float32', 'bfloat16'\]"),
    (["model.param_dtype=fp16"], r"model.param_dtype='fp16' is not allowed; choose one of \['float32', 'bfloat16'\]"),
    (["loop.iterations=0"], r"loop.iterations=0 must be > 0"),
])
def test_bad_values_name_the_key_and_what_is_allowed(overrides, pattern):
    with pytest.raises(ConfigValueError, match=pattern):
        load_config(None, overrides)


def test_name_defaults_to_the_yaml_stem_and_run_dir_to_runs_name(tmp_path):
    cfg = load_config(_yaml(tmp_path, "seed: 3\n", name="my_exp.yaml"))
    assert (cfg.name, cfg.run_dir, cfg.seed) == ("my_exp", str(pathlib.Path("runs") / "my_exp"), 3)
    # An explicit name (in the file or on the command line) wins over the stem; run_dir follows the name.
    assert load_config(_yaml(tmp_path, "name: other\n")).run_dir == str(pathlib.Path("runs") / "other")
    assert load_config(_yaml(tmp_path, "seed: 3\n"), ["name=cli"]).name == "cli"
    assert load_config(_yaml(tmp_path, "seed: 3\n"), ["run_dir=/tmp/x"]).run_dir == "/tmp/x"
    assert load_config().name == JaxsrConfig().name


def test_overrides_win_over_yaml(tmp_path):
    p = _yaml(tmp_path, "sample:\n  temperature: 0.5\n  top_k: 7\njudge:\n  mode: expected\n")
    cfg = load_config(p, ["sample.temperature=0.9", "judge.mode=sampled"])
    assert cfg.sample.temperature == 0.9 and cfg.judge.mode == "sampled"
    assert cfg.sample.top_k == 7  # untouched YAML values stay
    assert load_config(p).sample.temperature == 0.5


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JaxsrConfig) and cfg.name


def test_shipped_configs_exist():
    assert len(list(CONFIG_DIR.glob("*.yaml"))) >= 1
