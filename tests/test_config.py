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
    (["model.attention=flash"],
     r"model.attention='flash' is not allowed; choose one of \['xla', 'splash', 'cudnn', 'auto'\]"),
    (["loop.iterations=0"], r"loop.iterations=0 must be > 0"),
    (["mesh.topology=h100-8"], r"mesh.topology='h100-8': expected e.g. v5e-8, v5p-128"),
    (["mesh.topology=v5p-6"], r"mesh.topology='v5p-6': v5p-6 is not a slice jaxsr knows"),
    (["mesh.topology=v5e-8", "mesh.fsdp=16"], r"mesh.topology=v5e-8 has 8 chips but the mesh needs a multiple of 16 "
                                              r"\(mesh.data x mesh.fsdp x mesh.tensor"),
    (["mesh.topology=v5e-8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"],
     r"mesh.topology=v5e-8 has 8 chips but the mesh has 4"),
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


# --- settings that contradict each other -------------------------------------------------------------------------

def test_env_judge_template_or_tokenizer_of_an_environment_without_one():
    with pytest.raises(ConfigValueError, match=r"judge.template=env: environment 'oasst' \(data.source\) has no judge "
                                               r"template of its own; use judge.template=paper"):
        load_config(None, ["data.source=oasst", "judge.template=env", "model.path=some/model"])
    with pytest.raises(ConfigValueError, match=r"model.tokenizer=env: environment 'files' \(data.source\) ships no "
                                               r"tokenizer; set model.tokenizer .* or model.path"):
        load_config(None, ["data.source=files"])
    load_config(None, ["data.source=files", "model.path=some/model"])  # M0's own tokenizer: model.tokenizer unused


def test_run_checks_a_pretrained_model_on_the_world(tmp_path):
    from jaxsr import loop

    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"run_dir={tmp_path / 'run'}", "model.path=meta-llama/Llama-2-7b-hf"])
    with pytest.raises(ConfigValueError, match=r"model.path='meta-llama/Llama-2-7b-hf' with data.source='world': the "
                                               r"built-in world's data is for from-scratch tiny models; set "
                                               r"data.source to oasst .* or files"):
        loop.run(cfg)
    assert not (tmp_path / "run").exists()  # before the run directory, the lock or any download


@pytest.mark.parametrize("source", ["world", "arithmetic"])
def test_run_checks_the_judge_template_of_environments_whose_eft_uses_their_own(source):
    cfg = load_config(None, [f"data.source={source}", "judge.template=paper"])
    with pytest.raises(ConfigValueError, match=rf"judge.template='paper' with data.source='{source}': that "
                                               r"environment's EFT rows teach its own judge template.*"
                                               r"set judge.template=env"):
        cfg.check_run()
    load_config(None, [f"data.source={source}", "judge.template=env"]).check_run()


def test_run_checks_that_splash_attention_gets_rows_it_can_mask():
    # A shared-prompt DPO row is not a mask the splash kernel takes (jaxsr/model/attention_kernels.py).
    with pytest.raises(ConfigValueError, match=r"model.attention=splash with dpo.shared_prompt=true.*"
                                               r"set dpo.shared_prompt=false \(two rows per pair\) or "
                                               r"model.attention=auto"):
        load_config(None, ["model.attention=splash", "judge.template=env"]).check_run()
    load_config(None, ["model.attention=splash", "dpo.shared_prompt=false", "judge.template=env"]).check_run()
    assert load_config(None, []).model.attention == "auto"


def test_run_checks_that_cudnn_attention_gets_rows_and_a_dtype_it_takes():
    # cuDNN flash attention: bfloat16 / float16, one sequence per row, no shared-prompt rows (attention_kernels.py).
    ok = ["model.attention=cudnn", "model.dtype=bfloat16", "dpo.shared_prompt=false", "judge.template=env"]
    load_config(None, ok).check_run()
    for override, match in (("dpo.shared_prompt=true", r"model.attention=cudnn with dpo.shared_prompt=true.*"
                                                       r"set dpo.shared_prompt=false \(two rows per pair\) or "
                                                       r"model.attention=auto"),
                            ("sft.packing=true", r"model.attention=cudnn with sft.packing=true.*"
                                                 r"set sft.packing=false or model.attention=auto"),
                            ("model.dtype=float32", r"model.attention=cudnn with model.dtype=float32.*"
                                                    r"set model.dtype=bfloat16 or model.attention=auto")):
        with pytest.raises(ConfigValueError, match=match):
            load_config(None, ok + [override]).check_run()


