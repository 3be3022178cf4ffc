"""The objective registry: each loss declares, where it is defined, what it needs from a rollout batch.

The trainer, the config and the CLI read these declarations instead of keeping their own lists of names, so a
new objective is one function in one file (the package's or a user's plugin module) with one decorator::

    @register_objective("my_tb", family="trajectory_balance", log_z="frozen")
    def my_tb_loss(*, logp, ref_logp, mask, rewards, log_z, beta, **kw): ...

Inputs the trainer can supply: ``logp, old_logp, ref_logp, mask (B, T)``; ``rewards, advantages, log_z (B,)``;
``max_len``. Everything else in the signature is a hyperparameter (``train.objective_kwargs``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

FAMILIES = ("trajectory_balance", "policy_gradient", "supervised")
LOG_Z_KINDS = (None, "frozen", "learned", "zero")
TRAINER_INPUTS = frozenset({"logp", "old_logp", "ref_logp", "mask", "rewards", "advantages", "log_z", "max_len"})
# Hyperparameters the trainer fills from the run's target (``target.beta``), never from objective_kwargs.
TARGET_HYPERPARAMETERS = frozenset({"beta"})


@dataclass(frozen=True)
class ObjectiveSpec:
    """What an objective is and needs.

    ``family``: trajectory_balance (fits pi* ~ pi_ref exp(beta r~); needs ``beta``, ``ref_logp``, ``rewards``),
    policy_gradient (reward maximisation on group advantages; ``ref_logp`` only for a KL penalty) or supervised
    (fixed examples, its own loop). ``log_z``: where its ``log Z`` comes from by default: ``frozen`` (an offline
    source, never trained), ``learned`` (a head trained with the policy), ``zero``, or None (not used).
    """

    name: str
    fn: Callable
    family: str
    log_z: Optional[str] = None
    extends: Optional[Callable] = None  # a ``**kw`` pass-through target whose keywords count as ours

    @property
    def needs_beta(self) -> bool:
        return self.family == "trajectory_balance"

    @property
    def needs_advantages(self) -> bool:
        return "advantages" in self.accepted()

    @property
    def needs_old_logp(self) -> bool:
        return self.family != "supervised"

    def needs_ref_logp(self, hparams: Mapping[str, Any]) -> bool:
        """Reference log-probs: always for trajectory balance, for others only with a KL penalty."""
        if self.family == "trajectory_balance":
            return True
        return "ref_logp" in self.accepted() and float(hparams.get("kl_coef", 0) or 0) > 0

    def accepted(self) -> set[str]:
        """Every keyword the function takes, plus those of ``extends`` when it passes ``**kw`` on."""
        params = inspect.signature(self.fn).parameters
        names = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if self.extends is not None and any(p.kind == p.VAR_KEYWORD for p in params.values()):
            names |= {n for n, p in inspect.signature(self.extends).parameters.items()
                      if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        return names

    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameter name -> default (``inspect.Parameter.empty`` when required), the trainer's inputs and
        the target's ``beta`` excluded: what ``train.objective_kwargs`` may set and ``disa config`` shows."""
        out: dict[str, Any] = {}
        for fn in ([self.extends] if self.extends is not None else []) + [self.fn]:
            for n, p in inspect.signature(fn).parameters.items():
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                    out[n] = p.default
        return {n: d for n, d in out.items() if n not in TRAINER_INPUTS | TARGET_HYPERPARAMETERS}

    def default(self, name: str) -> Any:
        return self.hyperparameters().get(name, inspect.Parameter.empty)


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, *, family: str, log_z: Optional[str] = None, extends: Optional[Callable] = None):
    """Decorator: register ``fn`` as objective ``name`` (see the module docstring). Re-registering a name
    replaces it, so a plugin can override a built-in on purpose."""
    if family not in FAMILIES:
        raise ValueError(f"objective {name!r}: family must be one of {FAMILIES}, got {family!r}")
    if log_z not in LOG_Z_KINDS:
        raise ValueError(f"objective {name!r}: log_z must be one of {LOG_Z_KINDS}, got {log_z!r}")

    def deco(fn: Callable) -> Callable:
        OBJECTIVES[name] = ObjectiveSpec(name=name, fn=fn, family=family, log_z=log_z, extends=extends)
        return fn

    return deco


def get_spec(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def get_objective(name: str) -> Callable:
    return get_spec(name).fn


def objective_names(family: Optional[str] = None) -> list[str]:
    return sorted(n for n, s in OBJECTIVES.items() if family is None or s.family == family)


def check_hyperparameters(name: str, hparams: Mapping[str, Any], where: str = "objective_kwargs") -> None:
    """An unknown hyperparameter, or ``beta`` (which comes from the target), is an error naming it."""
    spec = get_spec(name)
    if "beta" in hparams and spec.needs_beta:
        raise ValueError(f"{where}: beta is not an objective hyperparameter; it is the target's (target.beta / "
                         f"the labels' beta), shared by Stage 1 and Stage 3")
    unknown = sorted(set(hparams) - set(spec.hyperparameters()))
    if unknown:
        raise ValueError(f"{where}: {unknown[0]!r} is not a hyperparameter of objective {name!r} "
                         f"(it accepts {sorted(spec.hyperparameters())})")


def compute_objective(name: str, *, inputs: dict, **hparams):
    """Call objective ``name`` with the rollout tensors it declares (others in ``inputs`` are ignored) and
    ``hparams``; an unknown hyperparameter is an error naming it."""
    spec = get_spec(name)
    accepted = spec.accepted()
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise TypeError(f"objective {name!r} got unknown hyperparameter(s) {unknown}; it accepts {sorted(accepted)}")
    args = {k: v for k, v in inputs.items() if k in accepted and v is not None}
    return spec.fn(**args, **hparams)


def objective_aggregation(name: str, hparams: Mapping[str, Any]) -> Optional[str]:
    """The aggregation mode the objective will use (its default unless overridden), None for per-rollout means."""
    if "aggregation" in hparams:
        return hparams["aggregation"]
    default = get_spec(name).default("aggregation")
    return None if default is inspect.Parameter.empty else default
