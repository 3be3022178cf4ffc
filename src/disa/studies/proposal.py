"""Proposal strength: the same N samples per prompt from the weak proposal (pi_ref: plain Monte Carlo) and from
the strong one; label error against the exact log Z, effective sample size, and the Stage 2 regressor's
held-out MSE when fitted to each proposal's labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def run(out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0) -> dict:
    from disa.demo import FULL_SETTINGS, QUICK_SETTINGS, label_errors, run_stage2, sample_and_score
    from disa.estimators import label_prompts
    from disa.studies.common import new_figure, save_figure, testbed_setup, write_results

    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    out = Path(out_dir)
    s = testbed_setup(quick, cache_dir)
    truths = s["truths"]
    exact = np.array([t.log_z(settings.beta) for t in truths])
    rows = []
    for name, model in (("weak (pi_ref)", s["ref"]), ("strong q", s["proposal"])):
        pool = sample_and_score(model, s["ref"], s["tokenizer"], truths, settings.n_samples, settings.max_new_tokens,
                                out / name.split()[0], seed)
        lab = label_prompts(*(torch.as_tensor(pool[k], dtype=torch.float64) for k in ("logp_ref", "logp_q", "reward")),
                            settings.beta)
        labels = lab["log_z"].numpy()
        _, report, predicted = run_stage2(s["ref"], s["tokenizer"], truths, labels, settings, seed)
        rows.append({"proposal": name, **{f"label_{k}": v for k, v in label_errors(labels, exact).items()},
                     "mean_ess": float(lab["ess"].mean()), "reward_rate": float(lab["reward_rate"].mean()),
                     "stage2_val_mse": float(report.val_mse),
                     **{f"regressor_{k}_vs_exact": v for k, v in label_errors(predicted, exact).items()}})
    plt, fig, ax = new_figure(1)
    keys = ["label_rmse", "stage2_val_mse", "regressor_rmse_vs_exact"]
    width = 0.38
    for j, row in enumerate(rows):
        ax.bar(np.arange(len(keys)) + (j - 0.5) * width, [row[k] for k in keys], width, label=row["proposal"])
    ax.set_xticks(np.arange(len(keys)), ["label RMSE", "Stage 2 val MSE", "regressor RMSE"], fontsize=7)
    ax.legend(fontsize=7)
    ax.set_title(f"N={settings.n_samples}, beta={settings.beta}")
    save_figure(plt, fig, out / "proposal.png")
    results = {"testbed": "quick" if quick else "full", "n": settings.n_samples, "beta": settings.beta, "rows": rows}
    cols = ["proposal", "label_rmse", "label_bias", "mean_ess", "reward_rate", "stage2_val_mse",
            "regressor_rmse_vs_exact", "regressor_bias_vs_exact"]
    write_results(out, "Proposal strength", results, {"weak vs strong proposal": (rows, cols)},
                  f"{'Quick' if quick else 'Full'} testbed, {len(truths)} training prompts, N={settings.n_samples}, "
                  f"beta={settings.beta}. Downstream metrics of each proposal's policy: see `disa demo` (it trains DISA "
                  "from the strong proposal); this study stops at Stage 2.")
    return results
