"""The regime map: where the source of ``log Z`` changes the trained policy, on the exact testbed (issue 24).

On-policy, a prompt-level error in ``log Z`` only shifts a baseline (Prop. 3(ii)): the expected gradient does
not move. It stops being harmless off-policy (App. C.5) and wherever ``pi*`` is not a zero of the residual. Each
regime below trains trajectory balance from ``pi_ref`` with every ``log Z`` source and scores the final policy
exactly against ``pi*`` (the testbed lists every correct answer):

    baseline  on-policy, trajectory residual, beta = 3 (the demo's setting)
    replay    Stage 3 groups mixing the proposal's stored Stage 1 samples with on-policy rollouts, up to fully
              offline; the replayed rows weighted by the known q (clipped pi_theta / q) or not at all (w = 1,
              the form Prop. 3(i) is about)
    stale     rollouts drawn from the policy k versions old (asynchronous training), w = 1
    visits    all train + held-out prompts (128) with the same budget, so each is visited once
    beta      a sharp target (beta 15; 3 is the baseline)
    residual  FlowRL's length-normalised residual (token-mean log-probs) instead of the trajectory one
    dial      the exact log Z plus an injected prompt-level error (bias, noise) on-policy and fully offline:
              the trained policy's KL, its residual, and Prop. 4's envelope from the injected MSE

Sources (``SOURCES``): ``regressor`` (DISA: the Stage 2 regressor frozen), ``exact`` (the true log Z),
``labels`` (the raw Stage 1 labels), ``learned`` (FlowRL's head, trained with the policy), ``zero`` and
``batch`` (each group's own estimate, Trajectory Balance with Asynchrony). Metrics: KL(pi*||pi), TV on the
correct set, accuracy, exact pass@k for k up to 256, and a Monte Carlo estimate of the residual under the exact
log Z; mean and spread over seeds. Every finished run is a JSON file under ``<out>/runs/`` and is reused when the
study runs again with the same settings (so two processes may split the regimes with ``only=``).

The small pure functions (:func:`exact_pass_at_k`, :func:`prop4_envelope`, :func:`injected_log_z`) are tested
against hand values in ``tests/test_regimes.py``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCES = ("regressor", "exact", "labels", "learned", "zero", "batch")
# source -> (train.objective, train.log_z): every frozen/zero/batch source runs DISA's objective (log Z detached),
# the learned head runs FlowRL's (its gradient reaches log Z); both get the regime's residual and weight
SOURCE_CONFIGS = {"regressor": ("disa", "regressor"), "exact": ("disa", "table"), "labels": ("disa", "labels"),
                  "learned": ("flowrl", "learned"), "zero": ("disa", "zero"), "batch": ("disa", "batch"),
                  "injected": ("disa", "table")}
PASS_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KL_GAP_AXIS = 0.2  # the gap plot's y range (nats); a bar beyond it is written as text


# ==================================================================================================
# the math (pure)
# ==================================================================================================
def exact_pass_at_k(p_correct: Sequence[float], ks: Sequence[int] = PASS_KS) -> np.ndarray:
    """Exact pass@k of i.i.d. draws from a policy, mean over prompts of ``1 - (1 - p)^k``, for each k of ``ks``;
    ``p_correct`` is each prompt's exact P(correct) (the sum of pi over its correct set). Computed as
    ``-expm1(k log1p(-p))``, accurate for small p and large k."""
    p = np.asarray(p_correct, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or np.any(~np.isfinite(p)) or np.any((p < -1e-12) | (p > 1 + 1e-12)):
        raise ValueError(f"p_correct must be a non-empty 1-D list of probabilities, got {p_correct!r}")
    ks = np.asarray(ks)
    if ks.ndim != 1 or ks.size == 0 or np.any(ks < 1) or np.any(ks != np.round(ks)):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-np.clip(p, 0.0, 1.0))  # -inf where p == 1: pass@k = 1
    return np.array([float(np.mean(-np.expm1(k * log_miss))) for k in ks])


def prop4_envelope(l_exact: float, eps2: float) -> float:
    """Prop. 4's Cauchy-Schwarz envelope: a policy's trajectory-balance loss under a frozen log Z whose mean
    squared error is ``eps2`` is at most ``L_exact + eps2 + 2 sqrt(eps2 L_exact)`` (= ``(sqrt L + eps)^2``)."""
    if not (l_exact >= 0 and eps2 >= 0) or not (math.isfinite(l_exact) and math.isfinite(eps2)):
        raise ValueError(f"l_exact and eps2 must be finite and >= 0, got {l_exact!r}, {eps2!r}")
    return float(l_exact + eps2 + 2.0 * math.sqrt(eps2 * l_exact))


def injected_log_z(exact: Sequence[float], bias: float, noise_sd: float, seed: int) -> tuple[np.ndarray, float]:
    """The exact log Z plus a known prompt-level error ``bias + noise_sd * N(0, 1)`` (one draw per prompt, from
    ``seed``); returns the values and their realised MSE ``eps^2 = mean(error^2)`` against the exact ones."""
    exact = np.asarray(exact, dtype=np.float64)
    if noise_sd < 0 or not (math.isfinite(bias) and math.isfinite(noise_sd)):
        raise ValueError(f"bias must be finite and noise_sd finite and >= 0, got {bias!r}, {noise_sd!r}")
    error = bias + noise_sd * np.random.default_rng(seed).standard_normal(exact.shape)
    return exact + error, float(np.mean(error**2))


# ==================================================================================================
# the regimes
# ==================================================================================================
@dataclass(frozen=True)
class Regime:
    """One column of the map: how Stage 3 is run (the same for every source)."""

    regime: str
    setting: str
    beta: float = 3.0
    replay_per_group: int = 0  # of the group_size rows of a prompt, how many are stored Stage 1 samples
    replay_weighted: bool = True  # replayed rows weighted by min(pi_theta / q, 10), else w = 1
    staleness: int = 0  # rollouts drawn from the policy this many versions old
    length_normalize: bool = False
    all_prompts: bool = False  # train + held-out prompts, the budget set by ``visits``
    visits: Optional[float] = None
    log_z_error: Optional[tuple[float, float]] = None  # (bias, noise sd) injected into the exact log Z
    sources: tuple = SOURCES

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in ".-" else "_" for c in f"{self.regime}-{self.setting}")

    @property
    def weight_mode(self) -> str:
        return "clipped_is" if self.replay_per_group and self.replay_weighted else "on_policy"


# (offline?, bias, noise sd in nats); b = 0 is the exact source's run of the baseline / fully offline replay
DIAL_ERRORS = ((False, 1.0, 0.0), (True, 1.0, 0.0), (True, -1.0, 0.0), (True, 0.0, 1.5))


def dial_regimes(errors=DIAL_ERRORS, replay_per_group: int = 8) -> list[Regime]:
    out = []
    for offline, bias, sd in errors:
        out.append(Regime("dial", f"{'offline' if offline else 'on-policy'} b={bias:+g} sd={sd:g}",
                              replay_per_group=replay_per_group if offline else 0, replay_weighted=False,
                              log_z_error=(bias, sd), sources=("injected",)))
    return out


def full_regimes(group_size: int = 8) -> list[Regime]:
    half = group_size // 2
    return [
        Regime("baseline", "on-policy"),
        Regime("replay", f"{half}/{group_size} stored, IS-weighted", replay_per_group=half),
        Regime("replay", f"{group_size}/{group_size} stored, w=1", replay_per_group=group_size, replay_weighted=False),
        Regime("stale", "k=8", staleness=8),
        Regime("visits", "128 prompts, 1 visit", all_prompts=True, visits=1.0),
        Regime("beta", "beta=15", beta=15.0),
        Regime("residual", "length-normalised", length_normalize=True),
        *dial_regimes(),
    ]


@dataclass(frozen=True)
class RegimeSettings:
    """The study's budget (the same for every regime and source)."""

    num_steps: int = 16  # sized so the full study (138 runs) fits about an hour on a busy shared 2-core CPU
    train_prompts: int = 32  # the first 32 training prompts: 4 visits each in 16 steps
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 3e-4
    logz_lr: float = 1e-2
    micro_batch_size: int = 32
    n_samples: int = 8  # Stage 1 proposal samples per prompt (the replay pool)
    fit_epochs: int = 300
    max_new_tokens: int = 16
    residual_samples: int = 8  # rollouts per prompt for the Monte Carlo residual under the exact log Z
    k: int = 8


