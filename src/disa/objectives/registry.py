"""The objective registry: each loss declares, where it is defined, what it reads from a rollout batch.

The trainer, the config and the CLI read these declarations instead of keeping their own lists of names, so a
new objective is one function in one file (the package's or a user's plugin module) with one decorator::

    @register_objective("my_tb", family="trajectory_balance", log_z="table",
                        needs=lambda hp: ObjectiveNeeds({"ref_logp", "rewards", "log_z"}))
    def my_tb_loss(*, logp, ref_logp, mask, rewards, log_z, beta, **kw): ...

What the trainer feeds is one :class:`ObjectiveInputs` (documented shapes, checked once). ``needs`` says which
of its optional fields the loss reads, either as a set or as a function of the objective's own (resolved)
hyperparameters, since e.g. a KL penalty reads ``ref_logp`` only when its coefficient is non-zero: only the
objective knows what its hyperparameters mean. :func:`bind_objective` resolves hyperparameters and needs ONCE,
when a trainer is built; every micro-batch then calls the bound objective with no reflection.
Everything in the signature that is not an input field is a hyperparameter (``train.objective_kwargs``).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

Tensor = torch.Tensor
FAMILIES = ("trajectory_balance", "policy_gradient", "supervised")
TOKEN_FIELDS = ("logp", "mask", "old_logp", "ref_logp")
ROLLOUT_FIELDS = ("rewards", "advantages", "log_z")
# Hyperparameters the trainer fills from the run's target (``target.beta``), never from objective_kwargs.
TARGET_HYPERPARAMETERS = frozenset({"beta"})


@dataclass(frozen=True)
class ObjectiveInputs:
    """One micro-batch of ``B`` rollouts as an objective sees it; the response is ``T`` tokens wide (right-padded).

    ``logp (B, T)``: log pi_theta of each response token, with gradient. ``mask (B, T)``: True on response tokens.
    ``old_logp (B, T)``: log pi_old (the policy that sampled the rollouts), no gradient. ``ref_logp (B, T)``:
    log pi_ref, no gradient. ``rewards (B,)``: the target's r~ for trajectory balance, the verifier's raw reward
    otherwise. ``advantages (B,)``: group-normalised raw rewards. ``log_z (B,)``: each rollout's prompt's log Z
    (with gradient only from a learned source). ``max_len``: the longest response the run allows (Dr. GRPO's
    constant). Optional fields are None when no one asked for them. Shapes are checked here, values (finite,
    0/1 mask) by the objectives' own checks.
    """

    logp: Tensor
    mask: Tensor
    old_logp: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None
    rewards: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    log_z: Optional[Tensor] = None
    max_len: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mask.dim() != 2:
            raise ValueError(f"mask must have shape (B, T), got {tuple(self.mask.shape)}")
        for name in TOKEN_FIELDS:
            t = getattr(self, name)
            if t is not None and t.shape != self.mask.shape:
                raise ValueError(f"{name} must have the shape of mask {tuple(self.mask.shape)}, got {tuple(t.shape)}")
        for name in ROLLOUT_FIELDS:
            t = getattr(self, name)
            if t is not None and t.shape != (self.mask.shape[0],):
                raise ValueError(f"{name} must have shape ({self.mask.shape[0]},), got {tuple(t.shape)}")


INPUT_FIELDS = frozenset(f.name for f in dataclasses.fields(ObjectiveInputs))
OPTIONAL_INPUTS = INPUT_FIELDS - {"logp", "mask"}
MAY_BE_NONE = frozenset({"max_len"})  # a needed field whose None is a value (no limit), not a missing input


@dataclass(frozen=True)
class ObjectiveNeeds:
    """What a bound objective reads and how its loss reduces over a batch.

    ``inputs``: the optional :class:`ObjectiveInputs` fields it reads. ``token_weighted``: the loss is one mean
    over every response token of the batch (micro-batches are then weighted by their token counts, not rows).
    ``length_normalized``: a trajectory-balance residual on token-mean log-probs (a batch log Z estimate must
    use the same), not trajectory sums.
    """

    inputs: frozenset = frozenset()
    token_weighted: bool = False
    length_normalized: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", frozenset(self.inputs))
        unknown = sorted(self.inputs - OPTIONAL_INPUTS)
        if unknown:
            raise ValueError(f"needs: {unknown} are not ObjectiveInputs fields (choose from {sorted(OPTIONAL_INPUTS)})")


# A family's inputs when an objective declares no ``needs``.
FAMILY_NEEDS = {
    "trajectory_balance": ObjectiveNeeds({"ref_logp", "rewards", "log_z"}),
    "policy_gradient": ObjectiveNeeds({"old_logp", "advantages"}),
    "supervised": ObjectiveNeeds(),
}
NeedsDeclaration = Union[ObjectiveNeeds, Iterable[str], Callable[[Mapping[str, Any]], ObjectiveNeeds]]


@dataclass(frozen=True)
class ObjectiveSpec:
    """What an objective is and needs.

    ``family``: trajectory_balance (fits pi* ~ pi_ref exp(beta r~): takes the target's ``beta``), policy_gradient
    (reward maximisation on group advantages) or supervised (fixed examples, the SFT loop). ``needs``: see
    :class:`ObjectiveNeeds` (None: the family's default, ``FAMILY_NEEDS``). ``log_z``: the registered log Z source
    ``train.log_z: auto`` means for it (``disa.log_z``), None when it reads none. ``trains_log_z``: its gradient
    reaches ``log_z`` (FlowRL), which a learned log Z source requires.
    """

    name: str
    fn: Callable
    family: str
    needs: Optional[NeedsDeclaration] = None
    log_z: Optional[str] = None
    trains_log_z: bool = False
    extends: Optional[Callable] = None  # a ``**kw`` pass-through target whose keywords count as ours

    @property
    def needs_beta(self) -> bool:
        return self.family == "trajectory_balance"

    def accepted(self) -> set[str]:
        """Every keyword the function takes, plus those of ``extends`` when it passes ``**kw`` on."""
        params = inspect.signature(self.fn).parameters
        names = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if self.extends is not None and any(p.kind == p.VAR_KEYWORD for p in params.values()):
            names |= {n for n, p in inspect.signature(self.extends).parameters.items()
                      if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        return names

    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameter name -> default (``inspect.Parameter.empty`` when required), the input fields and the
        target's ``beta`` excluded: what ``train.objective_kwargs`` may set and ``disa config`` shows."""
        out: dict[str, Any] = {}
        for fn in ([self.extends] if self.extends is not None else []) + [self.fn]:
            for n, p in inspect.signature(fn).parameters.items():
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                    out[n] = p.default
        return {n: d for n, d in out.items() if n not in INPUT_FIELDS | TARGET_HYPERPARAMETERS}

    def default(self, name: str) -> Any:
        return self.hyperparameters().get(name, inspect.Parameter.empty)

    def resolve_needs(self, hparams: Mapping[str, Any]) -> ObjectiveNeeds:
        """The declaration applied to ``hparams`` (the given ones over the defaults)."""
        declared = FAMILY_NEEDS[self.family] if self.needs is None else self.needs
        if callable(declared) and not isinstance(declared, ObjectiveNeeds):
            resolved = {n: d for n, d in self.hyperparameters().items() if d is not inspect.Parameter.empty}
            declared = declared({**resolved, **hparams})
        needs = declared if isinstance(declared, ObjectiveNeeds) else ObjectiveNeeds(frozenset(declared))
        missing = sorted(needs.inputs - self.accepted())
        if missing:
            raise TypeError(f"objective {self.name!r} declares it needs {missing}, but its function takes no such keyword")
        return needs


@dataclass(frozen=True)
class BoundObjective:
    """An objective with its hyperparameters and needs resolved: ``objective(inputs) -> (loss, metrics)``.

    Metrics are detached 0-d tensors (no host sync per metric; the trainer reduces a step's metrics at once)."""

    spec: ObjectiveSpec
    hyperparameters: Mapping[str, Any]
    needs: ObjectiveNeeds

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict]:
        args = {}
        for field in self.needs.inputs:
            value = getattr(inputs, field)
            if value is None and field not in MAY_BE_NONE:
                raise ValueError(f"objective {self.name!r} needs {field}, which this batch does not carry")
            args[field] = value
        return self.spec.fn(logp=inputs.logp, mask=inputs.mask, **args, **self.hyperparameters)


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, *, family: str, needs: Optional[NeedsDeclaration] = None, log_z: Optional[str] = None,
                       trains_log_z: bool = False, extends: Optional[Callable] = None):
    """Decorator: register ``fn`` as objective ``name`` (see the module docstring). Re-registering a name
    replaces it, so a plugin can override a built-in on purpose."""
    if family not in FAMILIES:
        raise ValueError(f"objective {name!r}: family must be one of {FAMILIES}, got {family!r}")
    if (log_z is None) != (family != "trajectory_balance"):
        raise ValueError(f"objective {name!r}: a trajectory-balance objective names its default log Z source "
                         f"(log_z=...), any other reads none; got family {family!r}, log_z={log_z!r}")

    def deco(fn: Callable) -> Callable:
        OBJECTIVES[name] = ObjectiveSpec(name=name, fn=fn, family=family, needs=needs, log_z=log_z,
                                         trains_log_z=trains_log_z, extends=extends)
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


def bind_objective(name: str, hparams: Mapping[str, Any]) -> BoundObjective:
    """Objective ``name`` with ``hparams`` (and, for trajectory balance, the target's ``beta``) resolved once:
    unknown hyperparameters are an error naming them."""
    spec = get_spec(name)
    allowed = set(spec.hyperparameters()) | (TARGET_HYPERPARAMETERS if spec.needs_beta else set())
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise TypeError(f"objective {name!r} got unknown hyperparameter(s) {unknown}; it accepts {sorted(allowed)}")
    return BoundObjective(spec=spec, hyperparameters=dict(hparams), needs=spec.resolve_needs(hparams))


def compute_objective(name: str, *, inputs: Mapping[str, Any], **hparams):
    """One call of objective ``name`` on a dict of input fields (those it does not need are ignored):
    ``bind_objective`` + :class:`ObjectiveInputs`, for callers holding loose tensors (tests, bridges)."""
    objective = bind_objective(name, hparams)
    keep = objective.needs.inputs | {"logp", "mask"}
    return objective(ObjectiveInputs(**{k: v for k, v in inputs.items() if k in keep}))
