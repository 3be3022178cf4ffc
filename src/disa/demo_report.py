"""The demo's report: mean and spread over seeds, the markdown tables and the plots of ``results.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

TRANSFORM_STUDY = ("disa_affine", "disa_group")  # reported against their own target (see disa.demo)


# ==================================================================================================
METRIC_COLUMNS = (
    ("p_correct", "accuracy"),
    ("kl_target_policy", "KL(pi*‖pi)"),
    ("tv", "TV to pi*"),
    ("tv_correct", "TV on correct set"),
    ("correct_entropy", "entropy on correct"),
    ("distinct_correct@{k}", "distinct correct@{k}"),
    ("distinct_strategies@{k}", "strategies@{k}"),
    ("heldout_p_correct", "held-out accuracy"),
    ("wall_s", "wall s"),
)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def summarize(runs: list[dict], methods: Sequence[str]) -> dict:
    """Mean and spread over seeds of every number in the per-seed runs."""
    stage1 = {}
    for i, row in enumerate(runs[0]["stage1"]):
        key = f"{row['proposal']} / {row['label']}"
        stage1[key] = {m: _mean_std([r["stage1"][i][m] for r in runs])
                       for m in ("rmse", "bias", "mean_ess", "reward_rate", "mean_max_weight")}
    sweeps = [{**{k: row[k] for k in ("study", "proposal", "beta", "n")},
               **{m: _mean_std([r["sweeps"][i][m] for r in runs]) for m in ("rmse", "bias")}}
              for i, row in enumerate(runs[0].get("sweeps", []))]
    return {
        "stage1": stage1,
        "sweeps": sweeps,
        "stage2": {m: _mean_std([r["stage2"][m] for r in runs]) for m in runs[0]["stage2"]},
        "methods": {meth: {m: _mean_std([r["methods"][meth][m] for r in runs]) for m in runs[0]["methods"][meth]}
                    for meth in methods},
    }


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def results_markdown(results: dict) -> str:
    s, summary, k = results["settings"], results["summary"], results["settings"]["k"]
    lines = [
        f"# disa demo: exact testbed ({'quick' if results['quick'] else 'full'}), {results['seeds']} seed(s)",
        "",
        f"beta = {s['beta']} on the raw binary reward; N = {s['n_samples']} proposal samples per prompt; "
        f"{s['num_steps']} RL steps of {s['prompts_per_step']} prompts x G = {s['group_size']} rollouts, lr {s['lr']}, "
        f"{s['updates_per_batch']} pass(es) per batch; trajectory balance with {s['rollout_weight']} weights"
        f"{', length-normalised' if s['length_normalize'] else ''}; "
        f"metrics on the {results['testbed']['n_train_prompts']} training prompts ({results['testbed']['mean_correct_answers']:.0f} "
        f"correct answers each on average), held-out accuracy on {results['testbed']['n_eval_prompts']} more. "
        "Values are mean ± std over seeds.",
        "",
        "## Stage 3: every method against the exact target pi*",
        "",
        "| method | " + " | ".join(name.format(k=k) for _, name in METRIC_COLUMNS) + " |",
        "|---|" + "---:|" * len(METRIC_COLUMNS),
    ]
    for name, row in results["reference"].items():
        cells = [f"{row[key.format(k=k)]:.3f}" if key.format(k=k) in row else "" for key, _ in METRIC_COLUMNS]
        lines.append(f"| {name} (no training) | " + " | ".join(cells) + " |")
    lines.append(_target_row("pi* (target)", {key: v for key, v in results["reference"]["pi_ref"].items()}, k))
    lines += [_method_row(m, stats, k) for m, stats in summary["methods"].items() if m not in TRANSFORM_STUDY]
    study = [m for m in summary["methods"] if m in TRANSFORM_STUDY]
    if study:
        first = summary["methods"][study[0]]
        lines += [
            "",
            "## Reward transform: frozen affine r~ vs the group plug-in (against pi* of the frozen affine r~)",
            "",
            "Both read log Z from the strong proposal's Stage 1 labels under r~ = a(x) r + b(x), with (a, b) the "
            "proposal group's normalisation frozen per prompt; `disa_affine` uses that r~ in Stage 3 too, "
            "`disa_group` recomputes the normalisation on each policy group, as FlowRL does.",
            "",
            "| method | " + " | ".join(name.format(k=k) for _, name in METRIC_COLUMNS) + " |",
            "|---|" + "---:|" * len(METRIC_COLUMNS),
            _target_row("pi* (frozen affine r~)", {key: v["mean"] for key, v in first.items()}, k),
            *[_method_row(m, summary["methods"][m], k) for m in study],
        ]
    lines += [
        "",
        "## Stage 1: label error against the exact log Z (training prompts)",
        "",
        "| proposal / label | RMSE | bias | mean ESS | reward rate | mean max weight |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, stats in summary["stage1"].items():
        lines.append(f"| {key} | " + " | ".join(
            _fmt(stats[m]) for m in ("rmse", "bias", "mean_ess", "reward_rate", "mean_max_weight")) + " |")
    lines += _sweep_tables(summary.get("sweeps", []))
    st2 = summary["stage2"]
    lines += [
        "",
        "## Stage 2: the frozen regressor (fitted to the strong-proposal LSE labels)",
        "",
        "| held-out MSE vs labels | predict-the-mean MSE | held-out R² | RMSE vs exact log Z (all training prompts) | bias vs exact |",
        "|---:|---:|---:|---:|---:|",
        f"| {_fmt(st2['val_mse'], 4)} | {_fmt(st2['baseline_val_mse'], 4)} | {_fmt(st2['val_r2'])} | "
        f"{_fmt(st2['exact_rmse'])} | {_fmt(st2['exact_bias'])} |",
        "",
        f"Wall time {results['wall_s']:.0f} s (Python {results['machine']['python']}, torch {results['machine']['torch']}, "
        f"{results['machine']['threads']} thread(s)).",
        "",
    ]
    return "\n".join(lines)


def _sweep_tables(sweeps: list[dict]) -> list[str]:
    """The beta sweep (rows beta) and the N-budget study (rows N): LSE label RMSE and bias per proposal."""
    lines = []
    proposals = list(dict.fromkeys(row["proposal"] for row in sweeps))
    for study, key, title in (("beta_sweep", "beta", "Stage 1 label error vs beta (N fixed)"),
                              ("n_sweep", "n", "Stage 1 label error vs the budget N (beta fixed; disjoint batches of N)")):
        rows = [row for row in sweeps if row["study"] == study]
        if not rows:
            continue
        lines += ["", f"## {title}", "",
                  f"| {key} | " + " | ".join(f"{p} RMSE | {p} bias" for p in proposals) + " |",
                  "|---:|" + "---:|---:|" * len(proposals)]
        for value in dict.fromkeys(row[key] for row in rows):
            cells = []
            for p in proposals:
                row = next(r for r in rows if r["proposal"] == p and r[key] == value)
                cells += [_fmt(row["rmse"]), _fmt(row["bias"])]
            lines.append(f"| {value:g} | " + " | ".join(cells) + " |")
    return lines


def _method_row(method: str, stats: dict, k: int) -> str:
    digits = {"wall_s": 0}
    return f"| **{method}** | " + " | ".join(
        _fmt(stats[key.format(k=k)], digits.get(key, 3)) for key, _ in METRIC_COLUMNS) + " |"


def _target_row(name: str, metrics: dict, k: int) -> str:
    """The target's own numbers, read from the ``*_target`` entries of an exact-metrics dict."""
    cells = []
    for key, _ in METRIC_COLUMNS:
        key = key.format(k=k)
        if key in ("kl_target_policy", "tv", "tv_correct"):
            cells.append("0")
        else:
            cells.append(f"{metrics[key + '_target']:.3f}" if key + "_target" in metrics else "")
    return f"| {name} | " + " | ".join(cells) + " |"


