"""Objectives: one module per loss, each a plain function of tensors returning ``(loss, metrics)``.

The trainer looks an objective up by name and passes whatever inputs it has; ``compute_objective`` hands
each function only the arguments it declares, so adding an objective is one function and one registry line.
Inputs (``B`` rollouts, ``T`` positions): ``logp, old_logp, ref_logp, mask (B, T)``; ``rewards, advantages,
log_z (B,)``. Hyperparameters are plain keyword arguments.
"""

from __future__ import annotations

import inspect
from typing import Callable

from .aspo import aspo_loss
from .common import AGGREGATIONS, aggregate
from .grpo import grpo_loss
from .gspo import gspo_loss
from .sft import sft_loss
from .tb import disa_loss, flowrl_loss, flowrl_no_logz_loss, trajectory_balance_loss

OBJECTIVES: dict[str, Callable] = {
    "disa": disa_loss,
    "flowrl": flowrl_loss,
    "flowrl_no_logz": flowrl_no_logz_loss,
    "tb": trajectory_balance_loss,
    "grpo": grpo_loss,
    "gspo": gspo_loss,
    "aspo": aspo_loss,
    "sft": sft_loss,
}

# What each objective needs from the rollouts, so the trainer computes only that.
NEEDS_LOG_Z = {"disa", "flowrl", "tb"}
USES_ADVANTAGES = {"grpo", "gspo", "aspo"}
DISTRIBUTION_MATCHING = {"disa", "flowrl", "flowrl_no_logz", "tb"}


def register_objective(name: str):
    def deco(fn: Callable) -> Callable:
        OBJECTIVES[name] = fn
        return fn

    return deco


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _accepted(fn: Callable) -> set[str] | None:
    """Keyword names ``fn`` accepts, following ``**kw`` pass-throughs into trajectory_balance_loss."""
    params = inspect.signature(fn).parameters
    names = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        names |= _accepted(trajectory_balance_loss) or set()
    return names


def compute_objective(name: str, *, inputs: dict, **hparams):
    """Call objective ``name`` with the rollout tensors it declares (others in ``inputs`` are ignored) and
    ``hparams``; an unknown hyperparameter is an error naming it."""
    fn = get_objective(name)
    accepted = _accepted(fn)
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise TypeError(f"objective {name!r} got unknown hyperparameter(s) {unknown}; it accepts {sorted(accepted)}")
    args = {k: v for k, v in inputs.items() if k in accepted and v is not None}
    return fn(**args, **hparams)


__all__ = [
    "AGGREGATIONS",
    "OBJECTIVES",
    "aggregate",
    "aspo_loss",
    "compute_objective",
    "disa_loss",
    "flowrl_loss",
    "flowrl_no_logz_loss",
    "get_objective",
    "grpo_loss",
    "gspo_loss",
    "register_objective",
    "sft_loss",
    "trajectory_balance_loss",
]
