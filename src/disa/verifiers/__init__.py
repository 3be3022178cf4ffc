"""Verifier registry and the one scoring path every consumer (sample, eval, train, the TRL bridge) goes through.

Every verifier has TRL's reward-function signature:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where each keyword is a per-row column of the prompt set (``answer``, ``tests``, ``numbers``...), a list aligned
with ``completions``. A verifier registers with the columns it cannot work without::

    @register_verifier("math", columns=("answer",))

so the pipeline can check a prompt file before any model loads (:func:`required_columns`) and :func:`score` can
name a row that lacks one. Built-in modules register on first use (``math`` needs math-verify only then); a
user's verifier is one plugin file (:mod:`disa.plugins`).

:func:`score` is the only place a verifier is called: it checks the columns, calls the verifier on the batch and
checks what comes back. A reward that is not a finite number (None, NaN, a string) or lies outside the verifier's
declared ``reward_range``, or a completion that makes the verifier raise, fails *that item*: it gets the verifier's declared ``failure_reward`` (0.0: counted wrong)
and a :class:`VerifierItemWarning` names the verifier, the row, the prompt id and why; the rest of the batch keeps
its rewards. A wrong number of rewards, a missing required column, a missing dependency, or every item of a batch
failing is the verifier's or the data's fault, not an item's, and stops the batch with an error that says which.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from math import isfinite  # not `import math`: the submodule disa.verifiers.math would shadow it
from typing import Any, Callable, Mapping, Optional, Sequence, Union

RewardFn = Callable[..., list[float]]


@dataclass(frozen=True)
class VerifierSpec:
    """A registered verifier: its function, the prompt-row columns it requires, and the reward a failed item gets."""

    name: str
    fn: RewardFn
    columns: tuple[str, ...] = ()
    failure_reward: float = 0.0
    runs_code: bool = False  # executes the completion: the stages check which sandbox it gets
    reward_range: Optional[tuple[float, float]] = None  # [low, high] every reward lies in; None: not declared
    # check_row(prompt, columns) -> None or why the row cannot be scored: run on every prompt row before any model
    # loads (``prompt``: the row's prompt text, or its last message's content; ``columns``: its verifier columns)
    check_row: Optional[Callable[[Any, Mapping[str, Any]], Optional[str]]] = None

    def out_of_range(self, reward: float) -> bool:
        """Whether ``reward`` lies outside the declared ``reward_range`` (never, when none is declared)."""
        return self.reward_range is not None and not (self.reward_range[0] <= reward <= self.reward_range[1])

    def range_text(self) -> str:
        return f"[{self.reward_range[0]:g}, {self.reward_range[1]:g}]" if self.reward_range is not None else "any"


class VerifierItemWarning(UserWarning):
    """One completion's reward could not be computed; it was given the verifier's ``failure_reward``."""


_REGISTRY: dict[str, VerifierSpec] = {}
# name -> module that registers it; imported on first use.
_LAZY = {"math": "disa.verifiers.math", "code": "disa.verifiers.code", "countdown": "disa.verifiers.countdown"}


def register_verifier(name: str, *, columns: Sequence[str] = (), failure_reward: float = 0.0,
                      runs_code: bool = False, reward_range: Optional[tuple[float, float]] = None,
                      check_row: Optional[Callable[[Any, Mapping[str, Any]], Optional[str]]] = None):
    """Decorator: register ``fn`` (TRL's signature) under ``name``, with the prompt columns it requires;
    ``runs_code=True`` declares that it executes the completion, so the stages check which sandbox it will get
    (``verifier.allow_fallback``); ``reward_range=(low, high)`` declares the rewards it can return: a reward
    outside it fails that item (:func:`score`) and a Stage 1 shard holding one is refused (``disa label``);
    ``check_row(prompt, columns)`` returns why a prompt row cannot be scored (None when it can): the stages run it
    on every row before any model loads."""
    columns = tuple(columns)
    if not all(isinstance(c, str) and c for c in columns):
        raise ValueError(f"register_verifier({name!r}): columns must be non-empty strings, got {columns!r}")
    if not isfinite(float(failure_reward)):
        raise ValueError(f"register_verifier({name!r}): failure_reward must be finite, got {failure_reward!r}")
    if reward_range is not None:
        low, high = (float(v) for v in reward_range)
        if not (isfinite(low) and isfinite(high) and low <= high):
            raise ValueError(f"register_verifier({name!r}): reward_range must be two finite numbers low <= high, "
                             f"got {reward_range!r}")
        if not low <= float(failure_reward) <= high:
            raise ValueError(f"register_verifier({name!r}): failure_reward {failure_reward!r} is outside its "
                             f"reward_range {reward_range!r}")
        reward_range = (low, high)

    def deco(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = VerifierSpec(name, fn, columns, float(failure_reward), bool(runs_code), reward_range,
                                       check_row)
        return fn

    return deco


def runs_code(verifier: Union[str, RewardFn, "VerifierSpec"]) -> bool:
    """Whether a verifier (a registry name, a spec, a registered function, or a ``functools.partial`` of one)
    executes the completion's code."""
    import functools

    while isinstance(verifier, functools.partial):
        verifier = verifier.func
    if isinstance(verifier, VerifierSpec):
        return verifier.runs_code
    if isinstance(verifier, str):
        return verifier_spec(verifier).runs_code
    return any(spec.fn is verifier and spec.runs_code for spec in _REGISTRY.values())


def verifier_spec(name: str) -> VerifierSpec:
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_LAZY))
        raise KeyError(f"unknown verifier {name!r}; known: {known}")
    return _REGISTRY[name]


