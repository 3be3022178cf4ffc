"""SFT vs DISA on the same proposal samples.

Testbed: the demo's runner with those two methods (SFT fits the reward-1 samples of the strong proposal's Stage 1
pool; DISA uses the same pool's labels), scored exactly. Pipeline config (:func:`run_from_config`): one DISA run
(``disa sample/label/fit-z/train/eval``) and an SFT run (``train.objective: sft``, the LoRA-SFT baseline) that reads
the DISA run's Stage 1 samples through ``stage1_dir``, both scored by ``disa eval``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run(out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0, seeds: int = 1, build_threads=None) -> dict:
    from disa.demo import _run_demo

    return _run_demo(out_dir, quick, seeds, ["disa", "sft"], cache_dir, None, build_threads)


def run_from_config(cfg, out_dir: str, seeds: int = 1) -> dict:
    """DISA and SFT from the same Stage 1 files of ``cfg`` (its proposal, N, seed), each trained and evaluated."""
    from disa.studies.pipeline import (derived_config, disa_changes, evaluate_reference, label_row, mean_over_seeds,
                                       require_models, seed_changes, stage, stage1, train_and_evaluate)

    require_models(cfg, "sft_vs_disa")
    out = Path(out_dir)
    per_seed = []
    for s in range(seeds):
        disa = derived_config(cfg, out / f"seed{s}" / "disa", {**seed_changes(cfg, s), **disa_changes(cfg)})
        labels = stage1(disa)
        stage("fit_z", disa)
        sft = derived_config(disa, out / f"seed{s}" / "sft", {"stage1_dir": disa.output_dir,
                                                               "train.objective": "sft", "train.objective_kwargs": {}})
        rate = label_row(labels)["reward_rate"]
        if correct_samples(disa) == 0:  # nothing to fine-tune on: the SFT policy is pi_ref unchanged
            sft_row = {**evaluate_reference(sft, out / f"seed{s}" / "sft"), "sft_examples": 0}
        else:
            sft_row = train_and_evaluate(sft)
        per_seed.append([{"method": "DISA", **train_and_evaluate(disa), "stage1_reward_rate": rate},
                         {"method": "SFT (LoRA, reward-1 samples)", **sft_row, "stage1_reward_rate": rate}])
    rows = mean_over_seeds(per_seed)
    reference = evaluate_reference(cfg, out)
    results = {"run": "pipeline", "config_output_dir": cfg.output_dir, "n": cfg.sample.n, "k": cfg.eval.k,
               "seeds": seeds, "rows": rows, "reference": reference}
    write_pipeline_outputs(out, results, cfg)
    return results


def correct_samples(cfg) -> int:
    """Reward-1 samples in a run's Stage 1 files: what the SFT baseline fine-tunes on."""
    from disa.run_dir import RunDir
    from disa.stages.label import collect_groups

    order, groups = collect_groups(str(RunDir(cfg.output_dir).samples))
    return int(sum(r >= 1.0 for p in order for r in groups[p]["reward"]))


def write_pipeline_outputs(out: Path, results: dict, cfg) -> None:
    from disa.studies.common import legend_below, new_figure, save_figure, seeds_phrase, write_results
    from disa.studies.pipeline import display_rows, plot_pass_curves, seeds_note

    rows, ref, k, seeds = results["rows"], results["reference"], results["k"], results["seeds"]
    everyone = [*rows, {"method": "pi_ref (untrained)", **ref}]
    plt, fig, (a0, a1) = new_figure(2, height=3.8)
    plot_pass_curves(a0, {r["method"]: r["pass_curve"] for r in everyone},
                     f"same Stage 1 samples (N={results['n']})")
    legend_below(a0, ncol=1)
    keys = ["mean_at_k", f"pass@{k}", "distinct_correct"]
    width = 0.27
    for j, row in enumerate(everyone):
        a1.bar(np.arange(len(keys)) + (j - 1) * width, [row[c] for c in keys], width, label=row["method"])
    a1.set_xticks(np.arange(len(keys)), [f"Mean@{k}", f"pass@{k}", "distinct correct\nper prompt"], fontsize=7)
    a1.set(ylabel="sampled (disa eval)", title=f"disa eval, k={k} ({seeds_phrase(seeds)})")
    legend_below(a1, ncol=1)
    save_figure(plt, fig, out / "sft_vs_disa.png")
    cols = ["method", "sft_examples", "mean_at_k", "pass@1", f"pass@{k}", "distinct_correct", "distinct_solutions",
            "self_bleu"]
    write_results(out, "SFT vs DISA (pipeline)", results, {
        f"the same Stage 1 samples, disa eval ({seeds_note(seeds)})": (display_rows(everyone, cols, seeds), cols)},
        f"Config output_dir {cfg.output_dir}: Stage 1 from models.proposal={cfg.models.proposal or cfg.models.reference} "
        f"(N={results['n']}, reward rate {rows[0]['stage1_reward_rate']:.4g}); DISA trains from its labels and Stage 2 "
        f"regressor, SFT (train.sft: LoRA, {cfg.train.sft.num_epochs} epochs) on its reward-1 samples through "
        "stage1_dir. sft_examples: how many reward-1 samples SFT had (a seed with none leaves SFT at pi_ref, scored as such).")
