"""The beta sweep: how the label and the target pi* ~ pi_ref exp(beta r) change with beta.

Per beta, from one pool of strong-proposal samples: the variance of the N-sample label across random subsets,
its relative bias and RMSE against the exact log Z; and, exactly, the target's accuracy P*(correct),
its pass@k (k i.i.d. draws) and KL(pi* || pi_ref), the distance Stage 3 has to travel from pi_ref. At a few
betas a DISA policy is trained (the demo's runner) and scored exactly, with its pass@k for k = 1..n both sampled
(the unbiased estimator ``disa eval`` uses) and exact. On a pipeline config (:func:`run_from_config`): the label's
variance and ESS per beta from one pool, and DISA trained per beta with the real stages, scored by ``disa eval``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

BETAS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 15.0)
TRAIN_BETAS = (1.0, 3.0, 8.0, 15.0)  # a DISA policy is trained (the demo's runner and budget) at each


PASS_KS = (1, 2, 4, 8, 16, 32)  # the pass@k columns of the table (up to the samples drawn)


def trained_rows(out: Path, quick: bool, cache_dir, settings, betas=TRAIN_BETAS, seeds: int = 1,
                 pass_samples: int = 32, truths=None, tokenizer=None, build_threads=None) -> list[dict]:
    """Train DISA towards pi*_beta for each beta (the demo's runner, ``seeds`` seeds) and score it exactly against
    that beta's target: accuracy, KL(pi* || pi), TV, distinct correct answers, held-out accuracy; and, with
    ``truths``, pass@k for k = 1..``pass_samples`` both sampled (the eval stage's unbiased estimator from
    ``pass_samples`` draws per prompt) and exact, for the seed-0 policy."""
    import dataclasses

    from disa.demo import _run_demo

    rows = []
    for beta in betas:
        res = _run_demo(out / f"train_beta{beta:g}", quick, seeds, ["disa"], cache_dir,
                        dataclasses.replace(settings, beta=beta), build_threads)
        stats = {k: v for k, v in res["summary"]["methods"]["disa"].items() if isinstance(v, dict) and "mean" in v}
        row = {"beta": beta}
        for name, key in (("policy_accuracy", "p_correct"), ("target_accuracy", "p_correct_target"),
                          ("kl_target_policy", "kl_target_policy"), ("tv_to_target", "tv"),
                          (f"distinct_correct@{settings.k}", f"distinct_correct@{settings.k}"),
                          ("heldout_accuracy", "heldout_p_correct")):
            row[name] = stats[key]["mean"]
            if seeds > 1:
                row[f"{name}_std"] = stats[key]["std"]
        if truths is not None:
            policy = load_trained_policy(out / f"train_beta{beta:g}" / "seed0" / "disa")
            row.update(pass_curves(policy, tokenizer, truths, pass_samples, settings.max_new_tokens, seed=7))
        rows.append(row)
    return rows


def load_trained_policy(folder: Path):
    """The newest checkpoint's policy under a demo method folder (``seed<k>/<method>/``)."""
    from transformers import AutoModelForCausalLM

    from disa.training import find_checkpoint

    return AutoModelForCausalLM.from_pretrained(str(find_checkpoint(folder) / "policy"), local_files_only=True).eval()


def exact_pass_curve(p_correct: Sequence[float], max_k: int) -> np.ndarray:
    """Exact pass@k for k = 1..max_k of i.i.d. draws: mean over prompts of ``1 - (1 - p)^k``."""
    p = np.asarray(p_correct, dtype=np.float64)
    if p.size == 0 or np.any((p < -1e-12) | (p > 1 + 1e-12)):
        raise ValueError(f"p_correct must be a non-empty list of probabilities, got {p_correct!r}")
    return np.array([np.mean(1.0 - (1.0 - np.clip(p, 0, 1)) ** k) for k in range(1, max_k + 1)])


def pass_curves(policy, tokenizer, truths, n: int, max_new_tokens: int, seed: int) -> dict:
    """pass@k for k = 1..n of ``policy`` on ``truths``: ``sampled_pass_curve`` from ``n`` draws per prompt
    (:func:`disa.metrics.pass_at_k_curve`, the estimator ``disa eval`` uses) and ``exact_pass_curve`` from the
    policy's exact P(correct) per prompt (the sum over every correct answer)."""
    import torch

    from disa import metrics
    from disa.data import PromptRecord, render_prompt
    from disa.generation.hf import HFGenerator
    from disa.testbed import correct_logprobs
    from disa.verifiers import get_verifier

    texts = [render_prompt(PromptRecord(id=t.id, prompt=t.text), tokenizer) for t in truths]
    groups = HFGenerator(policy, tokenizer, batch_size=32, device=None, progress=False).generate(
        texts, n, max_new_tokens=max_new_tokens, seed=seed)
    verify = get_verifier("countdown")
    correct = [int(sum(r >= 1.0 for r in verify([t] * n, [s.text for s in g]))) for t, g in zip(texts, groups)]
    with torch.inference_mode():
        p = [float(torch.as_tensor(correct_logprobs(policy, tokenizer, t.text, t.responses)).exp().sum()) for t in truths]
    return {"sampled_pass_curve": metrics.pass_at_k_curve([n] * len(truths), correct).tolist(),
            "exact_pass_curve": exact_pass_curve(p, n).tolist()}


def target_row(ref_logp_correct: Sequence[np.ndarray], beta: float, k: int) -> dict[str, float]:
    """Exact target quantities averaged over prompts: ``target_accuracy``, ``target_pass_at_k`` = mean of
    ``1 - (1 - P*)^k`` and ``kl_target_ref`` = KL(pi* || pi_ref) (exact: pi*/pi_ref is constant on the
    incorrect set, so lumping it loses nothing)."""
    from disa.testbed.ground_truth import coarse_kl_to_target, prob_correct, target_logprobs

    acc = np.array([prob_correct(target_logprobs(lp, beta)[0]) for lp in ref_logp_correct])
    kl = np.array([coarse_kl_to_target(lp, lp, beta) for lp in ref_logp_correct])
    return {"target_accuracy": float(acc.mean()), f"target_pass_at_{k}": float(np.mean(1 - (1 - acc) ** k)),
            "kl_target_ref": float(kl.mean())}


def run(out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0, seeds: int = 1, build_threads=None) -> dict:
    from disa.demo import FULL_SETTINGS, QUICK_SETTINGS, sample_and_score
    from disa.studies.common import testbed_setup
    from disa.studies.n_budget import label_stats, subsample_labels

    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    pool_size, num_subsamples, pass_samples = (32, 40, 32) if quick else (64, 100, 64)
    out = Path(out_dir)
    s = testbed_setup(quick, cache_dir, build_threads=build_threads)
    truths = s["truths"]
    pool = sample_and_score(s["proposal"], s["ref"], s["tokenizer"], truths, pool_size, settings.max_new_tokens,
                            out / "pool", seed)
    arrays = [pool[key] for key in ("logp_ref", "logp_q", "reward")]
    rows = []
    for beta in BETAS:
        exact = np.array([t.log_z(beta) for t in truths])
        labels = subsample_labels(*arrays, beta, settings.n_samples, num_subsamples, seed)
        stats = label_stats(labels, exact)
        rows.append({"beta": beta, "label_variance": stats["variance"], "relative_bias": stats["relative_bias"],
                     "rmse": stats["rmse"], "mean_exact_log_z": float(exact.mean()),
                     **target_row([t.ref_logp for t in truths], beta, settings.k)})
    trained = trained_rows(out, quick, cache_dir, settings, seeds=seeds, pass_samples=pass_samples, truths=truths,
                           tokenizer=s["tokenizer"], build_threads=build_threads)
    results = {"testbed": "quick" if quick else "full", "n": settings.n_samples, "pool_size": pool_size,
               "num_subsamples": num_subsamples, "prompts": len(truths), "seeds": seeds,
               "pass_samples": pass_samples, "rows": rows, "trained": trained}
    write_testbed_outputs(out, results, settings, quick)
    return results


def write_testbed_outputs(out: Path, results: dict, settings, quick: bool) -> None:
    from disa.studies.common import beta_axis, legend_below, new_figure, save_figure, seeds_phrase, write_results
    from disa.studies.pipeline import display_rows, seeds_note

    rows, trained, n_pass = results["rows"], results["trained"], results["pass_samples"]
    plt, fig, (a0, a1, a2, a3) = new_figure(4, height=3.8)
    betas = [r["beta"] for r in rows]
    a0.semilogx(betas, [r["label_variance"] for r in rows], "o-", label="label variance")
    a0.semilogx(betas, [r["rmse"] for r in rows], "s-", label="RMSE vs exact")
    a0.set(xlabel="beta", ylabel="nats^2 / nats", title=f"N={settings.n_samples} label, strong q")
    legend_below(a0)
    a1.semilogx(betas, [r["target_accuracy"] for r in rows], "o-", label="P*(correct)")
    a1.semilogx(betas, [r[f"target_pass_at_{settings.k}"] for r in rows], "s-", label=f"pass@{settings.k} of pi*")
    a1.semilogx(betas, [r["kl_target_ref"] / max(1e-12, max(x["kl_target_ref"] for x in rows)) for r in rows], "^-",
                label="KL(pi*||pi_ref) / max")
    a1.set(xlabel="beta", ylabel="probability / scaled KL", title="the target pi* (exact)")
    legend_below(a1)
    tb = [r["beta"] for r in trained]
    a2.errorbar(tb, [r["policy_accuracy"] for r in trained], yerr=[r.get("policy_accuracy_std", 0.0) for r in trained],
                fmt="o-", capsize=3, label="DISA accuracy" + (" ± std" if results["seeds"] > 1 else ""))
    a2.semilogx(tb, [r["target_accuracy"] for r in trained], "s--", label="pi* accuracy")
    a2.set(xlabel="beta", ylabel="P(correct), exact", title=f"DISA trained per beta ({seeds_phrase(results['seeds'])})")
    a2.set_ylim(0, 1.05)
    kl_axis = a2.twinx()  # KL has its own scale: on the accuracy axis it flattens the accuracies
    kl_axis.plot(tb, [r["kl_target_policy"] for r in trained], "^:", color="C2", label="KL(pi*||DISA), right axis")
    kl_axis.set_ylabel("nats")
    for ax, bs in ((a0, betas), (a1, betas), (a2, tb)):
        beta_axis(ax, bs)
    handles = [h for ax in (a2, kl_axis) for h in ax.get_legend_handles_labels()[0]]
    a2.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
              fontsize=7, frameon=False)
    for r, color in zip(trained, ("C0", "C1", "C2", "C3", "C4", "C5")):
        ks = np.arange(1, len(r["sampled_pass_curve"]) + 1)
        a3.plot(ks, r["sampled_pass_curve"], "-", color=color, label=f"beta={r['beta']:g} sampled")
        a3.plot(ks, r["exact_pass_curve"], ":", color=color, label=f"beta={r['beta']:g} exact")
    a3.set(xlabel="k", ylabel="pass@k", title=f"DISA pass@k (seed 0, {n_pass} draws/prompt)", xscale="log")
    a3.set_ylim(bottom=0)
    legend_below(a3)
    save_figure(plt, fig, out / "beta_sweep.png")
    ks = [k for k in PASS_KS if k <= n_pass]
    for r in trained:
        for k in ks:
            r[f"pass@{k} sampled"] = r["sampled_pass_curve"][k - 1]
            r[f"pass@{k} exact"] = r["exact_pass_curve"][k - 1]
    cols = ["beta", "label_variance", "relative_bias", "rmse", "mean_exact_log_z", "target_accuracy",
            f"target_pass_at_{settings.k}", "kl_target_ref"]
    tcols = ["beta", "policy_accuracy", "target_accuracy", "kl_target_policy", "tv_to_target",
             f"distinct_correct@{settings.k}", "heldout_accuracy"]
    pcols = ["beta"] + [f"pass@{k} {kind}" for k in ks for kind in ("sampled", "exact")]
    seeds = results["seeds"]
    write_results(out, "beta sweep", results, {
        "label and target vs beta": (rows, cols),
        f"a DISA policy trained at each beta (demo budget, {seeds_note(seeds)})": (display_rows(trained, tcols, seeds), tcols),
        f"pass@k of the trained policies: sampled ({n_pass} draws per prompt, unbiased estimator) vs exact (seed 0)":
            (trained, pcols)},
        f"{'Quick' if quick else 'Full'} testbed, {results['prompts']} training prompts, strong proposal, "
        f"N={settings.n_samples} labels from {results['num_subsamples']} random subsets of a {results['pool_size']}-sample "
        "pool; target columns are exact. Trained policies: the demo's DISA run (strong proposal, its Stage 1/2) at "
        "each beta, scored exactly against that beta's pi*. The sampled pass@k draws use one sampling seed for every "
        "policy (common random numbers), so their errors against the exact values are correlated across rows.")


