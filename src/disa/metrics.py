"""Evaluation metrics: unbiased pass@k, Mean@k, distinct-correct counts, strategy diversity, exact KL/TV.

Pure functions on plain Python sequences / NumPy arrays / torch tensors; nothing here touches a model.
The paper reports math as Mean@8 (mean accuracy of 8 samples per problem), code as pass@1 and pass@16
with the unbiased estimator of Chen et al. (2021), and diversity as the number of distinct solution
strategies among a problem's correct rollouts. On the exact testbed the learned policy is compared with
``pi*`` by total variation and KL.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Optional, Sequence

import numpy as np
import torch


# --------------------------------------------------------------------------- pass@k
def _check_count(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    ``pass@k = 1 - C(n - c, k) / C(n, k)``: the probability that a uniformly drawn ``k``-subset of the
    ``n`` samples holds at least one correct one. The binomial ratio overflows for large ``n``, so it is
    computed as the product ``prod_{i = n - c + 1}^{n} (1 - k / i)``, every factor in ``[0, 1]``.
    """
    n = _check_count("n", n)
    c = _check_count("c", c)
    k = _check_count("k", k, minimum=1)
    if c > n:
        raise ValueError(f"c (number correct) must be <= n (number of samples), got c={c}, n={n}")
    if k > n:
        raise ValueError(f"k must be <= n (number of samples), got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_per_problem(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> np.ndarray:
    """``pass_at_k`` for each problem, shape ``(num_problems,)``; errors name the offending problem index."""
    if len(num_samples) != len(num_correct):
        raise ValueError(
            f"num_samples and num_correct must have the same length, got {len(num_samples)} and {len(num_correct)}"
        )
    out = np.empty(len(num_samples), dtype=np.float64)
    for i, (n, c) in enumerate(zip(num_samples, num_correct)):
        try:
            out[i] = pass_at_k(n, c, k)
        except ValueError as err:
            raise ValueError(f"problem {i}: {err}") from None
    return out


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (the number a paper reports)."""
    if len(num_samples) == 0:
        raise ValueError("num_samples is empty: pass@k needs at least one problem")
    return float(pass_at_k_per_problem(num_samples, num_correct, k).mean())


# --------------------------------------------------------------------------- Mean@k
def _as_row(name: str, index: int, row) -> np.ndarray:
    arr = np.asarray(row, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}[{index}] must be a 1-D sequence of per-sample scores, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}[{index}] has a non-finite score")
    return arr


def mean_at_k_per_problem(correct: Sequence[Sequence[float]], k: Optional[int] = None) -> np.ndarray:
    """Mean accuracy of the first ``k`` samples of each problem, shape ``(num_problems,)``.

    ``correct[i]`` holds problem ``i``'s per-sample scores (bool, 0/1 or a reward in ``[0, 1]``); samples are
    taken in the order given. ``k=None`` uses all of them. A problem with fewer than ``k`` samples is an error
    rather than a silently smaller average.
    """
    if k is not None:
        k = _check_count("k", k, minimum=1)
    out = np.empty(len(correct), dtype=np.float64)
    for i, row in enumerate(correct):
        arr = _as_row("correct", i, row)
        if arr.size == 0:
            raise ValueError(f"correct[{i}] has no samples")
        if k is not None and arr.size < k:
            raise ValueError(f"correct[{i}] has {arr.size} samples, fewer than k={k}")
        out[i] = arr[:k].mean() if k is not None else arr.mean()
    return out


def mean_at_k(correct: Sequence[Sequence[float]], k: Optional[int] = None) -> float:
    """Mean@k: per-problem mean accuracy over ``k`` samples, averaged over problems (the paper's math metric)."""
    if len(correct) == 0:
        raise ValueError("correct is empty: Mean@k needs at least one problem")
    return float(mean_at_k_per_problem(correct, k).mean())


# --------------------------------------------------------------------------- diversity
def _correct_items(name: str, items: Sequence[Hashable], correct: Sequence) -> list:
    if len(items) != len(correct):
        raise ValueError(f"{name} and correct must have the same length, got {len(items)} and {len(correct)}")
    return [item for item, ok in zip(items, correct) if bool(ok)]


def distinct_correct(completions: Sequence[Hashable], correct: Sequence) -> int:
    """Number of distinct correct responses of one problem (duplicates of one answer string count once)."""
    return len(set(_correct_items("completions", completions, correct)))


def normalized_entropy(labels: Sequence[Hashable]) -> float:
    """Entropy of the empirical label distribution divided by ``log(len(labels))``, in ``[0, 1]``.

    1 when every item has its own label, 0 when all share one; 0 for fewer than two items (no spread is
    possible). Normalising by the item count, not the label count, keeps "2 labels over 8 items" below
    "8 labels over 8 items".
    """
    m = len(labels)
    if m < 2:
        return 0.0
    counts = np.fromiter(Counter(labels).values(), dtype=np.float64)
    p = counts / m
    return float(-(p * np.log(p)).sum() / math.log(m))


def strategy_diversity(strategies: Sequence[Hashable], correct: Sequence) -> dict[str, float]:
    """Diversity of one problem's correct samples given a strategy label per sample.

    Returns ``num_correct``, ``num_strategies`` (distinct strategies among correct samples) and
    ``strategy_entropy`` (``normalized_entropy`` of the correct samples' strategies).
    """
    labels = _correct_items("strategies", strategies, correct)
    return {
        "num_correct": float(len(labels)),
        "num_strategies": float(len(set(labels))),
        "strategy_entropy": normalized_entropy(labels),
    }


def diversity_summary(strategies: Sequence[Sequence[Hashable]], correct: Sequence[Sequence]) -> dict[str, float]:
    """``strategy_diversity`` averaged over problems, plus the fraction of problems with >= 2 strategies.

    ``strategies[i]`` and ``correct[i]`` are problem ``i``'s per-sample labels and correctness flags.
    """
    if len(strategies) != len(correct):
        raise ValueError(f"strategies and correct must list the same problems, got {len(strategies)} and {len(correct)}")
    if len(strategies) == 0:
        raise ValueError("strategies is empty: diversity needs at least one problem")
    rows = []
    for i, (labels, ok) in enumerate(zip(strategies, correct)):
        try:
            rows.append(strategy_diversity(labels, ok))
        except ValueError as err:
            raise ValueError(f"problem {i}: {err}") from None
    return {
        "mean_num_correct": float(np.mean([r["num_correct"] for r in rows])),
        "mean_num_strategies": float(np.mean([r["num_strategies"] for r in rows])),
        "mean_strategy_entropy": float(np.mean([r["strategy_entropy"] for r in rows])),
        "frac_multi_strategy": float(np.mean([r["num_strategies"] >= 2 for r in rows])),
    }


# --------------------------------------------------------------------------- exact distances (testbed)
def _check_distributions(p, q, atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape or p.dim() == 0:
        raise ValueError(f"p and q must be probability vectors of the same shape (..., K), got {tuple(p.shape)} and {tuple(q.shape)}")
    for name, t in (("p", p), ("q", q)):
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative")
        worst = float((t.sum(dim=-1) - 1).abs().max())
        if worst > atol:
            raise ValueError(f"{name} must sum to 1 over its last dimension (off by {worst:.3g})")
    return p, q


def total_variation(p, q, atol: float = 1e-6) -> torch.Tensor:
    """``TV(p, q) = 0.5 * sum_y |p(y) - q(y)|`` over the last dimension: ``(..., K) -> (...)``, in ``[0, 1]``."""
    p, q = _check_distributions(p, q, atol)
    return 0.5 * (p - q).abs().sum(dim=-1)


def kl_divergence(p, q, atol: float = 1e-6) -> torch.Tensor:
    """``KL(p || q) = sum_y p(y) log(p(y) / q(y))`` over the last dimension: ``(..., K) -> (...)``.

    Terms with ``p(y) = 0`` contribute 0; ``p(y) > 0 = q(y)`` makes it ``inf`` (no absolute continuity).
    """
    p, q = _check_distributions(p, q, atol)
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(dim=-1)


# --------------------------------------------------------------------------- uncertainty and curves
def percentile_interval(statistics: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap statistics (percentile method, linear interpolation)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    stats = np.asarray(statistics, dtype=np.float64)
    if stats.ndim != 1 or stats.size == 0:
        raise ValueError("statistics must be a non-empty 1-D sequence")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_indices(num_problems: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """``(num_resamples, num_problems)`` problem indices drawn with replacement; one draw shared by every
    metric of an evaluation so that their intervals come from the same resampled problem sets."""
    num_problems = _check_count("num_problems", num_problems, minimum=1)
    num_resamples = _check_count("num_resamples", num_resamples, minimum=1)
    return np.random.default_rng(seed).integers(0, num_problems, size=(num_resamples, num_problems))


def bootstrap_ci(
    per_problem: Sequence[float],
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    indices: Optional[np.ndarray] = None,
) -> dict[str, float]:
    """Mean of per-problem scores with a percentile bootstrap interval over problems.

    Problems, not samples, are resampled: the paper's benchmarks have few problems (AIME: 30), and that is
    where the uncertainty of a Mean@k or pass@k lies. Returns ``{"mean", "lo", "hi", "std"}`` (``std``: the
    bootstrap standard error). ``indices`` (from :func:`bootstrap_indices`) overrides the draw.
    """
    values = np.asarray(per_problem, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("per_problem must be a non-empty 1-D sequence of per-problem scores")
    if not np.all(np.isfinite(values)):
        raise ValueError("per_problem has a non-finite score")
    if indices is None:
        indices = bootstrap_indices(values.size, num_resamples, seed)
    elif indices.ndim != 2 or indices.shape[1] != values.size:
        raise ValueError(f"indices must have shape (resamples, {values.size}), got {indices.shape}")
    means = values[indices].mean(axis=1)
    lo, hi = percentile_interval(means, confidence)
    return {"mean": float(values.mean()), "lo": lo, "hi": hi, "std": float(means.std(ddof=1)) if means.size > 1 else 0.0}


def pass_at_k_curve(num_samples: Sequence[int], num_correct: Sequence[int], max_k: Optional[int] = None) -> np.ndarray:
    """Mean unbiased pass@k for k = 1 .. ``max_k`` (default: the smallest sample count), shape ``(max_k,)``.

    Index ``k - 1`` holds pass@k. Computing all of them from one set of ``n`` samples is how the paper draws
    pass@k curves up to k = N without drawing new samples for each k.
    """
    if len(num_samples) == 0:
        raise ValueError("num_samples is empty: a pass@k curve needs at least one problem")
    limit = min(int(n) for n in num_samples)
    max_k = limit if max_k is None else _check_count("max_k", max_k, minimum=1)
    if max_k > limit:
        raise ValueError(f"max_k={max_k} exceeds the smallest per-problem sample count {limit}")
    return np.array([mean_pass_at_k(num_samples, num_correct, k) for k in range(1, max_k + 1)])


def macro_average(per_benchmark: dict[str, float]) -> float:
    """Unweighted mean over benchmarks (the paper's "Avg" column: each benchmark counts once, whatever its size)."""
    if not per_benchmark:
        raise ValueError("per_benchmark is empty")
    return float(np.mean([float(v) for v in per_benchmark.values()]))


# --------------------------------------------------------------------------- checkpoint selection
def held_out_slice(ids: Sequence[str], size: int, seed: int = 0) -> list[str]:
    """``size`` prompt ids drawn without replacement by a seeded permutation (sorted input order first, so the
    slice depends on the id set, not the file order); the same slice for every method of a comparison."""
    size = _check_count("size", size, minimum=1)
    unique = sorted(set(ids))
    if size > len(unique):
        raise ValueError(f"held-out slice of {size} prompts asked from {len(unique)} distinct ids")
    order = np.random.default_rng(seed).permutation(len(unique))[:size]
    return [unique[i] for i in sorted(order)]


def select_checkpoint(scores: dict[int, float]) -> int:
    """The step with the highest held-out score; ties go to the earliest step (less training, same score).

    One rule for every method (App. D.1): the score is the held-out Mean@k, never a test-set number.
    """
    if not scores:
        raise ValueError("no checkpoint scores to select from")
    bad = {s: v for s, v in scores.items() if not math.isfinite(float(v))}
    if bad:
        raise ValueError(f"non-finite held-out score for step(s) {sorted(bad)}")
    best = max(float(v) for v in scores.values())
    return min(int(s) for s, v in scores.items() if float(v) == best)
