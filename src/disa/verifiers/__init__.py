"""Verifier registry. Every verifier has TRL's reward-function signature:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where each keyword is a per-row column of the prompt set (``answer``, ``tests``, ``numbers``...),
a list aligned with ``completions``. Modules register on import; ``get_verifier`` imports lazily so
that optional dependencies (math-verify) are only needed when that verifier is used.
"""

from __future__ import annotations

import importlib
from math import isfinite  # not `import math`: the submodule disa.verifiers.math would shadow it
from typing import Any, Callable, Optional, Sequence, Union

RewardFn = Callable[..., list[float]]

_REGISTRY: dict[str, RewardFn] = {}
_RUNS_CODE: set[str] = set()  # verifiers that execute the completion (the pipeline checks their isolation)
# name -> module that registers it; imported on first use.
_LAZY = {"math": "disa.verifiers.math", "code": "disa.verifiers.code", "countdown": "disa.verifiers.countdown"}


def register_verifier(name: str, *, runs_code: bool = False):
    """Register ``fn`` under ``name``; ``runs_code=True`` declares that it executes the completion, so the
    stages check which sandbox it will get (``verifier.allow_fallback``)."""

    def deco(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        if runs_code:
            _RUNS_CODE.add(name)
        else:
            _RUNS_CODE.discard(name)
        return fn

    return deco


def runs_code(verifier: Union[str, RewardFn]) -> bool:
    """Whether a verifier (a registry name, a registered function, or a ``functools.partial`` of one)
    executes the completion's code."""
    import functools

    while isinstance(verifier, functools.partial):
        verifier = verifier.func
    if isinstance(verifier, str):
        get_verifier(verifier)
        return verifier in _RUNS_CODE
    return any(_REGISTRY.get(name) is verifier for name in _RUNS_CODE)


def get_verifier(name: str) -> RewardFn:
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_LAZY))
        raise KeyError(f"unknown verifier {name!r}; known: {known}")
    return _REGISTRY[name]


def available_verifiers() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def resolve_verifier(verifier: Union[str, RewardFn]) -> tuple[RewardFn, str]:
    """A registry name or a reward function -> ``(function, name for messages)``."""
    if callable(verifier):
        return verifier, getattr(verifier, "__name__", "custom")
    return get_verifier(verifier), verifier


def repeat_columns(records: Sequence[Any], n: int) -> dict[str, list]:
    """TRL's per-completion keyword columns: each record's ``verifier_columns()`` value repeated ``n`` times
    (``n`` completions per prompt, adjacent), every key any record has (``None`` where one lacks it)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.verifier_columns() if k not in keys]
    return {k: [r.verifier_columns().get(k) for r in records for _ in range(n)] for k in keys}


def check_rewards(values: Any, expected: int, name: str) -> list[float]:
    """A verifier's output as floats; a wrong count or a None/NaN/inf reward is an error naming the verifier."""
    values = list(values)
    if len(values) != expected:
        raise ValueError(f"verifier {name!r} returned {len(values)} rewards for {expected} completions")
    out = []
    for i, v in enumerate(values):
        if v is None or not isfinite(float(v)):
            raise ValueError(f"verifier {name!r} returned a non-finite reward {v!r} for completion {i}")
        out.append(float(v))
    return out


def completion_text(completion: Any, row: Optional[int] = None) -> str:
    """Plain text of a completion: TRL passes strings or chat messages ``[{"role": ..., "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    where = "completion" if row is None else f"completions[{row}]"
    raise TypeError(f"{where} must be a str or a list of chat messages, got {type(completion).__name__}")
