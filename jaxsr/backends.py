"""The sampling seam: every stage that samples from a model (prompts, candidates, judgements, the EFT judge and
answers, the meta-judge, evaluation, head-to-head, checkpoint selection) calls one `Backend`, which wraps the
`SamplingBackend` that `sample.backend` selects: "jaxsr" (the built-in sampler, `jaxsr.sample.generate`) or
"module:factory" (an importable callable returning a SamplingBackend, e.g. an external engine given M_t as a
Hugging Face directory). See docs/sampling.md#backends.

Reproducibility: with the built-in backend a row's completion depends only on (seed, prompt, sample index) and the
call's sampling arguments, whatever the mesh, batch padding or chunking (docs/sampling.md#determinism), so a resumed
stage writes the rows an uninterrupted one would. An external engine need not give that (batch-dependent kernels,
its own seeding, continuous batching): a resumed stage's rows are then only as repeatable as the engine makes them.
"""

from __future__ import annotations

import functools
import importlib
import weakref
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from .config_checks import BUILTIN_BACKEND as BUILTIN
from .config_checks import backend_spec
from .configfile import ConfigValueError
from .judge_scores import digit_masses
from .policy import Policy, save_hf
from .sample import DEFAULT_MAX_BATCH_ROWS, Completion, generate

_METHODS = ("prepare", "generate", "release")


class SamplingBackend(Protocol):
    """What a sampling engine implements. The jaxsr side (`Backend`) calls `prepare(policy)` once before the first
    `generate` with a model and `release()` before it prepares another or when the run frees the devices (before
    training); `generate` is only called with the model last prepared.

    `generate(policy, prompt_ids, ...)`: `prompt_ids` are token-id lists (already chat-templated where the stage
    wants a chat turn); the keyword arguments mean what they mean for `jaxsr.sample.generate`; returns one list of
    `num_samples` `Completion`s per prompt, in prompt order.

    Optional: `digit_masses(policy, ids_BxT, mask_BxT) -> [B, 6]`, the probabilities of the scores 0-5 after the
    last token of each left-padded row (`jaxsr.judge_scores.digit_masses`); judge.mode=expected needs it.
    """

    def prepare(self, policy: Policy) -> None: ...

    def generate(self, policy: Policy, prompt_ids: Sequence[Sequence[int]], *, num_samples: int,
                 max_new_tokens: int | Sequence[int], temperature: float, top_p: float, top_k: int, seed: int,
                 max_batch_rows: int, stop: str | None, truncate_prompts: bool) -> list[list[Completion]]: ...

    def release(self) -> None: ...


