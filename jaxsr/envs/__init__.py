"""Environments: where a run's seed data, new prompts, grader and evaluation sets come from.

An environment is one module with an `Environment` subclass and a `register` call. The loop, the data stages,
the config and the report only talk to this interface, so the built-in world, Open Assistant and plain files
are interchangeable (`data.source`), and `data.options` holds the chosen environment's own keys (checked
against its `Options` dataclass like any other config key).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

from ..config import ConfigValueError
from ..configfile import unknown_key_error

SEED_SPLITS = ("ift", "eft", "seed_prompts", "eval", "rm_eval", "eft_source")


@dataclasses.dataclass
class NoOptions:
    """An environment without options."""


class Environment:
    """Seed data, a prompt source, a grader, evaluation sets and the report's columns of one task world.

    Subclasses set `name` and `Options` and override what they offer:
      seed_data: the splits (SEED_SPLITS) as lists of dicts: ift and eft {prompt, response}; seed_prompts
        {prompt}; eval {instruction, ...grader fields}; rm_eval {prompt or instruction, candidates or
        responses, scores or ranks}; eft_source {prompt, responses, ranks}: human-ranked responses (rank 0 = best)
        from which `data.build_eft` builds eft. Only ift and seed_prompts are required.
      new_prompts: a fixed prompt generator (`prompts.generator: env`); None when the environment has none.
      grade: score of a response to one eval row (requires an eval split).
      eval_metrics: the report's figures from the eval scores, named by `report_columns`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # (key, header, format) of the columns eval_metrics adds to the report, after "model".
    report_columns: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    # The fixed plot range of a report column's values, by key (jaxsr.report.axis_range).
    report_axes: ClassVar[dict[str, tuple[float, float]]] = {}
    # Why a pretrained model (model.path) should not train on this environment's data; "" when it may.
    only_from_scratch: ClassVar[str] = ""
    # Its EFT rows are rendered with its own judge template, so the loop must judge with it (judge.template=env).
    eft_in_own_judge_template: ClassVar[bool] = False
    # Its seed data has held-out prompts (eval or rm_eval) that head-to-head evaluation can compare models on.
    has_eval_prompts: ClassVar[bool] = True

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def seed_data(self, seed: int) -> dict[str, list[dict]]:
        raise NotImplementedError

    def new_prompts(self, seed: int, stream: str, n: int, held_out: set[str]) -> list[str] | None:
        return None

    @classmethod
    def has_prompt_source(cls) -> bool:
        return cls.new_prompts is not Environment.new_prompts

    @classmethod
    def has_tokenizer(cls) -> bool:
        return cls.tokenizer is not Environment.tokenizer

    @classmethod
    def has_judge_template(cls) -> bool:
        return cls.judge_template is not Environment.judge_template

    def grade(self, row: dict, response: str) -> float:
        raise NotImplementedError(f"environment {self.name!r} has no grader")

    def prompt_grader(self, seed: int, streams: Sequence[str], n: int, held_out: set[str]):
        """A ground-truth grader `(prompt, response) -> score` of the prompts its `new_prompts(seed, stream, n,
        held_out)` gave for `streams`: for the controls (`pairs.control`) and the pairs' true quality, never for
        the self-rewarding data itself."""
        raise NotImplementedError(f"environment {self.name!r} cannot grade the prompts it generates")

    @classmethod
    def has_prompt_grader(cls) -> bool:
        return cls.prompt_grader is not Environment.prompt_grader

    def prompt_judge(self, seed: int, streams: Sequence[str], n: int, held_out: set[str]):
        """The ground-truth judgement `(prompt, response) -> (score, text)` of the prompts `new_prompts(seed,
        stream, n, held_out)` gave for `streams`, the text in the answer format its judge template asks for (the
        EFT target): for EFT from the policy's own answers (`eft.policy_prompts`, jaxsr/eft_answers.py)."""
        raise NotImplementedError(f"environment {self.name!r} cannot judge the prompts it generates")

    @classmethod
    def has_prompt_judge(cls) -> bool:
        return cls.prompt_judge is not Environment.prompt_judge

    def eval_metrics(self, scores: Sequence[float]) -> dict:
        return {}

    def tokenizer(self):
        raise ConfigValueError(f"model.tokenizer=env: environment {self.name!r} ships no tokenizer; "
                               f"set model.tokenizer to a tokenizer directory or hub name")

    def judge_template(self) -> str:
        raise ConfigValueError(f"judge.template=env: environment {self.name!r} has no judge template of its own; "
                               f"use judge.template=paper or a template file")


_REGISTRY: dict[str, type[Environment]] = {}


def register(cls: type[Environment]) -> type[Environment]:
    """Class decorator: makes `cls` available as `data.source: <cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"environment {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def options_of(name: str, options: dict[str, Any] | None):
    """The environment's Options dataclass from a plain dict, with the config's unknown-key and type errors."""
    from omegaconf import OmegaConf
    from omegaconf import errors as oc_errors

    cls = environment_class(name)
    schema = OmegaConf.structured(cls.Options)
    given = OmegaConf.create(dict(options or {}))
    for key in given.keys():
        if key not in schema:  # the error names the full key and the environment's own keys
            where = OmegaConf.create({"data": {"options": schema}})
            raise ConfigValueError(f"environment {name!r}: {unknown_key_error(where, f'data.options.{key}')}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, given))
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigValueError(f"data.options for environment {name!r}: {str(e).splitlines()[0]}") from None


def environment_class(name: str) -> type[Environment]:
    if name not in _REGISTRY:
        raise ConfigValueError(f"data.source={name!r} is not an environment; choose one of {names()}")
    return _REGISTRY[name]


def get(name: str, options: dict[str, Any] | None = None) -> Environment:
    """The environment `name` with its options (a dict, as in `data.options`)."""
    return environment_class(name)(options_of(name, options))


def from_config(cfg) -> Environment:
    return get(cfg.data.source, cfg.data.options)


# The built-in environments register themselves on import.
from . import arithmetic, files, oasst, world  # noqa: E402,F401
