"""The frozen per-prompt ``log Z`` (and the affine ``r~`` map) as dataset columns, for TRL and veRL.

``disa fit-z`` writes ``log_z/table.parquet`` (``prompt_id, log_z, ...``, the target in its metadata); an
engine's dataset carries a prompt id per row, so DISA's Stage 3 inside the engine is a column lookup.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

from disa.config import ConfigError, TargetConfig

LOG_Z_COLUMN = "log_z"
AFFINE_COLUMNS = ("reward_scale", "reward_shift")


def read_table_target(table_path) -> tuple[dict[str, float], TargetConfig]:
    """``({prompt id: log Z}, target)`` of a ``disa fit-z`` table; a table without a recorded target is refused."""
    from disa.stages.fit_z import read_log_z_table

    path = Path(table_path)
    if not path.is_file():
        raise FileNotFoundError(f"log Z table {str(path)!r} does not exist (run `disa fit-z`)")
    values, meta = read_log_z_table(path)
    if "target" not in meta:
        raise ConfigError(f"{path}: records no target (beta, reward_transform); re-run `disa fit-z`")
    bad = [pid for pid, v in values.items() if v is None or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{path}: log_z is missing or non-finite for prompt_id {bad[:5]}")
    return {str(k): float(v) for k, v in values.items()}, TargetConfig.from_dict(meta["target"])


def read_affine_map(labels_path) -> dict[str, tuple[float, float]]:
    """``{prompt id: (reward_scale, reward_shift)}`` from Stage 1's ``labels.parquet``."""
    import pyarrow.parquet as pq

    path = Path(labels_path)
    names = pq.read_schema(str(path)).names
    missing = [c for c in ("prompt_id", *AFFINE_COLUMNS) if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} for the affine reward transform")
    cols = pq.read_table(str(path), columns=["prompt_id", *AFFINE_COLUMNS]).to_pydict()
    return {str(p): (float(a), float(b)) for p, a, b in zip(cols["prompt_id"], *(cols[c] for c in AFFINE_COLUMNS))}


def log_z_row(row: Mapping[str, Any], log_z: Mapping[str, float], affine: Optional[Mapping[str, tuple]],
              id_column: str, index: int) -> dict[str, float]:
    """The columns to add to one dataset row; a row whose prompt has no label is an error naming it."""
    if id_column not in row:
        raise KeyError(f"dataset row {index}: no {id_column!r} column (the prompt id the log Z table is keyed by)")
    pid = str(row[id_column])
    if pid not in log_z:
        raise KeyError(f"dataset row {index}: prompt_id {pid!r} is not in the log Z table")
    out = {LOG_Z_COLUMN: log_z[pid]}
    if affine is not None:
        if pid not in affine:
            raise KeyError(f"dataset row {index}: prompt_id {pid!r} has no reward_scale/reward_shift in the labels")
        out[AFFINE_COLUMNS[0]], out[AFFINE_COLUMNS[1]] = affine[pid]
    return out


def add_log_z_column(dataset, table_path, *, id_column: str = "prompt_id", labels_path=None,
                     target: Optional[TargetConfig] = None):
    """A copy of a ``datasets.Dataset`` with a ``log_z`` column looked up from ``disa fit-z``'s table (plus
    ``reward_scale``/``reward_shift`` when the target's transform is ``affine``: give ``labels_path``).

    ``target``, if given, must match the one the table was made with (``disa.run_dir.check_target``).
    Returns ``(dataset, target)``: the trainer takes its ``beta`` and ``reward_transform`` from there.
    """
    from disa.run_dir import check_target

    log_z, recorded = read_table_target(table_path)
    if target is not None:
        check_target(target, recorded, table_path)
    affine = None
    if recorded.reward_transform == "affine":
        if labels_path is None:
            raise ConfigError(f"{table_path} was made with reward_transform='affine': pass labels_path= "
                              "(Stage 1's labels.parquet, which holds each prompt's reward_scale/reward_shift)")
        affine = read_affine_map(labels_path)
    columns: dict[str, list] = {}
    for i, row in enumerate(dataset):
        for k, v in log_z_row(row, log_z, affine, id_column, i).items():
            columns.setdefault(k, []).append(v)
    for name, values in columns.items():
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, values)
    return dataset, recorded


