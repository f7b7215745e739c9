"""The config sections of the self-rewarding data: prompts, judge, pairs, EFT building and Meta-Rewarding
(re-exported by jaxsr/config.py)."""

from __future__ import annotations

import dataclasses

from .config_checks import choice as _choice
from .config_checks import positive as _positive
from .config_checks import sampling as _sampling
from .configfile import ConfigValueError


@dataclasses.dataclass
class PromptsSection:
    """Self-Instruct generation of new prompts (paper: 8-shot = 6 seed + 2 generated, T=0.6, top-p 0.9).

    Attributes:
      num_prompts: prompts to accept per iteration.
      generator: "" to use M_t, a model path (HF dir or jaxsr checkpoint) of a fixed generator (the paper's choice),
        or "env": the environment's own prompt sampler as the fixed generator.
      requests_per_round: few-shot requests generated together; one round's accepted prompts form one shard.
      max_rounds: give up (with what was accepted) after this many rounds.
      target_pairs: preference pairs DPO trains on per iteration (the paper's 3,964, then 6,942): [] = no target,
        one value for every iteration, or one per iteration (M1 -> M2 first); with checkpoint selection
        (dpo.eval_every) the pairs stage keeps dpo.selection_prompts more, held out as its validation prompts.
        With a target, `num_prompts` is the
        first block of prompts; the pairs stage generates, answers and judges more blocks (sized by the pair
        yield so far) until the target is met or `max_prompts` prompts exist, and keeps exactly the first
        `target` pairs in prompt order.
      max_prompts: the cap on an iteration's prompts when a target is set (0 = 10 x num_prompts).
    """

    num_prompts: int = 1000
    target_pairs: list[int] = dataclasses.field(default_factory=list)
    max_prompts: int = 0
    generator: str = ""
    num_seed_shots: int = 6
    num_generated_shots: int = 2
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 128
    requests_per_round: int = 64
    max_rounds: int = 1000
    max_rouge: float = 0.7
    min_words: int = 3
    max_words: int = 150

    def __post_init__(self):
        _positive("prompts.num_prompts", self.num_prompts)
        _sampling("prompts", self.temperature, self.top_p)
        if not 0 < self.max_rouge <= 1:
            raise ConfigValueError(f"prompts.max_rouge={self.max_rouge!r} must be in (0, 1]")
        _positive("prompts.requests_per_round", self.requests_per_round)
        _positive("prompts.max_prompts", self.max_prompts, zero_ok=True)
        if self.target_pairs and self.prompt_cap < self.num_prompts:
            raise ConfigValueError(f"prompts.max_prompts={self.max_prompts} is below prompts.num_prompts="
                                   f"{self.num_prompts}, the first block of prompts")
        for i, n in enumerate(self.target_pairs):
            _positive(f"prompts.target_pairs[{i}]", n)
            if n > self.prompt_cap:
                raise ConfigValueError(
                    f"prompts.target_pairs[{i}]={n} cannot be met: a prompt gives at most one pair and the prompts "
                    f"are capped at {self.prompt_cap} (prompts.max_prompts={self.max_prompts}"
                    f"{', i.e. 10 x prompts.num_prompts' if not self.max_prompts else ''}); raise prompts.max_prompts")

    @property
    def prompt_cap(self) -> int:
        """The most prompts an iteration generates when it has a pairs target."""
        return self.max_prompts or 10 * self.num_prompts

    def target(self, iteration: int) -> int:
        """The pairs target of iteration t (M_t -> M_{t+1}); 0 = none."""
        if not self.target_pairs:
            return 0
        return self.target_pairs[min(iteration, len(self.target_pairs)) - 1]