def get_verifier(name: str) -> RewardFn:
    """The reward function registered as ``name`` (TRL's signature)."""
    return verifier_spec(name).fn


def required_columns(name: str) -> tuple[str, ...]:
    """The prompt-row columns verifier ``name`` declared it requires (``("answer",)`` for ``math``)."""
    return verifier_spec(name).columns


def available_verifiers() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def resolve_verifier(verifier: Union[str, RewardFn, VerifierSpec]) -> VerifierSpec:
    """A registry name, a spec, or a bare reward function (no declared columns, failure reward 0.0) -> its spec."""
    if isinstance(verifier, VerifierSpec):
        return verifier
    if callable(verifier):
        registered = next((spec for spec in _REGISTRY.values() if spec.fn is verifier), None)
        return registered or VerifierSpec(getattr(verifier, "__name__", "custom"), verifier)
    return verifier_spec(verifier)


def repeat_columns(records: Sequence[Any], n: int) -> dict[str, list]:
    """TRL's per-completion keyword columns: each record's ``verifier_columns()`` value repeated ``n`` times
    (``n`` completions per prompt, adjacent), every key any record has (``None`` where one lacks it)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.verifier_columns() if k not in keys]
    return {k: [r.verifier_columns().get(k) for r in records for _ in range(n)] for k in keys}


def _as_reward(value: Any) -> Optional[float]:
    """``value`` as a finite float (bools and numpy numbers included), or None (None, NaN, inf, a string...)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if isfinite(number) else None


def _call(spec: VerifierSpec, prompts: list, completions: list, columns: Mapping[str, list], kwargs: dict):
    return spec.fn(prompts, completions, **columns, **kwargs)


