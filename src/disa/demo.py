"""``disa demo``: the whole method and every baseline on the exact testbed, scored against ground truth.

One run, top to bottom (``run_demo``):

1. build or reuse the testbed (:mod:`disa.testbed`): tiny GPT-2 ``pi_ref`` and a stronger proposal ``q``;
2. ground truth: every correct response of every prompt scored under ``pi_ref`` gives the exact ``log Z``
   and ``pi*`` (raw binary reward, the testbed's default transform, ``beta`` below);
3. Stage 1 with the real stage code (``run_sampling`` -> Parquet shards -> ``run_labelling``), once with the
   strong proposal and once with ``pi_ref`` as the weak one; each label (LSE eq. 8 and geometric) is compared
   with the exact ``log Z``;
4. Stage 2: the regressor on ``pi_ref``'s pooled prompt states, fitted to the strong labels; its held-out MSE
   against the labels and its error against the exact ``log Z``;
5. Stage 3: DISA, FlowRL (learned ``log Z`` head), FlowRL without ``log Z``, GRPO, GSPO, ASPO and LoRA-SFT on
   the proposal's reward-1 samples, each from ``pi_ref`` with one budget and seed;
6. every final policy scored exactly on the prompts it was trained on (where ``pi*`` is the objective's
   target): accuracy, KL(pi*||pi) on the coarse partition {each correct answer, all wrong answers}, total
   variation to ``pi*``, expected distinct correct answers and strategies in ``k`` samples; and its accuracy
   on held-out prompts. (The testbed's knowledge is per prompt, memorised, so held-out prompts show little
   transfer: they are a check that nothing broke, not the target.)

Writes ``results.json``, ``results.md`` and ``plots/*.png`` to ``out_dir`` and prints the tables. With
several seeds, Stages 1-3 are redone per seed (the testbed stays fixed) and tables give mean +- std.
Interrupted and run again with the same ``out_dir`` and settings, it resumes: Stage 1's finished shards and
every finished method (``<out_dir>/seed<k>/<method>/demo_result.json``) are reused.
"""

from __future__ import annotations

import logging
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from disa.config import SFTConfig, TargetConfig, TrainConfig
from disa.data import PromptRecord
from disa.io import atomic_write_json, json_safe
from disa.embeddings import ModelPoolEmbedder
from disa.estimators import label_prompts
from disa.generation.hf import HFGenerator
from disa.regressor import fit_regressor
from disa.log_z import FrozenLogZ, LogZTable
from disa.stages.label import run_labelling
from disa.stages.sample import run_sampling
from disa.stages.train import train_policy
from disa.training import train_sft
from disa.testbed.models import torch_threads
from disa.demo_report import QUICK_NOTICE, TRANSFORM_STUDY, results_markdown, summarize, write_plots  # noqa: F401  (re-exported)
from disa.stages.fit_z import regressor_verdict
from disa.testbed import build_testbed, correct_logprobs, exact_metrics, log_z_from_logprobs, strategies
from disa.verifiers import get_verifier

log = logging.getLogger(__name__)

METHODS = ("disa", "flowrl", "flowrl_no_logz", "grpo", "gspo", "aspo", "sft")
# DISA with its log Z read from elsewhere, to tell Stage 1's error from Stage 2's: the Stage 1 labels
# themselves (no regressor), and the exact log Z (an oracle only a testbed has). Not run unless asked.
ABLATIONS = ("disa_labels", "disa_exact")
# The reward transform study: r~ = a(x) r + b(x) with (a, b) frozen from the proposal's group (Stage 1 and
# Stage 3 agree, so the exact Z exists) vs the group plug-in recomputed on each policy group (FlowRL, the
# paper). Both read log Z from the Stage 1 labels under the frozen transform and are scored against the
# pi* of that transform.
METRICS_VERSION = 2  # bump when exact_metrics gains a metric, so a resumed demo recomputes old results
DEFAULT_METHODS = METHODS + ABLATIONS + tuple(TRANSFORM_STUDY)
TRAJECTORY_BALANCE = ("disa", "disa_labels", "disa_exact", *TRANSFORM_STUDY, "flowrl", "flowrl_no_logz")


