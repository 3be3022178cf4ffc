"""disa.metrics: pass@k against brute-force subset enumeration, Mean@k, diversity, exact KL/TV."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from disa.metrics import (
    distinct_correct,
    diversity_summary,
    kl_divergence,
    mean_at_k,
    mean_at_k_per_problem,
    mean_pass_at_k,
    normalized_entropy,
    pass_at_k,
    pass_at_k_per_problem,
    strategy_diversity,
    total_variation,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_form_and_known_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(16, 1, 16) == 1.0
    # 1 - C(n-c, k) / C(n, k) with exact integers
    assert pass_at_k(20, 4, 6) == pytest.approx(1 - math.comb(16, 6) / math.comb(20, 6), rel=1e-13)


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 100) overflows float64; the product form does not.
    value = pass_at_k(2000, 7, 100)
    exact = 1 - math.comb(1993, 100) / math.comb(2000, 100)  # Python ints, exact ratio then float
    assert math.isfinite(value)
    assert value == pytest.approx(exact, rel=1e-10)


def test_pass_at_k_monotone_in_k_and_c():
    values_k = [pass_at_k(16, 3, k) for k in range(1, 17)]
    assert all(a <= b + 1e-15 for a, b in zip(values_k, values_k[1:]))
    values_c = [pass_at_k(16, c, 4) for c in range(17)]
    assert all(a <= b + 1e-15 for a, b in zip(values_c, values_c[1:]))


@pytest.mark.parametrize(
    "n, c, k, match",
    [
        (5, 2, 6, "k must be <= n"),
        (5, 6, 1, "c .* must be <= n"),
        (-1, 0, 1, "n must be >= 0"),
        (5, -1, 1, "c must be >= 0"),
        (5, 2, 0, "k must be >= 1"),
        (5, 2, -3, "k must be >= 1"),
        (5.0, 2, 1, "n must be an integer"),
        (5, True, 1, "c must be an integer"),
    ],
)
def test_pass_at_k_rejects_bad_counts(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_pass_at_k_per_problem_and_mean():
    per = pass_at_k_per_problem([4, 4, 6], [0, 1, 6], k=2)
    assert per.shape == (3,)
    np.testing.assert_allclose(per, [0.0, 0.5, 1.0], atol=1e-12)
    assert mean_pass_at_k([4, 4, 6], [0, 1, 6], k=2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="problem 1: c"):
        pass_at_k_per_problem([4, 4], [1, 5], k=1)
    with pytest.raises(ValueError, match="same length"):
        pass_at_k_per_problem([4, 4], [1], k=1)
    with pytest.raises(ValueError, match="empty"):
        mean_pass_at_k([], [], k=1)


def test_pass_at_1_equals_mean_accuracy():
    rng = np.random.default_rng(0)
    correct = rng.random((7, 9)) < 0.4
    p1 = mean_pass_at_k([9] * 7, correct.sum(axis=1).tolist(), k=1)
    assert p1 == pytest.approx(mean_at_k(correct.tolist()), abs=1e-12)


def test_mean_at_k():
    correct = [[1, 0, 1, 1], [0, 0, 0, 1], [True, True, False, False]]
    np.testing.assert_allclose(mean_at_k_per_problem(correct), [0.75, 0.25, 0.5])
    assert mean_at_k(correct) == pytest.approx(0.5)
    # k uses the first k samples of each problem
    np.testing.assert_allclose(mean_at_k_per_problem(correct, k=2), [0.5, 0.0, 1.0])
    assert mean_at_k(correct, k=2) == pytest.approx(0.5)
    assert mean_at_k([[0.5, 1.0]], k=2) == pytest.approx(0.75)  # real-valued rewards average too


def test_mean_at_k_errors():
    with pytest.raises(ValueError, match=r"correct\[1\] has 2 samples, fewer than k=3"):
        mean_at_k([[1, 0, 1], [1, 0]], k=3)
    with pytest.raises(ValueError, match=r"correct\[0\] has no samples"):
        mean_at_k([[]])
    with pytest.raises(ValueError, match=r"correct\[0\] has a non-finite"):
        mean_at_k([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="empty"):
        mean_at_k([])
    with pytest.raises(ValueError, match="k must be >= 1"):
        mean_at_k([[1]], k=0)


def test_distinct_correct_counts_unique_correct_strings():
    completions = ["3*7+5", "5+7*3", "3*7+5", "9-1", "wrong"]
    correct = [1, 1, 1, 0, 1]
    assert distinct_correct(completions, correct) == 3  # "3*7+5" twice counts once; "9-1" is wrong
    assert distinct_correct(completions, [0] * 5) == 0
    with pytest.raises(ValueError, match="same length"):
        distinct_correct(completions, [1, 1])


def test_normalized_entropy():
    assert normalized_entropy([]) == 0.0
    assert normalized_entropy(["a"]) == 0.0
    assert normalized_entropy(["a"] * 5) == 0.0
    assert normalized_entropy(list("abcd")) == pytest.approx(1.0)
    # 2 labels over 4 items, counts (3, 1): H = -(.75 ln .75 + .25 ln .25), normalised by ln 4
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert normalized_entropy(["a", "a", "a", "b"]) == pytest.approx(expected, rel=1e-12)


def test_strategy_diversity_and_summary():
    strategies = ["s1", "s1", "s2", "s3", "s3"]
    correct = [True, True, True, False, True]
    out = strategy_diversity(strategies, correct)
    assert out["num_correct"] == 4
    assert out["num_strategies"] == 3  # s1, s2, s3 among the correct samples
    counts = np.array([2, 1, 1]) / 4
    assert out["strategy_entropy"] == pytest.approx(-(counts * np.log(counts)).sum() / math.log(4))

    summary = diversity_summary([strategies, ["a", "a", "b"]], [correct, [1, 1, 0]])
    assert summary["mean_num_correct"] == pytest.approx(3.0)
    assert summary["mean_num_strategies"] == pytest.approx(2.0)
    assert summary["mean_strategy_entropy"] == pytest.approx(out["strategy_entropy"] / 2)  # second is 0
    assert summary["frac_multi_strategy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="problem 1: strategies and correct"):
        diversity_summary([strategies, ["a"]], [correct, [1, 1]])
    with pytest.raises(ValueError, match="same problems"):
        diversity_summary([strategies], [])


def test_total_variation_and_kl():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    assert float(total_variation(p, q)) == pytest.approx(0.25)
    assert float(total_variation(p, p)) == 0.0
    assert float(kl_divergence(p, q)) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(1.0), rel=1e-12)
    assert float(kl_divergence(q, p)) == math.inf  # q puts mass where p has none
    batched = total_variation(torch.stack([p, q]), torch.stack([q, q]))
    assert batched.shape == (2,)
    np.testing.assert_allclose(batched.numpy(), [0.25, 0.0])
    with pytest.raises(ValueError, match="sum to 1"):
        total_variation([0.5, 0.6], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        kl_divergence([1.5, -0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence([1.0], [0.5, 0.5])
