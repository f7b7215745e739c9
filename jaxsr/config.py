"""Typed run configuration: one dataclass per section, validated when built (jaxsr/configfile.py reads YAML files
and `key.sub=value` overrides into them).

Everything is validated before any compute: an unknown key names the closest valid one, a bad value names
the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, Optional


# Reading YAML files and overrides is jaxsr/configfile.py; its names stay importable from here.
from .configfile import ConfigValueError, load_config, to_dict, to_yaml, unknown_key_error  # noqa: F401

from .config_checks import backend_spec
from .config_checks import check_model_dir  # noqa: F401 (part of this module's interface)
from .config_checks import choice as _choice
from .config_checks import positive as _positive
from .config_checks import sampling as _sampling
# The self-rewarding data's sections live in jaxsr/config_data.py; they stay importable from here.
from .config_data import EftSection, JudgeSection, MetaSection, PairsSection, PromptsSection  # noqa: F401

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass
class MeshConfig:
    """Device mesh sizes (one may be -1: "the remaining devices").

    All unset: jaxsr's default mesh (FSDP as wide as the model dimension allows, data parallel over the rest).
    Any set: the unset ones default to data=-1, fsdp=1, tensor=1.

    topology: the TPU slice the config is sized for (`v5p-16`, `v5e-8`, `2xv5p-64`; docs/launch.md section 5):
      `jaxsr plan` plans on its chips and `jaxsr plan --compile` compiles for it unless told otherwise. A run
      does not need it (the mesh spans whatever devices there are) and it is not part of a run's identity.
    """

    data: Optional[int] = None
    fsdp: Optional[int] = None
    tensor: Optional[int] = None
    topology: str = ""

    def __post_init__(self):
        if not self.topology:
            return
        from .plan_compile import parse_topology

        try:
            chips = parse_topology(self.topology).chips
        except ValueError as e:
            raise ConfigValueError(str(e).replace("--topology ", "mesh.topology=", 1)) from None
        if not self.is_set:
            return  # the default mesh fits any number of devices
        sizes = [v if v is not None else d for v, d in zip((self.data, self.fsdp, self.tensor), (-1, 1, 1))]
        fixed = math.prod(v for v in sizes if v != -1)
        if -1 in sizes and chips % fixed:
            raise ConfigValueError(f"mesh.topology={self.topology} has {chips} chips but the mesh needs a multiple of "
                                   f"{fixed} (mesh.data x mesh.fsdp x mesh.tensor = {' x '.join(map(str, sizes))})")
        if -1 not in sizes and chips != fixed:
            raise ConfigValueError(f"mesh.topology={self.topology} has {chips} chips but the mesh has {fixed} "
                                   f"(mesh.data x mesh.fsdp x mesh.tensor = {' x '.join(map(str, sizes))})")

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.data, self.fsdp, self.tensor))

    def build(self, embed_dim: int):
        """The mesh on this process's devices (embed_dim picks the default mesh's FSDP width)."""
        from .model.sharding import mesh_from_sizes

        return mesh_from_sizes(self.data, self.fsdp, self.tensor, embed_dim)


@dataclasses.dataclass
class ArchitectureSection:
    """A from-scratch M0 (used when model.path is empty): a Llama-shaped decoder of this size."""

    model_type: str = "llama"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclasses.dataclass
class ModelSection:
    """Where M0 comes from and how it computes.

    Attributes:
      path: Hugging Face model directory, hub name, or jaxsr checkpoint directory; empty = a random M0 of
        `architecture` with `tokenizer`.
      tokenizer: for a from-scratch M0: "env" (the environment's tokenizer) or a tokenizer directory / hub name.
      chat_template: how a user turn is rendered: "" (the tokenizer's own), a shipped template ("llama2":
        jaxsr/templates/llama2_chat.jinja, Meta's [INST] format) or the path of a .jinja file. A base model's
        tokenizer (Llama-2-70b-hf) has none of its own.
      init_seed: seed of the random M0.
      dtype: compute dtype: matmul operands, activations (on accelerators) and the KV cache.
      param_dtype: storage dtype of the parameters and the AdamW state. float32 (the default) keeps master
        weights that small updates move; with bfloat16 an update below half a bfloat16 ulp of a weight (|w|/512
        or so: 2e-5 at |w| = 0.01) rounds away, which at the paper's DPO lr of 1e-6 is nearly every update.
      remat: rematerialisation of each decoder layer in training: none, dots, full.
      attention: how a chunk attends to its own keys (training, log-probs, prefill; docs/training.md): xla (scores
        materialised), splash (the Pallas splash kernel; off TPU in interpret mode, for tests), cudnn (cuDNN flash
        attention: NVIDIA GPUs, model.dtype=bfloat16, head_dim <= 128, no packed rows; tested on CPU through XLA
        only) or auto (splash on TPU, cudnn on an NVIDIA GPU where it applies, xla elsewhere). Shared-prompt DPO
        rows always take the XLA path. Decode steps take the Pallas decode kernel (reads only the KV cache's filled
        blocks) under splash, and under auto on TPU; the XLA path otherwise.
    """

    path: str = ""
    tokenizer: str = "env"
    chat_template: str = ""
    init_seed: int = 0
    architecture: ArchitectureSection = dataclasses.field(default_factory=ArchitectureSection)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        _choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _choice("model.remat", self.remat, ("none", "dots", "full"))
        _choice("model.attention", self.attention, ("xla", "splash", "cudnn", "auto"))
        from .chat import CHAT_TEMPLATES

        template = self.chat_template
        if template and template not in CHAT_TEMPLATES and not template.endswith(".jinja"):
            raise ConfigValueError(f"model.chat_template={self.chat_template!r} is neither a shipped template "
                                   f"({', '.join(CHAT_TEMPLATES)}) nor the path of a .jinja file; \"\" uses the "
                                   f"tokenizer's own")

    @property
    def dtypes(self) -> dict[str, str]:
        """load_policy's / random_policy's dtype keywords: compute `dtype`, storage `param_dtype`."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype}


@dataclasses.dataclass
class DataSection:
    """Where the seed data, new prompts, grader and evaluation sets come from: an environment (jaxsr/envs/).

    Attributes:
      source: the environment: world (the built-in verifiable world), oasst (Open Assistant), files (your
        JSONL / HF-datasets files), arithmetic (the small example), or one you registered.
      options: the environment's own keys (e.g. world: ift, eft, eval, rm_eval sizes; oasst: path, num_ift;
        files: ift_path, eft_path, prompts_path), checked against its Options dataclass.
      build_eft: build the EFT seed as the paper does (section `eft`): train an SFT baseline on IFT alone,
        let it judge the environment's human-ranked responses (its `eft_source` split), keep the judgements
        whose scores agree with the human ranking; M1 then trains on IFT + that EFT. Off: the environment's own
        EFT split, if any (the world builds its own).
    """

    source: str = "world"
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    build_eft: bool = False


@dataclasses.dataclass
class LoopSection:
    """The iteration schedule: M1 by SFT, then M2 ... M_T by DPO on self-generated pairs (paper: T = 3).

    Attributes:
      iterations: T, the last model index.
      eval_max_new_tokens: greedy generation budget for the instruction-following evaluation.
      head_to_head: after each DPO iteration, M_{t+1} against M_t (and against run_dir/models/baseline when
        present) on the eval split, judged pairwise by M_{t+1} in both orders (paper Fig. 3; docs/evaluation.md).
    """

    iterations: int = 3
    eval_max_new_tokens: int = 64
    head_to_head: bool = False

    def __post_init__(self):
        _positive("loop.iterations", self.iterations)


@dataclasses.dataclass
class DistributedSection:
    """Multi-process set-up (docs/launch.md). Not part of a run's identity: a run may resume on another layout.

    Attributes:
      coordinator_address: HOST:PORT of process 0, which runs JAX's coordinator there; empty: automatic on TPU
        pods and detected clusters (SLURM, Open MPI), else one process.
      num_processes / process_id: how many processes, and which one this is (0 .. num_processes - 1).
      initialization_timeout: seconds to wait for the coordinator and all processes to join.
      heartbeat_timeout: seconds after which a silent (killed, hung) process counts as dead and the coordinator
        stops all the others.
    """

    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100

    def __post_init__(self):
        _positive("distributed.num_processes", self.num_processes)
        _positive("distributed.initialization_timeout", self.initialization_timeout)
        _positive("distributed.heartbeat_timeout", self.heartbeat_timeout)
        if self.coordinator_address and not 0 <= self.process_id < self.num_processes:
            raise ConfigValueError(f"distributed.process_id={self.process_id} must be in [0, {self.num_processes}) "
                                   f"(distributed.num_processes={self.num_processes})")


@dataclasses.dataclass
class SampleSection:
    """Candidate generation (paper: N=4 at T=0.7, top-p 0.9).

    Attributes:
      max_batch_rows: rows (one sample of one prompt) per chunk of every sampling call of a run: prompts,
        candidates, judgements, evaluation, head-to-head and checkpoint selection. Results do not depend on it.
      decode_tensor: the tensor-parallel size of the sampler's layout (weights split over `tensor` devices, the
        others data-parallel replicas; docs/sampling.md); null: the largest that fits the devices and the model
        (at most 8). Results do not depend on it.
      backend: the sampler every stage that samples calls (jaxsr/backends.py, docs/sampling.md#backends): "jaxsr"
        (the built-in one) or "module:factory", an importable callable returning a SamplingBackend (an external
        engine given M_t as a Hugging Face directory). Only the built-in one guarantees that a row depends on
        (seed, prompt, sample index) alone; judge.mode=expected needs a backend that gives digit probabilities.
      share_prefixes: the built-in sampler prefills each distinct prompt once for all its rows (a prompt's N
        samples, an answer's K judgements) and a prefix every prompt of a call starts with (the judge's rubric)
        once per call (docs/sampling.md#shared-prefixes); false: every row prefills its whole prompt. The same
        completions either way, up to float rounding.
    """

    num_samples: int = 4
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    max_batch_rows: int = 256
    decode_tensor: Optional[int] = None
    backend: str = "jaxsr"
    share_prefixes: bool = True

    def __post_init__(self):
        _positive("sample.num_samples", self.num_samples)
        _positive("sample.max_new_tokens", self.max_new_tokens)
        _sampling("sample", self.temperature, self.top_p)
        _positive("sample.top_k", self.top_k, zero_ok=True)
        _positive("sample.max_batch_rows", self.max_batch_rows)
        if self.decode_tensor is not None:
            _positive("sample.decode_tensor", self.decode_tensor)
        backend_spec("sample.backend", self.backend)  # its form; the import is check_run's


@dataclasses.dataclass
class TrainSection:
    """The keys every training stage has (SftSection and DpoSection add their own). Paper defaults are set per
    stage in JaxsrConfig.

    Attributes:
      lr / final_lr: peak learning rate and the rate the schedule decays to at the last step.
      schedule: cosine or linear decay after `warmup_steps` of linear warmup from 0.
      batch_size: examples (SFT) or pairs (DPO) per optimizer step, across all devices.
      grad_accum: micro-batches per optimizer step (batch_size must be divisible by it).
      epochs / max_steps: stage length; max_steps > 0 overrides epochs.
      max_length: tokens per example (prompt + response); longer responses are truncated or dropped.
      overlong: truncate (the response, never the prompt) or drop.
      checkpoint_every / keep_checkpoints: step-checkpoint cadence and retention.
    """

    lr: float = 5.5e-6
    final_lr: float = 1.1e-6
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0
    dropout: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    max_length: int = 1024
    overlong: str = "truncate"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0

    def validate(self, section: str):
        _positive(f"{section}.lr", self.lr)
        _positive(f"{section}.final_lr", self.final_lr, zero_ok=True)
        _choice(f"{section}.schedule", self.schedule, ("cosine", "linear", "constant"))
        _positive(f"{section}.batch_size", self.batch_size)
        _positive(f"{section}.grad_accum", self.grad_accum)
        if self.batch_size % self.grad_accum:
            raise ConfigValueError(f"{section}.batch_size={self.batch_size} is not divisible by {section}.grad_accum={self.grad_accum}")
        if not 0 <= self.dropout < 1:
            raise ConfigValueError(f"{section}.dropout={self.dropout!r} must be in [0, 1)")
        _positive(f"{section}.max_length", self.max_length)
        _choice(f"{section}.overlong", self.overlong, ("truncate", "drop"))
        _positive(f"{section}.checkpoint_every", self.checkpoint_every)
        _positive(f"{section}.keep_checkpoints", self.keep_checkpoints)


@dataclasses.dataclass
class SftSection(TrainSection):
    """Supervised fine-tuning (the `sft` section).

    Attributes:
      packing: pack several examples into each row of max_length tokens (attention stays within each example);
        batch_size then counts rows.
    """

    packing: bool = False


@dataclasses.dataclass
class DpoSection(TrainSection):
    """DPO-family preference training (the `dpo` section).

    Attributes:
      shared_prompt: lay each pair out as one row, prompt + chosen + rejected, with the rejected response
        attending to the prompt but not to the chosen one; the prompt's forward and backward pass then run once
        per pair instead of twice. The same loss and gradient as two rows per pair (up to float rounding);
        false: two rows.
      beta / loss_type / label_smoothing: the preference loss (losses.preference_loss).
      rpo_alpha: weight of Iterative RPO's length-normalised NLL of the chosen response (0: none).
      reference: pi_ref log-probs precomputed with the pairs, or computed on the fly from a frozen copy of M_t.
      eval_every / selection_prompts / selection_judge: checkpoint selection (docs/training.md; paper: 200, 253):
        every eval_every steps (0: off) the current params play the selected checkpoint head-to-head on
        selection_prompts prompts held out of the pairs, judged by M_t ("") or the model directory selection_judge.
    """

    shared_prompt: bool = True
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    reference: str = "precomputed"
    eval_every: int = 0
    selection_prompts: int = 253
    selection_judge: str = ""

    def validate(self, section: str):
        from .losses import LOSS_TYPES  # imported here: the config module loads without JAX

        super().validate(section)
        _positive(f"{section}.beta", self.beta)
        _choice(f"{section}.loss_type", self.loss_type, LOSS_TYPES)
        if not 0 <= self.label_smoothing <= 0.5:
            raise ConfigValueError(f"{section}.label_smoothing={self.label_smoothing!r} must be in [0, 0.5]")
        _positive(f"{section}.rpo_alpha", self.rpo_alpha, zero_ok=True)
        _choice(f"{section}.reference", self.reference, ("precomputed", "on_the_fly"))
        _positive(f"{section}.eval_every", self.eval_every, zero_ok=True)
        _positive(f"{section}.selection_prompts", self.selection_prompts)
        if self.selection_judge and not Path(self.selection_judge).is_dir():
            raise ConfigValueError(f"{section}.selection_judge={self.selection_judge!r} is not a model directory; "
                                   f"use '' for M_t as the judge")


def _sft_defaults() -> SftSection:
    # Paper §3.1.3: 5.5e-6 cosine-decayed to 1.1e-6, batch 16, dropout 0.1, loss on target tokens only.
    return SftSection(lr=5.5e-6, final_lr=1.1e-6, schedule="cosine", batch_size=16, dropout=0.1)


def _dpo_defaults() -> DpoSection:
    # Paper §3.1.3: 1e-6 decaying to 1e-7, batch 16, beta 0.1, dropout 0.1 (decay shape unstated: linear).
    return DpoSection(lr=1e-6, final_lr=1e-7, schedule="linear", batch_size=16, dropout=0.1, beta=0.1)


@dataclasses.dataclass
class JaxsrConfig:
    """A whole run. `name` defaults to the YAML file's stem; `run_dir` to runs/<name>."""

    name: str = "default"
    run_dir: str = ""
    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    loop: LoopSection = dataclasses.field(default_factory=LoopSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sample: SampleSection = dataclasses.field(default_factory=SampleSection)
    prompts: PromptsSection = dataclasses.field(default_factory=PromptsSection)
    judge: JudgeSection = dataclasses.field(default_factory=JudgeSection)
    pairs: PairsSection = dataclasses.field(default_factory=PairsSection)
    eft: EftSection = dataclasses.field(default_factory=EftSection)
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)
    sft: SftSection = dataclasses.field(default_factory=_sft_defaults)
    dpo: DpoSection = dataclasses.field(default_factory=_dpo_defaults)

    def __post_init__(self):
        self.sft.validate("sft")
        self.dpo.validate("dpo")
        if not self.run_dir:
            self.run_dir = str(Path("runs") / self.name)
        from .envs import environment_class, options_of

        options_of(self.data.source, self.data.options)  # unknown environment or option: fail before any compute
        env = environment_class(self.data.source)
        if self.judge.template == "env" and not env.has_judge_template():
            raise ConfigValueError(f"judge.template=env: environment {env.name!r} (data.source) has no judge template "
                                   f"of its own; use judge.template=paper or the path of a template file")
        if not self.model.path and self.model.tokenizer == "env" and not env.has_tokenizer():
            raise ConfigValueError(f"model.tokenizer=env: environment {env.name!r} (data.source) ships no tokenizer; "
                                   f"set model.tokenizer to a tokenizer directory or hub name, or model.path")

    def check_run(self) -> None:
        """What makes a config wrong for the self-rewarding loop (`jaxsr run`, the stage commands, `jaxsr eval`)
        though fine for commands that read only some sections (`jaxsr sft`, `dpo`, `plan` use no seed data)."""
        from .envs import environment_class

        env = environment_class(self.data.source)
        attention = self.model.attention
        if attention in ("splash", "cudnn") and self.dpo.shared_prompt:
            raise ConfigValueError(f"model.attention={attention} with dpo.shared_prompt=true: a shared-prompt row (the "
                                   f"rejected response sees the prompt but not the chosen one) is not a mask the "
                                   f"{attention} kernel takes; set dpo.shared_prompt=false (two rows per pair) or "
                                   f"model.attention=auto (those rows on the XLA path)")
        if attention == "cudnn" and self.sft.packing:
            raise ConfigValueError("model.attention=cudnn with sft.packing=true: cuDNN's sequence lengths take one "
                                   "sequence per row, not packed ones; set sft.packing=false or model.attention=auto "
                                   "(packed rows on the XLA path)")
        if attention == "cudnn" and self.model.dtype == "float32":
            raise ConfigValueError("model.attention=cudnn with model.dtype=float32: cuDNN flash attention takes "
                                   "bfloat16 or float16; set model.dtype=bfloat16 or model.attention=auto (the XLA "
                                   "path for float32)")
        if self.model.path and env.only_from_scratch:
            raise ConfigValueError(f"model.path={self.model.path!r} with data.source={env.name!r}: "
                                   f"{env.only_from_scratch}; "
                                   f"set data.source to oasst (Open Assistant, the paper's seeds) or files (your JSONL "
                                   f"data), or leave model.path empty for a from-scratch model")
        n_iter = self.loop.iterations - 1
        if len(self.prompts.target_pairs) > 1 and len(self.prompts.target_pairs) != n_iter:
            raise ConfigValueError(f"prompts.target_pairs={self.prompts.target_pairs} has "
                                   f"{len(self.prompts.target_pairs)} values but loop.iterations="
                                   f"{self.loop.iterations} makes {n_iter} self-rewarding iterations (M1 -> M2 ..); "
                                   f"give one value for all or one per iteration")
        if self.meta.enabled and (self.judge.mode != "sampled" or self.judge.num_judgements < 2):
            raise ConfigValueError(f"meta.enabled=true with judge.mode={self.judge.mode!r}, judge.num_judgements="
                                   f"{self.judge.num_judgements}: the meta-judge compares a candidate's judgements, so "
                                   f"it needs judge.mode=sampled and judge.num_judgements >= 2")
        if self.pairs.control and not (env.has_prompt_grader() and self.prompts.generator == "env"):
            raise ConfigValueError(f"pairs.control={self.pairs.control!r} needs the ground truth of the iteration's "
                                   f"prompts: an environment that grades the prompts it generates (data.source="
                                   f"world) with prompts.generator=env; data.source={env.name!r}, prompts.generator="
                                   f"{self.prompts.generator!r}")
        if self.eft.policy_prompts:
            from .eft_answers import check_environment

            check_environment(env)
        if self.loop.head_to_head and not env.has_eval_prompts:
            raise ConfigValueError(f"loop.head_to_head=true with data.source={env.name!r}: that environment has no "
                                   f"held-out prompts (eval or rm_eval) to compare models on; set loop.head_to_head="
                                   f"false and compare models afterwards on your own prompts with "
                                   f"`jaxsr eval --head-to-head A B --prompts FILE`")
        if self.sample.backend != "jaxsr":
            from .backends import check_expected_judge, resolve

            resolve(self.sample.backend)  # importable, and names a callable: before any compute
            if self.judge.mode == "expected":
                check_expected_judge(self.sample.backend)
        if self.prompts.generator not in ("", "env"):
            check_model_dir("prompts.generator", self.prompts.generator)
        if self.dpo.eval_every and self.dpo.selection_judge:
            check_model_dir("dpo.selection_judge", self.dpo.selection_judge)
        held = self.dpo.selection_prompts if self.dpo.eval_every else 0
        for i, n in enumerate(self.prompts.target_pairs):
            if held and n + held > self.prompts.prompt_cap:
                raise ConfigValueError(
                    f"prompts.target_pairs[{i}]={n} + dpo.selection_prompts={held} (held out for checkpoint "
                    f"selection) cannot be met: a prompt gives at most one pair and the prompts are capped at "
                    f"{self.prompts.prompt_cap} (prompts.max_prompts); raise prompts.max_prompts")
        if env.eft_in_own_judge_template and self.judge.template != "env":
            raise ConfigValueError(f"judge.template={self.judge.template!r} with data.source={env.name!r}: that "
                                   f"environment's EFT rows teach its own judge template, so M_t would judge with a "
                                   f"prompt it was not trained on; set judge.template=env")