@dataclass(frozen=True)
class DemoSettings:
    """The demo's budget; one object so that every method gets the same one."""

    beta: float = 3.0  # pi* = pi_ref * exp(beta * r) / Z on the raw binary reward
    n_samples: int = 8  # Stage 1 proposal samples per prompt, N (paper: 8)
    group_size: int = 8  # Stage 3 rollouts per prompt, G (paper: 8)
    prompts_per_step: int = 8
    num_steps: int = 150
    # policy AdamW rate, the same for every RL objective: of 3e-4, 1e-3 and 3e-3, the one where GRPO (not
    # DISA) ended most accurate in a 150-step pilot; at 3e-3 GRPO collapsed to 0% correct
    lr: float = 3e-4
    logz_lr: float = 1e-2  # FlowRL's head: larger than the policy's, as in FlowRL
    micro_batch_size: int = 32  # two optimiser steps per rollout batch of 64
    updates_per_batch: int = 1  # passes over each rollout batch; > 1 makes later passes off-policy
    rollout_weight: str = "on_policy"  # trajectory balance's w: on_policy (1) or clipped_is (FlowRL's code)
    length_normalize: bool = False  # trajectory balance on token-mean log-probs (FlowRL's code) vs sums (eq. 10)
    max_new_tokens: int = 16  # the longest correct answer is 11 characters + EOS
    k: int = 8  # distinct answers / strategies among k samples
    sft_epochs: int = 3
    sft_lr: float = 3e-3  # LoRA adapters take larger rates than full fine-tuning
    fit_epochs: int = 300
    sweep_betas: tuple = (1.0, 2.0, 3.0, 5.0, 8.0)  # Stage 1 label error vs beta, from the same N samples
    sweep_n_max: int = 32  # the N-budget study draws this many per prompt and splits them into batches of N


FULL_SETTINGS = DemoSettings()
QUICK_SETTINGS = DemoSettings(num_steps=40, fit_epochs=100, sweep_n_max=16)


# ==================================================================================================
# ground truth
# ==================================================================================================
@dataclass
class PromptTruth:
    """Everything exact about one prompt: its correct answers, their strategies, ``log pi_ref`` of each."""

    id: str
    text: str
    responses: list[str]
    strategy_labels: list[str]
    ref_logp: np.ndarray  # (K,) float64

    def log_z(self, beta: float, reward_values=(0.0, 1.0)) -> float:
        """Exact log Z; ``reward_values`` = (r~ of a wrong answer, r~ of a right one)."""
        return log_z_from_logprobs(self.ref_logp, beta, reward_values)


def prompt_truths(prompts, ref_model, tokenizer, id_prefix: str) -> list[PromptTruth]:
    out = []
    for i, p in enumerate(prompts):
        table = strategies(p)
        responses = list(table)
        out.append(PromptTruth(f"{id_prefix}{i}", p.text, responses, [table[r] for r in responses],
                               correct_logprobs(ref_model, tokenizer, p, responses)))
    return out


def exact_policy_metrics(
    policy, tokenizer, truths: Sequence[PromptTruth], beta: float, k: int, reward_values: Optional[list] = None
) -> dict[str, float]:
    """Mean over prompts of :func:`disa.testbed.exact_metrics` (the policy scored on every correct answer).

    ``reward_values``: per prompt (r~ wrong, r~ right) defining pi*; default the raw reward (0, 1)."""
    rows = []
    policy.eval()
    with torch.inference_mode():
        for i, t in enumerate(truths):
            logp = correct_logprobs(policy, tokenizer, t.text, t.responses)
            values = reward_values[i] if reward_values is not None else (0.0, 1.0)
            rows.append(exact_metrics(logp, t.ref_logp, t.strategy_labels, beta, values, k=k))
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


# ==================================================================================================
# Stage 1 and 2
# ==================================================================================================
def settings_with(base: DemoSettings, overrides: Sequence[str]) -> DemoSettings:
    """``base`` with ``field=value`` overrides (``disa demo --set num_steps=300``), values parsed as YAML;
    an unknown field or a value of the wrong type is an error naming the field."""
    import typing

    import yaml

    from disa.config import check_field_type

    fields = typing.get_type_hints(DemoSettings)
    changes = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        value = yaml.safe_load(raw)
        if fields[name] is tuple and isinstance(value, list):  # YAML has lists, the frozen settings tuples
            value = tuple(value)
        changes[name] = check_field_type(f"--set {name}", value, fields[name])
    return dataclasses.replace(base, **changes)


