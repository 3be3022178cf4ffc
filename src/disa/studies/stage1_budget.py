"""Stage 1 at the paper's decoding settings, and the same label accuracy for fewer proposal samples.

    python -m disa.studies.stage1_budget --seeds 2 [--quick] [--out bench/stage1-budget.md]

On the exact testbed (:mod:`disa.testbed`, the demo's full build: 96 training prompts, strong proposal ``q``),
per seed, with the real Stage 1 code (``run_sampling``, ``logp_q`` the sampled distribution's):

1. **Decoding settings.** ``n_max`` samples per prompt from ``q`` at each of temperature 1 / top-p 1 (the
   distribution ``q`` itself), 0.6 / 1, 1 / 0.95 and 0.6 / 0.95 (the paper-style settings). Every label of
   budget N (disjoint batches) against the exact ``log Z``: RMSE and bias of eq. 8 and ``cv``, and of eq. 8
   with the untempered model's ``log q`` (what ``disa sample`` recorded before: the weights of another
   distribution).
2. **Adaptive budget.** From the temperature-1 pool: every prompt starts with 2 samples; then 3 rounds,
   each spending an equal part of the rest of the total budget where
   :func:`disa.label_estimators.allocate_samples` says (the largest drop of the labels' estimated variance),
   simulated on already drawn samples in their drawing order. RMSE against the exact ``log Z`` at
   equal total samples, against fixed N, and the smallest budget whose RMSE matches eq. 8 at N = 8.
3. **Coverage** of the nominal 95% interval ``log Z^ +- 1.96 se``.

Writes ``<out>`` (Markdown) and ``<out>.json`` (every number).
"""

from __future__ import annotations

import logging
import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from disa.label_estimators import allocate_samples, label_with_se, rewarded_count

log = logging.getLogger(__name__)

SETTINGS = ((1.0, 1.0), (0.6, 1.0), (1.0, 0.95), (0.6, 0.95))
BETAS = (1.0, 3.0)
N_FIXED = 8


def draw(q, ref, tokenizer, truths, n: int, temperature: float, top_p: float, out_dir: Path, seed: int) -> dict:
    """``n`` samples per prompt from ``q`` at these settings: ``(P, n)`` float64 arrays ``logp_ref``,
    ``logp_q`` (the sampled distribution's), ``logp_q_model`` (the untempered model's) and ``reward``."""
    import pyarrow.parquet as pq

    from disa.data import PromptRecord
    from disa.generation.hf import HFGenerator
    from disa.scoring import score_responses
    from disa.stages.sample import run_sampling

    records = [PromptRecord(id=t.id, prompt=t.text) for t in truths]
    generator = HFGenerator(q, tokenizer, batch_size=32, device=None, progress=False)
    run_sampling(records, generator=generator, n=n, out_dir=str(out_dir), verifier="countdown", ref_model=ref,
                 ref_tokenizer=tokenizer, proposal_model=q, proposal_tokenizer=tokenizer, shard_size=64,
                 max_new_tokens=16, temperature=temperature, top_p=top_p, seed=seed, score_batch_size=64,
                 progress=False)
    cols = pq.read_table(out_dir / "samples").to_pydict()
    prompt_ids = [tokenizer(p)["input_ids"] for p in cols["prompt"]]
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"]
                    + ([tokenizer.eos_token_id] if f == "eos" else []) for r, f in zip(cols["response"], cols["finish_reason"])]
    cols["logp_q_model"] = score_responses(q, prompt_ids, response_ids, pad_id=tokenizer.pad_token_id or 0,
                                           batch_size=64)
    row = {t.id: i for i, t in enumerate(truths)}
    out = {k: np.zeros((len(truths), n)) for k in ("logp_ref", "logp_q", "logp_q_model", "reward")}
    for j, (pid, idx) in enumerate(zip(cols["prompt_id"], cols["sample_idx"])):
        for k, a in out.items():
            a[row[pid], idx] = cols[k][j]
    return out


