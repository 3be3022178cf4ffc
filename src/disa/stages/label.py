"""Stage 1b: turn sample shards into one ``log Z`` label (and diagnostics) per prompt.

Reads every ``shard-*.parquet`` written by :mod:`disa.stages.sample`, groups rows by ``prompt_id`` (a
prompt may have any number of samples; shorter groups are masked), applies the reward transform, and calls
:func:`disa.estimators.label_prompts`. Writes ``labels.parquet`` with one row per prompt:

``prompt_id, log_z, log_z_geometric, ess, max_weight, reward_rate, n, reward_scale, reward_shift``

``reward_scale`` / ``reward_shift`` are the per-prompt affine map ``r~ = a r + b`` used for the label
(``raw``: 1, 0; ``affine`` and ``group``: the proposal group's frozen normalisation), so Stage 3 can apply
the very same ``r~`` to its own rollouts. ``reward_rate`` is the raw reward's mean under q.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from disa import estimators
from disa.estimators import REWARD_TRANSFORMS
from disa.io import atomic_write_parquet
from disa.run_dir import LABELS_METADATA_KEY
from disa.stages import common
from disa.stages.common import stage
from disa.stages.sample import list_shards

REQUIRED_COLUMNS = ("prompt_id", "sample_idx", "reward", "logp_ref", "logp_q")
LABEL_COLUMNS = (
    "prompt_id", "log_z", "log_z_geometric", "ess", "max_weight", "reward_rate", "n", "reward_scale", "reward_shift",
)


def read_shard(path: str) -> dict[str, list]:
    """Read the label-relevant columns of one shard, validating them row by row.

    Raises ``ValueError`` naming the file, the 1-based row and the column for a missing column, a null, or
    a NaN/inf number.
    """
    try:
        schema_names = pq.read_schema(path).names
    except Exception as exc:
        raise ValueError(f"{path}: cannot read Parquet file ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in schema_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    data = pq.read_table(path, columns=list(REQUIRED_COLUMNS)).to_pydict()
    for col in REQUIRED_COLUMNS:
        for row, value in enumerate(data[col], start=1):
            if value is None:
                raise ValueError(f"{path}, row {row}: column {col!r} is null")
            if col in ("reward", "logp_ref", "logp_q") and not math.isfinite(value):
                raise ValueError(f"{path}, row {row}: column {col!r} is {value} (must be finite)")
    return data


def collect_groups(samples_dir: str) -> tuple[list[str], dict[str, dict[str, list]]]:
    """All shards' rows grouped by prompt (first-seen order). Duplicate ``(prompt_id, sample_idx)`` pairs are
    an error naming both places: they would double-count a sample in the label."""
    shards = list_shards(samples_dir)
    if not shards:
        raise FileNotFoundError(f"no shard-*.parquet files in {samples_dir}")
    order: list[str] = []
    groups: dict[str, dict[str, list]] = {}
    seen: dict[tuple[str, int], str] = {}
    for path in shards:
        data = read_shard(path)
        for row, pid in enumerate(data["prompt_id"]):
            key = (pid, int(data["sample_idx"][row]))
            where = f"{os.path.basename(path)} row {row + 1}"
            if key in seen:
                raise ValueError(f"duplicate sample (prompt_id={pid!r}, sample_idx={key[1]}) in {seen[key]} and {where}")
            seen[key] = where
            if pid not in groups:
                groups[pid] = {"reward": [], "logp_ref": [], "logp_q": []}
                order.append(pid)
            for col in ("reward", "logp_ref", "logp_q"):
                groups[pid][col].append(float(data[col][row]))
    return order, groups


def _to_padded(order: list[str], groups: dict, col: str, width: int) -> torch.Tensor:
    out = torch.zeros((len(order), width), dtype=torch.float64)
    for i, pid in enumerate(order):
        values = groups[pid][col]
        out[i, : len(values)] = torch.tensor(values, dtype=torch.float64)
    return out


def reward_affine_map(kind: str, rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt ``(scale, shift)``, each ``(P,)``, of the transform ``kind`` on the proposal groups."""
    if kind == "raw":
        return torch.ones(rewards.shape[0], dtype=rewards.dtype), torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    if kind in ("affine", "group"):
        return estimators.fit_affine_transform(rewards, mask=mask)
    raise ValueError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {kind!r}")


