"""What the studies share on a pipeline run (``disa study NAME -c CONFIG``): sub-runs made of the stages.

A pipeline has no exact truth, so a study there compares runs of the real stages (``disa.stages.<verb>.run``)
that differ in one setting, each in its own sub-folder of the study's ``--out`` with its own ``output_dir``, and
scores every trained policy with ``disa eval`` (sampled Mean@k, unbiased pass@k for k = 1..k, distinct correct
answers, judge-free diversity). Nothing here re-implements a stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from disa.config import ConfigError, PipelineConfig, config_from_dict, config_to_dict


def derived_config(cfg: PipelineConfig, output_dir: Path, changes: Optional[Mapping[str, Any]] = None) -> PipelineConfig:
    """``cfg`` writing into ``output_dir``, with dotted-field ``changes`` ({"target.beta": 8.0}); checked like a
    loaded config, so a bad change is a ConfigError naming the field."""
    data = config_to_dict(cfg)
    data["output_dir"] = str(output_dir)
    for dotted, value in (changes or {}).items():
        node = data
        *sections, name = dotted.split(".")
        for section in sections:
            node = node[section]
        if name not in node:
            raise ConfigError(f"{dotted}: no such config field")
        node[name] = value
    return config_from_dict(data)


def stage(verb: str, cfg: PipelineConfig, **kwargs):
    """``disa <verb>`` on ``cfg`` (every stage resumes or redoes its own artefact)."""
    from disa.stages import verb_function

    return verb_function(verb)(cfg, **kwargs)


def stage1(cfg: PipelineConfig) -> dict:
    """``disa sample`` then ``disa label``; returns the label table's columns."""
    import pyarrow.parquet as pq

    from disa.run_dir import RunDir

    stage("sample", cfg)
    stage("label", cfg)
    return pq.read_table(RunDir(cfg.output_dir).labels).to_pydict()


def require_models(cfg: PipelineConfig, study: str, proposal_distinct: bool = False) -> None:
    """A clear error, before any model loads, when the config cannot run ``study``."""
    from disa.stages import common

    common.model_path(cfg, "reference")
    if not cfg.data.prompts:
        raise ConfigError(f"data.prompts: the {study} study samples and trains on the config's prompts; set it")
    if proposal_distinct:
        if not cfg.models.proposal:
            raise ConfigError(f"models.proposal: the {study} study compares models.proposal with models.reference "
                              "as the proposal; set models.proposal to a model folder other than the reference")
        if common.model_path(cfg, "proposal") == common.model_path(cfg, "reference"):
            raise ConfigError(f"models.proposal: the {study} study needs a proposal other than models.reference "
                              f"(both are {cfg.models.reference!r})")


def label_row(columns: Mapping[str, Sequence]) -> dict[str, float]:
    """Summary of a label table: mean and spread (std across prompts) of log Z, mean standard error, ESS and
    reward rate."""
    log_z = np.asarray(columns["log_z"], dtype=np.float64)
    return {"mean_label": float(log_z.mean()), "label_spread": float(log_z.std(ddof=1)) if log_z.size > 1 else 0.0,
            "mean_label_se": float(np.mean(columns["log_z_se"])), "mean_ess": float(np.mean(columns["ess"])),
            "reward_rate": float(np.mean(columns["reward_rate"]))}


def eval_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers a study table shows from one ``disa eval`` summary: Mean@k, pass@1, pass@k, distinct correct
    answers, distinct solutions and self-BLEU (judge-free diversity), and the pass@k curve for k = 1..k."""
    k = int(summary["k"])
    curve = [float(v) for v in summary["pass_curve"]]
    div = summary.get("diversity", {})
    return {"mean_at_k": float(summary["mean_at_k"]), "pass@1": curve[0], f"pass@{k}": curve[-1],
            "distinct_correct": float(summary["distinct_correct"]),
            "distinct_solutions": float(div.get("distinct_solutions", math.nan)),
            "self_bleu": float(div.get("self_bleu", math.nan)), "pass_curve": curve}


def train_and_evaluate(cfg: PipelineConfig) -> dict[str, Any]:
    """``disa train`` then ``disa eval`` (the newest checkpoint); returns :func:`eval_row` of the evaluation (with
    ``sft_examples`` for the SFT baseline)."""
    trained = stage("train", cfg)
    row = eval_row(stage("evaluate", cfg))
    if "examples" in trained:
        row["sft_examples"] = int(trained["examples"])
    return row


def evaluate_reference(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """``disa eval --checkpoint models.reference`` into ``out/reference``: the untrained starting point."""
    from disa.stages import common

    return eval_row(stage("evaluate", derived_config(cfg, out / "reference"),
                          checkpoint=common.model_path(cfg, "reference")))


def seed_changes(cfg: PipelineConfig, seed: int) -> dict[str, int]:
    """Seed ``s`` of a study: every seeded stage (sampling, Stage 2 split and init, training) shifted by ``s``."""
    return {"sample.seed": cfg.sample.seed + seed, "fit_z.seed": cfg.fit_z.seed + seed,
            "train.seed": cfg.train.seed + seed}


def disa_changes(cfg: PipelineConfig) -> dict[str, Any]:
    """Config changes that make Stage 3 DISA (kept as configured when it already is)."""
    return {} if cfg.train.objective == "disa" else {"train.objective": "disa", "train.objective_kwargs": {},
                                                      "train.log_z": "auto"}


SETTING_KEYS = ("beta", "proposal", "method")  # what a row is about, not a measurement


def mean_over_seeds(per_seed: Sequence[Sequence[dict]], keep: Sequence[str] = SETTING_KEYS) -> list[dict]:
    """Rows averaged over seeds (row i of every seed describes the same setting): numbers become their mean and
    gain a ``<key>_std`` (sample std; 0 with one seed), lists are averaged element-wise; ``keep`` keys (the
    setting) and non-numbers are kept from the first seed."""
    out = []
    for rows in zip(*per_seed):
        merged = {}
        for key, first in rows[0].items():
            values = [r[key] for r in rows]
            if key in keep or isinstance(first, bool) or not isinstance(first, (int, float, list)):
                merged[key] = first
            elif isinstance(first, list):
                merged[key] = np.mean(np.asarray(values, dtype=np.float64), axis=0).tolist()
            else:
                a = np.asarray(values, dtype=np.float64)
                merged[key] = float(a.mean())
                merged[f"{key}_std"] = float(a.std(ddof=1)) if a.size > 1 else 0.0
        out.append(merged)
    return out


def display_rows(rows: Sequence[dict], columns: Sequence[str], seeds: int) -> list[dict]:
    """Rows for the markdown table: ``mean ± std`` strings when there are several seeds."""
    if seeds == 1:
        return [dict(r) for r in rows]
    shown = []
    for r in rows:
        row = {}
        for c in columns:
            v = r.get(c, "")
            row[c] = f"{v:.4g} ± {r[c + '_std']:.2g}" if isinstance(v, float) and f"{c}_std" in r else v
        shown.append(row)
    return shown


def seeds_note(seeds: int) -> str:
    return "one seed, so no spread" if seeds == 1 else f"mean ± std over {seeds} seeds"


def plot_pass_curves(ax, curves: Mapping[str, Sequence[float]], title: str) -> None:
    """pass@k for k = 1..K of several policies on one axis."""
    for name, curve in curves.items():
        ks = np.arange(1, len(curve) + 1)
        ax.plot(ks, curve, marker="o", ms=3, label=name, ls="--" if name.startswith("pi_ref") else "-")
    ax.set(xlabel="k", ylabel="unbiased pass@k (sampled)", title=title)
    ax.set_ylim(bottom=0)