FULL_SETTINGS = RegimeSettings()
QUICK_SETTINGS = RegimeSettings(num_steps=4, train_prompts=24, prompts_per_step=4, group_size=4, n_samples=4, fit_epochs=30,
                                residual_samples=4)


def quick_regimes(group_size: int = 4) -> list[Regime]:
    """The default-suite form: the baseline with every source, fully offline and IS-weighted mixed replay, stale
    rollouts, and the dial at growing positive bias (where the residual must grow)."""
    return [Regime("baseline", "on-policy"),
            Regime("replay", f"{group_size}/{group_size} stored, w=1", replay_per_group=group_size,
                   replay_weighted=False, sources=("exact", "zero")),
            Regime("replay", f"{group_size // 2}/{group_size} stored, IS-weighted", replay_per_group=group_size // 2,
                   sources=("batch", "learned")),
            Regime("stale", "k=1", staleness=1, sources=("batch",)),
            *dial_regimes(((False, 0.0, 0.0), (False, 1.0, 0.0), (False, 3.0, 0.0)), replay_per_group=group_size)]


# ==================================================================================================
# Stage 1 and 2 (per seed, per beta)
# ==================================================================================================
class Offline:
    """Stage 1 (the strong proposal's samples on every train and held-out prompt, with the real stage code) and,
    per beta, the LSE labels and the Stage 2 regressor fitted on all of them; the replay pool's token ids and
    token log-probs under pi_ref and q. Built once per seed, lazily."""

    def __init__(self, setup: dict, settings: RegimeSettings, out: Path, seed: int):
        from disa.demo import sample_and_score

        self.setup, self.settings, self.seed = setup, settings, seed
        self.truths = setup["truths"] + setup["eval_truths"]
        self.samples = sample_and_score(setup["proposal"], setup["ref"], setup["tokenizer"], self.truths,
                                        settings.n_samples, settings.max_new_tokens, out / "stage1" / f"seed{seed}", seed)
        self._stage2: dict[float, dict] = {}
        self._pool = None

    def exact(self, beta: float) -> np.ndarray:
        return np.array([t.log_z(beta) for t in self.truths])

    def stage2(self, beta: float) -> dict:
        """Labels, the frozen regressor and their errors against the exact log Z at ``beta``."""
        if beta not in self._stage2:
            from disa.demo import DemoSettings, label_errors, run_stage2
            from disa.estimators import label_prompts

            arrays = [torch.as_tensor(self.samples[k], dtype=torch.float64) for k in ("logp_ref", "logp_q", "reward")]
            labels = label_prompts(*arrays, beta)["log_z"].numpy()
            frozen, report, predicted = run_stage2(self.setup["ref"], self.setup["tokenizer"], self.truths, labels,
                                                   DemoSettings(fit_epochs=self.settings.fit_epochs), self.seed)
            exact = self.exact(beta)
            self._stage2[beta] = {
                "labels": labels, "frozen": frozen, "exact": exact,
                "diagnostics": {"stage2_val_mse": float(report.val_mse),
                                "stage2_mean_predictor_mse": float(report.baseline_val_mse),
                                "labels_rmse_vs_exact": label_errors(labels, exact)["rmse"],
                                "regressor_rmse_vs_exact": label_errors(predicted, exact)["rmse"]}}
        return self._stage2[beta]

    def pool(self) -> dict:
        """Per prompt id: the stored samples as (prompt token ids, response token ids, raw reward, token log-probs
        under pi_ref and under q)."""
        if self._pool is None:
            from disa.generation import encode_prompt
            from disa.scoring import score_token_logprobs
            from disa.testbed import encode_texts

            tok, cols = self.setup["tokenizer"], self.samples["columns"]
            prompt_ids = [encode_prompt(tok, p) for p in cols["prompt"]]
            response_ids = [ids + ([tok.eos_token_id] if fin == "eos" else [])
                            for ids, fin in zip(encode_texts(tok, cols["response"]), cols["finish_reason"])]
            scored = {name: score_token_logprobs(self.setup[name], prompt_ids, response_ids, pad_id=tok.pad_token_id,
                                                 batch_size=64) for name in ("ref", "proposal")}
            pool = collections.defaultdict(list)
            for j, pid in enumerate(cols["prompt_id"]):
                pool[pid].append((prompt_ids[j], response_ids[j], float(cols["reward"][j]),
                                  scored["ref"][j].float(), scored["proposal"][j].float()))
            self._pool = dict(pool)
        return self._pool