# --------------------------------------------------------------------------- on a pipeline run
PIPELINE_TRAIN_BETAS = (1.0, 3.0, 8.0)


def run_from_config(cfg, out_dir: str, seeds: int = 1, betas: Sequence[float] = BETAS,
                    train_betas: Sequence[float] = PIPELINE_TRAIN_BETAS, pool_factor: int = 4,
                    num_subsamples: int = 100) -> dict:
    """The sweep on a pipeline config: one pool of ``pool_factor * sample.n`` proposal samples per prompt gives,
    per beta, the variance of the N-sample LSE label across random size-N subsets and its ESS; and at each of
    ``train_betas`` the real stages (label, fit-z, train, eval from the same Stage 1 samples) give a DISA policy
    scored by ``disa eval``. No exact truth exists here."""
    from disa.run_dir import RunDir
    from disa.stages.label import collect_groups
    from disa.studies.pipeline import (derived_config, disa_changes, evaluate_reference, mean_over_seeds,
                                       require_models, seed_changes, stage, train_and_evaluate)

    require_models(cfg, "beta_sweep")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = Path(out_dir)
    n = cfg.sample.n
    pool_cfg = derived_config(cfg, out / "pool", {"sample.n": n * pool_factor})
    stage("sample", pool_cfg)
    order, groups = collect_groups(str(RunDir(pool_cfg.output_dir).samples))
    m = min(len(groups[p]["reward"]) for p in order)
    arrays = [np.array([groups[p][key][:m] for p in order], dtype=np.float64) for key in ("logp_ref", "logp_q", "reward")]
    rows = [label_row_at(arrays, beta, n, num_subsamples) for beta in betas]
    per_seed = []
    for s in range(seeds):
        base = derived_config(cfg, out / f"seed{s}" / "stage1", {**seed_changes(cfg, s), **disa_changes(cfg)})
        stage("sample", base)
        seed_rows = []
        for beta in train_betas:
            sub = derived_config(base, out / f"seed{s}" / f"beta{beta:g}", {"target.beta": float(beta)})
            share_samples(RunDir(base.output_dir), RunDir(sub.output_dir))
            stage("label", sub)
            fit = stage("fit_z", sub)
            seed_rows.append({"beta": float(beta), "stage2_val_mse": fit["val_mse"],
                              "stage2_mean_predictor_mse": fit["baseline_val_mse"], **train_and_evaluate(sub)})
        per_seed.append(seed_rows)
    trained = mean_over_seeds(per_seed)
    reference = evaluate_reference(cfg, out)
    results = {"run": "pipeline", "config_output_dir": cfg.output_dir, "n": n, "pool_size": m, "prompts": len(order),
               "num_subsamples": num_subsamples, "seeds": seeds, "k": cfg.eval.k, "rows": rows, "trained": trained,
               "reference": reference}
    write_pipeline_outputs(out, results, cfg)
    return results