def test_paper_config_is_the_paper():
    cfg = load_config(CONFIG_DIR / "paper_llama2_70b.yaml")
    cfg.check_run()
    assert (cfg.model.path, cfg.model.chat_template) == ("meta-llama/Llama-2-70b-hf", "llama2")
    assert cfg.data.source == "oasst" and cfg.data.options == {"path": "OpenAssistant/oasst1", "num_ift": 3200}
    assert cfg.data.build_eft and cfg.eft.rebalance  # EFT built by the SFT baseline, as in §3.1.2
    assert cfg.prompts.generator == "meta-llama/Llama-2-70b-chat-hf"
    assert (cfg.prompts.target(1), cfg.prompts.target(2)) == (3964, 6942)  # the pairs DPO trains on (paper §3.2)
    assert (cfg.prompts.num_seed_shots, cfg.prompts.num_generated_shots, cfg.prompts.temperature) == (6, 2, 0.6)
    assert (cfg.sample.num_samples, cfg.sample.temperature, cfg.sample.top_p) == (4, 0.7, 0.9)
    assert (cfg.judge.template, cfg.judge.mode, cfg.judge.num_judgements) == ("paper", "sampled", 3)
    sft, dpo = cfg.sft, cfg.dpo
    assert (sft.lr, sft.final_lr, sft.schedule, sft.batch_size, sft.dropout) == (5.5e-6, 1.1e-6, "cosine", 16, 0.1)
    assert (dpo.lr, dpo.final_lr, dpo.batch_size, dpo.beta, dpo.dropout) == (1e-6, 1e-7, 16, 0.1, 0.1)
    assert cfg.loop.iterations == 3


def test_mesh_topology_is_not_part_of_a_runs_identity(tmp_path):
    # What a config is sized for: resuming a run with another (or no) topology computes the same thing.
    from jaxsr import loop

    assert load_config(None, ["mesh.topology=v5p-16"]).mesh.topology == "v5p-16"
    assert load_config(None, ["mesh.topology=2xv5e-16", "mesh.data=2", "mesh.fsdp=-1"]).mesh.topology == "2xv5e-16"
    run = tmp_path / "run"
    run.mkdir()
    loop.Manifest(run, load_config(None, [f"run_dir={run}", "mesh.topology=v5e-8"]))
    loop.Manifest(run, load_config(None, [f"run_dir={run}"]))  # no ConfigMismatch


def test_every_shipped_config_passes_the_run_checks():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(path).check_run()


TINY = CONFIG_DIR / "tiny.yaml"


def test_run_checks_fixed_generator_and_selection_judge_directories(tmp_path, fixtures_dir):
    missing = tmp_path / "no-model"
    with pytest.raises(ConfigValueError, match=rf"prompts.generator='{missing}': no such model directory"):
        load_config(TINY, [f"prompts.generator={missing}"]).check_run()
    with pytest.raises(ConfigValueError, match=r"prompts.generator='\./llama': no such model directory"):
        load_config(TINY, ["prompts.generator=./llama"]).check_run()
    with pytest.raises(ConfigValueError, match=rf"prompts.generator='{tmp_path}': not a model directory"):
        load_config(TINY, [f"prompts.generator={tmp_path}"]).check_run()
    no_tok = tmp_path / "weights_only"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((fixtures_dir / "hf" / "llama2" / "config.json").read_text())
    with pytest.raises(ConfigValueError, match=rf"dpo.selection_judge='{no_tok}': the model has no tokenizer"):
        load_config(TINY, [f"dpo.selection_judge={no_tok}", "dpo.eval_every=5"]).check_run()
    # A model directory with a tokenizer, and a hub name (resolved when it loads), pass.
    load_config(TINY, [f"prompts.generator={fixtures_dir / 'hf' / 'llama2'}"]).check_run()
    load_config(TINY, ["prompts.generator=meta-llama/Llama-2-70b-chat-hf"]).check_run()