# ==================================================================================================
# Stage 3 under a regime
# ==================================================================================================
def regime_trainer_class():
    """``RLTrainer`` whose rollout batch follows the regime: drawn from a stale copy of the policy, and/or with
    some rows of each group replaced by stored Stage 1 samples (their ``old_logp`` is log q, so FlowRL's clipped
    trajectory weight ``min(pi_theta / old, 10)`` is the importance weight to the current policy). The log Z
    source then sees the merged group, exactly as it would a collector's."""
    from disa.log_z import LogZRequest
    from disa.objectives import ObjectiveNeeds
    from disa.training.collector import RolloutCollector
    from disa.training.models import pad_rows
    from disa.training.rl import RLTrainer
    from disa.training.rollouts import Rollouts

    class RegimeTrainer(RLTrainer):
        def __init__(self, *args, staleness: int = 0, replay: Optional[dict] = None, replay_per_group: int = 0, **kw):
            super().__init__(*args, **kw)
            cfg = self.config
            if not 0 <= replay_per_group <= cfg.group_size or (replay_per_group and replay is None):
                raise ValueError(f"replay_per_group must be in [0, {cfg.group_size}] with a replay pool")
            self.staleness, self.replay, self.n_replay = staleness, replay, replay_per_group
            n_on = cfg.group_size - replay_per_group
            self.on_collector = None if n_on == 0 else RolloutCollector(
                self.engine, self.collector.reward_fn, self.prompts, reference=self.collector.reference, log_z=None,
                transform=self.collector.transform, needs=ObjectiveNeeds({"ref_logp"}), old_logp_pass=True,
                beta=self.target.beta, config=dataclasses.replace(cfg, group_size=n_on))
            self.snapshots: collections.deque = collections.deque(maxlen=staleness + 1)
            self.behaviour = copy.deepcopy(self.policy).requires_grad_(False) if staleness else None

        def behaviour_policy(self):
            if not self.staleness:
                return self.policy
            self.snapshots.append({k: v.detach().clone() for k, v in self.policy.state_dict().items()})
            self.behaviour.load_state_dict(self.snapshots[0])  # max(0, t - k) updates old
            return self.behaviour

        def collect_rollouts(self, prompt_indices, seed=None):
            cfg, G, k = self.config, self.config.group_size, self.n_replay
            on = self.on_collector.collect(self.behaviour_policy(), prompt_indices, seed) if self.on_collector else None
            g = torch.Generator().manual_seed(int(seed or 0) + 17)
            rows = []  # (prompt index, prompt ids, response ids, raw reward, ref logp, old logp, text, finish)
            for j, i in enumerate(prompt_indices):
                if on is not None:
                    n_on = G - k
                    for r in range(j * n_on, (j + 1) * n_on):
                        n = len(on.response_ids[r])
                        rows.append((i, on.prompt_ids[r], on.response_ids[r], float(on.raw_rewards[r]),
                                     on.ref_logp[r, :n], on.old_logp[r, :n], on.completions[r], on.finish_reasons[r]))
                stored = self.replay[self.prompts[i]["id"]] if k else []
                for s in torch.randperm(len(stored), generator=g)[:k].tolist():
                    p_ids, r_ids, reward, ref, q = stored[s]
                    rows.append((i, p_ids, r_ids, reward, ref, q, "", "replay"))
            width = max(len(r[2]) for r in rows)
            ids = [self.prompts[i]["id"] for i in prompt_indices]
            raw = torch.tensor([r[3] for r in rows], dtype=torch.float32).view(len(prompt_indices), G)
            rewards = self.collector.transform(raw, ids).flatten()
            mask = pad_rows([torch.ones(len(r[2])) for r in rows], width).bool()
            ref = pad_rows([r[4] for r in rows], width)
            old = pad_rows([r[5] for r in rows], width)
            log_z = None
            if self.log_z is not None:
                log_z = self.log_z.rollout_log_z(LogZRequest(
                    prompt_ids=ids, prompt_texts=[self.prompts[i]["text"] for i in prompt_indices], group_size=G,
                    beta=self.target.beta, rewards=rewards, mask=mask, ref_logp=ref, old_logp=old,
                    length_normalized=self.objective.needs.length_normalized))
            from disa.estimators import group_normalize

            return Rollouts(prompt_index=[r[0] for r in rows], prompt_ids=[r[1] for r in rows],
                            response_ids=[r[2] for r in rows], completions=[r[6] for r in rows],
                            finish_reasons=[r[7] for r in rows], raw_rewards=raw.flatten(), rewards=rewards,
                            advantages=group_normalize(raw).flatten(), old_logp=old, mask=mask, ref_logp=ref,
                            log_z=log_z)

    return RegimeTrainer