def run_labelling(
    samples_dir: str,
    *,
    beta: float,
    reward_transform: str = "raw",
    out_path: Optional[str] = None,
    metadata: Optional[dict] = None,
) -> pa.Table:
    """Label every prompt found in ``samples_dir``'s shards; write ``out_path`` (default
    ``<samples_dir>/labels.parquet``) and return the table (columns ``LABEL_COLUMNS``).

    ``reward_transform``: ``raw`` (``r~ = r``), ``group`` (group-normalised within the proposal group, the
    GRPO/FlowRL statistic) or ``affine`` (the same normalisation, recorded as a frozen per-prompt map).
    ``metadata``: what the table records about itself (JSON, under the Parquet key ``disa``): the target it
    estimates, so Stage 3 can refuse a config that trains towards another one.
    """
    if reward_transform not in REWARD_TRANSFORMS:
        raise ValueError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {reward_transform!r}")
    estimators.check_beta(beta)
    order, groups = collect_groups(samples_dir)
    width = max(len(g["reward"]) for g in groups.values())
    mask = torch.zeros((len(order), width), dtype=torch.bool)
    for i, pid in enumerate(order):
        mask[i, : len(groups[pid]["reward"])] = True
    rewards = _to_padded(order, groups, "reward", width)
    logp_ref = _to_padded(order, groups, "logp_ref", width)
    logp_q = _to_padded(order, groups, "logp_q", width)

    if reward_transform == "group":
        shaped = estimators.group_normalize(rewards, mask=mask)
        scale, shift = reward_affine_map("group", rewards, mask)
    else:
        scale, shift = reward_affine_map(reward_transform, rewards, mask)
        shaped = estimators.affine_transform(rewards, scale, shift) * mask

    labels = estimators.label_prompts(logp_ref, logp_q, shaped, beta, mask=mask, raw_rewards=rewards)
    table = pa.table(
        {
            "prompt_id": pa.array(order, pa.string()),
            **{k: pa.array(labels[k].double().tolist(), pa.float64())
               for k in ("log_z", "log_z_geometric", "ess", "max_weight", "reward_rate")},
            "n": pa.array([int(v) for v in labels["n"].tolist()], pa.int32()),
            "reward_scale": pa.array(scale.double().tolist(), pa.float64()),
            "reward_shift": pa.array(shift.double().tolist(), pa.float64()),
        }
    )
    if out_path is None:
        base = samples_dir[: -len("samples")] if os.path.basename(os.path.normpath(samples_dir)) == "samples" else samples_dir
        out_path = os.path.join(base, "labels.parquet")
    if metadata is not None:
        table = table.replace_schema_metadata({LABELS_METADATA_KEY: json.dumps(metadata)})
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write_parquet(table, out_path)
    return table


@stage("label")
def run(cfg) -> dict:
    """``disa label``: one ``log Z`` label per prompt (eq. 8) + diagnostics -> ``labels.parquet``, recording the
    target (``target.beta``, ``target.reward_transform``), N and the samples' settings and model fingerprints."""
    rd = common.run_dir(cfg)
    rd.complete_shards()
    samples_meta = json.loads(rd.samples_meta.read_text()) if rd.samples_meta.exists() else {}
    metadata = {"format_version": 1, "target": cfg.target.to_dict(), "n": samples_meta.get("n"),
                "samples": samples_meta}
    table = run_labelling(str(rd.samples), beta=cfg.target.beta, reward_transform=cfg.target.reward_transform,
                          out_path=str(rd.labels), metadata=metadata)
    cols = table.to_pydict()
    mean = lambda name: sum(cols[name]) / len(cols[name])  # noqa: E731
    result = {"rows": table.num_rows, "mean_log_z": mean("log_z"), "mean_ess": mean("ess"),
              "mean_reward_rate": mean("reward_rate"), "path": str(rd.labels)}
    common.say("label", f"{table.num_rows} prompts -> {rd.labels}; mean log Z label {result['mean_log_z']:.4f} "
               f"(beta {cfg.target.beta}, r~ {cfg.target.reward_transform}), mean ESS {result['mean_ess']:.2f}, "
               f"mean reward rate under q {result['mean_reward_rate']:.4f}")
    return result
