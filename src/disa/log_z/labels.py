"""``train.log_z: labels``: the Stage 1 labels' ``log Z`` used directly, no regressor (an ablation of Stage 2)."""

from __future__ import annotations

from disa.log_z.base import LogZContext, register_log_z_source
from disa.log_z.table import LogZTable, for_records


@register_log_z_source("labels", requires=("labels",))
class LabelsLogZ(LogZTable):
    """A ``LogZTable`` read from ``labels.parquet`` (``prompt_id``, ``log_z``)."""

    @classmethod
    def from_run(cls, context: LogZContext) -> LogZTable:
        import pyarrow.parquet as pq

        labels = context.run_dir.labels
        cols = pq.read_table(str(labels), columns=["prompt_id", "log_z"]).to_pydict()
        return for_records(dict(zip(cols["prompt_id"], cols["log_z"])), context.records, labels)
