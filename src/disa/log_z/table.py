"""``train.log_z: table`` (DISA's default): the frozen per-prompt ``log Z`` table that ``disa fit-z`` writes
(``log_z/table.parquet``, the regressor's value for every labelled prompt). ``LogZTable`` is also how the
demo and the studies hand a trainer fixed values (Stage 1 labels, an exact log Z)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from disa.config import ConfigError
from disa.log_z.base import FrozenLogZSource, LogZContext, register_log_z_source


@register_log_z_source("table", requires=("labels", "log_z_table"))
class LogZTable(FrozenLogZSource):
    """One fixed value per prompt id; no parameters, so nothing can train it."""

    def __init__(self, values: Mapping):
        self.values = {str(k): float(v) for k, v in values.items()}

    @classmethod
    def from_run(cls, context: LogZContext) -> "LogZTable":
        from disa.run_dir import check_target
        from disa.stages.fit_z import read_log_z_table

        rd = context.run_dir
        rd.require(rd.log_z_table, "fit-z", "the frozen log Z of every labelled prompt")
        values, meta = read_log_z_table(rd.log_z_table)
        if "target" in meta:
            check_target(context.pipeline.target, meta["target"], rd.log_z_table)
        check_fitted_on_current_labels(meta, rd)
        return for_records(values, context.records, rd.log_z_table)

    def prompt_log_z(self, texts: Sequence[str], ids: Sequence) -> torch.Tensor:
        missing = [i for i in ids if str(i) not in self.values]
        if missing:
            raise KeyError(f"LogZTable: no log Z for prompt id(s) {missing[:5]}")
        return torch.tensor([self.values[str(i)] for i in ids], dtype=torch.float32)


def for_records(values: Mapping, records, where) -> LogZTable:
    """The table restricted to the prompts trained on; a prompt without a value is an error naming the file."""
    ids = [r.id for r in records]
    missing = [i for i in ids if i not in values]
    if missing:
        raise ConfigError(f"{where}: no log Z for prompt id(s) {missing[:5]} of data.prompts; run `disa sample`, "
                          "`disa label` and `disa fit-z` on this prompt set (or set train.log_z: regressor)")
    from disa.stages.train import refuse_bad_numbers

    chosen = {i: values[i] for i in ids}
    refuse_bad_numbers(chosen, where, "log Z")
    return LogZTable(chosen)


def check_fitted_on_current_labels(meta: Mapping, rd) -> None:
    """A table fitted on labels that were made again since is refused: its values belong to other labels."""
    from disa.artifacts import LABELS

    fitted_on = (meta.get("inputs") or {}).get("labels")
    if fitted_on is not None and fitted_on != LABELS.digest(rd.root):
        raise ConfigError(f"{rd.log_z_table} was fitted on labels.parquet digest {fitted_on}, but {rd.labels} is "
                          f"now {LABELS.digest(rd.root)} (labelled again since): run `disa fit-z` again")
