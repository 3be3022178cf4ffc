"""Proposal strength: the same N samples per prompt from the weak proposal (pi_ref: plain Monte Carlo) and from
the strong one; label error against the exact log Z, effective sample size, the Stage 2 regressor's held-out
MSE when fitted to each proposal's labels, and a DISA policy trained from each proposal's regressor (the demo's
runner and budget), scored exactly. On a pipeline config (:func:`run_from_config`) the same comparison with the
real stages and ``disa eval``, without the exact columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EXACT_COLUMNS = ("policy_accuracy", "kl_target_policy", "tv_to_target", "distinct_correct", "heldout_accuracy")


def run(out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0, seeds: int = 1, build_threads=None) -> dict:
    from disa.demo import FULL_SETTINGS, QUICK_SETTINGS, label_errors, run_stage2, sample_and_score, train_method
    from disa.estimators import label_prompts
    from disa.studies.common import testbed_setup
    from disa.studies.pipeline import mean_over_seeds

    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    out = Path(out_dir)
    s = testbed_setup(quick, cache_dir, eval_truths=True, build_threads=build_threads)
    truths, tb = s["truths"], s["testbed"]
    exact = np.array([t.log_z(settings.beta) for t in truths])
    per_seed = []
    for sd in range(seed, seed + seeds):
        rows = []
        for name, model in (("weak (pi_ref)", s["ref"]), ("strong q", s["proposal"])):
            folder = out / (f"seed{sd}" if seeds > 1 else "") / name.split()[0]
            pool = sample_and_score(model, s["ref"], s["tokenizer"], truths, settings.n_samples,
                                    settings.max_new_tokens, folder, sd)
            lab = label_prompts(*(torch.as_tensor(pool[k], dtype=torch.float64) for k in ("logp_ref", "logp_q", "reward")),
                                settings.beta)
            labels = lab["log_z"].numpy()
            frozen, report, predicted = run_stage2(s["ref"], s["tokenizer"], truths, labels, settings, sd)
            policy, _ = train_method("disa", tb.load_ref, s["ref"], s["tokenizer"], truths, settings, sd,
                                     folder / "disa", {"regressor": frozen})
            rows.append({"proposal": name, **{f"label_{k}": v for k, v in label_errors(labels, exact).items()},
                         "mean_ess": float(lab["ess"].mean()), "reward_rate": float(lab["reward_rate"].mean()),
                         "stage2_val_mse": float(report.val_mse),
                         "stage2_mean_predictor_mse": float(report.baseline_val_mse),
                         **{f"regressor_{k}_vs_exact": v for k, v in label_errors(predicted, exact).items()},
                         **downstream(policy, s, settings)})
        per_seed.append(rows)
    rows = mean_over_seeds(per_seed)
    reference = {"proposal": "pi_ref (untrained)", **downstream(s["ref"], s, settings)}
    results = {"testbed": "quick" if quick else "full", "n": settings.n_samples, "beta": settings.beta,
               "num_steps": settings.num_steps, "seeds": seeds, "rows": rows, "reference": reference}
    write_testbed_outputs(out, results, quick, len(truths))
    return results


def downstream(policy, setup: dict, settings) -> dict:
    """A policy's exact metrics against pi*: accuracy, KL(pi*||pi), TV, distinct correct answers in k draws
    (training prompts), and its accuracy on the held-out prompts."""
    from disa.demo import exact_policy_metrics

    m = exact_policy_metrics(policy, setup["tokenizer"], setup["truths"], settings.beta, settings.k)
    held = exact_policy_metrics(policy, setup["tokenizer"], setup["eval_truths"], settings.beta, settings.k)
    return {"policy_accuracy": m["p_correct"], "kl_target_policy": m["kl_target_policy"], "tv_to_target": m["tv"],
            "distinct_correct": m[f"distinct_correct@{settings.k}"], "heldout_accuracy": held["p_correct"]}


def write_testbed_outputs(out: Path, results: dict, quick: bool, prompts: int) -> None:
    from disa.studies.common import legend_below, new_figure, save_figure, seeds_phrase, write_results
    from disa.studies.pipeline import display_rows, seeds_note

    rows, ref, seeds = results["rows"], results["reference"], results["seeds"]
    plt, fig, (a0, a1) = new_figure(2, height=3.8)
    width = 0.38
    keys = ["label_rmse", "stage2_val_mse", "regressor_rmse_vs_exact"]
    for j, row in enumerate(rows):  # one colour per proposal in both panels (C0 is pi_ref's)
        a0.bar(np.arange(len(keys)) + (j - 0.5) * width, [row[k] for k in keys], width, label=row["proposal"],
               color=f"C{j + 1}", yerr=[row.get(f"{k}_std", 0.0) for k in keys], capsize=2)
    a0.set_xticks(np.arange(len(keys)), ["label RMSE\nvs exact", "Stage 2\nval MSE", "regressor RMSE\nvs exact"],
                  fontsize=7)
    a0.set(ylabel="nats (MSE: nats^2)", title=f"Stage 1-2, N={results['n']}, beta={results['beta']:g}"
           + (" (± std)" if seeds > 1 else ""))
    legend_below(a0)
    keys = list(EXACT_COLUMNS)
    width = 0.27
    for j, row in enumerate([ref, *rows]):
        a1.bar(np.arange(len(keys)) + (j - 1) * width, [row[k] for k in keys], width, color=f"C{j}",
               yerr=[row.get(f"{k}_std", 0.0) for k in keys], capsize=2,
               label=f"DISA from {row['proposal']}" if row is not ref else row["proposal"])
    a1.set_xticks(np.arange(len(keys)), ["accuracy", "KL(pi*||pi)", "TV to pi*", "distinct\ncorrect@k",
                                         "held-out\naccuracy"], fontsize=7)
    a1.set(ylabel="exact value", title=f"DISA, {results['num_steps']} steps ({seeds_phrase(seeds)})")
    legend_below(a1, ncol=1)
    save_figure(plt, fig, out / "proposal.png")
    cols = ["proposal", "label_rmse", "label_bias", "mean_ess", "reward_rate", "stage2_val_mse",
            "stage2_mean_predictor_mse", "regressor_rmse_vs_exact", "regressor_bias_vs_exact"]
    dcols = ["proposal", *EXACT_COLUMNS]
    write_results(out, "Proposal strength", results, {
        f"weak vs strong proposal: Stage 1-2 ({seeds_note(seeds)})": (display_rows(rows, cols, seeds), cols),
        f"DISA trained from each proposal's regressor, exact metrics ({seeds_note(seeds)})":
            (display_rows(rows, dcols, seeds) + [ref], dcols)},
        f"{'Quick' if quick else 'Full'} testbed, {prompts} training prompts, N={results['n']}, beta={results['beta']:g}. "
        f"Each proposal's labels -> its own Stage 2 regressor -> DISA with the demo's budget ({results['num_steps']} "
        "steps); accuracy, KL, TV and distinct correct answers on the training prompts (where pi* is the target), "
        "held-out accuracy on the testbed's held-out prompts.")


# --------------------------------------------------------------------------- on a pipeline run
def run_from_config(cfg, out_dir: str, seeds: int = 1) -> dict:
    """``models.proposal`` vs ``models.reference`` as the Stage 1 proposal, everything else equal: each gets
    ``disa sample/label/fit-z/train/eval`` in its own sub-run. Label spread and standard error, ESS, reward rate,
    Stage 2 held-out MSE against predicting the training mean, and the DISA policy's sampled metrics."""
    from disa.studies.pipeline import (derived_config, disa_changes, evaluate_reference, mean_over_seeds,
                                       require_models, seed_changes, stage, stage1, train_and_evaluate, label_row)

    require_models(cfg, "proposal", proposal_distinct=True)
    out = Path(out_dir)
    per_seed = []
    for s in range(seeds):
        rows = []
        for name, tag, proposal in (("strong (models.proposal)", "strong", cfg.models.proposal),
                                    ("weak (models.reference)", "weak", cfg.models.reference)):
            sub = derived_config(cfg, out / f"seed{s}" / tag,
                                 {**seed_changes(cfg, s), **disa_changes(cfg), "models.proposal": proposal})
            labels = stage1(sub)
            fit = stage("fit_z", sub)
            rows.append({"proposal": name, **label_row(labels), "stage2_val_mse": fit["val_mse"],
                         "stage2_mean_predictor_mse": fit["baseline_val_mse"], **train_and_evaluate(sub)})
        per_seed.append(rows)
    rows = mean_over_seeds(per_seed)
    reference = evaluate_reference(cfg, out)
    results = {"run": "pipeline", "config_output_dir": cfg.output_dir, "n": cfg.sample.n, "k": cfg.eval.k,
               "seeds": seeds, "rows": rows, "reference": reference}
    write_pipeline_outputs(out, results, cfg)
    return results