class JaxsrBackend:
    """The built-in sampler: `jaxsr.sample.generate` and `jaxsr.judge_scores.digit_masses` on the policy itself.
    prepare and release do nothing: the policy keeps its own decode copy (`Policy.for_decode` / `release_decode`).
    share_prefixes: `generate`'s (`sample.share_prefixes`). It also returns `Completion.after_stop_probs` when
    asked (the expected judge's digit probabilities from the sampling pass)."""

    def __init__(self, share_prefixes: bool = True):
        self.share_prefixes = share_prefixes

    def prepare(self, policy: Policy) -> None:
        pass

    def release(self) -> None:
        pass

    def generate(self, policy: Policy, prompt_ids, **kw) -> list[list[Completion]]:
        return generate(policy, prompt_ids, share_prefixes=self.share_prefixes, **kw)

    def digit_masses(self, policy: Policy, ids_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
        return digit_masses(policy, ids_BxT, mask_BxT)


class Backend:
    """The selected SamplingBackend and the model it holds, as the stages see it. `spec` names it in errors."""

    def __init__(self, impl: SamplingBackend, spec: str = BUILTIN):
        self.impl, self.spec = impl, spec
        self._held: weakref.ref | None = None  # weak: the run frees a model by dropping it (Context.release_models)

    @property
    def captures_after_stop(self) -> bool:
        """Whether `generate` can return `Completion.after_stop_probs` (the built-in sampler)."""
        return isinstance(self.impl, JaxsrBackend)

    @property
    def digit_masses_available(self) -> bool:
        return callable(getattr(self.impl, "digit_masses", None))

    def _hold(self, policy: Policy) -> None:
        if self._held is not None and self._held() is policy:
            return
        self.release()
        self.impl.prepare(policy)
        self._held = weakref.ref(policy)

    def release(self) -> None:
        """Lets the backend free the model it was prepared with (nothing for the built-in one)."""
        if self._held is not None:
            self._held = None
            self.impl.release()

    def generate(self, policy: Policy, prompt_ids: Sequence[Sequence[int]], *, num_samples: int = 1,
                 max_new_tokens: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, stop: str | None = None,
                 truncate_prompts: bool = False, after_stop_probs: Sequence[Sequence[int]] | None = None
                 ) -> list[list[Completion]]:
        """`num_samples` completions of each prompt (token-id lists), as `jaxsr.sample.generate` returns them.
        `after_stop_probs`: asked of the built-in sampler only; an external engine's completions carry None."""
        bad = next((i for i, p in enumerate(prompt_ids) if isinstance(p, (str, bytes))), None)
        if bad is not None:
            raise ValueError(f"prompt {bad} is a string; sampling backends take token-id lists (tokenise it with "
                             f"policy.tokenizer, or jaxsr.chat.chat_token_ids for a chat turn)")
        if len(prompt_ids) == 0:
            return []
        self._hold(policy)
        extra = {"after_stop_probs": after_stop_probs} if after_stop_probs and self.captures_after_stop else {}
        out = self.impl.generate(policy, prompt_ids, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 max_batch_rows=max_batch_rows, stop=stop, truncate_prompts=truncate_prompts, **extra)
        if len(out) != len(prompt_ids) or any(len(row) != num_samples for row in out):
            shape = [len(row) for row in out][:8]
            raise ValueError(f"sample.backend={self.spec!r} returned {len(out)} lists of completions {shape} for "
                             f"{len(prompt_ids)} prompts with num_samples={num_samples}; expected one list of "
                             f"{num_samples} per prompt")
        if not all(isinstance(c, Completion) for row in out for c in row):
            raise ValueError(f"sample.backend={self.spec!r} returned something other than jaxsr.sample.Completion")
        return out

    def digit_masses(self, policy: Policy, ids_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
        """[B, 6] probabilities of the scores 0-5 after each left-padded row (judge.mode=expected)."""
        if not self.digit_masses_available:
            raise ValueError(f"judge.mode=expected reads the probabilities of the digits 0-5 from the model's logits "
                             f"after 'Score:', and sample.backend={self.spec!r} gives none (its backend has no "
                             f"digit_masses); use sample.backend={BUILTIN} or judge.mode=sampled")
        self._hold(policy)
        return np.asarray(self.impl.digit_masses(policy, ids_BxT, mask_BxT))


def resolve(spec: str, key: str = "sample.backend") -> Callable[[], SamplingBackend]:
    """The factory `spec` names: the built-in backend's for "jaxsr", else the attribute of an importable module
    ("package.module:attribute"); a ConfigValueError naming `key` when it is neither."""
    parts = backend_spec(key, spec)
    if parts is None:
        return JaxsrBackend
    module, attr = parts
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name and (module + ".").startswith(e.name + ".")
        why = "it is not on the Python path" if missing else f"importing it failed: {e}"
        raise ConfigValueError(f"{key}={spec!r}: cannot import module {module!r} ({why}); expected an importable "
                               f"module with the backend factory") from e
    try:
        factory = functools.reduce(getattr, attr.split("."), mod)
    except AttributeError:
        raise ConfigValueError(f"{key}={spec!r}: module {module!r} has no attribute {attr!r}; expected a callable "
                               f"that returns a SamplingBackend") from None
    if not callable(factory):
        raise ConfigValueError(f"{key}={spec!r}: {module}.{attr} is not callable (a {type(factory).__name__}); "
                               f"expected a callable that returns a SamplingBackend")
    return factory


def check_expected_judge(spec: str, key: str = "sample.backend") -> None:
    """judge.mode=expected needs the backend's digit_masses; for an external backend the factory must be a class
    that defines it (so it is known without starting the engine)."""
    factory = resolve(spec, key)
    if not callable(getattr(factory, "digit_masses", None)):
        raise ConfigValueError(
            f"judge.mode=expected with {key}={spec!r}: the expected judge reads the probabilities of the digits 0-5 "
            f"from the model's logits after 'Score:', and {spec!r} does not say it gives them (its factory is not a "
            f"class with a digit_masses method); use {key}={BUILTIN} or judge.mode=sampled")


def load(spec: str = BUILTIN, key: str = "sample.backend", share_prefixes: bool = True) -> Backend:
    """A new `Backend` for `spec` (the factory is called once: an external engine starts here).
    share_prefixes: the built-in sampler's (`sample.share_prefixes`)."""
    if backend_spec(key, spec) is None:
        return Backend(JaxsrBackend(share_prefixes), spec)
    impl = resolve(spec, key)()
    missing = [m for m in _METHODS if not callable(getattr(impl, m, None))]
    if missing:
        raise ConfigValueError(f"{key}={spec!r}: its factory made a {type(impl).__name__} without "
                               f"{', '.join(missing)}; a SamplingBackend has prepare(policy), "
                               f"generate(policy, prompt_ids, ...) and release()")
    return Backend(impl, spec)


def from_config(cfg) -> Backend:
    """The backend `cfg.sample.backend` selects, new (a run keeps one: `Context.backend()`)."""
    return load(cfg.sample.backend, share_prefixes=cfg.sample.share_prefixes)


def builtin() -> Backend:
    return Backend(JaxsrBackend())


def export_hf(policy: Policy, out_dir) -> Path:
    """M_t as an HF model directory for an external engine: safetensors in the compute dtype, config.json,
    generation_config.json and the tokenizer with the run's chat template (`jaxsr export`'s `save_hf`). Every
    process must call it; process 0 writes."""
    return save_hf(policy, out_dir, dtype=policy.dtype)
