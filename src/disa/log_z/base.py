"""The ``LogZSource`` contract and its registry: where trajectory balance reads ``log Z(x)`` (eq. 5).

A source gives each rollout its prompt's ``log Z``. Most know it before the update (``rollout_log_z``: a frozen
per-prompt value, zero, a batch estimate); a learned one computes it inside the update from the policy's
hidden states, with gradient (``update_log_z``). Each source is one file of this package (or of a plugin) that
registers itself with the run artefacts it reads::

    @register_log_z_source("my_source", requires=("labels",))
    class MySource(LogZSource):
        @classmethod
        def from_run(cls, context): ...
        def rollout_log_z(self, request): ...

``train.log_z`` names a registered source (``auto``: the objective's declaration); the trainer calls the
contract and never asks which kind it holds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import torch
from torch import nn

from disa.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from disa.config import PipelineConfig, TrainConfig
    from disa.objectives import ObjectiveSpec
    from disa.run_dir import RunDir

Tensor = torch.Tensor
# The run artefacts a source may declare it reads (``disa train`` and ``disa validate`` check they exist).
ARTEFACTS = ("labels", "log_z_table", "log_z_regressor")


@dataclass(frozen=True)
class LogZRequest:
    """What a source may read to give a rollout batch of ``P`` prompts x ``G`` rollouts its log Z.

    ``prompt_ids``, ``prompt_texts``: ``P`` each (texts as rendered for the policy). ``rewards (P*G,)``: r~.
    ``mask, old_logp, ref_logp (P*G, T)``: old_logp is None unless the source ``needs_old_logp``.
    ``beta``: the target's. ``length_normalized``: the objective's residual uses token-mean log-probs.
    """

    prompt_ids: Sequence[Any]
    prompt_texts: Sequence[str]
    group_size: int
    beta: float
    rewards: Tensor
    mask: Tensor
    ref_logp: Optional[Tensor] = None
    old_logp: Optional[Tensor] = None
    length_normalized: bool = False


@dataclass(frozen=True)
class LogZContext:
    """What ``from_run`` may read: the train config, and for ``disa train`` the pipeline config, the Stage 1-2
    run folder and the prompt records (``.id``) trained on. A library trainer passes only ``train``."""

    train: "TrainConfig"
    pipeline: Optional["PipelineConfig"] = None
    run_dir: Optional["RunDir"] = None
    records: Optional[Sequence[Any]] = None


class LogZSource(abc.ABC):
    """Where trajectory balance reads log Z. Class attributes declare what the trainer must provide:

    ``trains``: it has parameters (``module``) the optimiser trains with the policy at ``train.logz_lr``; only an
    objective that lets its gradient reach log Z (``trains_log_z``) may use it. ``needs_old_logp``: the request
    carries ``old_logp``. ``needs_hidden_states``: the update calls ``update_log_z`` with the policy's last hidden
    states. ``module``: what a checkpoint saves (None: nothing to save).
    """

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = False
    needs_old_logp: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False
    module: Optional[nn.Module] = None

    @classmethod
    def from_run(cls, context: LogZContext) -> "LogZSource":
        """Build the source for a run (default: it needs nothing)."""
        return cls()

    def bind(self, policy: nn.Module) -> None:
        """Called once the policy is final (LoRA applied), before the optimiser is built."""

    @abc.abstractmethod
    def rollout_log_z(self, request: LogZRequest) -> Optional[Tensor]:
        """Per-rollout log Z ``(P*G,)`` float32 on the CPU without a graph, or None when ``update_log_z`` gives it."""

    def update_log_z(self, hidden_states: Tensor, prompt_mask: Tensor) -> Tensor:
        """Log Z ``(B,)`` with gradient, from ``hidden_states (B, L, H)`` over ``prompt_mask (B, L)``."""
        raise NotImplementedError(f"log Z source {self.name!r} gives log Z before the update")


@dataclass(frozen=True)
class LogZSourceEntry:
    name: str
    cls: type
    requires: tuple[str, ...]


LOG_Z_SOURCES: dict[str, LogZSourceEntry] = {}


def register_log_z_source(name: str, *, requires: Sequence[str] = ()):
    """Class decorator: register a ``LogZSource`` as ``train.log_z: name``, reading the run artefacts
    ``requires`` (a subset of ``ARTEFACTS``). Re-registering a name replaces it."""
    unknown = sorted(set(requires) - set(ARTEFACTS))
    if unknown:
        raise ValueError(f"log Z source {name!r}: requires {unknown} are not run artefacts ({list(ARTEFACTS)})")
    if name == "auto":
        raise ValueError("'auto' is train.log_z's 'the objective's declaration', not a source name")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, LogZSource)):
            raise TypeError(f"log Z source {name!r}: {cls!r} is not a LogZSource subclass")
        cls.name = name
        LOG_Z_SOURCES[name] = LogZSourceEntry(name=name, cls=cls, requires=tuple(requires))
        return cls

    return deco


def log_z_source_names() -> list[str]:
    return sorted(LOG_Z_SOURCES)


def resolve_log_z_source(setting: str, spec: "ObjectiveSpec") -> Optional[LogZSourceEntry]:
    """``train.log_z`` + the objective's declaration -> the registered source, or None (the objective reads none).

    ``auto`` is the objective's own declaration. Objectives outside trajectory balance read no log Z, so anything
    but ``auto`` is an error; a source that trains needs an objective whose gradient reaches log Z (flowrl)."""
    if spec.log_z is None:
        if setting != "auto":
            raise ConfigError(f"train.log_z: objective {spec.name!r} ({spec.family}) reads no log Z; "
                              f"leave train.log_z at 'auto', got {setting!r}")
        return None
    name = spec.log_z if setting == "auto" else setting
    if name not in LOG_Z_SOURCES:
        raise ConfigError(f"train.log_z: {name!r} is not a registered log Z source (auto, or one of "
                          f"{log_z_source_names()}; a plugin can register more)")
    entry = LOG_Z_SOURCES[name]
    if entry.cls.trains and not spec.trains_log_z:
        raise ConfigError(f"train.log_z: {name!r} trains a log Z head, but objective {spec.name!r} does not let its "
                          "gradient reach log Z, so the head would never learn; only an objective that trains log Z "
                          "(flowrl) can use it")
    return entry


class FrozenLogZSource(LogZSource):
    """A per-prompt log Z fixed before training (DISA's eq. 10): ``prompt_log_z(texts, ids) -> (P,)``, read
    under no_grad, checked for shape and finiteness, repeated over each prompt's group."""

    @abc.abstractmethod
    def prompt_log_z(self, texts: Sequence[str], ids: Sequence[Any]) -> Tensor:
        """``(P,)`` log Z of ``P`` prompts."""

    def __call__(self, texts: Sequence[str], ids: Sequence[Any]) -> Tensor:
        return self.prompt_log_z(texts, ids)

    def rollout_log_z(self, request: LogZRequest) -> Tensor:
        return read_frozen_log_z(self.prompt_log_z, request.prompt_texts, request.prompt_ids).repeat_interleave(
            request.group_size)


def read_frozen_log_z(log_z_fn, texts: Sequence[str], ids: Sequence[Any]) -> Tensor:
    """``log_z_fn(texts, ids)`` as a float32 CPU ``(P,)`` tensor without a graph; wrong shapes and non-finite
    values are errors naming the prompts, since a bad label would silently bias every residual."""
    with torch.no_grad():
        log_z = torch.as_tensor(log_z_fn(list(texts), list(ids))).detach().float().cpu()
    if log_z.shape != (len(texts),):
        raise ValueError(f"log Z source must return shape ({len(texts)},) for {len(texts)} prompts, got {tuple(log_z.shape)}")
    if not bool(torch.isfinite(log_z).all()):
        bad = [ids[i] for i in torch.nonzero(~torch.isfinite(log_z)).flatten().tolist()]
        raise ValueError(f"log Z source returned a non-finite log Z for prompt id(s) {bad}")
    return log_z


class FrozenFunction(FrozenLogZSource):
    """Any ``fn(texts, ids) -> (P,)`` as a frozen source (a library user's own table or model). ``bind`` refuses a
    function whose parameters the policy's optimiser would train: DISA's log Z must stay frozen."""

    def __init__(self, fn):
        self.fn = fn

    def prompt_log_z(self, texts, ids) -> Tensor:
        return self.fn(texts, ids)

    def bind(self, policy: nn.Module) -> None:
        owner = self.fn if isinstance(self.fn, nn.Module) else getattr(self.fn, "__self__", None)
        if not isinstance(owner, nn.Module):
            return
        trained = {id(p) for p in policy.parameters() if p.requires_grad}
        shared = [n for n, p in owner.named_parameters() if id(p) in trained]
        if shared:
            raise ValueError(f"the frozen log Z function shares trainable parameters with the policy ({shared[:3]}); "
                             "DISA's log Z must be frozen")
