"""Exact ground truth on the testbed: the partition function, the target distribution and distances to it.

Every correct response of a prompt can be listed (:func:`disa.testbed.task.enumerate_correct`), and with a
binary reward the tilt ``exp(beta * r~)`` takes one value on the correct set and one on its complement.
So scoring the K correct strings (each followed by EOS) under ``pi_ref`` gives ``Z`` exactly:

    P   = sum_{y correct} pi_ref(y|x)
    Z   = (1 - P) * exp(beta * r0) + P * exp(beta * r1)            r~ = r0 if wrong, r1 if right
        = exp(beta * b) * (1 + (exp(beta * a) - 1) * P)             for r~ = a * r + b

``pi*`` is ``pi_ref`` scaled by ``exp(beta * r1) / Z`` on each correct string and by ``exp(beta * r0) / Z``
on the incorrect set, whose inner shape (which wrong string) is that of ``pi_ref``. The metrics below
compare a policy with ``pi*`` on the partition {each correct string} + {all incorrect strings lumped}:
the policy's correct strings are scored exactly, and its incorrect mass is ``1 - P_theta``. Every metric
is a pure function of float64 log-prob vectors of shape ``(K,)`` aligned with one list of correct strings.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from disa.scoring import score_responses
from disa.testbed.task import _as_prompt, enumerate_correct, strategies

RewardValues = tuple[float, float]
BINARY_REWARD: RewardValues = (0.0, 1.0)


def _as_logp(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of log-probs over the correct set, got shape {arr.shape}")
    if np.isnan(arr).any() or (arr > 1e-9).any():
        raise ValueError(f"{name} must hold log-probabilities (<= 0, no NaN)")
    return np.minimum(arr, 0.0)


def _logsumexp(a: np.ndarray) -> float:
    if a.size == 0:
        return -math.inf
    m = float(a.max())
    if m == -math.inf:
        return -math.inf
    return m + math.log(float(np.exp(a - m).sum()))


def _log1mexp(log_p: float) -> float:
    """``log(1 - exp(log_p))`` accurately for ``log_p <= 0`` (Maechler's switch at log 1/2)."""
    if log_p >= 0:
        return -math.inf
    if log_p > -math.log(2):
        return math.log(-math.expm1(log_p))
    return math.log1p(-math.exp(log_p))


def _check_reward_values(reward_values: RewardValues) -> tuple[float, float]:
    if len(reward_values) != 2:
        raise ValueError(f"reward_values must be (r~ if incorrect, r~ if correct), got {reward_values!r}")
    r0, r1 = float(reward_values[0]), float(reward_values[1])
    if not r1 > r0:
        raise ValueError(f"reward_values must reward correct answers more (a > 0), got {reward_values!r}")
    return r0, r1


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------


def correct_logprobs(
    model, tokenizer, prompt, responses: Sequence[str] | None = None, *, batch_size: int = 64
) -> np.ndarray:
    """``log pi(y + EOS | x)`` in float64 for every correct response (default: :func:`enumerate_correct`
    order) of ``prompt`` (a Prompt or prompt string). Shape ``(K,)``."""
    from disa.testbed.models import encode_responses, encode_texts

    p = _as_prompt(prompt)
    responses = enumerate_correct(p) if responses is None else list(responses)
    if not responses:
        return np.zeros(0, dtype=np.float64)
    prompt_ids = encode_texts(tokenizer, [p.text])[0]
    scores = score_responses(
        model,
        [prompt_ids] * len(responses),
        encode_responses(tokenizer, responses),
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
    )
    return np.asarray(scores, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# partition function and target
# --------------------------------------------------------------------------------------------------


def log_z_from_logprobs(ref_logp_correct, beta: float, reward_values: RewardValues = BINARY_REWARD) -> float:
    """Exact ``log Z`` from the reference log-probs of the correct set (see the module docstring)."""
    r0, r1 = _check_reward_values(reward_values)
    log_p = _logsumexp(_as_logp(ref_logp_correct, "ref_logp_correct"))
    return float(np.logaddexp(_log1mexp(log_p) + beta * r0, log_p + beta * r1))


def exact_log_z(model, tokenizer, prompt, beta: float, reward_values: RewardValues = BINARY_REWARD) -> float:
    """Exact ``log Z(x)`` for ``pi_ref = model``, by scoring every correct response of ``prompt``."""
    return log_z_from_logprobs(correct_logprobs(model, tokenizer, prompt), beta, reward_values)


def target_logprobs(
    ref_logp_correct, beta: float, reward_values: RewardValues = BINARY_REWARD
) -> tuple[np.ndarray, float]:
    """``(log pi*(y) for each correct y  (K,), log pi*(incorrect set))``."""
    r0, r1 = _check_reward_values(reward_values)
    ref = _as_logp(ref_logp_correct, "ref_logp_correct")
    log_z = log_z_from_logprobs(ref, beta, reward_values)
    log_incorrect = _log1mexp(_logsumexp(ref)) + beta * r0 - log_z
    return ref + beta * r1 - log_z, float(log_incorrect)


# --------------------------------------------------------------------------------------------------
# metrics (pure, float64)
# --------------------------------------------------------------------------------------------------


def prob_correct(logp_correct) -> float:
    """Probability that a sample is correct: ``sum_y pi(y)`` over the correct set."""
    return float(math.exp(_logsumexp(_as_logp(logp_correct, "logp_correct"))))


def _coarse(logp_correct: np.ndarray) -> tuple[np.ndarray, float]:
    """Coarse-grained distribution: probs of each correct string and the lumped incorrect mass."""
    return np.exp(logp_correct), math.exp(_log1mexp(_logsumexp(logp_correct)))


def coarse_kl_to_target(
    policy_logp_correct, ref_logp_correct, beta: float, reward_values: RewardValues = BINARY_REWARD
) -> float:
    """``KL(pi* || pi_theta)`` over {each correct string} + {incorrect lumped}.

    A lower bound on the full KL (coarse-graining never increases KL); ``inf`` if ``pi_theta`` puts zero
    mass where ``pi*`` puts some.
    """
    theta = _as_logp(policy_logp_correct, "policy_logp_correct")
    star, star_incorrect = target_logprobs(ref_logp_correct, beta, reward_values)
    if theta.shape != star.shape:
        raise ValueError(f"policy_logp_correct {theta.shape} and ref_logp_correct {star.shape} must align")
    theta_incorrect = _log1mexp(_logsumexp(theta))
    kl = 0.0
    for log_s, log_t in [*zip(star.tolist(), theta.tolist()), (star_incorrect, theta_incorrect)]:
        if log_s == -math.inf:
            continue
        if log_t == -math.inf:
            return math.inf
        kl += math.exp(log_s) * (log_s - log_t)
    return max(kl, 0.0)


def total_variation_to_target(
    policy_logp_correct, ref_logp_correct, beta: float, reward_values: RewardValues = BINARY_REWARD
) -> float:
    """Total variation over the same partition:
    ``( sum_{y correct} |pi_theta(y) - pi*(y)| + |pi_theta(incorrect) - pi*(incorrect)| ) / 2``.

    The incorrect set enters as one lumped atom, so this is a lower bound on the full TV (it ignores how
    each policy spreads its mass over wrong strings). In [0, 1].
    """
    theta = _as_logp(policy_logp_correct, "policy_logp_correct")
    star, star_incorrect = target_logprobs(ref_logp_correct, beta, reward_values)
    if theta.shape != star.shape:
        raise ValueError(f"policy_logp_correct {theta.shape} and ref_logp_correct {star.shape} must align")
    p_theta, p_theta_incorrect = _coarse(theta)
    diff = np.abs(p_theta - np.exp(star)).sum() + abs(p_theta_incorrect - math.exp(star_incorrect))
    return float(0.5 * diff)


def correct_set_tv(
    policy_logp_correct, ref_logp_correct, beta: float, reward_values: RewardValues = BINARY_REWARD
) -> float:
    """Total variation between ``pi_theta(. | correct)`` and ``pi*(. | correct)``: how differently the two
    spread their mass over the correct answers, whatever their accuracy (a collapse onto one answer shows here
    even at high accuracy). For a binary reward ``pi*(. | correct) = pi_ref(. | correct)``. In [0, 1]; 1 if
    the policy has no correct mass."""
    theta = _as_logp(policy_logp_correct, "policy_logp_correct")
    star, _ = target_logprobs(ref_logp_correct, beta, reward_values)
    if theta.shape != star.shape:
        raise ValueError(f"policy_logp_correct {theta.shape} and ref_logp_correct {star.shape} must align")
    if theta.size == 0:
        return 0.0
    log_mass = _logsumexp(theta)
    if log_mass == -math.inf:
        return 1.0
    return float(0.5 * np.abs(np.exp(theta - log_mass) - np.exp(star - _logsumexp(star))).sum())


def normalized_correct_entropy(logp_correct) -> float:
    """Entropy of ``pi(. | correct)`` divided by ``log K``: 1 = uniform over the K correct strings, 0 = one
    string. Defined as 0 when K <= 1 or the policy has no correct mass."""
    lp = _as_logp(logp_correct, "logp_correct")
    if lp.size <= 1:
        return 0.0
    log_p = _logsumexp(lp)
    if log_p == -math.inf:
        return 0.0
    cond = lp - log_p
    probs = np.exp(cond)
    mask = probs > 0
    entropy = float(-(probs[mask] * cond[mask]).sum())
    return max(0.0, entropy / math.log(lp.size))


def expected_distinct(probs, k: int) -> float:
    """``sum_i 1 - (1 - p_i)^k``: expected number of distinct items among k i.i.d. samples."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    return float((-np.expm1(k * np.log1p(-np.minimum(p, 1 - 1e-300)))).sum()) if p.size else 0.0


def expected_distinct_correct(logp_correct, k: int) -> float:
    """Expected number of distinct correct strings among k samples from the policy."""
    return expected_distinct(np.exp(_as_logp(logp_correct, "logp_correct")), k)


def strategy_probs(logp_correct, strategy_labels: Sequence[str]) -> dict[str, float]:
    """Probability of each strategy: the sum of its strings' probabilities."""
    lp = _as_logp(logp_correct, "logp_correct")
    if len(strategy_labels) != lp.size:
        raise ValueError(f"strategy_labels has {len(strategy_labels)} entries, logp_correct has {lp.size}")
    totals: dict[str, float] = defaultdict(float)
    for label, value in zip(strategy_labels, np.exp(lp).tolist()):
        totals[label] += value
    return dict(totals)


def expected_distinct_strategies(logp_correct, strategy_labels: Sequence[str], k: int) -> float:
    """Expected number of distinct strategies among the correct answers in k samples."""
    return expected_distinct(list(strategy_probs(logp_correct, strategy_labels).values()), k)


def exact_metrics(
    policy_logp_correct,
    ref_logp_correct,
    strategy_labels: Sequence[str],
    beta: float,
    reward_values: RewardValues = BINARY_REWARD,
    k: int = 8,
) -> dict[str, float]:
    """All exact metrics of one policy on one prompt, plus the same diversity numbers for ``pi*``."""
    star, _ = target_logprobs(ref_logp_correct, beta, reward_values)
    return {
        "log_z": log_z_from_logprobs(ref_logp_correct, beta, reward_values),
        "p_correct": prob_correct(policy_logp_correct),
        "p_correct_target": prob_correct(star),
        "kl_target_policy": coarse_kl_to_target(policy_logp_correct, ref_logp_correct, beta, reward_values),
        "tv": total_variation_to_target(policy_logp_correct, ref_logp_correct, beta, reward_values),
        "tv_correct": correct_set_tv(policy_logp_correct, ref_logp_correct, beta, reward_values),
        "correct_entropy": normalized_correct_entropy(policy_logp_correct),
        "correct_entropy_target": normalized_correct_entropy(star),
        f"distinct_correct@{k}": expected_distinct_correct(policy_logp_correct, k),
        f"distinct_correct@{k}_target": expected_distinct_correct(star, k),
        f"distinct_strategies@{k}": expected_distinct_strategies(policy_logp_correct, strategy_labels, k),
        f"distinct_strategies@{k}_target": expected_distinct_strategies(star, strategy_labels, k),
    }


def policy_metrics(
    policy, ref_model, tokenizer, prompt, beta: float, reward_values: RewardValues = BINARY_REWARD, k: int = 8
) -> dict[str, float]:
    """Score every correct response of ``prompt`` under ``policy`` and ``ref_model`` and return
    :func:`exact_metrics`."""
    p = _as_prompt(prompt)
    table = strategies(p)
    responses = list(table)
    return exact_metrics(
        correct_logprobs(policy, tokenizer, p, responses),
        correct_logprobs(ref_model, tokenizer, p, responses),
        [table[r] for r in responses],
        beta,
        reward_values,
        k,
    )