def write_pipeline_outputs(out: Path, results: dict, cfg) -> None:
    from disa.studies.common import legend_below, new_figure, save_figure, seeds_phrase, write_results
    from disa.studies.pipeline import display_rows, plot_pass_curves, seeds_note

    rows, ref, k, seeds = results["rows"], results["reference"], results["k"], results["seeds"]
    plt, fig, (a0, a1, a2) = new_figure(3, height=3.8)
    width = 0.38
    for ax, keys, labels, title, ylabel in (
            (a0, ["label_spread", "mean_label_se"], ["label spread\n(std over prompts)", "mean label SE"],
             f"Stage 1 labels, N={results['n']}", "nats"),
            (a1, ["stage2_val_mse", "stage2_mean_predictor_mse"], ["regressor", "predict the\ntraining mean"],
             "Stage 2 held-out MSE", "nats^2")):
        for j, row in enumerate(rows):
            ax.bar(np.arange(len(keys)) + (j - 0.5) * width, [row[c] for c in keys], width, label=row["proposal"])
        ax.set_xticks(np.arange(len(keys)), labels, fontsize=7)
        ax.set(ylabel=ylabel, title=title)
        legend_below(ax, ncol=1)
    plot_pass_curves(a2, {**{f"DISA from {r['proposal']}": r["pass_curve"] for r in rows},
                          "pi_ref (untrained)": ref["pass_curve"]}, f"DISA per proposal ({seeds_phrase(seeds)})")
    legend_below(a2, ncol=1)
    save_figure(plt, fig, out / "proposal.png")
    cols = ["proposal", "mean_label", "label_spread", "mean_label_se", "mean_ess", "reward_rate", "stage2_val_mse",
            "stage2_mean_predictor_mse"]
    ecols = ["proposal", "mean_at_k", "pass@1", f"pass@{k}", "distinct_correct", "distinct_solutions", "self_bleu"]
    write_results(out, "Proposal strength (pipeline)", results, {
        f"Stage 1-2 per proposal ({seeds_note(seeds)})": (display_rows(rows, cols, seeds), cols),
        f"DISA trained from each proposal's labels, disa eval ({seeds_note(seeds)})":
            (display_rows(rows, ecols, seeds) + [{"proposal": "pi_ref (untrained)", **ref}], ecols)},
        f"Config output_dir {cfg.output_dir}: models.proposal={cfg.models.proposal} vs models.reference="
        f"{cfg.models.reference} as the Stage 1 proposal, N={results['n']}, target beta={cfg.target.beta:g}, "
        f"{cfg.label.estimator} labels; everything else as configured. No exact log Z on a pipeline: label quality "
        "shows only as spread, standard error, ESS and how well Stage 2 predicts held-out labels.")