def label_errors(labels: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """RMSE and mean signed error (bias) of labels against the exact ``log Z``, both ``(P,)``."""
    err = np.asarray(labels, dtype=np.float64) - np.asarray(exact, dtype=np.float64)
    return {"rmse": float(np.sqrt(np.mean(err**2))), "bias": float(np.mean(err))}


def sample_and_score(model, ref_model, tokenizer, truths, n: int, max_new_tokens: int, out_dir: Path, seed: int,
                     q_model=None) -> dict:
    """Stage 1 sampling from ``model``, scored under ``pi_ref`` and ``q_model`` (default: ``model``) with the real
    stage code (Parquet shards in ``out_dir``); returns the samples as
    ``(P, n)`` float64 arrays ``logp_ref``, ``logp_q``, ``reward`` in ``truths`` order, and the columns."""
    import pyarrow.parquet as pq

    records = [PromptRecord(id=t.id, prompt=t.text) for t in truths]
    generator = HFGenerator(model, tokenizer, batch_size=32, device=None, progress=False)
    run_sampling(records, generator=generator, n=n, out_dir=str(out_dir), verifier="countdown",
                 ref_model=ref_model, ref_tokenizer=tokenizer, proposal_model=model if q_model is None else q_model,
                 proposal_tokenizer=tokenizer,
                 shard_size=64, max_new_tokens=max_new_tokens, seed=seed, score_batch_size=64, progress=False)
    columns = pq.read_table(out_dir / "samples").to_pydict()
    row = {t.id: i for i, t in enumerate(truths)}
    arrays = {name: np.zeros((len(truths), n)) for name in ("logp_ref", "logp_q", "reward")}
    for j, (pid, idx) in enumerate(zip(columns["prompt_id"], columns["sample_idx"])):
        for name, a in arrays.items():
            a[row[pid], idx] = columns[name][j]
    return {**arrays, "columns": columns}


def sweep_rows(samples: dict, truths: Sequence[PromptTruth], betas: Sequence[float], ns: Sequence[int]) -> list[dict]:
    """LSE label error against the exact log Z for every (beta, N): the ``(P, N_max)`` samples are split into
    ``N_max // N`` disjoint batches of N, each batch labels every prompt, and errors are averaged over batches."""
    rows = []
    as_t = {k: torch.as_tensor(samples[k], dtype=torch.float64) for k in ("logp_ref", "logp_q", "reward")}
    n_max = as_t["reward"].shape[1]
    for beta in betas:
        exact = np.array([t.log_z(beta) for t in truths])
        for n in ns:
            errs = [label_errors(label_prompts(*(as_t[k][:, b * n:(b + 1) * n] for k in ("logp_ref", "logp_q", "reward")),
                                               beta)["log_z"].numpy(), exact)
                    for b in range(n_max // n)]
            rows.append({"beta": beta, "n": n, "batches": len(errs),
                         "rmse": float(np.mean([e["rmse"] for e in errs])), "bias": float(np.mean([e["bias"] for e in errs]))})
    return rows


def run_stage1(model, ref_model, tokenizer, truths, settings: DemoSettings, out_dir: Path, seed: int) -> dict:
    """Sample N per prompt from ``model``, verify and re-score (Parquet shards), label with ``run_labelling``;
    returns the label table as numpy columns in ``truths`` order, the reward-1 (prompt, response) pairs, and
    the beta and N sweeps of the label error."""
    samples = sample_and_score(model, ref_model, tokenizer, truths, settings.n_samples, settings.max_new_tokens,
                               out_dir, seed)
    labels = {}
    for transform, suffix in (("raw", ""), ("affine", "_affine")):
        target = {"beta": settings.beta, "reward_transform": transform}
        table = run_labelling(str(out_dir / "samples"), beta=settings.beta, reward_transform=transform,
                              out_path=str(out_dir / f"labels{suffix}.parquet"),
                              metadata={"target": target, "n": settings.n_samples}).to_pydict()
        index = {pid: i for i, pid in enumerate(table["prompt_id"])}
        order = [index[t.id] for t in truths]
        labels.update({k + suffix: np.asarray(v)[order] for k, v in table.items() if k != "prompt_id"})
    columns = samples["columns"]
    labels["correct_pairs"] = [(p, r) for p, r, w in zip(columns["prompt"], columns["response"], columns["reward"]) if w == 1.0]
    labels["beta_sweep"] = sweep_rows(samples, truths, settings.sweep_betas, [settings.n_samples])
    big = sample_and_score(model, ref_model, tokenizer, truths, settings.sweep_n_max, settings.max_new_tokens,
                           out_dir / "n_sweep", seed + 10_000)
    ns = [2**i for i in range(int(math.log2(settings.sweep_n_max)) + 1)]
    labels["n_sweep"] = sweep_rows(big, truths, [settings.beta], ns)
    return labels


def affine_reward_values(labels: dict) -> list[tuple[float, float]]:
    """Per prompt (r~ wrong, r~ right) = (b, a + b) of the frozen affine transform in the labels."""
    return [(float(b), float(a + b)) for a, b in zip(labels["reward_scale_affine"], labels["reward_shift_affine"])]


def stage1_rows(labels: dict, truths: Sequence[PromptTruth], beta: float, proposal: str) -> list[dict]:
    """Label errors against the exact log Z: raw reward (LSE, geometric), and the frozen affine r~ of this
    proposal's own groups (whose exact Z exists because (a, b) are fixed)."""
    exact = np.array([t.log_z(beta) for t in truths])
    exact_affine = np.array([t.log_z(beta, v) for t, v in zip(truths, affine_reward_values(labels))])

    def diagnostics(suffix: str) -> dict:
        return {"proposal": proposal, "mean_ess": float(np.mean(labels["ess" + suffix])),
                "reward_rate": float(np.mean(labels["reward_rate" + suffix])),
                "mean_max_weight": float(np.mean(labels["max_weight" + suffix]))}

    return [
        {**diagnostics(""), "label": "lse", **label_errors(labels["log_z"], exact)},
        {**diagnostics(""), "label": "geometric", **label_errors(labels["log_z_geometric"], exact)},
        {**diagnostics("_affine"), "label": "lse, affine r~", **label_errors(labels["log_z_affine"], exact_affine)},
    ]


def run_stage2(ref_model, tokenizer, truths, labels: np.ndarray, settings: DemoSettings, seed: int):
    """Fit the regressor to the labels; returns ``(FrozenLogZ, FitReport, predictions (P,))``."""
    embedder = ModelPoolEmbedder(ref_model, tokenizer, batch_size=64)
    embeddings = embedder.embed([t.text for t in truths], progress=False)
    regressor, report = fit_regressor(embeddings, torch.as_tensor(labels, dtype=torch.float32), hidden=128,
                                      max_epochs=settings.fit_epochs, patience=30, seed=seed, progress=False)
    frozen = FrozenLogZ(regressor, embedder)
    return frozen, report, frozen.predict(embeddings).double().numpy()


# ==================================================================================================
# Stage 3
# ==================================================================================================
# Each method is a config: (train.objective, train.log_z, target.reward_transform). The ablations differ from
# ``disa`` only in where log Z comes from (``log_z_table`` below), the transform study only in r~.
METHOD_CONFIGS = {
    "disa": ("disa", "regressor", "raw"),
    "disa_labels": ("disa", "labels", "raw"),
    "disa_exact": ("disa", "table", "raw"),
    "disa_affine": ("disa", "labels", "affine"),
    "disa_group": ("disa", "labels", "group"),
    **{m: (m, "auto", "raw") for m in ("flowrl", "flowrl_no_logz", "grpo", "gspo", "aspo", "sft")},
}


def method_config(method: str, settings: DemoSettings, seed: int) -> tuple[TrainConfig, TargetConfig]:
    """One budget for every objective; the trajectory-balance ones target the exact pi* (raw reward,
    trajectory-level log-probs, on-policy weights), the reward maximisers use their usual defaults."""
    objective, log_z, transform = METHOD_CONFIGS[method]
    kwargs = ({"length_normalize": settings.length_normalize, "rollout_weight_mode": settings.rollout_weight}
              if method in TRAJECTORY_BALANCE else {})
    train = TrainConfig(
        objective=objective, objective_kwargs=kwargs, log_z=log_z, group_size=settings.group_size,
        prompts_per_step=settings.prompts_per_step, num_steps=settings.num_steps,
        updates_per_batch=settings.updates_per_batch, micro_batch_size=settings.micro_batch_size, lr=settings.lr,
        logz_lr=settings.logz_lr, max_new_tokens=settings.max_new_tokens,
        generation_batch_size=settings.prompts_per_step, save_every=0, keep_checkpoints=1, seed=seed,
        sft=SFTConfig(num_epochs=settings.sft_epochs, lr=settings.sft_lr, micro_batch_size=32, seed=seed),
    )
    return train, TargetConfig(beta=settings.beta, reward_transform=transform)


def train_method(method: str, load_policy, ref_model, tokenizer, truths, settings: DemoSettings, seed: int,
                 out_dir: Path, log_z_sources: dict, sft_pairs=None, affine=None):
    """Train one method from a fresh copy of pi_ref with the pipeline's ``train_policy``; returns
    ``(policy, history)``."""
    train, target = method_config(method, settings, seed)
    prompts = [{"id": t.id, "text": t.text} for t in truths]
    if train.objective == "sft":
        return train_sft(load_policy(), tokenizer, sft_pairs, train.sft, output_dir=str(out_dir))
    return train_policy(
        load_policy(), ref_model, tokenizer, prompts, get_verifier("countdown"), train, target, output_dir=str(out_dir),
        log_z=log_z_sources.get(train.log_z) if train.objective == "disa" else None,
        affine=affine if target.reward_transform == "affine" else None,
    )


# ==================================================================================================
# the run
# ==================================================================================================
def run_demo(
    out_dir: str = "runs/demo",
    quick: bool = False,
    seeds: int = 1,
    methods: Optional[Sequence[str]] = None,
    cache_dir: Optional[str] = None,
    settings: Optional[DemoSettings] = None,
    build_threads: int | str | None = None,
) -> dict:
    """Run the demo (module docstring); returns the results dict also written to ``out_dir/results.json``.
    ``build_threads``: torch threads for building the testbed when it is not cached (None: the documented 1;
    ``"auto"``: every free core; see :func:`disa.testbed.build_testbed`).

    Runs on one CPU thread: the testbed's models are so small that a second intra-op thread only adds
    synchronisation (the test suite measured one 32x64 layer ~150x slower with two contended threads)."""
    with torch_threads(1):
        return _run_demo(out_dir, quick, seeds, methods, cache_dir, settings, build_threads)


def _run_demo(out_dir, quick, seeds, methods, cache_dir, settings, build_threads=None) -> dict:
    methods = list(methods or DEFAULT_METHODS)
    known = METHODS + ABLATIONS + tuple(TRANSFORM_STUDY)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(known)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    settings = settings or (QUICK_SETTINGS if quick else FULL_SETTINGS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if quick:
        _say(QUICK_NOTICE)
    _say(f"testbed ({'quick' if quick else 'full'}): building or loading the cached models")
    tb = build_testbed(cache_dir, quick=quick, num_threads=build_threads)
    tokenizer = tb.tokenizer
    ref = tb.load_ref().requires_grad_(False)
    proposal = tb.load_proposal().requires_grad_(False)
    train_truth = prompt_truths(tb.train_prompts, ref, tokenizer, "train-")
    eval_truth = prompt_truths(tb.eval_prompts, ref, tokenizer, "eval-")
    exact_train = np.array([t.log_z(settings.beta) for t in train_truth])
    _say(f"ground truth: {len(train_truth)} train / {len(eval_truth)} held-out prompts, "
         f"{np.mean([len(t.responses) for t in train_truth]):.0f} correct answers per prompt on average")

    reference_rows = {
        name: {**exact_policy_metrics(model, tokenizer, train_truth, settings.beta, settings.k),
               "heldout_p_correct": exact_policy_metrics(model, tokenizer, eval_truth, settings.beta, settings.k)["p_correct"]}
        for name, model in (("pi_ref", ref), ("proposal q", proposal))
    }
    runs: list[dict] = []
    for seed in range(seeds):
        seed_dir = out / f"seed{seed}"
        run = {"seed": seed, "stage1": [], "methods": {}}
        t0 = time.perf_counter()
        strong = run_stage1(proposal, ref, tokenizer, train_truth, settings, seed_dir / "stage1_strong", seed)
        weak = run_stage1(ref, ref, tokenizer, train_truth, settings, seed_dir / "stage1_weak", seed)
        run["stage1"] = [row for labels, name in ((strong, "strong q"), (weak, "weak (pi_ref)"))
                         for row in stage1_rows(labels, train_truth, settings.beta, name)]
        run["sweeps"] = [{**row, "proposal": name, "study": study}
                         for labels, name in ((strong, "strong q"), (weak, "weak (pi_ref)"))
                         for study in ("beta_sweep", "n_sweep") for row in labels[study]]
        run["stage1_seconds"] = time.perf_counter() - t0
        _say(f"seed {seed} stage 1: " + "; ".join(
            f"{r['proposal']} {r['label']} RMSE {r['rmse']:.3f} bias {r['bias']:+.3f}" for r in run["stage1"]))

        frozen, report, predicted = run_stage2(ref, tokenizer, train_truth, strong["log_z"], settings, seed)
        run["stage2"] = {"val_mse": report.val_mse, "val_r2": report.val_r2,
                         "baseline_val_mse": report.baseline_val_mse, "train_mse": report.train_mse,
                         **{f"exact_{k}": v for k, v in label_errors(predicted, exact_train).items()}}
        _say(f"seed {seed} stage 2: {regressor_verdict(report.val_mse, report.baseline_val_mse)}; "
             f"RMSE vs exact log Z {run['stage2']['exact_rmse']:.3f}")
        run["curves"] = {}
        labels_table = lambda key: LogZTable({t.id: float(v) for t, v in zip(train_truth, strong[key])})  # noqa: E731
        log_z_sources = {"regressor": frozen, "labels": labels_table("log_z"),
                         "table": LogZTable({t.id: float(v) for t, v in zip(train_truth, exact_train)})}
        affine_sources = {**log_z_sources, "labels": labels_table("log_z_affine")}
        affine_values = affine_reward_values(strong)  # the strong proposal's frozen (a, b): they define pi*_affine
        affine = {t.id: (v[1] - v[0], v[0]) for t, v in zip(train_truth, affine_values)}
        for method in methods:
            done_file = seed_dir / method / "demo_result.json"
            run_key = {"settings": dataclasses.asdict(settings), "testbed": tb.root.name, "seed": seed,
                       "metrics_version": METRICS_VERSION}
            if done_file.exists() and json.loads(done_file.read_text())["key"] == json_safe(run_key):
                # a finished method of an interrupted demo: its numbers are kept, not recomputed
                done = json.loads(done_file.read_text())
                run["methods"][method], run["curves"][method] = done["metrics"], done["curve"]
                _say(f"seed {seed} {method:15s} reused {done_file}")
                continue
            t0 = time.perf_counter()
            policy, history = train_method(
                method, tb.load_ref, ref, tokenizer, train_truth, settings, seed, seed_dir / method,
                affine_sources if method in TRANSFORM_STUDY else log_z_sources, sft_pairs=strong["correct_pairs"],
                affine=affine)
            seconds = time.perf_counter() - t0
            target = affine_values if method in TRANSFORM_STUDY else None
            metrics = exact_policy_metrics(policy, tokenizer, train_truth, settings.beta, settings.k, target)
            metrics["heldout_p_correct"] = exact_policy_metrics(policy, tokenizer, eval_truth, settings.beta, settings.k)["p_correct"]
            metrics["wall_s"] = seconds
            run["methods"][method] = metrics
            run["curves"][method] = [float(r.get("reward_mean", math.nan)) for r in history]
            atomic_write_json(done_file, {"key": run_key, "metrics": metrics, "curve": run["curves"][method]})
            _say(f"seed {seed} {method:15s} acc {metrics['p_correct']:.3f}  KL {metrics['kl_target_policy']:.3f}  "
                 f"TV {metrics['tv']:.3f}  distinct@{settings.k} {metrics[f'distinct_correct@{settings.k}']:.2f}  "
                 f"{seconds:.0f}s")
            del policy
        runs.append(run)

    results = {
        "settings": dataclasses.asdict(settings), "quick": quick, "seeds": seeds, "methods": methods,
        "testbed": {"root": str(tb.root), "n_train_prompts": len(train_truth), "n_eval_prompts": len(eval_truth),
                    "mean_correct_answers": float(np.mean([len(t.responses) for t in train_truth]))},
        "reference": reference_rows, "runs": runs, "summary": summarize(runs, methods),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "wall_s": time.perf_counter() - started,
    }
    atomic_write_json(out / "results.json", results)
    markdown = results_markdown(results)
    (out / "results.md").write_text(markdown)
    try:
        write_plots(results, out / "plots")
    except Exception as e:  # plots are a convenience: never lose the numbers over them
        _say(f"plots skipped: {e}")
    print(markdown)
    _say(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'plots'} in {results['wall_s']:.0f}s")
    if quick:
        _say(QUICK_NOTICE)
    return results


def _say(message: str) -> None:
    log.info(message)