def train_one(regime: Regime, source: str, seed: int, setup: dict, offline: Offline, settings: RegimeSettings,
              work: Path) -> tuple:
    """Train one (regime, source, seed) from a fresh pi_ref; returns ``(policy, history, prompts' truths,
    log Z values the run read (None: computed online), injected eps^2)``."""
    from disa.config import TargetConfig, TrainConfig
    from disa.log_z import LogZTable
    from disa.verifiers import get_verifier

    truths = offline.truths if regime.all_prompts else setup["truths"][:settings.train_prompts]
    st2 = offline.stage2(regime.beta)
    index = {t.id: i for i, t in enumerate(offline.truths)}
    rows = [index[t.id] for t in truths]
    values, eps2 = None, 0.0
    if source == "exact":
        values = st2["exact"][rows]
    elif source == "labels":
        values = st2["labels"][rows]
    elif source == "injected":
        values, eps2 = injected_log_z(st2["exact"][rows], *regime.log_z_error, seed=seed + 1000)
    given = None
    if values is not None:
        given = LogZTable({t.id: float(v) for t, v in zip(truths, values)})
    elif source == "regressor":
        given = st2["frozen"]
    objective, log_z = SOURCE_CONFIGS[source]
    steps = settings.num_steps
    if regime.visits is not None:
        steps = max(1, math.ceil(regime.visits * len(truths) / settings.prompts_per_step))
    train = TrainConfig(
        objective=objective, log_z=log_z, group_size=settings.group_size,
        objective_kwargs={"length_normalize": regime.length_normalize, "rollout_weight_mode": regime.weight_mode},
        prompts_per_step=settings.prompts_per_step, num_steps=steps, updates_per_batch=1,
        micro_batch_size=settings.micro_batch_size, lr=settings.lr, logz_lr=settings.logz_lr,
        max_new_tokens=settings.max_new_tokens, generation_batch_size=settings.prompts_per_step, save_every=0,
        keep_checkpoints=1, seed=seed, report_to="none")
    trainer = regime_trainer_class()(
        setup["testbed"].load_ref(), setup["ref"], setup["tokenizer"], [{"id": t.id, "text": t.text} for t in truths],
        get_verifier("countdown"), train, output_dir=str(work), target=TargetConfig(beta=regime.beta, reward_transform="raw"),
        log_z=given, staleness=regime.staleness, replay=offline.pool() if regime.replay_per_group else None,
        replay_per_group=regime.replay_per_group)
    history = trainer.train()
    return trainer.policy, history, truths, values, eps2


