"""Bootstrap intervals, pass@k curves, the macro average and checkpoint selection against hand-computed values."""

import math

import numpy as np
import pytest

from disa import metrics


def test_percentile_interval_by_hand():
    assert metrics.percentile_interval([0, 1, 2, 3, 4], confidence=0.5) == (1.0, 3.0)
    with pytest.raises(ValueError, match="confidence"):
        metrics.percentile_interval([1.0], confidence=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.percentile_interval([])


def test_bootstrap_ci_with_given_resamples():
    # resampled means of [0, 1] under these four draws: 0, .5, 1, .5 -> sorted 0, .5, .5, 1
    idx = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    ci = metrics.bootstrap_ci([0.0, 1.0], confidence=0.5, indices=idx)
    assert ci["mean"] == 0.5
    assert ci["lo"] == pytest.approx(0.375)  # quantile .25 at position .75 between 0 and .5
    assert ci["hi"] == pytest.approx(0.625)
    assert ci["std"] == pytest.approx(math.sqrt(0.5 / 3))  # squared deviations .25, 0, .25, 0 over 3 (ddof=1)


def test_bootstrap_ci_constant_and_coverage():
    ci = metrics.bootstrap_ci([0.3] * 7, num_resamples=50)
    assert ci["lo"] == pytest.approx(0.3) and ci["hi"] == pytest.approx(0.3) and ci["std"] == pytest.approx(0.0)
    values = np.r_[np.zeros(50), np.ones(50)]
    ci = metrics.bootstrap_ci(values, num_resamples=2000, seed=1)
    # standard error of a mean of 100 Bernoulli(.5): 0.05, so the 95% interval is about .5 +- .098
    assert ci["lo"] == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02)
    assert ci["hi"] == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert ci["std"] == pytest.approx(0.05, abs=0.005)
    assert metrics.bootstrap_ci(values, seed=3) == metrics.bootstrap_ci(values, seed=3)


def test_bootstrap_ci_errors():
    with pytest.raises(ValueError, match="non-finite"):
        metrics.bootstrap_ci([0.0, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        metrics.bootstrap_ci([0.0, 1.0], indices=np.zeros((3, 5), dtype=int))
    with pytest.raises(ValueError, match="num_resamples"):
        metrics.bootstrap_indices(3, 0)


def test_pass_at_k_curve_by_hand():
    # problem 1: n=4, c=2 -> pass@1 .5, pass@2 1 - C(2,2)/C(4,2) = 5/6, pass@3 = pass@4 = 1; problem 2 never correct
    curve = metrics.pass_at_k_curve([4, 4], [2, 0])
    np.testing.assert_allclose(curve, [0.25, 5 / 12, 0.5, 0.5])
    np.testing.assert_allclose(metrics.pass_at_k_curve([4, 4], [2, 0], max_k=2), [0.25, 5 / 12])
    with pytest.raises(ValueError, match="exceeds"):
        metrics.pass_at_k_curve([4, 3], [1, 1], max_k=4)
    with pytest.raises(ValueError, match="empty"):
        metrics.pass_at_k_curve([], [])


def test_pass_at_k_curve_large_n_is_monotone_and_finite():
    curve = metrics.pass_at_k_curve([1024] * 3, [1, 10, 500])
    assert curve.shape == (1024,)
    assert np.all(np.diff(curve) >= -1e-12) and curve[-1] == pytest.approx(1.0)
    assert curve[0] == pytest.approx((1 / 1024 + 10 / 1024 + 500 / 1024) / 3)


def test_macro_average():
    assert metrics.macro_average({"aime24": 0.1, "math500": 0.7}) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        metrics.macro_average({})


def test_held_out_slice_is_deterministic_and_order_free():
    ids = [f"p{i}" for i in range(20)]
    a = metrics.held_out_slice(ids, 5, seed=0)
    assert len(a) == 5 and len(set(a)) == 5 and set(a) <= set(ids)
    assert metrics.held_out_slice(list(reversed(ids)), 5, seed=0) == a
    assert metrics.held_out_slice(ids, 5, seed=1) != a
    with pytest.raises(ValueError, match="20 distinct"):
        metrics.held_out_slice(ids, 21)


def test_select_checkpoint_rule():
    assert metrics.select_checkpoint({100: 0.5, 300: 0.7, 200: 0.7}) == 200
    assert metrics.select_checkpoint({50: 0.1}) == 50
    with pytest.raises(ValueError, match="non-finite"):
        metrics.select_checkpoint({1: float("nan"), 2: 0.3})
    with pytest.raises(ValueError, match="no checkpoint"):
        metrics.select_checkpoint({})


def test_eval_summary_intervals_and_curve():
    from disa.stages.evaluate import format_markdown, summarize

    responses = [["x", "y"], ["x", "x"], ["z", "w"]]
    rewards = [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    summary, _ = summarize(["a", "b", "c"], responses, rewards, k=2, pass_at=[1, 2], bootstrap=500, seed=0)
    assert summary["pass_curve"] == [pytest.approx(0.5), pytest.approx(2 / 3)]
    assert set(summary["ci"]) == {"mean_at_k", "pass@1", "pass@2"}
    ci = summary["ci"]["pass@2"]
    assert ci["mean"] == pytest.approx(2 / 3) and 0.0 <= ci["lo"] <= ci["mean"] <= ci["hi"] <= 1.0
    assert "| pass@2 | 0.6667 | [" in format_markdown(summary, [])
    plain, _ = summarize(["a", "b", "c"], responses, rewards, k=2, pass_at=[1], bootstrap=0)
    assert "ci" not in plain and "bootstrap" not in format_markdown(plain, [])
