"""Verifier registry. Every verifier has TRL's reward-function signature:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where each keyword is a per-row column of the prompt set (``answer``, ``tests``, ``numbers``...),
a list aligned with ``completions``. Modules register on import; ``get_verifier`` imports lazily so
that optional dependencies (math-verify) are only needed when that verifier is used.
"""

from __future__ import annotations

import importlib
from typing import Callable

RewardFn = Callable[..., list[float]]

_REGISTRY: dict[str, RewardFn] = {}
# name -> module that registers it; imported on first use.
_LAZY = {"math": "disa.verifiers.math", "code": "disa.verifiers.code", "countdown": "disa.verifiers.countdown"}


def register_verifier(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def get_verifier(name: str) -> RewardFn:
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_LAZY))
        raise KeyError(f"unknown verifier {name!r}; known: {known}")
    return _REGISTRY[name]


def available_verifiers() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))
