"""Where trajectory balance reads ``log Z(x)``: the ``LogZSource`` contract (:mod:`disa.log_z.base`) and one
file per source, each registering itself with the run artefacts it reads:

    table       the frozen per-prompt table of ``disa fit-z`` (DISA's default)      labels, log_z_table
    regressor   the frozen Stage 2 regressor applied to the prompts                  labels, log_z_regressor
    labels      the Stage 1 labels, no regressor                                     labels
    learned     a head on the policy's prompt states, trained with it (FlowRL)       -
    zero        log Z = 0                                                            -
    batch       each group's own estimate (Trajectory Balance with Asynchrony)       -

A plugin registers more the same way (``plugins:`` in the config).
"""

from __future__ import annotations

from disa.log_z.base import (
    LOG_Z_SOURCES,
    FrozenFunction,
    FrozenLogZSource,
    LogZContext,
    LogZRequest,
    LogZSource,
    LogZSourceEntry,
    log_z_source_names,
    read_frozen_log_z,
    register_log_z_source,
    resolve_log_z_source,
)
from disa.log_z.batch import BatchLogZ, batch_log_z
from disa.log_z.labels import LabelsLogZ
from disa.log_z.learned import LearnedLogZ, LogZHead, policy_hidden_size
from disa.log_z.regressor import FrozenLogZ
from disa.log_z.table import LogZTable
from disa.log_z.zero import ZeroLogZ

__all__ = [
    "LOG_Z_SOURCES", "BatchLogZ", "FrozenFunction", "FrozenLogZ", "FrozenLogZSource", "LabelsLogZ", "LearnedLogZ",
    "LogZContext", "LogZHead", "LogZRequest", "LogZSource", "LogZSourceEntry", "LogZTable", "ZeroLogZ",
    "batch_log_z", "log_z_source_names", "policy_hidden_size", "read_frozen_log_z", "register_log_z_source",
    "resolve_log_z_source",
]
