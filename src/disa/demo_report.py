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


QUICK_NOTICE = ("--quick is a smoke run (the small testbed and a short budget): it checks that every method "
                "runs end to end, and its numbers are not representative (on it a baseline can come out ahead of DISA "
                "or the reverse by chance). The representative numbers are the full demo's, `disa demo --seeds 3`, "
                "in docs/results/demo.md.")


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
        + ("Values are mean ± std over seeds." if results["seeds"] > 1 else
         "One seed, so no spread is shown (`--seeds 3` reports mean ± std)."),
        *(["", f"**{QUICK_NOTICE}**"] if results["quick"] else []),
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
        "The regressor beats predicting the training labels' mean when its held-out MSE is below the second "
        "column; R² compares with the held-out labels' own mean, so it can be negative even then.",
        "",
        "| held-out MSE vs labels | MSE of predicting the training mean | held-out R² | RMSE vs exact log Z (all training prompts) | bias vs exact |",
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


def smooth(values: Sequence[float], weight: float = 0.8) -> np.ndarray:
    """Exponential moving average that skips NaNs and starts at the first value (no pull towards 0)."""
    out, level = [], None
    for v in values:
        if not math.isnan(v):
            level = v if level is None else weight * level + (1 - weight) * v
        out.append(np.nan if level is None else level)
    return np.asarray(out, dtype=np.float64)


def _fixed(results: dict) -> str:
    """What every plot holds fixed, for its title."""
    s = results["settings"]
    seeds = results["seeds"]
    return (f"beta = {s['beta']}, N = {s['n_samples']}, {s['num_steps']} RL steps, G = {s['group_size']}, "
            f"{seeds} seed{'s (mean, bars: std)' if seeds > 1 else ''}")


def _errors(stats: Sequence[dict]):
    return [st["std"] for st in stats] if any(st["n"] > 1 for st in stats) else None


def write_plots(results: dict, plot_dir: Path) -> None:
    """methods.png, reward_curves.png, stage1_labels.png, stage1_sweeps.png: axis labels on every panel,
    titles that say what is held fixed, legends outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    k = results["settings"]["k"]
    methods = [m for m in results["summary"]["methods"] if m not in TRANSFORM_STUDY]  # other target
    panels = [("p_correct", "accuracy (higher: more correct)"), ("kl_target_policy", "KL(pi* || pi) (lower: closer)"),
              ("tv", "TV to pi* (lower: closer)"), ("tv_correct", "TV on the correct set (lower: closer)"),
              (f"distinct_correct@{k}", f"distinct correct answers in {k} samples")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    y = np.arange(len(methods))
    ref = results["reference"]["pi_ref"]
    for ax, (key, label) in zip(axes.flat, panels):
        stats = [results["summary"]["methods"][m][key] for m in methods]
        ax.barh(y, [st["mean"] for st in stats], xerr=_errors(stats), capsize=3, color="tab:blue")
        if key in ref:
            ax.axvline(ref[key], color="gray", ls="--", lw=1.2, label="pi_ref (before training)")
        if key + "_target" in ref:
            ax.axvline(ref[key + "_target"], color="tab:green", ls=":", lw=1.8, label="pi* (the target)")
        ax.set_yticks(y, methods, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    legend_ax = axes.flat[-1]
    legend_ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color="tab:blue"),
               plt.Line2D([], [], color="gray", ls="--"), plt.Line2D([], [], color="tab:green", ls=":", lw=1.8)]
    legend_ax.legend(handles, ["final policy of each method", "pi_ref (before training)", "pi* (the target)"],
                     loc="center", fontsize=10, frameon=False)
    fig.suptitle(f"Every method's final policy against the exact target pi* ({_fixed(results)})", fontsize=11)
    fig.tight_layout()
    fig.savefig(plot_dir / "methods.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    colors = plt.get_cmap("tab10").colors
    for i, method in enumerate(methods):
        curves = [[np.nan if v is None else v for v in r["curves"][method]]  # NaN reads back from JSON as null
                  for r in results["runs"] if r["curves"].get(method)]
        if curves and not all(math.isnan(v) for v in curves[0]):
            raw = np.nanmean(np.array(curves, dtype=np.float64), axis=0)
            color = colors[i % len(colors)]
            ax.plot(raw, color=color, alpha=0.2, lw=0.8)
            ax.plot(smooth(raw), color=color, lw=1.8, label=method)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean rollout reward (fraction correct)")
    ax.set_title(f"Training reward: smoothed (EMA 0.8), raw faint ({_fixed(results)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(plot_dir / "reward_curves.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(results["summary"]["stage1"]) + 1.6))
    keys = list(results["summary"]["stage1"])
    stats = [results["summary"]["stage1"][key] for key in keys]
    y = np.arange(len(keys))
    ax.barh(y - 0.2, [st["rmse"]["mean"] for st in stats], 0.4, xerr=_errors([st["rmse"] for st in stats]),
            label="RMSE")
    ax.barh(y + 0.2, [st["bias"]["mean"] for st in stats], 0.4, xerr=_errors([st["bias"] for st in stats]),
            label="bias (mean error)")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, keys, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Stage 1 label - exact log Z (nats)")
    st = results["settings"]
    ax.set_title(f"Stage 1 labels against the exact log Z (beta = {st['beta']}, N = {st['n_samples']}, "
                 f"{results['seeds']} seed{'s: mean, bars: std' if results['seeds'] > 1 else ''})", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(plot_dir / "stage1_labels.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    sweeps = results["summary"].get("sweeps", [])
    if sweeps:
        s = results["settings"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        studies = (("beta_sweep", "beta", "beta", f"label error vs beta (N = {s['n_samples']} fixed)"),
                   ("n_sweep", "n", "N, samples per prompt (log scale)", f"label error vs N (beta = {s['beta']} fixed)"))
        for ax, (study, key, xlabel, title) in zip(axes, studies):
            for proposal in dict.fromkeys(r["proposal"] for r in sweeps):
                rows = [r for r in sweeps if r["study"] == study and r["proposal"] == proposal]
                x = [r[key] for r in rows]
                line = ax.errorbar(x, [r["rmse"]["mean"] for r in rows], yerr=_errors([r["rmse"] for r in rows]),
                                   marker="o", label=f"{proposal}: RMSE")
                ax.plot(x, [r["bias"]["mean"] for r in rows], ls="--", marker="x", color=line[0].get_color(),
                        label=f"{proposal}: bias")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("LSE label - exact log Z (nats)")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            if key == "n":
                ax.set_xscale("log", base=2)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
        fig.suptitle(f"Stage 1 label error, {results['seeds']} seed(s), on the training prompts", fontsize=10)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        fig.savefig(plot_dir / "stage1_sweeps.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