def labels(estimator: str, logp_ref, logp_q, reward, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``(log Z^, se)`` per prompt of ``estimator`` on ``(P, N)`` arrays (raw binary reward: base 0)."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    log_z, se = label_with_se(estimator, t(logp_ref) - t(logp_q), t(reward), beta, base_reward=0.0)
    return log_z.numpy(), se.numpy()


def settings_rows(pool: dict, exact: dict, setting, n: int) -> list[dict]:
    rows = []
    n_max = pool["reward"].shape[1]
    for beta in BETAS:
        for name, est, q_key in (("eq. 8", "lse", "logp_q"), ("cv", "cv", "logp_q"),
                                 ("eq. 8, untempered log q", "lse", "logp_q_model"),
                                 ("cv, untempered log q", "cv", "logp_q_model")):
            errs, covers, covers_seen = [], [], []
            for b in range(n_max // n):
                sl = slice(b * n, (b + 1) * n)
                log_z, se = labels(est, pool["logp_ref"][:, sl], pool[q_key][:, sl], pool["reward"][:, sl], beta)
                errs.append(log_z - exact[beta])
                inside = np.abs(log_z - exact[beta]) <= 1.96 * se
                covers.append(np.mean(inside))
                seen = rewarded_count(torch.as_tensor(pool["reward"][:, sl]), 0.0).numpy() > 0
                covers_seen.append(np.mean(inside[seen]) if seen.any() else np.nan)
            err = np.concatenate(errs)
            rows.append({"temperature": setting[0], "top_p": setting[1], "beta": beta, "n": n, "label": name,
                         "rmse": float(np.sqrt(np.mean(err**2))), "bias": float(np.mean(err)),
                         "coverage95": float(np.mean(covers)), "coverage95_rewarded": float(np.nanmean(covers_seen)),
                         "reward_rate": float(pool["reward"].mean())})
    return rows


def adaptive_labels(pool: dict, estimator: str, beta: float, budget: int, n0: int, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """``disa sample --target-se``'s rule on already drawn samples (drawing order kept): ``n0`` per prompt,
    then ``rounds`` rounds, each spending an equal part of what is left of ``budget`` (total samples) as
    :func:`disa.label_estimators.allocate_samples` says from the labels so far. Returns ``(log Z^, N used)``."""
    p, n_max = pool["reward"].shape
    n = np.full(p, n0)

    def current():
        log_z, se = np.zeros(p), np.zeros(p)
        for i in range(p):  # prompts have different N: one row at a time
            sl = slice(0, int(n[i]))
            lz, s_ = labels(estimator, pool["logp_ref"][i:i + 1, sl], pool["logp_q"][i:i + 1, sl],
                            pool["reward"][i:i + 1, sl], beta)
            log_z[i], se[i] = lz[0], s_[0]
        seen = np.array([(pool["reward"][i, :int(n[i])] > 0).sum() for i in range(p)])
        return log_z, se, seen

    log_z, se, seen = current()
    for r in range(rounds):
        extra = (budget - int(n.sum())) // (rounds - r)
        if extra <= 0:
            break
        add = allocate_samples(torch.as_tensor(se), torch.as_tensor(n), torch.as_tensor(seen), extra,
                               cap=torch.full((p,), n_max)).numpy()
        n = n + add
        log_z, se, seen = current()
    return log_z, n


def budget_rows(pool: dict, exact: dict, ns_fixed: Sequence[int], budgets_per_prompt: Sequence[float]) -> list[dict]:
    rows = []
    p, n_max = pool["reward"].shape
    for beta in BETAS:
        for name, est in (("eq. 8", "lse"), ("cv", "cv")):
            for n in ns_fixed:
                log_z, _ = labels(est, pool["logp_ref"][:, :n], pool["logp_q"][:, :n], pool["reward"][:, :n], beta)
                err = log_z - exact[beta]
                rows.append({"beta": beta, "label": f"{name}, fixed N", "samples_per_prompt": float(n),
                             "rmse": float(np.sqrt(np.mean(err**2))), "bias": float(np.mean(err))})
            for b in budgets_per_prompt:
                log_z, used = adaptive_labels(pool, est, beta, int(round(b * p)), n0=2, rounds=3)
                err = log_z - exact[beta]
                rows.append({"beta": beta, "label": f"{name}, adaptive", "samples_per_prompt": float(used.mean()),
                             "rmse": float(np.sqrt(np.mean(err**2))), "bias": float(np.mean(err)),
                             "max_n": int(used.max())})
    return rows


def average(per_seed: list[list[dict]], keys: Sequence[str]) -> list[dict]:
    out = []
    for rows in zip(*per_seed):
        agg = {k: v for k, v in rows[0].items() if k not in keys}
        for k in keys:
            vals = [r[k] for r in rows]
            agg[k], agg[k + "_std"] = float(np.mean(vals)), float(np.std(vals))
        out.append(agg)
    return out


def markdown(res: dict) -> str:
    lines = ["# Stage 1: decoding settings and sample budget on the exact testbed", "",
             f"`{res['command']}` ({res['n_prompts']} training prompts, {res['seeds']} seeds, {res['n_max']} samples "
             f"per prompt per setting and seed; {res['wall_s']:.0f} s). Errors of the label against the exact `log Z` "
             "in nats, mean over seeds (± std over seeds).", "",
             f"## Decoding settings (N = {N_FIXED}, disjoint batches)", "",
             "| temperature | top_p | beta | label | RMSE | bias | 95% coverage (all / rewarded seen) | proposal reward "
             "rate |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["settings"]:
        lines.append(f"| {r['temperature']:g} | {r['top_p']:g} | {r['beta']:g} | {r['label']} | {r['rmse']:.3f} ± "
                     f"{r['rmse_std']:.3f} | {r['bias']:+.3f} | {r['coverage95']:.2f} / {r['coverage95_rewarded']:.2f} | "
                     f"{r['reward_rate']:.3f} |")
    lines += ["", "## Adaptive budget against fixed N (temperature 1, the first samples of each prompt's pool)", "",
              "| beta | label | samples per prompt | RMSE | bias |", "|---:|---|---:|---:|---:|"]
    for r in res["budget"]:
        lines.append(f"| {r['beta']:g} | {r['label']} | {r['samples_per_prompt']:.2f} | {r['rmse']:.3f} ± "
                     f"{r['rmse_std']:.3f} | {r['bias']:+.3f} |")
    lines += ["", "## Samples needed to match eq. 8 at N = 8", ""]
    for line in res["match"]:
        lines.append(f"- {line}")
    return "\n".join(lines) + "\n"


def match_lines(rows: list[dict]) -> list[str]:
    """For each beta and label: the smallest mean budget whose RMSE is at most eq. 8's at fixed N = 8."""
    out = []
    for beta in BETAS:
        ref = next(r for r in rows if r["beta"] == beta and r["label"] == "eq. 8, fixed N" and r["samples_per_prompt"] == 8)
        for label in sorted({r["label"] for r in rows if r["beta"] == beta}):
            ok = [r for r in rows if r["beta"] == beta and r["label"] == label and r["rmse"] <= ref["rmse"]]
            if ok:
                best = min(ok, key=lambda r: r["samples_per_prompt"])
                out.append(f"beta {beta:g}, {label}: {best['samples_per_prompt']:.2f} samples per prompt "
                           f"({100 * best['samples_per_prompt'] / 8:.0f}% of eq. 8's 8) reach RMSE {best['rmse']:.3f} "
                           f"<= {ref['rmse']:.3f}")
            else:
                out.append(f"beta {beta:g}, {label}: no budget measured reaches eq. 8's RMSE {ref['rmse']:.3f}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m disa.studies.stage1_budget", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--n-max", type=int, default=32, help="samples per prompt per setting and seed")
    parser.add_argument("--quick", action="store_true", help="the quick testbed (24 prompts), for a smoke test")
    parser.add_argument("--work", default="runs/stage1_budget", help="where the samples go (resumable)")
    parser.add_argument("--out", default="bench/stage1-budget.md")
    args = parser.parse_args(argv)

    from disa.studies.label_estimators import testbed_with_exact_log_z
    from disa.testbed.models import torch_threads

    started = time.perf_counter()
    with torch_threads(1):
        _, tokenizer, ref, q, truths, exact = testbed_with_exact_log_z(args.quick, BETAS)
        per_seed_settings, per_seed_budget = [], []
        for seed in range(args.seeds):
            rows, pool_t1 = [], None
            for setting in SETTINGS:
                work = Path(args.work) / f"seed{seed}" / f"t{setting[0]:g}-p{setting[1]:g}"
                pool = draw(q, ref, tokenizer, truths, args.n_max, *setting, work, seed)
                rows += settings_rows(pool, exact, setting, N_FIXED)
                if setting == (1.0, 1.0):
                    pool_t1 = pool
            per_seed_settings.append(rows)
            per_seed_budget.append(budget_rows(pool_t1, exact, (2, 3, 4, 6, 8, 16), (2.5, 3, 4, 5, 6, 8)))
            log.info(f"stage1 budget: seed {seed} done ({time.perf_counter() - started:.0f} s)")
    budget = average(per_seed_budget, ("samples_per_prompt", "rmse", "bias"))
    res = {"command": "python -m disa.studies.stage1_budget " + " ".join(argv if argv is not None else
                                                                       __import__("sys").argv[1:]),
           "seeds": args.seeds, "n_max": args.n_max, "n_prompts": len(truths),
           "settings": average(per_seed_settings, ("rmse", "bias", "coverage95", "coverage95_rewarded", "reward_rate")),
           "budget": budget, "match": match_lines(budget), "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
