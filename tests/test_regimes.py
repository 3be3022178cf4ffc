"""The regime map (issue 24): its math against hand / float64 values, a reduced study in the default suite (the
table's shape, the monotone effect of an injected log Z error on the residual, Prop. 4's envelope), the full
study behind the slow marker."""

import json
import math

import numpy as np
import pytest

from disa.studies import regimes as R


# ------------------------------------------------------------------ exact pass@k
def test_exact_pass_at_k_by_hand():
    # prompts with P(correct) 0.5, 0 and 1: pass@1 = 1.5 / 3, pass@2 = (0.75 + 0 + 1) / 3, pass@3 = (0.875 + 1) / 3
    np.testing.assert_allclose(R.exact_pass_at_k([0.5, 0.0, 1.0], [1, 2, 3]), [0.5, 1.75 / 3, 1.875 / 3])


def test_exact_pass_at_k_small_p_large_k_matches_float64():
    p = np.array([1e-9, 1e-4, 0.3])
    ks = [1, 16, 256]
    direct = [np.mean(1 - (1 - p) ** k) for k in ks]  # float64 power
    np.testing.assert_allclose(R.exact_pass_at_k(p, ks), direct, rtol=1e-9)
    # 1 - (1 - 1e-9)^256 = 2.56e-7 (to 7 digits): the expm1 form keeps it exactly where 1 - x^k rounds
    assert R.exact_pass_at_k([1e-9], [256])[0] == pytest.approx(256e-9, rel=1e-6)


@pytest.mark.parametrize("p,ks", [([], [1]), ([1.5], [1]), ([-0.1], [1]), ([float("nan")], [1]), ([0.5], [0]),
                                   ([0.5], [1.5])])
def test_exact_pass_at_k_refuses_bad_input(p, ks):
    with pytest.raises(ValueError):
        R.exact_pass_at_k(p, ks)


# ------------------------------------------------------------------ Prop. 4 envelope
def test_prop4_envelope_by_hand():
    assert R.prop4_envelope(1.0, 1.0) == 4.0  # 1 + 1 + 2 * 1
    assert R.prop4_envelope(4.0, 0.0) == 4.0
    assert R.prop4_envelope(0.0, 9.0) == 9.0
    assert R.prop4_envelope(4.0, 1.0) == 9.0  # (2 + 1)^2
    for bad in ((-1.0, 1.0), (1.0, -1.0), (float("inf"), 1.0), (float("nan"), 0.0)):
        with pytest.raises(ValueError):
            R.prop4_envelope(*bad)


def test_prop4_envelope_bounds_any_prompt_level_error_float64():
    rng = np.random.default_rng(0)
    for _ in range(50):
        res = rng.normal(size=(7, 5)) * rng.uniform(0.1, 3)  # residuals under the exact log Z, 7 prompts x 5 samples
        err = rng.normal(size=(7, 1)) * rng.uniform(0, 3) + rng.normal()  # one error per prompt
        lhs = np.mean((res + err) ** 2)
        assert lhs <= R.prop4_envelope(np.mean(res**2), np.mean(np.broadcast_to(err, res.shape) ** 2)) + 1e-12
    res = np.array([1.0, 2.0])  # an error proportional to the residual reaches the envelope: (1 + 2)^2 L
    assert np.mean((3 * res) ** 2) == pytest.approx(R.prop4_envelope(np.mean(res**2), np.mean((2 * res) ** 2)))


# ------------------------------------------------------------------ injected error
def test_injected_log_z_bias_noise_and_mse():
    exact = np.array([1.0, 2.0, 3.0])
    values, mse = R.injected_log_z(exact, 0.5, 0.0, seed=0)
    np.testing.assert_allclose(values, exact + 0.5)
    assert mse == pytest.approx(0.25)
    v1, m1 = R.injected_log_z(exact, -1.0, 2.0, seed=3)
    v2, m2 = R.injected_log_z(exact, -1.0, 2.0, seed=3)
    np.testing.assert_array_equal(v1, v2)
    assert m1 == pytest.approx(np.mean((v1 - exact) ** 2)) and m1 == m2
    with pytest.raises(ValueError):
        R.injected_log_z(exact, 0.0, -1.0, seed=0)


