"""Objectives: one module per loss, each a plain function of tensors returning ``(loss, metrics)`` (metrics as
detached 0-d tensors), registered where it is defined with what it needs (:mod:`disa.objectives.registry`). Importing this package registers the
built-ins; a user's module registers more the same way (``plugins:`` in the config, see ``disa.plugins``).
"""

from __future__ import annotations

from . import aspo, grpo, gspo, sft, tb  # noqa: F401  (registers the built-ins)
from .aspo import aspo_loss
from .common import AGGREGATIONS, aggregate
from .grpo import grpo_loss
from .gspo import gspo_loss
from .registry import (
    OBJECTIVES,
    BoundObjective,
    ObjectiveInputs,
    ObjectiveNeeds,
    ObjectiveSpec,
    bind_objective,
    check_hyperparameters,
    compute_objective,
    get_objective,
    get_spec,
    objective_names,
    register_objective,
)
from .sft import sft_loss
from .tb import disa_loss, flowrl_loss, flowrl_no_logz_loss, trajectory_balance_loss

__all__ = [
    "AGGREGATIONS", "OBJECTIVES", "BoundObjective", "ObjectiveInputs", "ObjectiveNeeds", "ObjectiveSpec", "aggregate",
    "aspo_loss", "bind_objective", "check_hyperparameters", "compute_objective", "disa_loss", "flowrl_loss",
    "flowrl_no_logz_loss", "get_objective", "get_spec", "grpo_loss", "gspo_loss", "objective_names",
    "register_objective", "sft_loss", "trajectory_balance_loss",
]