def score(
    verifier: Union[str, RewardFn, VerifierSpec],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Optional[Mapping[str, Sequence[Any]]] = None,
    *,
    ids: Optional[Sequence[Any]] = None,
    verifier_kwargs: Optional[Mapping[str, Any]] = None,
) -> list[float]:
    """Rewards of ``completions`` (one per row) by ``verifier`` (a registry name or a reward function).

    ``prompts`` and every list in ``columns`` are aligned with ``completions``; ``ids`` (optional) names each
    row's prompt in messages; ``verifier_kwargs`` are the verifier's own settings (``data.verifier_kwargs``).
    See the module docstring for what fails an item and what fails the batch."""
    spec = resolve_verifier(verifier)
    prompts, completions = list(prompts), list(completions)
    columns = {k: list(v) for k, v in (columns or {}).items()}
    kwargs = dict(verifier_kwargs or {})
    n = len(completions)
    for name, column in [("prompts", prompts), *columns.items()] + ([("ids", list(ids))] if ids is not None else []):
        if len(column) != n:
            raise ValueError(f"verifier {spec.name!r}: column {name!r} has {len(column)} rows for {n} completions")

    def where(i: int) -> str:
        return f"row {i}" + (f" (prompt id {ids[i]!r})" if ids is not None else "")

    for column in spec.columns:
        values = columns.get(column)
        missing = [i for i in range(n) if values is None or values[i] is None]
        if missing:
            raise ValueError(f"verifier {spec.name!r} requires column {column!r}, which {where(missing[0])} lacks"
                             f"{f' (and {len(missing) - 1} more rows)' if len(missing) > 1 else ''}")
    if n == 0:
        return []

    try:
        values = list(_call(spec, prompts, completions, columns, kwargs))
        failures: dict[int, str] = {}
    except (ImportError, MemoryError):
        raise
    except Exception as batch_error:  # noqa: BLE001 - find the item(s) that made it raise, score the others
        values, failures = [None] * n, {}
        for i in range(n):
            try:
                [values[i]] = list(_call(spec, prompts[i:i + 1], completions[i:i + 1],
                                         {k: v[i:i + 1] for k, v in columns.items()}, kwargs))
            except (ImportError, MemoryError):
                raise
            except Exception as err:  # noqa: BLE001
                failures[i] = f"raised {type(err).__name__}: {err}"
        if not failures:  # every item passes alone: the batch call itself is broken
            raise RuntimeError(f"verifier {spec.name!r} raised on the batch of {n} but on no single item: "
                               f"{type(batch_error).__name__}: {batch_error}") from batch_error
    if len(values) != n:
        raise ValueError(f"verifier {spec.name!r} returned {len(values)} rewards for {n} completions")
    bad = {i: failures.get(i) or f"returned {values[i]!r}, not a finite number" for i in range(n)
           if i in failures or _as_reward(values[i]) is None}
    bad.update({i: f"returned {values[i]!r}, outside its declared reward range {spec.range_text()}" for i in range(n)
                if i not in bad and spec.out_of_range(_as_reward(values[i]))})
    if n > 1 and len(bad) == n:  # not one completion's fault: the verifier or the data is broken
        raise RuntimeError(f"verifier {spec.name!r} failed on every one of the {n} items; {where(0)}: {bad[0]}")
    rewards = []
    for i, value in enumerate(values):
        reward = None if i in bad else _as_reward(value)
        if reward is None:
            why = bad[i]
            warnings.warn(VerifierItemWarning(f"verifier {spec.name!r}, {where(i)}: {why}; scored "
                                              f"{spec.failure_reward} (its failure reward)"), stacklevel=2)
            reward = spec.failure_reward
        rewards.append(reward)
    return rewards


def as_reward_function(verifier: Union[str, RewardFn, VerifierSpec], **verifier_kwargs) -> RewardFn:
    """``verifier`` as a TRL reward function (``reward_funcs=[as_reward_function("math")]``), scoring through
    :func:`score`: TRL's bridge gets the same column checks and per-item failures as the pipeline."""
    spec = resolve_verifier(verifier)

    def reward(prompts, completions, **columns):
        columns = {k: v for k, v in columns.items() if k not in ("completion_ids", "trainer_state")
                   and isinstance(v, (list, tuple)) and len(v) == len(completions)}
        texts = [completion_text(c, i) for i, c in enumerate(completions)]
        return score(spec, prompts, texts, columns, verifier_kwargs=verifier_kwargs)

    reward.__name__ = spec.name
    return reward


def completion_text(completion: Any, row: Optional[int] = None) -> str:
    """Plain text of a completion: TRL passes strings or chat messages ``[{"role": ..., "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    where = "completion" if row is None else f"completions[{row}]"
    raise TypeError(f"{where} must be a str or a list of chat messages, got {type(completion).__name__}")


__all__ = ["register_verifier", "get_verifier", "verifier_spec", "required_columns", "available_verifiers",
           "resolve_verifier", "repeat_columns", "score", "as_reward_function", "completion_text", "VerifierSpec",
           "VerifierItemWarning"]