def label_row_at(arrays: Sequence[np.ndarray], beta: float, n: int, num_subsamples: int, seed: int = 0) -> dict:
    """One beta on a ``(P, M)`` pool: the N-sample LSE label's variance across random size-``n`` subsets (mean over
    prompts), its mean, and the mean ESS of ``n`` samples over the pool's disjoint size-``n`` batches."""
    import torch

    from disa.estimators import label_prompts
    from disa.studies.n_budget import subsample_labels

    labels = subsample_labels(*arrays, beta, n, num_subsamples, seed)
    t = [torch.as_tensor(a, dtype=torch.float64) for a in arrays]
    ess = [label_prompts(*(a[:, b * n:(b + 1) * n] for a in t), beta)["ess"].mean().item()
           for b in range(arrays[0].shape[1] // n)]
    return {"beta": float(beta), "label_variance": float(labels.var(0, ddof=1).mean()),
            "mean_label": float(labels.mean()), "mean_ess": float(np.mean(ess)),
            "reward_rate": float(np.mean(arrays[2]))}


def share_samples(source, dest) -> None:
    """Copy a finished ``disa sample`` output (shards and meta.json) into another run folder, so that runs which
    differ only after Stage 1's sampling (here: beta) label the very same samples."""
    import shutil

    source.complete_shards()
    if dest.samples.is_dir():
        return
    dest.root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source.samples, dest.samples)
    if source.samples_meta.is_file():
        shutil.copy2(source.samples_meta, dest.samples_meta)


def write_pipeline_outputs(out: Path, results: dict, cfg) -> None:
    from disa.studies.common import beta_axis, legend_below, new_figure, save_figure, seeds_phrase, write_results
    from disa.studies.pipeline import display_rows, plot_pass_curves, seeds_note

    rows, trained, ref, k = results["rows"], results["trained"], results["reference"], results["k"]
    plt, fig, (a0, a1, a2, a3) = new_figure(4, height=3.8)
    betas = [r["beta"] for r in rows]
    a0.loglog(betas, [r["label_variance"] for r in rows], "o-", label="label variance")
    a0.set(xlabel="beta", ylabel="variance across subsets (nats^2)",
           title=f"N={results['n']} label, pool of {results['pool_size']}")
    a1.semilogx(betas, [r["mean_ess"] for r in rows], "o-")
    a1.set(xlabel="beta", ylabel=f"mean ESS (of {results['n']})", title="importance weights, same samples")
    beta_axis(a0, betas)
    beta_axis(a1, betas)
    tb = [r["beta"] for r in trained]
    for key, marker in (("mean_at_k", "o"), (f"pass@{k}", "s")):
        line = a2.errorbar(tb, [r[key] for r in trained], yerr=[r.get(f"{key}_std", 0.0) for r in trained],
                           fmt=marker + "-", capsize=3, label=f"DISA {key}" + (" ± std" if results["seeds"] > 1 else ""))[0]
        a2.axhline(ref[key], color=line.get_color(), ls="--", lw=1, label=f"pi_ref {key}")
    a2.set(xlabel="beta", ylabel="sampled (disa eval)",
           title=f"DISA per beta, same Stage 1 ({seeds_phrase(results['seeds'])})")
    beta_axis(a2, tb)
    a2.set_ylim(bottom=0)
    legend_below(a2)
    plot_pass_curves(a3, {**{f"DISA beta={r['beta']:g}": r["pass_curve"] for r in trained},
                          "pi_ref (untrained)": ref["pass_curve"]}, f"pass@k of each policy, k = 1..{k}")
    legend_below(a3)
    save_figure(plt, fig, out / "beta_sweep.png")
    cols = ["beta", "label_variance", "mean_label", "mean_ess", "reward_rate"]
    tcols = ["beta", "stage2_val_mse", "stage2_mean_predictor_mse", "mean_at_k", "pass@1", f"pass@{k}",
             "distinct_correct", "distinct_solutions", "self_bleu"]
    ref_row = {"beta": "pi_ref (untrained)", **ref}
    seeds = results["seeds"]
    write_results(out, "beta sweep (pipeline)", results, {
        "N-sample label vs beta (one pool)": (rows, cols),
        f"DISA trained at each beta, scored by disa eval ({seeds_note(seeds)})":
            (display_rows(trained, tcols, seeds) + [ref_row], tcols)},
        f"Config output_dir {cfg.output_dir}: {results['prompts']} prompts, raw reward under target.reward_transform="
        f"{cfg.target.reward_transform} for the trained runs; label rows: LSE label (eq. 8) of N={results['n']} samples, "
        f"{results['num_subsamples']} random subsets of a {results['pool_size']}-sample pool per prompt (reward rate "
        "is the pool's and does not depend on beta). Trained rows: `disa label/fit-z/train/eval` at each beta from "
        f"the same Stage 1 samples ({cfg.label.estimator} label estimator); sampled metrics with eval.k={k}. "
        "No exact truth on a pipeline.")