def write_plots(results: dict, plot_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    k = results["settings"]["k"]
    methods = [m for m in results["summary"]["methods"] if m not in TRANSFORM_STUDY]  # other target
    panels = [("p_correct", "accuracy"), ("kl_target_policy", "KL(pi* || pi)"), ("tv", "TV to pi*"),
              ("tv_correct", "TV on the correct set"), (f"distinct_correct@{k}", f"distinct correct @{k}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        stats = [results["summary"]["methods"][m][key] for m in methods]
        ax.bar(methods, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=3, color="tab:blue")
        ref = results["reference"]["pi_ref"]
        if key in ref:
            ax.axhline(ref[key], color="gray", ls="--", lw=1, label="pi_ref")
        if key + "_target" in ref:
            ax.axhline(ref[key + "_target"], color="tab:green", ls=":", lw=1.5, label="pi*")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / "methods.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method in methods:
        curves = [r["curves"][method] for r in results["runs"] if r["curves"].get(method)]
        if curves and not all(math.isnan(v) for v in curves[0]):
            ax.plot(np.nanmean(np.array(curves), axis=0), label=method)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean rollout reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / "reward_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    keys = list(results["summary"]["stage1"])
    stats = [results["summary"]["stage1"][key] for key in keys]
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [s["rmse"]["mean"] for s in stats], 0.4, yerr=[s["rmse"]["std"] for s in stats], label="RMSE")
    ax.bar(x + 0.2, [s["bias"]["mean"] for s in stats], 0.4, yerr=[s["bias"]["std"] for s in stats], label="bias")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, keys, rotation=20, fontsize=8)
    ax.set_title("Stage 1 labels vs exact log Z")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / "stage1_labels.png", dpi=120)
    plt.close(fig)

    sweeps = results["summary"].get("sweeps", [])
    if sweeps:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, (study, key, xlabel) in zip(axes, (("beta_sweep", "beta", "beta"), ("n_sweep", "n", "N (log scale)"))):
            for proposal in dict.fromkeys(r["proposal"] for r in sweeps):
                rows = [r for r in sweeps if r["study"] == study and r["proposal"] == proposal]
                x = [r[key] for r in rows]
                ax.errorbar(x, [r["rmse"]["mean"] for r in rows], yerr=[r["rmse"]["std"] for r in rows],
                            marker="o", label=f"{proposal} RMSE")
                ax.plot(x, [r["bias"]["mean"] for r in rows], ls="--", marker="x", label=f"{proposal} bias")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xlabel(xlabel)
            if key == "n":
                ax.set_xscale("log", base=2)
        axes[0].set_ylabel("LSE label - exact log Z")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / "stage1_sweeps.png", dpi=120)
        plt.close(fig)


