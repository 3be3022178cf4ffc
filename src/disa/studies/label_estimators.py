"""Stage 1 label error of every estimator against the exact ``log Z``, at equal total sampling budget.

    python -m disa.studies.label_estimators --seeds 3 [--stage3] [--out docs/label-estimators.md]

On the exact testbed (:mod:`disa.testbed`, the demo's full build: 96 training prompts, strong proposal ``q``),
per seed: ``n_max`` samples per prompt from ``q`` and ``n_max`` from ``pi_ref``, each verified and scored under
both models with the real Stage 1 code (``run_sampling``). For every ``beta`` and budget ``N`` the samples are
split into ``n_max // N`` disjoint batches; an estimator spends its ``N`` samples as its proposal shares say
(``q:pi_ref`` = 1:1 spends ``N/2`` on each), labels every prompt, and its RMSE and bias against the exact
``log Z`` are averaged over batches, then over seeds. ``--stage3`` also trains DISA (the demo's Stage 3
budget) from the labels of eq. 8 and of the best estimator at ``beta = 3, N = 8``, and with the batch-estimated
``log Z`` (``train.log_z: batch``), and scores each policy exactly.
Writes ``<out>`` (Markdown) and ``<out>.json`` (every number).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from disa.label_estimators import AUTO, choose_estimator, label_prompts_with, mixture_log_ratio, split_budget

log = logging.getLogger(__name__)

# (name, (share of q, share of pi_ref), estimator, add se^2 / 2: the delta method's Jensen-gap correction)
ESTIMATORS = (
    ("eq. 8, q", (1, 0), "lse", False),
    ("cv, q", (1, 0), "cv", False),
    ("cv + se^2/2, q", (1, 0), "cv", True),
    ("regression cv, q", (1, 0), "regression_cv", False),
    ("auto (eq. 8 or cv, per run), q", (1, 0), AUTO, False),
    ("eq. 8, pi_ref (plain MC)", (0, 1), "lse", False),
    ("MIS q+pi_ref 1:1, eq. 8", (1, 1), "lse", False),
    ("MIS q+pi_ref 1:1, cv", (1, 1), "cv", False),
    ("MIS q+pi_ref 3:1, cv", (3, 1), "cv", False),
    ("MIS q+pi_ref 1:3, cv", (1, 3), "cv", False),
)
BETAS = (1.0, 3.0, 5.0, 8.0)
NS = (4, 8, 16)


def sample_scored(gen_model, q_model, ref_model, tokenizer, truths, n: int, out_dir: Path, seed: int,
                  max_new_tokens: int) -> dict:
    """``n`` samples per prompt drawn from ``gen_model`` with the real Stage 1 code, scored under ``pi_ref``
    and ``q``: ``(P, n)`` float64 arrays ``logp_ref``, ``logp_q``, ``reward`` in ``truths`` order."""
    from disa.demo import sample_and_score

    samples = sample_and_score(gen_model, ref_model, tokenizer, truths, n, max_new_tokens, out_dir, seed, q_model=q_model)
    return {name: samples[name] for name in ("logp_ref", "logp_q", "reward")}


def batch_labels(from_q: dict, from_ref: dict, shares, estimator: str, beta: float, n: int, batch: int,
                 bias_correct: bool = False) -> dict:
    """One batch's labels and standard errors: ``n`` samples split between ``q`` and ``pi_ref`` by ``shares``,
    pooled and weighted against their balance-heuristic mixture."""
    n_q, n_ref = split_budget(n, shares)
    parts = [{k: torch.as_tensor(src[k][:, batch * m:(batch + 1) * m]) for k in ("logp_ref", "logp_q", "reward")}
             for src, m in ((from_q, n_q), (from_ref, n_ref)) if m > 0]
    cat = {k: torch.cat([p[k] for p in parts], dim=1) for k in ("logp_ref", "logp_q", "reward")}
    strata = torch.cat([torch.full(p["reward"].shape, j) for j, p in enumerate(parts)], dim=1)
    p = cat["reward"].shape[0]
    budgets = torch.tensor([[float(n_q), float(n_ref)]] * p)
    if estimator == AUTO:
        log_ratio = mixture_log_ratio(cat["logp_ref"], torch.stack([cat["logp_q"], cat["logp_ref"]], dim=2), budgets)
        estimator = choose_estimator(log_ratio, cat["reward"], beta, base_reward=0.0, strata=strata)
    out = label_prompts_with(estimator, cat["logp_ref"], cat["logp_q"], cat["reward"], beta, base_reward=0.0,
                             log_q_extra=torch.stack([cat["logp_q"], cat["logp_ref"]], dim=2),
                             budgets=budgets, strata=strata)
    if bias_correct:
        out["log_z"] = out["log_z"] + out["log_z_se"] ** 2 / 2
    return {k: v.numpy() for k, v in out.items()}


def error_rows(from_q: dict, from_ref: dict, exact_by_beta: dict, betas: Sequence[float], ns: Sequence[int]) -> list[dict]:
    """RMSE, bias, mean standard error and 95% coverage of every estimator for every (beta, N), averaged over
    the disjoint batches of one seed's samples."""
    n_max = from_q["reward"].shape[1]
    rows = []
    for beta in betas:
        exact = exact_by_beta[beta]
        for n in ns:
            for name, shares, estimator, corrected in ESTIMATORS:
                stats = []
                for b in range(n_max // n):
                    out = batch_labels(from_q, from_ref, shares, estimator, beta, n, b, corrected)
                    err = out["log_z"] - exact
                    stats.append((math.sqrt(float(np.mean(err**2))), float(np.mean(err)), float(np.mean(out["log_z_se"])),
                                  float(np.mean(np.abs(err) <= 1.96 * out["log_z_se"]))))
                rmse, bias, se, cover = (float(np.mean(c)) for c in zip(*stats))
                rows.append({"beta": beta, "n": n, "estimator": name, "batches": len(stats), "rmse": rmse,
                             "bias": bias, "mean_se": se, "coverage95": cover})
    return rows


def average_over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    out = []
    for rows in zip(*per_seed):
        first = rows[0]
        agg = {k: first[k] for k in ("beta", "n", "estimator")}
        for key in ("rmse", "bias", "mean_se", "coverage95"):
            values = [r[key] for r in rows]
            agg[key], agg[key + "_std"] = float(np.mean(values)), float(np.std(values))
        out.append(agg)
    return out


def stage3(tb, ref, tokenizer, truths, labels_by_name: dict, seed: int, out_dir: Path, quick: bool = False) -> dict:
    """DISA trained with each frozen label table (``train.log_z: labels``) and with the batch estimate
    (``train.log_z: batch``), the demo's budget; each policy scored exactly."""
    from disa.demo import FULL_SETTINGS, QUICK_SETTINGS, exact_policy_metrics, method_config
    from disa.log_z import LogZTable
    from disa.stages.train import train_policy
    from disa.verifiers import get_verifier

    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    prompts = [{"id": t.id, "text": t.text} for t in truths]
    results = {}
    for name, labels in [*labels_by_name.items(), ("batch log Z (no model)", None)]:
        train, target = method_config("disa_labels", settings, seed)
        log_z_fn = None
        if labels is None:
            train = dataclasses.replace(train, log_z="batch")
        else:
            log_z_fn = LogZTable({t.id: float(v) for t, v in zip(truths, labels)})
        t0 = time.perf_counter()
        policy, _ = train_policy(tb.load_ref(), ref, tokenizer, prompts, get_verifier("countdown"), train, target,
                                 output_dir=str(out_dir / name.replace(" ", "_").replace(".", "")), log_z=log_z_fn)
        metrics = exact_policy_metrics(policy, tokenizer, truths, settings.beta, settings.k)
        results[name] = {"p_correct": metrics["p_correct"], "kl_target_policy": metrics["kl_target_policy"],
                         "tv": metrics["tv"], "wall_s": time.perf_counter() - t0}
        log.info(f"label study: seed {seed} stage 3 {name}: acc {metrics['p_correct']:.3f} "
                 f"KL {metrics['kl_target_policy']:.3f}")
    return results


GUIDE = [
    "## Which estimator, when", "",
    "Both `lse` (eq. 8) and `cv` are unbiased on the linear scale; their variances differ. `cv`'s terms drop the "
    "wrong answers' importance weights, so it wins where the proposal puts more mass on correct answers than the "
    "target `pi*` does (`q` tilted beyond `pi*`: small `beta`, a strong proposal) and loses where `q` is close to "
    "`pi*` (large `beta`): at `q = pi*` eq. 8's terms are all equal to `Z` while `cv`'s still vary with the "
    "weights. So `cv` is not the better label in general; `label.estimator: auto` picks `lse` or `cv` once per run, "
    "the one with the smaller mean estimated variance over the prompts where a rewarded sample was seen (one choice "
    "from all prompts: a per-prompt choice on the same samples would pick each prompt's luckier draw). Mixing in "
    "`pi_ref` (`sample.reference_share`) bounds every weight by `1 / share` and helps at large `beta`.", "",
    "## Decoding settings: temperature and top-p", "",
    "`disa sample` records `logp_q` as the log-prob of the distribution actually sampled from (transformers' "
    "temperature, top-k and top-p warpers in `generate`'s order, renormalised; vLLM's `processed_logprobs`), and "
    "`meta.json` says so (`logp_q_distribution: sampled`); `disa label` refuses a tempered or truncated run "
    "without that record. A tempered proposal is still a proposal with full support: the label stays unbiased. "
    "A truncated one (`top_p < 1`, `top_k > 0`) has `q(y|x) = 0` on every response that leaves a step's nucleus, "
    "so the label estimates the target's mass on the reachable set S only: eq. 8 estimates "
    "`Z_S = sum_{y in S} pi_ref(y) e^{beta r~(y)}`, low by `-log pi*(S)`; `cv` estimates "
    "`Z - sum_{y not in S} pi_ref(y) (e^{beta r~(y)} - e^{beta r0})`, which misses only the rewarded excess "
    "outside S (a wrong answer outside the nucleus costs it nothing). The trained policy then matches `pi*` "
    "with the wrong normaliser. Keep `top_p = 1` for an exact label; `bench/stage1-budget.md` measures both "
    "effects on this testbed.", "",
    "## Reliability", "",
    "A prompt with no sample rewarded above the base is never `reliable` (whatever its ESS and standard error: "
    "they describe the wrong answers only) and its `n_recommended` is `2 N`; a standard error at rounding level "
    "(every term equal) is not trusted either. The standard error is the delta method's on the log scale; its "
    "coverage is below nominal at small N (tables below), mostly from groups whose terms are all equal.", "",
]


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = ["# Stage 1 label estimators on the exact testbed", "",
             f"`{results['command']}` ({results['n_prompts']} training prompts, {results['seeds']} seeds, "
             f"{results['n_max']} samples per prompt from `q` and from `pi_ref` per seed, split into disjoint "
             f"batches of budget N; {results['wall_s']:.0f} s). Each cell: RMSE of the label against the exact "
             "`log Z` in nats (mean over seeds ± std over seeds), then the mean signed error (bias). Budget N is the "
             "total number of samples per prompt, whatever proposal draws them: `MIS q+pi_ref 1:1` at N = 8 spends "
             "4 on `q` and 4 on `pi_ref` and weights all 8 against the mixture (balance heuristic); `cv` is the "
             "control variate `E_q[pi_ref/q] = 1` with the wrong-answer reward as base (`src/disa/label_estimators.py`).",
             ""]
    for beta in results["betas"]:
        lines += [f"## beta = {beta:g}", "", "| estimator | " + " | ".join(f"N = {n}" for n in results["ns"]) + " |",
                  "|---|" + "---:|" * len(results["ns"])]
        for name, *_ in ESTIMATORS:
            cells = []
            for n in results["ns"]:
                r = next(r for r in rows if r["beta"] == beta and r["n"] == n and r["estimator"] == name)
                cells.append(f"{r['rmse']:.3f} ± {r['rmse_std']:.3f} ({r['bias']:+.3f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += GUIDE
    lines += ["## Standard errors (delta method) against the actual error", "",
              "Mean reported `log_z_se` and the fraction of prompts whose label is within 1.96 SE of the exact value "
              "(beta = 3):", "", "| estimator | N | mean SE | actual RMSE | 95% coverage |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["beta"] == 3.0:
            lines.append(f"| {r['estimator']} | {r['n']} | {r['mean_se']:.3f} | {r['rmse']:.3f} | {r['coverage95']:.2f} |")
    if results.get("stage3"):
        lines += ["", "## Stage 3: DISA with each label (beta = 3, N = 8, the demo's budget)", "",
                  "| log Z source | accuracy | KL(pi*‖pi) | TV to pi* |", "|---|---:|---:|---:|"]
        names = list(results["stage3"][0])
        for name in names:
            cells = []
            for key in ("p_correct", "kl_target_policy", "tv"):
                v = [s[name][key] for s in results["stage3"]]
                cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        picked = [s["best estimator's labels"]["estimator"] for s in results["stage3"]]
        lines += ["", f"The best estimator (lowest label RMSE at beta = 3, N = 8, eq. 8 excluded) per seed: {picked}. "
                  "`batch log Z` is `train.log_z: batch` (no Stage 1, no model)."]
    return "\n".join(lines) + "\n"


def testbed_with_exact_log_z(quick: bool, betas):
    """What the Stage 1 studies start from: the testbed, its tokenizer, frozen ``pi_ref`` and proposal ``q``, the
    training prompts' exact ground truth, and their exact ``log Z`` at each ``beta`` (a numpy array per beta)."""
    from disa.demo import prompt_truths
    from disa.testbed import build_testbed

    tb = build_testbed(None, quick=quick)
    ref = tb.load_ref().requires_grad_(False)
    q = tb.load_proposal().requires_grad_(False)
    truths = prompt_truths(tb.train_prompts, ref, tb.tokenizer, "train-")
    exact = {beta: np.array([t.log_z(beta) for t in truths]) for beta in betas}
    return tb, tb.tokenizer, ref, q, truths, exact


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m disa.studies.label_estimators", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-max", type=int, default=32, help="samples per prompt from each of q and pi_ref")
    parser.add_argument("--quick", action="store_true", help="the quick testbed (24 prompts), for a smoke test")
    parser.add_argument("--stage3", action="store_true", help="also train DISA from eq. 8's and the best labels")
    parser.add_argument("--work", default="runs/label_study", help="where the samples go (resumable)")
    parser.add_argument("--out", default="docs/label-estimators.md")
    args = parser.parse_args(argv)
    if args.n_max < 8:
        parser.error(f"--n-max must be at least 8 (the study reports N = 8), got {args.n_max}")
    ns = tuple(n for n in NS if n <= args.n_max)

    from disa.testbed.models import torch_threads

    started = time.perf_counter()
    with torch_threads(1):
        tb, tokenizer, ref, q, truths, exact = testbed_with_exact_log_z(args.quick, BETAS)
        per_seed, stage3_runs = [], []
        for seed in range(args.seeds):
            work = Path(args.work) / f"seed{seed}"
            from_q = sample_scored(q, q, ref, tokenizer, truths, args.n_max, work / "q", seed, 16)
            from_ref = sample_scored(ref, q, ref, tokenizer, truths, args.n_max, work / "ref", seed + 7919, 16)
            rows = error_rows(from_q, from_ref, exact, BETAS, ns)
            per_seed.append(rows)
            at = {r["estimator"]: r["rmse"] for r in rows if r["beta"] == 3.0 and r["n"] == 8}
            log.info(f"label study: seed {seed} beta 3 N 8: " + "; ".join(f"{k} {v:.3f}" for k, v in at.items()))
            if args.stage3:
                best = min((e for e in ESTIMATORS if e[0] != ESTIMATORS[0][0]), key=lambda e: at[e[0]])
                labels = {name: batch_labels(from_q, from_ref, e[1], e[2], 3.0, 8, 0, e[3])["log_z"]
                          for name, e in (("eq. 8 labels", ESTIMATORS[0]), ("best estimator's labels", best))}
                labels["exact log Z"] = exact[3.0]
                runs = stage3(tb, ref, tokenizer, truths, labels, seed, work / "stage3", args.quick)
                runs["best estimator's labels"]["estimator"] = best[0]
                stage3_runs.append(runs)
    results = {"command": "python -m disa.studies.label_estimators " + " ".join(argv if argv is not None else
                                                                               __import__("sys").argv[1:]),
               "seeds": args.seeds, "n_max": args.n_max, "n_prompts": len(truths), "betas": list(BETAS),
               "ns": list(ns), "rows": average_over_seeds(per_seed), "per_seed": per_seed, "stage3": stage3_runs,
               "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
