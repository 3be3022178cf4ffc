"""Stage 1b: turn sample shards into one ``log Z`` label (and diagnostics) per prompt.

Reads every ``shard-*.parquet`` written by :mod:`disa.stages.sample`, groups rows by ``prompt_id`` (a
prompt may have any number of samples; shorter groups are masked), applies the reward transform, and calls
:func:`disa.estimators.label_prompts`. Writes ``labels.parquet`` with one row per prompt:

``prompt_id, log_z, log_z_geometric, ess, max_weight, reward_rate, n, reward_scale, reward_shift,
estimator, log_z_se, reliable`` (+ ``n_recommended`` when a target standard error is given)

``reward_scale`` / ``reward_shift`` are the per-prompt affine map ``r~ = a r + b`` used for the label
(``raw``: 1, 0; ``affine`` and ``group``: the proposal group's frozen normalisation), so Stage 3 can apply
the very same ``r~`` to its own rollouts. ``reward_rate`` is the raw reward's mean under q. ``estimator``
names the label's estimator (:mod:`disa.label_estimators`: ``lse`` is eq. 8), ``log_z_se`` is its delta-method
standard error in nats, ``reliable`` is False where the ESS or the standard error says not to trust it.

Samples may come from two proposals: rows whose optional ``proposal`` column reads ``reference`` were drawn
from ``pi_ref``, all others from ``q``. Then every label is weighted against the mixture
``(n_q q + n_ref pi_ref) / N`` of each prompt's own counts (multiple importance sampling, balance heuristic).
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
from disa.label_estimators import (
    AUTO, LABEL_ESTIMATORS, choose_estimator, label_with_se, recommended_n, reliability, rewarded_count,
)
from disa.io import atomic_write_parquet
from disa.run_dir import LABELS_METADATA_KEY
from disa.stages import common
from disa.stages.common import stage
from disa.stages.sample import LOGP_Q_META_KEY, LOGP_Q_SAMPLED, is_warped, list_shards

REQUIRED_COLUMNS = ("prompt_id", "sample_idx", "reward", "logp_ref", "logp_q")
PROPOSAL_COLUMN = "proposal"  # optional: "reference" marks a sample drawn from pi_ref
REFERENCE_PROPOSAL = "reference"
LOGP_TOLERANCE = 1e-3  # a sum of log-softmax values rounds to at most a few ulps above 0
LABEL_COLUMNS = (
    "prompt_id", "log_z", "log_z_geometric", "ess", "max_weight", "reward_rate", "n", "reward_scale", "reward_shift",
    "estimator", "log_z_se", "reliable",
)


def read_shard(path: str, verifier=None) -> dict[str, list]:
    """Read the label-relevant columns of one shard, validating them row by row.

    Raises ``ValueError`` naming the file, the 1-based row and the column for a missing column, a null, a
    NaN/inf number, a log-probability above 0, or (given the ``VerifierSpec`` that scored the shard) a reward
    outside the verifier's declared range.
    """
    from disa.artifacts import reading

    with reading(path, "sample"):
        schema_names = pq.read_schema(path).names
        missing = [c for c in REQUIRED_COLUMNS if c not in schema_names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        columns = list(REQUIRED_COLUMNS) + ([PROPOSAL_COLUMN] if PROPOSAL_COLUMN in schema_names else [])
        data = pq.read_table(path, columns=columns).to_pydict()
    for col in columns:
        for row, value in enumerate(data[col], start=1):
            if value is None:
                raise ValueError(f"{path}, row {row}: column {col!r} is null")
            if col in ("reward", "logp_ref", "logp_q") and not math.isfinite(value) \
                    and not _outside_truncated_q(col, value, data, row - 1):
                raise ValueError(f"{path}, row {row}: column {col!r} is {value} (must be finite)")
            if col == "reward" and verifier is not None and verifier.out_of_range(value):
                raise ValueError(f"{path}, row {row}: column 'reward' is {value}, outside the reward range "
                                 f"{verifier.range_text()} verifier {verifier.name!r} declares; the shard is damaged: "
                                 "delete it and run `disa sample` again (it redoes that shard)")
            if col in ("logp_ref", "logp_q") and value > LOGP_TOLERANCE:
                raise ValueError(f"{path}, row {row}: column {col!r} is {value}, but a log-probability is <= 0; the "
                                 "shard is damaged: delete it and run `disa sample` again (it redoes that shard)")
    return data


def _outside_truncated_q(col: str, value: float, data: dict, index: int) -> bool:
    """A response drawn from ``pi_ref`` may leave the truncated proposal's nucleus: ``log q = -inf`` is then
    exact, and the mixture ``s_q q + s_ref pi_ref`` it is weighted against stays positive."""
    return col == "logp_q" and value == -math.inf and data.get(PROPOSAL_COLUMN, [None] * (index + 1))[index] \
        == REFERENCE_PROPOSAL


def collect_groups(samples_dir: str) -> tuple[list[str], dict[str, dict[str, list]]]:
    """All shards' rows grouped by prompt (first-seen order). Duplicate ``(prompt_id, sample_idx)`` pairs are
    an error naming both places: they would double-count a sample in the label."""
    shards = list_shards(samples_dir)
    if not shards:
        raise FileNotFoundError(f"no shard-*.parquet files in {samples_dir}")
    verifier = shards_verifier(samples_dir)
    order: list[str] = []
    groups: dict[str, dict[str, list]] = {}
    seen: dict[tuple[str, int], str] = {}
    for path in shards:
        data = read_shard(path, verifier)
        for row, pid in enumerate(data["prompt_id"]):
            key = (pid, int(data["sample_idx"][row]))
            where = f"{os.path.basename(path)} row {row + 1}"
            if key in seen:
                raise ValueError(f"duplicate sample (prompt_id={pid!r}, sample_idx={key[1]}) in {seen[key]} and {where}")
            seen[key] = where
            if pid not in groups:
                groups[pid] = {"reward": [], "logp_ref": [], "logp_q": [], "from_reference": []}
                order.append(pid)
            for col in ("reward", "logp_ref", "logp_q"):
                groups[pid][col].append(float(data[col][row]))
            tag = data[PROPOSAL_COLUMN][row] if PROPOSAL_COLUMN in data else None
            groups[pid]["from_reference"].append(1.0 if tag == REFERENCE_PROPOSAL else 0.0)
    return order, groups


def shards_verifier(samples_dir: str):
    """The registered ``VerifierSpec`` that scored the shards (``meta.json`` beside ``samples/`` records its name),
    or None when it records none or the name is not registered here (its reward range cannot be checked)."""
    from disa.verifiers import verifier_spec

    meta_path = os.path.join(os.path.dirname(os.path.normpath(samples_dir)), "meta.json")
    try:
        with open(meta_path) as fh:
            name = json.load(fh).get("verifier")
        return verifier_spec(name) if isinstance(name, str) else None
    except (OSError, ValueError, AttributeError, KeyError, ImportError):
        return None  # meta.json itself is checked (and named) by the stage that reads it


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
    estimator: str = "lse",
    max_se: float = 0.5,
    min_ess: float = 2.0,
    target_se: Optional[float] = None,
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
    if estimator not in (*LABEL_ESTIMATORS, AUTO):
        raise ValueError(f"estimator must be one of {(*LABEL_ESTIMATORS, AUTO)}, got {estimator!r}")
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

    from_ref = _to_padded(order, groups, "from_reference", width).bool() & mask
    strata = None
    if bool(from_ref.any()):  # two proposals: weight every sample against the per-prompt mixture
        counts = torch.stack([(mask & ~from_ref).sum(dim=1), from_ref.sum(dim=1)], dim=1).double()
        shares = torch.log(counts / counts.sum(dim=1, keepdim=True))
        logp_q = torch.logsumexp(torch.stack([logp_q, logp_ref], dim=2) + shares[:, None, :], dim=2)
        logp_q = logp_q.masked_fill(~mask, 0.0)
        strata = from_ref.long()
    labels = estimators.label_prompts(logp_ref, logp_q, shaped, beta, mask=mask, raw_rewards=rewards)
    # the control variate's base: r~ of the smallest raw reward any response can get (0, or a lower one seen)
    base_raw = min(0.0, float(rewards[mask].min()))
    log_ratio = (logp_ref - logp_q).masked_fill(~mask, 0.0)
    if estimator == AUTO:  # one choice for the run, from every prompt's evidence
        estimator = choose_estimator(log_ratio, shaped, beta, base_reward=scale * base_raw + shift, mask=mask,
                                     strata=strata)
    log_z, se = label_with_se(estimator, log_ratio, shaped, beta,
                              base_reward=scale * base_raw + shift, mask=mask, strata=strata)
    if estimator != "lse":  # eq. 8 keeps the exact numbers of label_prompts
        labels["log_z"] = log_z
    rewarded = rewarded_count(rewards, base_raw, mask)  # nothing above the lowest reward: never reliable
    columns = {
        "prompt_id": pa.array(order, pa.string()),
        **{k: pa.array(labels[k].double().tolist(), pa.float64())
           for k in ("log_z", "log_z_geometric", "ess", "max_weight", "reward_rate")},
        "n": pa.array([int(v) for v in labels["n"].tolist()], pa.int32()),
        "reward_scale": pa.array(scale.double().tolist(), pa.float64()),
        "reward_shift": pa.array(shift.double().tolist(), pa.float64()),
        "estimator": pa.array([estimator] * len(order), pa.string()),
        "log_z_se": pa.array(se.double().tolist(), pa.float64()),
        "reliable": pa.array(reliability(labels["ess"], se, min_ess=min_ess, max_se=max_se,
                                         rewarded=rewarded).tolist(), pa.bool_()),
    }
    if target_se is not None:
        columns["n_recommended"] = pa.array(recommended_n(se, labels["n"], target_se, rewarded=rewarded).tolist(),
                                            pa.int64())
    table = pa.table(columns)
    refuse_non_finite(order, table)
    if out_path is None:
        base = samples_dir[: -len("samples")] if os.path.basename(os.path.normpath(samples_dir)) == "samples" else samples_dir
        out_path = os.path.join(base, "labels.parquet")
    if metadata is not None:
        table = table.replace_schema_metadata({LABELS_METADATA_KEY: json.dumps(metadata)})
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write_parquet(table, out_path)
    return table


def check_samples_match_meta(shards: list[str], meta: dict) -> None:
    """Refuse shards that are readable but not what ``disa sample`` wrote: a shard missing rows, a prompt with
    another number of samples than ``n``, a prompt id that is not one of the sampled prompts (the ids, in order,
    must hash to ``meta.json``'s ``prompt_ids_sha256``). The adaptive budget's extra rounds
    (``shard-aRR-*``) add samples to some prompts: their ids must be sampled prompts."""
    import hashlib

    from disa.artifacts import reading

    n, size, total = meta.get("n"), meta.get("shard_size"), meta.get("num_prompts")
    if not all(isinstance(v, int) and v > 0 for v in (n, size, total)):
        return
    order: list[str] = []
    counts: dict[str, int] = {}
    where: dict[str, str] = {}  # prompt id -> the shard it first appears in
    extra = [p for p in shards if os.path.basename(p).startswith("shard-a")]
    shards = [p for p in shards if p not in extra]
    for k, path in enumerate(shards):
        with reading(path, "sample"):
            ids = pq.read_table(path, columns=["prompt_id"]).column(0).to_pylist()
        expected = min(size, total - k * size) * n
        if len(ids) != expected:
            raise ValueError(f"{path}: {len(ids)} rows, but meta.json says {expected} ({n} samples of "
                             f"{expected // n} prompts); the shard is damaged: delete it and run `disa sample` again")
        for pid in ids:
            if pid not in counts:
                order.append(pid)
                where[pid] = path
            counts[pid] = counts.get(pid, 0) + 1
    short = [p for p in order if counts[p] != n]
    if short:
        shards_named = sorted({where[p] for p in short[:5]})
        raise ValueError(f"{', '.join(shards_named)}: prompt id(s) {short[:5]} have {[counts[p] for p in short[:5]]} "
                         f"samples, not n = {n}; the shard is damaged: delete it and run `disa sample` again")
    digest = hashlib.sha256("\n".join(order).encode("utf-8")).hexdigest()
    if meta.get("prompt_ids_sha256") not in (None, digest):
        raise ValueError(f"samples: the shards' prompt ids are not the {total} prompts meta.json records (a foreign "
                         "or reordered id); delete the damaged shard and run `disa sample` again")
    known = set(order)
    for path in extra:
        with reading(path, "sample"):
            ids = pq.read_table(path, columns=["prompt_id"]).column(0).to_pylist()
        foreign = sorted(set(ids) - known)
        if foreign:
            raise ValueError(f"{path}: prompt id(s) {foreign[:5]} were not sampled in the first pass; the shard is "
                             "damaged: delete it and run `disa sample` again")


class NonFiniteLabels(ValueError):
    """A label or affine map came out NaN or infinite: writing it would poison every later stage."""


def refuse_non_finite(order: list[str], table: pa.Table) -> None:
    """Raise ``NonFiniteLabels`` naming the prompt ids whose ``log_z`` or ``r~`` map is not finite."""
    bad = {}
    for name in ("log_z", "reward_scale", "reward_shift"):
        for pid, value in zip(order, table.column(name).to_pylist()):
            if value is None or not math.isfinite(value):
                bad.setdefault(pid, f"{name} = {value}")
    if bad:
        listed = ", ".join(f"{pid!r} ({why})" for pid, why in list(bad.items())[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise NonFiniteLabels(f"{len(bad)} of {len(order)} prompts get a non-finite label: {listed}{more}; nothing was "
                              "written. beta * (r~ max - r~ min) beyond ~700 overflows: lower target.beta, or check "
                              "the shards' logp_ref / logp_q")


@stage("label")
def run(cfg) -> dict:
    """``disa label``: one ``log Z`` label per prompt (eq. 8) + diagnostics -> ``labels.parquet``, recording the
    target (``target.beta``, ``target.reward_transform``), N and the samples' settings and model fingerprints."""
    from disa.artifacts import SAMPLES, read_json
    from disa.config import ConfigError

    rd = common.run_dir(cfg)
    shards = rd.complete_shards()
    samples_meta = read_json(rd.samples_meta, "sample") if rd.samples_meta.exists() else {}
    try:
        check_samples_match_meta(shards, samples_meta)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_proposal_log_q(samples_meta, str(rd.samples_meta))
    metadata = {"format_version": 1, "target": cfg.target.to_dict(), "n": samples_meta.get("n"),
                "samples": samples_meta, "inputs": {"samples": SAMPLES.digest(rd.root)}}
    lab = cfg.label
    metadata["label"] = lab.to_dict()
    try:
        table = run_labelling(str(rd.samples), beta=cfg.target.beta, reward_transform=cfg.target.reward_transform,
                              out_path=str(rd.labels), metadata=metadata, estimator=lab.estimator, max_se=lab.max_se,
                              min_ess=lab.min_ess, target_se=lab.target_se)
    except ValueError as e:  # a damaged shard, or labels that cannot be trusted: named, nothing written
        raise ConfigError(str(e)) from None
    cols = table.to_pydict()
    result = label_summary(cols)
    result["unreliable_why"] = unreliable_why(cols, lab.max_se, lab.min_ess)
    result["path"] = str(rd.labels)
    common.say("label", f"{table.num_rows} prompts -> {rd.labels}; estimator {lab.estimator} (beta {cfg.target.beta}, "
               f"r~ {cfg.target.reward_transform})")
    for line in summary_lines(result, lab):
        common.say("label", line)
    return result


def check_proposal_log_q(samples_meta: dict, where: str) -> None:
    """Refuse samples drawn at temperature != 1 or with truncation whose ``logp_q`` is not recorded as the
    sampled distribution's (runs written before it was): their importance weights are another distribution's."""
    if is_warped(samples_meta) and samples_meta.get(LOGP_Q_META_KEY) != LOGP_Q_SAMPLED:
        from disa.config import ConfigError

        raise ConfigError(
            f"{where}: samples drawn at temperature={samples_meta.get('temperature')}, top_p="
            f"{samples_meta.get('top_p')} record no {LOGP_Q_META_KEY}={LOGP_Q_SAMPLED!r}: their logp_q is the "
            "untempered model's, not the distribution sampled from, and the label would be biased; sample again")


def label_summary(cols: dict) -> dict:
    """Means and counts of a label table's columns (``disa label``'s printed summary)."""
    rows = len(cols["log_z"])
    mean = lambda name: sum(cols[name]) / rows  # noqa: E731
    ses = sorted(cols["log_z_se"])
    out = {"rows": rows, "mean_log_z": mean("log_z"), "mean_ess": mean("ess"), "mean_reward_rate": mean("reward_rate"),
           "mean_se": mean("log_z_se"), "median_se": ses[rows // 2], "max_se": ses[-1],
           "unreliable": rows - sum(bool(v) for v in cols["reliable"]),
           "unreliable_ids": [p for p, ok in zip(cols["prompt_id"], cols["reliable"]) if not ok]}
    if "n_recommended" in cols:
        need = sorted(cols["n_recommended"])
        out.update({"n_recommended_median": need[rows // 2], "n_recommended_p90": need[min(rows - 1, int(0.9 * rows))],
                    "n_recommended_max": need[-1]})
    return out


def summary_lines(s: dict, lab) -> list[str]:
    lines = [f"mean log Z label {s['mean_log_z']:.4f}, mean ESS {s['mean_ess']:.2f}, mean reward rate "
             f"{s['mean_reward_rate']:.4f}",
             f"standard error (nats): mean {s['mean_se']:.4f}, median {s['median_se']:.4f}, max {s['max_se']:.4f}",
             f"{s['unreliable']} of {s['rows']} labels flagged unreliable (ESS < {lab.min_ess:g}, or SE 0 or "
             f"> {lab.max_se:g})" + (f", e.g. {s['unreliable_ids'][:5]}" if s["unreliable"] else "")]
    lines += s.get("unreliable_why", [])
    if "n_recommended_median" in s:
        lines.append(f"N per prompt for a standard error of {lab.target_se:g}: median {s['n_recommended_median']}, "
                     f"90th percentile {s['n_recommended_p90']}, max {s['n_recommended_max']} (se ~ 1/sqrt(N))")
    return lines


def upper_95(n: int) -> float:
    """The one-sided 95% upper bound on a rate after 0 successes in ``n`` draws: ``1 - 0.05^(1/n)`` (about 3/n)."""
    return 1.0 - 0.05 ** (1.0 / n)


def unreliable_why(cols: dict, max_se: float, min_ess: float) -> list[str]:
    """Why the unreliable labels are unreliable, one line per cause, each with the N per prompt that would fix it:
    no rewarded sample (the correct rate is then below :func:`upper_95` of N), a standard error
    above ``max_se`` (``se ~ 1/sqrt(N)``: N (se / max_se)^2), an ESS below ``min_ess`` (ESS grows about as N:
    N min_ess / ESS). Each count is of the unreliable labels with that cause (a label may have several)."""
    bad = [i for i, ok in enumerate(cols["reliable"]) if not ok]
    if not bad:
        return []
    n = [int(cols["n"][i]) for i in bad]
    none = [i for i in bad if cols["reward_rate"][i] <= 0]
    high_se = [i for i in bad if cols["reward_rate"][i] > 0 and cols["log_z_se"][i] > max_se]
    low_ess = [i for i in bad if cols["reward_rate"][i] > 0 and cols["ess"][i] < min_ess]

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    out = [f"why {len(bad)} of {len(cols['reliable'])} labels are unreliable (expected when N per prompt is small, "
           f"here N = {median(n)}):"]
    if none:
        m = median(n)
        out.append(f"  {len(none)} had no rewarded sample in N: their correct rate is below {upper_95(m):.2g} "
                   f"(95% bound from 0 of {m}); sample.n = {4 * m} lowers that to {upper_95(4 * m):.2g}, or use a "
                   "proposal that solves them (models.proposal)")
    if high_se:
        need = [math.ceil(cols["n"][i] * (cols["log_z_se"][i] / max_se) ** 2) for i in high_se]
        out.append(f"  {len(high_se)} had a standard error above label.max_se = {max_se:g}: N about {median(need)} "
                   f"per prompt (median; max {max(need)}) brings it to {max_se:g} (se ~ 1/sqrt(N))")
    if low_ess:
        need = [math.ceil(cols["n"][i] * min_ess / max(cols["ess"][i], 1e-9)) for i in low_ess]
        out.append(f"  {len(low_ess)} had an effective sample size below label.min_ess = {min_ess:g}: N about "
                   f"{median(need)} per prompt (median; max {max(need)}), or a proposal closer to pi_ref")
    return out
