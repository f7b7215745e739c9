"""The sampling seam (jaxsr/backends.py): the built-in backend is `jaxsr.sample.generate`, a backend named by
`sample.backend=module:factory` is what a stage calls, M_t reaches an external engine as an HF directory, and a bad
`sample.backend` is a config error that names the key."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer

import jaxsr
from jaxsr import artifacts, backends, judging, selfreward
from jaxsr.chat import chat_token_ids
from jaxsr.config import ConfigValueError, load_config
from jaxsr.sample import Completion, generate
from jaxsr.stages import Context, RunPaths, stage_seed

from conftest import FIXTURES

PROMPTS = ["Name a colour.", "Count to three."]


@pytest.fixture(scope="module")
def policy():
    return jaxsr.load_policy(FIXTURES / "hf" / "qwen3")


# Short: the fixture model's context is 128 tokens.
JUDGE_TEMPLATE = "Rate the answer.\nQ: <INSTRUCTION_HERE>\nA: <RESPONSE_HERE>\nEnd with Score: <0-5>"


def config(tmp_path, *overrides):
    return load_config(None, [f"run_dir={tmp_path}", "seed=3", "sample.num_samples=2", "sample.max_new_tokens=10",
                              "judge.template=env", "judge.mode=sampled", "judge.num_judgements=2",
                              "judge.max_new_tokens=8", *overrides])


def write_prompts(directory, texts):
    w = artifacts.ShardedWriter(directory, shard_size=100)
    w.extend({"prompt_id": i, "prompt": t, "round": 0} for i, t in enumerate(texts))
    w.finalize()


# --- stand-in engines, named by sample.backend=test_backends:<factory> ---------------------------------------------

class Recorder:
    """Records what it is given; answers "canned <prompt> <sample>" (a judge request: "Fine.\\nScore: 4")."""

    made: list = []

    def __init__(self):
        self.calls, self.prepared, self.released = [], [], 0
        Recorder.made.append(self)

    def prepare(self, policy):
        self.prepared.append(policy)

    def release(self):
        self.released += 1

    def generate(self, policy, prompt_ids, **kw):
        self.calls.append(([list(p) for p in prompt_ids], kw))
        text = (lambda i, j: "Fine.\nScore: 4") if kw["stop"] == "score" else (lambda i, j: f"canned {i} {j}")
        return [[Completion([7] * (j + 1), text(i, j), [-1.0] * (j + 1), "length", len(p))
                 for j in range(kw["num_samples"])] for i, p in enumerate(prompt_ids)]


def make_recorder():
    return Recorder()


class RecorderWithDigits(Recorder):
    def digit_masses(self, policy, ids_BxT, mask_BxT):
        return np.tile(np.array([0, 0, 0, 0, 1.0, 0], np.float32), (len(ids_BxT), 1))


class Exporter:
    """An engine that is handed M_t as an HF directory: `prepare` exports it and reads it back as an engine would
    (transformers' config and tokenizer only), `release` deletes it. It answers with the prompt decoded by the
    exported tokenizer."""

    made: list = []

    def __init__(self):
        self.dir = self.config = self.tokenizer = None
        Exporter.made.append(self)

    def prepare(self, policy):
        self.dir = tempfile.mkdtemp(prefix="jaxsr-engine-")
        backends.export_hf(policy, self.dir)
        self.config, self.tokenizer = AutoConfig.from_pretrained(self.dir), AutoTokenizer.from_pretrained(self.dir)

    def release(self):
        shutil.rmtree(self.dir)
        self.dir = None

    def generate(self, policy, prompt_ids, **kw):
        return [[Completion([], self.tokenizer.decode(p), [], "eos", len(p))] * kw["num_samples"] for p in prompt_ids]


NOT_CALLABLE = 3


def make_nothing():
    return object()


def make_miscounting():
    r = Recorder()
    r.generate = lambda policy, prompt_ids, **kw: [[] for _ in prompt_ids]
    return r


# --- the built-in backend ------------------------------------------------------------------------------------------

def test_the_candidates_stage_through_the_default_backend_writes_generate_s_completions(policy, tmp_path):
    cfg = config(tmp_path)
    assert cfg.sample.backend == "jaxsr"
    write_prompts(tmp_path / "prompts", PROMPTS)
    selfreward.generate_candidates(policy, tmp_path / "prompts", tmp_path / "candidates", cfg, 1)
    sec = cfg.sample
    want = generate(policy, chat_token_ids(policy.tokenizer, PROMPTS), num_samples=sec.num_samples,
                    max_new_tokens=sec.max_new_tokens, temperature=sec.temperature, top_p=sec.top_p, top_k=sec.top_k,
                    seed=stage_seed(cfg.seed, 1, "candidates"), max_batch_rows=sec.max_batch_rows)
    rows = artifacts.read_dataset(tmp_path / "candidates").to_list()
    assert [(r["response"], r["num_tokens"], r["finish_reason"]) for r in rows] == [
        (c.text, len(c.token_ids), c.finish_reason) for comps in want for c in comps]
    # Plain text, tokenised as the prompts stage does before it hands token ids to the backend, left-truncated.
    ids = policy.tokenizer(PROMPTS)["input_ids"]
    got = backends.builtin().generate(policy, ids, max_new_tokens=10, temperature=0.7, top_p=0.9, seed=1,
                                      truncate_prompts=True)
    assert got == generate(policy, PROMPTS, max_new_tokens=10, temperature=0.7, top_p=0.9, seed=1,
                           truncate_prompts=True)


# --- an external backend -------------------------------------------------------------------------------------------

def test_a_stage_samples_through_the_configured_backend(policy, tmp_path):
    cfg = config(tmp_path, "sample.backend=test_backends:make_recorder")
    cfg.check_run()
    write_prompts(tmp_path / "prompts", PROMPTS)
    selfreward.generate_candidates(policy, tmp_path / "prompts", tmp_path / "candidates", cfg, 1)
    engine = Recorder.made[-1]
    assert engine.prepared == [policy] and len(engine.calls) == 1
    ids, kw = engine.calls[0]
    assert ids == chat_token_ids(policy.tokenizer, PROMPTS)  # chat-templated token ids
    assert kw == dict(num_samples=2, max_new_tokens=10, temperature=0.7, top_p=0.9, top_k=0,
                      seed=stage_seed(3, 1, "candidates"), max_batch_rows=256, stop=None, truncate_prompts=False)
    rows = artifacts.read_dataset(tmp_path / "candidates").to_list()
    assert [(r["prompt_id"], r["candidate_id"], r["response"], r["num_tokens"]) for r in rows] == [
        (i, j, f"canned {i} {j}", j + 1) for i in range(2) for j in range(2)]

    # The judge stage: the stop condition goes to the engine, its text is parsed.
    selfreward.judge_candidates(policy, tmp_path / "candidates", tmp_path / "judgements", cfg, 1,
                                template=JUDGE_TEMPLATE)
    engine = Recorder.made[-1]
    assert [kw["stop"] for _, kw in engine.calls] == ["score"] and len(engine.calls[0][0]) == 4
    assert {r["score"] for r in artifacts.read_dataset(tmp_path / "judgements")} == {4.0}


def test_a_run_context_keeps_one_backend_and_releases_its_model(policy, tmp_path):
    cfg = config(tmp_path, "sample.backend=test_backends:make_recorder")
    ctx = Context(cfg=cfg, paths=RunPaths(tmp_path), mesh=None, env=None, t=1)
    backend = ctx.backend()
    assert ctx.at(selfreward.JUDGEMENTS, 1).backend() is backend
    for _ in range(2):
        backend.generate(policy, [[5, 6]], max_new_tokens=4)
    assert backend.impl.prepared == [policy] and backend.impl.released == 0  # prepared once per model
    ctx.release_models()
    assert backend.impl.released == 1
    backend.generate(policy, [[5, 6]], max_new_tokens=4)
    assert backend.impl.prepared == [policy, policy]


def test_m_t_reaches_an_external_engine_as_a_hugging_face_directory(policy, tmp_path):
    cfg = config(tmp_path, "sample.backend=test_backends:Exporter")
    backend = backends.from_config(cfg)
    ids = chat_token_ids(policy.tokenizer, PROMPTS)
    out = backend.generate(policy, ids, max_new_tokens=4)
    engine = Exporter.made[-1]
    assert [o[0].text for o in out] == [policy.tokenizer.decode(p) for p in ids]
    # The weights are the model's (the fixture's own files as reference), the config and chat template too.
    exported, original = (load_file(f"{d}/model.safetensors") for d in (engine.dir, FIXTURES / "hf" / "qwen3"))
    assert sorted(exported) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(engine.config, field) == getattr(AutoConfig.from_pretrained(FIXTURES / "hf" / "qwen3"), field)
    assert engine.tokenizer.chat_template == policy.tokenizer.chat_template
    assert chat_token_ids(engine.tokenizer, PROMPTS) == ids
    directory = engine.dir
    backend.release()
    assert engine.dir is None and not Path(directory).exists()


# --- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, match", [
    ("vllm", r"sample.backend='vllm' is not a sampling backend; use 'jaxsr' .* or 'module:factory'"),
    ("test_backends.make_recorder", "is not a sampling backend"),  # a dot where the colon goes
])
def test_a_backend_that_is_not_a_name_fails_when_the_config_loads(tmp_path, spec, match):
    with pytest.raises(ConfigValueError, match=match):
        config(tmp_path, f"sample.backend={spec}")


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:make", r"sample.backend='no_such_module_xyz:make': cannot import module 'no_such_module_xyz' "
                                r"\(it is not on the Python path\)"),
    ("broken_backend_xyz:make", r"cannot import module 'broken_backend_xyz' \(importing it failed: No module named "
                                r"'no_such_dependency_xyz'\)"),
    ("test_backends:no_such", r"module 'test_backends' has no attribute 'no_such'; expected a callable"),
    ("test_backends:NOT_CALLABLE", r"test_backends.NOT_CALLABLE is not callable \(a int\)"),
])
def test_a_backend_that_cannot_be_loaded_fails_before_the_run(tmp_path, monkeypatch, spec, match):
    (tmp_path / "broken_backend_xyz.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(tmp_path, f"sample.backend={spec}")
    with pytest.raises(ConfigValueError, match=match):
        cfg.check_run()


def test_a_factory_must_make_a_backend_and_the_backend_must_answer_every_row(policy):
    with pytest.raises(ConfigValueError, match="its factory made a object without prepare, generate, release"):
        backends.load("test_backends:make_nothing")
    with pytest.raises(ValueError, match=r"sample.backend='test_backends:make_miscounting' returned 1 lists of "
                                         r"completions \[0\] for 1 prompts with num_samples=1"):
        backends.load("test_backends:make_miscounting").generate(policy, [[5, 6]], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 is a string; sampling backends take token-id lists"):
        backends.builtin().generate(policy, ["text"], max_new_tokens=4)


def test_the_expected_judge_needs_a_backend_with_digit_probabilities(policy, tmp_path):
    with pytest.raises(ConfigValueError, match=r"judge.mode=expected with sample.backend='test_backends:make_recorder'"
                                               r".* use sample.backend=jaxsr or judge.mode=sampled"):
        config(tmp_path, "sample.backend=test_backends:make_recorder", "judge.mode=expected").check_run()
    config(tmp_path, "sample.backend=test_backends:RecorderWithDigits", "judge.mode=expected").check_run()
    config(tmp_path, "judge.mode=expected").check_run()
    # Called directly, past the config check: an error, never the built-in model's digits in its place.
    sec = config(tmp_path, "judge.mode=expected").judge
    with pytest.raises(ValueError, match="sample.backend='test_backends:make_recorder' gives none"):
        judging.judge(policy, [[5, 6, 7]], sec, seed=0, backend=backends.load("test_backends:make_recorder"))
    verdicts = judging.judge(policy, [[5, 6, 7]], sec, seed=0,
                                backend=backends.load("test_backends:RecorderWithDigits"))
    assert verdicts[0][0][1:] == (4.0, [0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