def monte_carlo_residual(policy, setup: dict, truths, exact: np.ndarray, beta: float, n: int, seed: int,
                         max_new_tokens: int, error: Optional[np.ndarray] = None) -> dict:
    """``n`` rollouts per prompt from ``policy``: the mean residual and mean squared residual under the exact log Z
    (trajectory level; ``E_pi[res] = KL(pi || pi*)``, ``E_pi[res^2] = 0`` iff ``pi = pi*``), and with ``error`` (a
    prompt-level log Z error) the squared residual under ``exact + error``."""
    from disa.generation.hf import HFGenerator
    from disa.scoring import score_token_logprobs
    from disa.verifiers import get_verifier

    tok = setup["tokenizer"]
    groups = HFGenerator(policy, tok, batch_size=32, device=None, progress=False).generate(
        [t.text for t in truths], n, max_new_tokens=max_new_tokens, seed=seed)
    flat = [(i, s) for i, g in enumerate(groups) for s in g]
    p_ids, r_ids = [s.prompt_ids for _, s in flat], [s.response_ids for _, s in flat]
    lp = torch.stack([t.double().sum() for t in score_token_logprobs(policy, p_ids, r_ids, pad_id=tok.pad_token_id,
                                                                      batch_size=64)]).numpy()
    lr = torch.stack([t.double().sum() for t in score_token_logprobs(setup["ref"], p_ids, r_ids,
                                                                      pad_id=tok.pad_token_id, batch_size=64)]).numpy()
    reward = np.array(get_verifier("countdown")([truths[i].text for i, _ in flat], [s.text for _, s in flat]))
    prompt = np.array([i for i, _ in flat])
    res = np.asarray(exact)[prompt] + lp - beta * (reward >= 1.0) - lr
    out = {"residual_mean": float(res.mean()), "residual_sq": float(np.mean(res**2))}
    if error is not None:
        out["residual_sq_injected"] = float(np.mean((res + np.asarray(error)[prompt]) ** 2))
    return out


def score_policy(policy, truths, beta: float, k: int, tokenizer) -> dict:
    """Exact metrics (mean over prompts) and exact pass@k from each prompt's P(correct)."""
    from disa.testbed import correct_logprobs, exact_metrics, prob_correct

    rows, p = [], []
    policy.eval()
    with torch.inference_mode():
        for t in truths:
            logp = correct_logprobs(policy, tokenizer, t.text, t.responses)
            rows.append(exact_metrics(logp, t.ref_logp, t.strategy_labels, beta, k=k))
            p.append(prob_correct(logp))
    out = {key: float(np.mean([r[key] for r in rows])) for key in ("p_correct", "kl_target_policy", "tv_correct", "tv",
                                                                   "p_correct_target")}
    out.update({f"pass@{kk}": v for kk, v in zip(PASS_KS, exact_pass_at_k(p))})
    return out