@dataclasses.dataclass
class JudgeSection:
    """LLM-as-a-Judge (paper: K=3 sampled judgements at T=0.7, top-p 0.9, score = mean of valid ones).

    Attributes:
      template: "paper" (Figure 2, word for word), "env" (the environment's own), or a path to a template with
        <INSTRUCTION_HERE> and <RESPONSE_HERE>.
      mode: sampled (K judgements, mean of valid scores) or expected (one justification, then the
        probability-weighted mean of the digits 0-5 after "Score:").
      exclude_truncated: drop candidates that hit sample.max_new_tokens before judging.
      stop_at_score: end a judgement once its score is written (sampled: "Score: d" and a character that ends
        the value; expected: "score:", where the digit probabilities are read) instead of at EOS or max_new_tokens.
        The judgement text ends there; the parsed score is the one its first marker gives.
      pairwise_template: the head-to-head and checkpoint-selection judge's prompt: "default" (jaxsr's,
        evaluate.PAIRWISE_TEMPLATE) or a path to a template with <INSTRUCTION_HERE>, <OUTPUT_A_HERE> and
        <OUTPUT_B_HERE> (a shorter one for a judge with a short context).
    """

    template: str = "paper"
    mode: str = "sampled"
    num_judgements: int = 3
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    exclude_truncated: bool = False
    stop_at_score: bool = True
    pairwise_template: str = "default"

    def __post_init__(self):
        _choice("judge.mode", self.mode, ("sampled", "expected"))
        _positive("judge.num_judgements", self.num_judgements)
        _positive("judge.max_new_tokens", self.max_new_tokens)
        _sampling("judge", self.temperature, self.top_p)


@dataclasses.dataclass
class PairsSection:
    """Best-vs-worst pairs.

    Attributes:
      length_control: Meta-Rewarding's rho (0 = plain max/min).
      control: "" (the self-rewarding pairs), or a control experiment on the same candidates for an environment
        that can grade its generated prompts (the world): "random" (the self-judged pairs, each oriented by a coin)
        or "oracle" (best vs worst by the environment's ground-truth grader: the upper bound). docs/results.md.
    """

    length_control: float = 0.0
    control: str = ""

    def __post_init__(self):
        if not 0 <= self.length_control <= 1:
            raise ConfigValueError(f"pairs.length_control={self.length_control!r} must be in [0, 1]")
        _choice("pairs.control", self.control, ("", "random", "oracle"))


@dataclasses.dataclass
class EftSection:
    """Building the EFT seed from human-ranked responses (`data.build_eft`; paper §3.1.1, jaxsr/eft.py).

    Attributes:
      judgements_per_response: judgements the SFT baseline samples of each response (judge.mode=expected: one);
        a prompt's j-th judgements of its responses form its j-th judgement set, kept when it agrees with the
        human ranking.
      eval_fraction: share of the ranked prompts held out, by a hash of the prompt, as the reward-model eval set
        (data/rm_eval) when the environment gives none; an environment's own rm_eval is used as it is.
      rebalance: down-sample the most common score to the count of the next most common one (the paper discards
        part of its most common score, 4).
      policy_prompts: EFT from the policy's own answers (jaxsr/eft_answers.py), for an environment with a prompt
        source and a ground-truth judge: an SFT baseline (M0 on IFT only) answers this many fresh prompts
        (`sample.num_samples` each), the environment grades every answer into a judgement in its judge format,
        and the rows (rebalanced when `rebalance`) join M1's SFT data. 0: off.
    """

    judgements_per_response: int = 1
    eval_fraction: float = 0.25
    rebalance: bool = True
    policy_prompts: int = 0

    def __post_init__(self):
        _positive("eft.judgements_per_response", self.judgements_per_response)
        if not 0 <= self.eval_fraction < 1:
            raise ConfigValueError(f"eft.eval_fraction={self.eval_fraction!r} must be in [0, 1)")
        if self.policy_prompts < 0:
            raise ConfigValueError(f"eft.policy_prompts={self.policy_prompts!r} must be >= 0 (0: off)")


@dataclasses.dataclass
class MetaSection:
    """Meta-Rewarding (Wu et al. 2024; jaxsr/metareward.py): M_t meta-judges its own judgements, and DPO also trains
    on the resulting judge-preference pairs.

    Attributes:
      enabled: add the judge_pairs stage to every iteration (needs judge.mode=sampled with num_judgements >= 2).
      responses: candidates meta-judged per iteration, those whose judge scores vary most.
      iterations: the iterations whose DPO adds the judge pairs (the paper: the first two of four).
      max_new_tokens / temperature / top_p: the meta-judge's sampling.
    """

    enabled: bool = False
    responses: int = 256
    iterations: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9

    def __post_init__(self):
        _positive("meta.responses", self.responses)
        _positive("meta.max_new_tokens", self.max_new_tokens)
        _sampling("meta", self.temperature, self.top_p)