def test_regimes_are_declared_consistently():
    regs = R.full_regimes(8)
    assert len({r.slug for r in regs}) == len(regs)  # one run folder each
    assert {r.regime for r in regs} == {"baseline", "replay", "stale", "visits", "beta", "residual", "dial"}
    assert all(set(r.sources) <= set(R.SOURCE_CONFIGS) for r in regs)
    assert [r.weight_mode for r in regs if r.regime == "replay"] == ["clipped_is", "on_policy"]
    assert all(r.sources == R.SOURCES for r in regs if r.regime != "dial")


# ------------------------------------------------------------------ the reduced study (default suite)
@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("regimes")
    cache = tmp_path_factory.getbasetemp() / "disa-testbed-cache"
    from disa.testbed.models import torch_threads

    with torch_threads(1):
        results = R.run(str(out), quick=True, cache_dir=str(cache), seeds=2)
    return out, results


def test_quick_study_table_shape(quick_study):
    out, results = quick_study
    regs = R.quick_regimes(R.QUICK_SETTINGS.group_size)
    expected = [(r.regime, r.setting, s) for r in regs for s in r.sources]
    assert [(r["regime"], r["setting"], r["source"]) for r in results["rows"]] == expected
    for row in results["rows"]:
        for key in ("kl_target_policy", "tv_correct", "p_correct", "pass@1", "pass@256", "residual_sq"):
            assert math.isfinite(row[key]) and f"{key}_std" in row, (row["source"], key)
        assert 0 <= row["pass@1"] <= row["pass@16"] <= row["pass@256"] <= 1
        assert row["pass@1"] == pytest.approx(row["p_correct"], rel=1e-9)  # pass@1 is the accuracy
        assert row["kl_target_policy"] >= 0 and 0 <= row["tv_correct"] <= 1
    assert len(results["per_seed"]) == 2 and all(len(s) == len(expected) for s in results["per_seed"])
    md = (out / "results.md").read_text()
    assert "every regime and source" in md and "log Z error dial" in md and " ± " in md
    assert json.loads((out / "results.json").read_text())["seeds"] == 2
    assert (out / "regimes_kl.png").stat().st_size > 1000 and (out / "regimes_dial.png").stat().st_size > 1000


def test_quick_study_injected_error_raises_the_residual_within_prop4(quick_study):
    _, results = quick_study
    dial = [r for r in results["rows"] if r["regime"] == "dial"]
    assert [r["setting"] for r in dial] == ["on-policy b=+0 sd=0", "on-policy b=+1 sd=0", "on-policy b=+3 sd=0"]
    assert [r["injected_mse"] for r in dial] == pytest.approx([0.0, 1.0, 9.0])
    # the trained objective's residual and the trained policy's squared residual under the injected log Z grow
    # with the injected bias; every policy stays within Prop. 4's envelope of its own exact-log-Z residual
    for key in ("final_loss", "residual_sq_injected"):
        values = [r[key] for r in dial]
        assert values[0] < values[1] < values[2], (key, values)
    for seed_rows in results["per_seed"]:
        for r in seed_rows:
            if r["regime"] == "dial":
                assert r["residual_sq_injected"] <= r["prop4_envelope"] + 1e-9
    exact = next(r for r in results["rows"] if r["regime"] == "baseline" and r["source"] == "exact")
    assert dial[0]["kl_target_policy"] == pytest.approx(exact["kl_target_policy"])  # b = 0 is the exact source


def test_quick_study_reuses_finished_runs(quick_study, monkeypatch):
    out, results = quick_study

    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(R, "train_one", refuse)
    again = R.run(str(out), quick=True, cache_dir=str(out.parent / "disa-testbed-cache"), seeds=2)
    assert [r["kl_target_policy"] for r in again["rows"]] == [r["kl_target_policy"] for r in results["rows"]]


# ------------------------------------------------------------------ the full study
@pytest.mark.slow
def test_full_regime_map(tmp_path):
    from disa.testbed.models import torch_threads

    with torch_threads(1):
        results = R.run(str(tmp_path), seeds=3)
    regs = R.full_regimes(R.FULL_SETTINGS.group_size)
    assert len(results["rows"]) == sum(len(r.sources) for r in regs)
    dial = {r["setting"].split(" (")[0]: r for r in R.dial_rows(results["rows"])}
    for mode in ("on-policy", "offline"):
        assert dial[f"{mode} b=+1 sd=0"]["residual_sq_injected"] > dial[f"{mode} b=+0 sd=0"]["residual_sq_injected"]
    for seed_rows in results["per_seed"]:
        assert all(r["residual_sq_injected"] <= r["prop4_envelope"] + 1e-9 for r in seed_rows if r["regime"] == "dial")