def run_one(regime: Regime, source: str, seed: int, setup: dict, offline: Offline, settings: RegimeSettings,
            out: Path) -> dict:
    """One finished run as a dict (cached in ``<out>/runs/<slug>/<source>/seed<k>.json``)."""
    from disa.io import atomic_write_json, json_safe

    done = out / "runs" / regime.slug / source / f"seed{seed}.json"
    key = json_safe({"regime": dataclasses.asdict(regime), "settings": dataclasses.asdict(settings), "seed": seed,
                     "source": source, "version": 1})
    if done.exists():
        saved = json.loads(done.read_text())
        if saved["key"] == key:
            return saved["result"]
    t0 = time.perf_counter()
    work = done.parent / f"work-seed{seed}-{os.getpid()}"  # per process: two processes may race on one run
    policy, history, truths, values, eps2 = train_one(regime, source, seed, setup, offline, settings, work)
    train_s = time.perf_counter() - t0
    st2 = offline.stage2(regime.beta)
    index = {t.id: i for i, t in enumerate(offline.truths)}
    exact = st2["exact"][[index[t.id] for t in truths]]
    error = None if values is None else values - exact
    result = {"regime": regime.regime, "setting": regime.setting, "source": source, "seed": seed,
              **score_policy(policy, truths, regime.beta, settings.k, setup["tokenizer"]),
              **monte_carlo_residual(policy, setup, truths, exact, regime.beta, settings.residual_samples,
                                     seed + 4242, settings.max_new_tokens, error),
              "final_loss": float(np.mean([r["loss"] for r in history[-max(1, len(history) // 5):]])),
              "steps": len(history), "prompts": len(truths), "injected_mse": eps2,
              **st2["diagnostics"], "train_s": train_s}
    if regime.log_z_error is not None:
        result["prop4_envelope"] = prop4_envelope(result["residual_sq"], eps2)
    shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(done, {"key": key, "result": result})
    _say(f"{regime.regime:8s} {regime.setting:28s} {source:9s} seed {seed}: KL {result['kl_target_policy']:.3f} "
         f"acc {result['p_correct']:.3f} TVc {result['tv_correct']:.3f} pass@256 {result['pass@256']:.3f} "
         f"res^2 {result['residual_sq']:.2f} ({train_s:.0f}s)")
    return result


# ==================================================================================================
# the study
# ==================================================================================================
METRIC_COLUMNS = ["p_correct", "kl_target_policy", "tv_correct", "pass@1", "pass@16", "pass@256", "residual_sq",
                  "final_loss"]


def run(out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0, seeds: int = 3, build_threads=None,
        settings: Optional[RegimeSettings] = None, regimes: Optional[Sequence[Regime]] = None,
        only: Optional[Sequence[str]] = None) -> dict:
    """Every regime x source x seed (``seed .. seed + seeds - 1``); ``only``: run just these regime names (the
    table is still written from every finished run on disk). Writes ``results.json``, ``results.md`` and PNGs."""
    from disa.studies.common import testbed_setup

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    settings = settings or (QUICK_SETTINGS if quick else FULL_SETTINGS)
    regimes = list(regimes or (quick_regimes(settings.group_size) if quick else full_regimes(settings.group_size)))
    bad = [r.setting for r in regimes if r.replay_per_group > min(settings.group_size, settings.n_samples)]
    if bad:
        raise ValueError(f"regimes {bad}: replay_per_group exceeds group_size / n_samples of the settings")
    out = Path(out_dir)
    started = time.perf_counter()
    setup = testbed_setup(quick, cache_dir, eval_truths=True, build_threads=build_threads)
    offline = {s: Offline(setup, settings, out, s) for s in range(seed, seed + seeds)}
    _say(f"stage 1 done for seeds {list(offline)}")
    per_seed = []
    for s in offline:
        rows = []
        for regime in regimes:
            for source in regime.sources:
                if only is not None and regime.regime not in only:
                    cached = _cached(out, regime, source, s)
                    if cached is None:
                        continue
                    rows.append(cached)
                else:
                    rows.append(run_one(regime, source, s, setup, offline[s], settings, out))
        per_seed.append(rows)
    results = summarise(per_seed, regimes, settings, quick, seeds)
    results["wall_s"] = time.perf_counter() - started
    write_outputs(out, results)
    return results


def _cached(out: Path, regime: Regime, source: str, seed: int) -> Optional[dict]:
    done = out / "runs" / regime.slug / source / f"seed{seed}.json"
    return json.loads(done.read_text())["result"] if done.exists() else None


def summarise(per_seed: list[list[dict]], regimes, settings: RegimeSettings, quick: bool, seeds: int) -> dict:
    """Mean and sample std over seeds per (regime, setting, source), and each row's KL gap to the exact log Z."""
    from disa.studies.pipeline import mean_over_seeds

    keys = [{(r["regime"], r["setting"], r["source"]) for r in rows} for rows in per_seed]
    common = set.intersection(*keys) if keys else set()
    aligned = [sorted((r for r in rows if (r["regime"], r["setting"], r["source"]) in common),
                      key=lambda r: _order(regimes, r)) for rows in per_seed]
    rows = mean_over_seeds(aligned, keep=("regime", "setting", "source", "seed"))
    for r in rows:
        r.pop("seed", None)
    for seed_rows in aligned:  # per-seed gap, so that its spread is the paired one
        for r in seed_rows:
            ref = next((x for x in seed_rows if (x["regime"], x["setting"], x["source"]) ==
                        (r["regime"], r["setting"], "exact")), None)
            r["_gap"] = r["kl_target_policy"] - ref["kl_target_policy"] if ref is not None else float("nan")
    for i, r in enumerate(rows):
        gaps = np.array([seed_rows[i]["_gap"] for seed_rows in aligned])
        r["kl_gap_vs_exact"] = float(gaps.mean())
        r["kl_gap_vs_exact_std"] = float(gaps.std(ddof=1)) if gaps.size > 1 else 0.0
    return {"testbed": "quick" if quick else "full", "seeds": seeds, "settings": dataclasses.asdict(settings),
            "regimes": [dataclasses.asdict(r) for r in regimes], "rows": rows,
            "per_seed": [[{k: v for k, v in r.items() if k != "_gap"} for r in s] for s in aligned]}


def _order(regimes, row) -> tuple:
    for i, reg in enumerate(regimes):
        if (reg.regime, reg.setting) == (row["regime"], row["setting"]):
            return (i, reg.sources.index(row["source"]))
    return (len(regimes), 0)


def dial_rows(rows: Sequence[dict]) -> list[dict]:
    """The dial's rows, with its zero-error points: where no ``b=+0 sd=0`` run exists, the ``exact`` source's run of
    the baseline (on-policy) and of fully offline ``w = 1`` replay (offline) are the same training."""
    dial = [dict(r) for r in rows if r["regime"] == "dial"]
    for mode, (regime, marker) in (("on-policy", ("baseline", "")), ("offline", ("replay", "w=1"))):
        if any(r["setting"].startswith(f"{mode} b=+0 sd=0") for r in dial):
            continue
        for r in rows:
            if r["regime"] == regime and marker in r["setting"] and r["source"] == "exact":
                zero = {**r, "regime": "dial", "setting": f"{mode} b=+0 sd=0 (= {regime} exact)", "source": "injected",
                        "injected_mse": 0.0, "injected_mse_std": 0.0, "residual_sq_injected": r["residual_sq"],
                        "residual_sq_injected_std": r.get("residual_sq_std", 0.0), "prop4_envelope": r["residual_sq"],
                        "prop4_envelope_std": r.get("residual_sq_std", 0.0)}
                dial.insert(0, zero)
    return sorted(dial, key=lambda r: (not r["setting"].startswith("on-policy"), r["injected_mse"]))


def write_outputs(out: Path, results: dict) -> None:
    from disa.studies.common import write_results
    from disa.studies.pipeline import display_rows, seeds_note

    rows, seeds = results["rows"], results["seeds"]
    try:
        plot_map(out, results)
    except Exception as e:  # plots are a convenience: never lose the numbers over them
        _say(f"plots skipped: {e}")
    main = [r for r in rows if r["regime"] != "dial"]
    dial = dial_rows(rows)
    cols = ["regime", "setting", "source", "kl_target_policy", "kl_gap_vs_exact", "tv_correct", "p_correct",
            "pass@1", "pass@16", "pass@256", "residual_sq", "stage2_val_mse", "regressor_rmse_vs_exact"]
    dcols = ["setting", "injected_mse", "kl_target_policy", "p_correct", "pass@256", "residual_sq",
             "residual_sq_injected", "prop4_envelope", "final_loss"]
    s = results["settings"]
    write_results(out, "the regime map: where the source of log Z matters", results, {
        f"every regime and source ({seeds_note(seeds)})": (display_rows(main, cols, seeds), cols),
        f"the log Z error dial ({seeds_note(seeds)})": (display_rows(dial, dcols, seeds), dcols)},
        f"{results['testbed']} testbed; {s['num_steps']} steps of {s['prompts_per_step']} prompts x {s['group_size']} "
        f"rollouts, lr {s['lr']}, N = {s['n_samples']} Stage 1 samples per prompt. KL, TV and pass@k are exact; "
        f"residual_sq is a Monte Carlo mean of the squared trajectory residual under the exact log Z "
        f"({s['residual_samples']} rollouts per prompt). kl_gap_vs_exact: KL minus the exact-log-Z run's, per seed.")


def plot_map(out: Path, results: dict) -> None:
    from disa.studies.common import legend_below, new_figure, save_figure

    rows = results["rows"]
    settings = [(r["regime"], r["setting"]) for r in rows if r["regime"] != "dial"]
    settings = list(dict.fromkeys(settings))
    sources = [s for s in SOURCES if any(r["source"] == s for r in rows)]
    if settings:
        plt, fig, ax = new_figure(1, height=4.2)
        fig.set_size_inches(9, 4.2)
        width = 0.8 / max(1, len(sources))
        for j, src in enumerate(sources):
            xs, ys, es = [], [], []
            for i, st in enumerate(settings):
                r = next((r for r in rows if (r["regime"], r["setting"]) == st and r["source"] == src), None)
                if r is not None:
                    xs.append(i + (j - (len(sources) - 1) / 2) * width)
                    ys.append(r["kl_gap_vs_exact"])
                    es.append(r.get("kl_gap_vs_exact_std", 0.0))
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=src)
            for x, y, e in zip(xs, ys, es):  # a bar beyond the axis: its value written at the edge
                if abs(y) > KL_GAP_AXIS:
                    ax.text(x, math.copysign(KL_GAP_AXIS * 0.93, y), f"{y:+.2f}\n±{e:.2f}", fontsize=5, ha="center")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylim(-KL_GAP_AXIS, KL_GAP_AXIS)
        ax.set_xticks(range(len(settings)), [f"{a}\n{b}" for a, b in settings], fontsize=6, rotation=30, ha="right")
        ax.set(ylabel="KL(pi*||pi) minus the exact log Z run's",
               title="KL gap to the exact log Z, per regime and source (paired by seed, ± std)")
        ax.legend(fontsize=7, ncol=3, frameon=False)
        save_figure(plt, fig, out / "regimes_kl.png")

        plt, fig, ax = new_figure(1, height=3.6)
        fig.set_size_inches(9, 3.6)
        for j, src in enumerate(sources):
            xs, ys = [], []
            for i, st in enumerate(settings):
                r = next((r for r in rows if (r["regime"], r["setting"]) == st and r["source"] == src), None)
                if r is not None:
                    xs.append(i + (j - (len(sources) - 1) / 2) * width)
                    ys.append(r["pass@256"] - r["pass@1"])
            ax.bar(xs, ys, width, label=src)
        ax.set_xticks(range(len(settings)), [f"{a}\n{b}" for a, b in settings], fontsize=6, rotation=30, ha="right")
        ax.set(ylabel="pass@256 - pass@1 (exact)", title="what large k adds, per regime and source")
        ax.legend(fontsize=7, ncol=3, frameon=False)
        save_figure(plt, fig, out / "regimes_passk.png")
    dial = dial_rows(rows)
    if dial:
        plt, fig, (a0, a1) = new_figure(2, height=3.6)
        for mode, marker, color in (("on-policy", "o", "C0"), ("offline", "s", "C1")):
            d = sorted((r for r in dial if r["setting"].startswith(mode)), key=lambda r: r["injected_mse"])
            if not d:
                continue
            a0.errorbar([r["injected_mse"] for r in d], [r["kl_target_policy"] for r in d],
                        yerr=[r.get("kl_target_policy_std", 0.0) for r in d], fmt=marker, color=color, capsize=2,
                        label=mode)
            a1.plot([r["injected_mse"] for r in d], [r["residual_sq_injected"] for r in d], marker, color=color,
                    label=f"{mode}: measured")
            a1.plot([r["injected_mse"] for r in d], [r["prop4_envelope"] for r in d], marker, color=color, mfc="none",
                    label=f"{mode}: Prop. 4 envelope")
        a0.set(xlabel="injected MSE eps^2 (nats^2)", ylabel="KL(pi* || pi), exact", title="log Z error dial")
        a1.set(xlabel="injected MSE eps^2 (nats^2)", ylabel="squared residual (MC)", title="residual vs Prop. 4")
        legend_below(a0)
        legend_below(a1)
        save_figure(plt, fig, out / "regimes_dial.png")


def run_from_config(cfg, out_dir: str, seeds: int = 1) -> dict:
    raise ValueError("study regimes needs the exact log Z and pi*, which only the testbed has: run `disa study "
                     "regimes` without -c")


def _say(message: str) -> None:
    log.info("regimes: %s", message)
