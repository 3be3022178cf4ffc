"""Stage 1 label estimators beyond eq. 8: exact unbiasedness on the linear scale (float64, by enumerating
every sample tuple), their standard errors against a bootstrap, diagnostics and the N recommendation."""

import itertools
import math

import pytest
import torch

from disa.estimators import log_z_lse
from disa.label_estimators import (
    allocate_samples,
    bootstrap_se,
    choose_estimator,
    label_prompts_with,
    label_with_se,
    mixture_log_ratio,
    recommended_n,
    reliability,
    rewarded_count,
    split_budget,
)

# a 4-outcome "response space": pi_ref, a proposal that moved mass onto the correct answers, a binary reward
PI_REF = torch.tensor([0.5, 0.1, 0.3, 0.1], dtype=torch.float64)
Q = torch.tensor([0.1, 0.45, 0.05, 0.4], dtype=torch.float64)
REWARD = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
BETA = 2.0
EXACT_Z = float((PI_REF * torch.exp(BETA * REWARD)).sum())


def _expected_z(estimator, draws_from, n_per, base_reward=0.0):
    """E[Z^] over every ordered tuple of samples: ``draws_from`` is a list of proposals, ``n_per`` their counts."""
    props = [p for p, k in zip(draws_from, n_per) for _ in range(k)]
    tuples = list(itertools.product(range(4), repeat=len(props)))
    idx = torch.tensor(tuples)
    prob = torch.ones(len(tuples), dtype=torch.float64)
    for j, p in enumerate(props):
        prob = prob * p[idx[:, j]]
    log_q = torch.stack([torch.log(p)[idx] for p in draws_from], dim=2)
    logp_ref = torch.log(PI_REF)[idx]
    if len(draws_from) == 1:
        log_ratio = logp_ref - log_q[..., 0]
    else:
        log_ratio = mixture_log_ratio(logp_ref, log_q, torch.tensor(n_per))
    log_z, _ = label_with_se(estimator, log_ratio, REWARD[idx], BETA, base_reward=base_reward)
    return float((prob * torch.exp(log_z)).sum())


@pytest.mark.parametrize("estimator", ["lse", "cv"])
def test_single_proposal_estimators_are_unbiased_on_the_linear_scale(estimator):
    assert _expected_z(estimator, [Q], [3]) == pytest.approx(EXACT_Z, rel=1e-12)


@pytest.mark.parametrize("estimator", ["lse", "cv"])
def test_mixture_of_proposals_is_unbiased_with_stratified_budgets(estimator):
    # two samples from q, one from pi_ref, weighted against the balance-heuristic mixture
    assert _expected_z(estimator, [Q, PI_REF], [2, 1]) == pytest.approx(EXACT_Z, rel=1e-12)


def test_regression_cv_is_biased_at_small_n_and_consistent_at_large_n():
    # the fitted coefficient extrapolates from few samples: at N = 4 the label is biased (O(1/N)), unlike
    # cv's on the same tuples, and at N = 2000 the bias is gone
    assert abs(_expected_z("regression_cv", [Q], [4]) / EXACT_Z - 1) > 0.01
    assert _expected_z("cv", [Q], [4]) == pytest.approx(EXACT_Z, rel=1e-12)
    gen = torch.Generator().manual_seed(5)
    idx = torch.multinomial(Q.expand(20, 4), 2000, replacement=True, generator=gen)
    log_z, _ = label_with_se("regression_cv", (torch.log(PI_REF) - torch.log(Q))[idx], REWARD[idx], BETA,
                             base_reward=0.0)
    assert float(torch.exp(log_z).mean()) == pytest.approx(EXACT_Z, rel=0.01)


def test_control_variate_has_the_binary_closed_form():
    log_ratio = torch.tensor([[0.3, -1.2, 0.7, 2.0]], dtype=torch.float64)
    reward = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    r0, r1, beta = -0.5, 1.5, 1.7  # an affine r~: wrong -> r0, right -> r1
    r_tilde = r0 + (r1 - r0) * reward
    p_hat = float((torch.exp(log_ratio) * reward).mean())
    expected = math.log(math.exp(beta * r0) * (1 + (math.exp(beta * (r1 - r0)) - 1) * p_hat))
    log_z, _ = label_with_se("cv", log_ratio, r_tilde, beta, base_reward=r0)
    assert float(log_z) == pytest.approx(expected, rel=1e-12)


def test_lse_matches_eq_8_and_q_equal_pi_ref_makes_all_estimators_agree():
    gen = torch.Generator().manual_seed(0)
    log_ratio = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    reward = (torch.rand(5, 8, generator=gen) < 0.4).double()
    log_z, _ = label_with_se("lse", log_ratio, reward, 3.0)
    assert torch.allclose(log_z, log_z_lse(log_ratio + 3.0 * reward), atol=1e-12)
    zero = torch.zeros(5, 8, dtype=torch.float64)  # plain Monte Carlo: rho = 1
    labels = [label_with_se(e, zero, reward, 3.0, base_reward=0.0)[0] for e in ("lse", "cv", "regression_cv")]
    assert torch.allclose(labels[0], labels[1], atol=1e-12) and torch.allclose(labels[0], labels[2], atol=1e-12)


def test_defensive_mixture_bounds_the_weights():
    gen = torch.Generator().manual_seed(1)
    logp_ref = torch.randn(3, 6, generator=gen, dtype=torch.float64) - 5
    log_q = torch.stack([logp_ref + 8 * torch.randn(3, 6, generator=gen, dtype=torch.float64), logp_ref], dim=2)
    ratio = mixture_log_ratio(logp_ref, log_q, torch.tensor([4, 2]))
    assert bool((ratio <= math.log(6 / 2) + 1e-12).all())


@pytest.mark.parametrize("estimator", ["lse", "cv", "regression_cv"])
def test_delta_method_se_agrees_with_the_bootstrap(estimator):
    gen = torch.Generator().manual_seed(2)
    p, n = 4, 300
    idx = torch.multinomial(Q.expand(p, 4), n, replacement=True, generator=gen)
    log_ratio = (torch.log(PI_REF) - torch.log(Q))[idx]
    reward = REWARD[idx]
    _, se = label_with_se(estimator, log_ratio, reward, BETA, base_reward=0.0)
    boot = bootstrap_se(estimator, log_ratio, reward, BETA, base_reward=0.0, draws=1000)
    assert torch.allclose(se, boot, rtol=0.15), (se, boot)


def test_cv_has_smaller_se_than_eq_8_when_q_drops_the_wrong_answers():
    gen = torch.Generator().manual_seed(3)
    idx = torch.multinomial(Q.expand(50, 4), 16, replacement=True, generator=gen)
    log_ratio = (torch.log(PI_REF) - torch.log(Q))[idx]
    se = {e: label_with_se(e, log_ratio, REWARD[idx], BETA, base_reward=0.0)[1].mean() for e in ("lse", "cv")}
    assert se["cv"] < 0.7 * se["lse"]


def test_stratified_se_and_label_prompts_with_a_mixture():
    gen = torch.Generator().manual_seed(4)
    logp_ref = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    logp_q = logp_ref + torch.randn(2, 6, generator=gen, dtype=torch.float64)
    reward = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.float64)
    strata = torch.tensor([[0, 0, 0, 0, 1, 1]] * 2)
    out = label_prompts_with("cv", logp_ref, logp_q, reward, 2.0, base_reward=0.0,
                             log_q_extra=torch.stack([logp_q, logp_ref], dim=2),
                             budgets=torch.tensor([[4.0, 2.0]] * 2), strata=strata)
    assert out["log_z"].shape == out["log_z_se"].shape == out["ess"].shape == (2,)
    assert bool((out["log_z_se"] > 0).all()) and bool((out["log_z"] >= 0).all())


def test_reward_below_the_base_is_an_error():
    with pytest.raises(ValueError, match="below base_reward"):
        label_with_se("cv", torch.zeros(1, 3), torch.tensor([[0.0, -1.0, 1.0]]), 1.0, base_reward=0.0)
    with pytest.raises(ValueError, match="unknown label estimator"):
        label_with_se("median", torch.zeros(1, 3), torch.zeros(1, 3), 1.0, base_reward=0.0)


def test_masked_prompts_ignore_padding():
    log_ratio = torch.tensor([[0.1, -0.4, 9.0], [0.2, 0.3, -0.1]], dtype=torch.float64)
    reward = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    full, se_full = label_with_se("cv", log_ratio, reward, 1.5, base_reward=0.0, mask=mask)
    short, se_short = label_with_se("cv", log_ratio[:1, :2], reward[:1, :2], 1.5, base_reward=0.0)
    assert float(full[0]) == pytest.approx(float(short[0]), rel=1e-12)
    assert float(se_full[0]) == pytest.approx(float(se_short[0]), rel=1e-12)


def test_reliability_and_recommended_n():
    ess = torch.tensor([1.0, 6.0, 6.0, 6.0, 6.0, 6.0])
    se = torch.tensor([0.1, 0.0, 0.9, 0.2, 0.2, 1e-9])
    rewarded = torch.tensor([3, 3, 3, 3, 0, 3])
    assert reliability(ess, se, min_ess=2.0, max_se=0.5, rewarded=rewarded).tolist() == [
        False, False, False, True, False, False]
    # se 0.4 at N = 8 -> target 0.2 needs 4x the samples; an uninformative se (0, or nothing rewarded) -> 2 N
    got = recommended_n(torch.tensor([0.4, 0.1, 0.0, 0.3]), torch.tensor([8, 8, 8, 8]), 0.2,
                        rewarded=torch.tensor([2, 2, 2, 0]))
    assert got.tolist() == [32, 2, 16, 16]
    with pytest.raises(ValueError, match="target_se"):
        recommended_n(torch.tensor([0.4]), torch.tensor([8]), 0.0, rewarded=torch.tensor([1]))
    assert split_budget(8, [1, 1]) == [4, 4] and split_budget(7, [3, 1]) == [5, 2] and sum(split_budget(16, [1, 2, 1])) == 16


def test_rewarded_count_counts_samples_above_the_base():
    rewards = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert rewarded_count(rewards, 0.0, mask).tolist() == [2, 0]
    assert rewarded_count(rewards, torch.tensor([0.6, -1.0]), mask).tolist() == [1, 2]


# --------------------------------------------------------------------------- corners
def test_regression_cv_does_not_pin_an_all_correct_group():
    # 8 correct samples, beta 3: the fit f = rho e^{beta} is exact, which pinned the label at e^{beta} = 3.0
    # with a rounding-noise SE; it must now be cv's label (P^_ref = mean rho) with cv's standard error
    gen = torch.Generator().manual_seed(6)
    log_ratio = torch.randn(1, 8, generator=gen, dtype=torch.float64) - 1.0
    reward = torch.ones(1, 8, dtype=torch.float64)
    reg, reg_se = label_with_se("regression_cv", log_ratio, reward, 3.0, base_reward=0.0)
    cv, cv_se = label_with_se("cv", log_ratio, reward, 3.0, base_reward=0.0)
    p_hat = float(torch.exp(log_ratio).mean())
    assert float(cv) == pytest.approx(math.log(1 + math.expm1(3.0) * p_hat), rel=1e-12)
    assert float(reg) == float(cv) and float(reg_se) == float(cv_se) > 1e-3
    # rho constant as well (plain Monte Carlo, all correct): no spread at all, so the label is not reliable
    _, se = label_with_se("regression_cv", torch.zeros(1, 8, dtype=torch.float64), reward, 3.0, base_reward=0.0)
    assert not bool(reliability(torch.tensor([8.0]), se, min_ess=2.0, max_se=0.5, rewarded=torch.tensor([8])))


def test_regression_cv_with_two_samples_falls_back_to_cv():
    # two points always lie on a line: the fitted label would have a standard error of exactly 0
    log_ratio = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    reward = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert label_with_se("regression_cv", log_ratio, reward, 2.0, base_reward=0.0) == \
        label_with_se("cv", log_ratio, reward, 2.0, base_reward=0.0)


@pytest.mark.parametrize("estimator", ["lse", "cv", "regression_cv"])
@pytest.mark.parametrize("offset", [-1000.0, 1000.0])
def test_huge_log_weights_shift_the_label_exactly(estimator, offset):
    # every log-ratio moved by the same constant c: eq. 8's label moves by c exactly; cv and regression cv
    # are compared on a rescaled problem with the same relative weights (rho' = rho e^{c}, base moved too)
    gen = torch.Generator().manual_seed(7)
    log_ratio = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    reward = (torch.rand(3, 6, generator=gen) < 0.5).double()
    reward[:, 0] = 1.0
    reward[:, 1] = 0.0
    if estimator == "lse":
        ref, ref_se = label_with_se(estimator, log_ratio, reward, 2.0)
        got, got_se = label_with_se(estimator, log_ratio + offset, reward, 2.0)
        assert torch.allclose(got, ref + offset, rtol=1e-12, atol=1e-9)
        assert torch.allclose(got_se, ref_se, rtol=1e-9)
    else:
        got, got_se = label_with_se(estimator, log_ratio + offset, reward, 2.0, base_reward=0.0)
        assert torch.isfinite(got).all() and torch.isfinite(got_se).all()
        if estimator == "cv":  # Z^ = 1 + e^{c} A, A = mean(rho (e^{beta r} - 1)): log Z^ = logaddexp(0, c + log A)
            a = (torch.exp(log_ratio) * torch.expm1(2.0 * reward)).mean(dim=1)
            assert torch.allclose(got, torch.logaddexp(torch.zeros(3, dtype=torch.float64), offset + torch.log(a)),
                                  rtol=1e-12, atol=1e-12)
            assert bool((got_se > 0).all()) if offset > 0 else bool((got_se < 1e-300).all())


def test_lse_with_every_log_weight_at_minus_1000_is_finite():
    log_z, se = label_with_se("lse", torch.tensor([[-1000.0, -1000.5, -1001.0]], dtype=torch.float64),
                              torch.zeros(1, 3, dtype=torch.float64), 1.0)
    expected = -1000.0 + math.log((1 + math.exp(-0.5) + math.exp(-1.0)) / 3)
    assert float(log_z) == pytest.approx(expected, rel=1e-14) and 0 < float(se) < 1


@pytest.mark.parametrize("wrong_log_ratio", [400.0, 800.0])
def test_cv_ignores_a_huge_wrong_answer_weight(wrong_log_ratio):
    # a wrong answer's cv term is e^{beta r0} whatever its weight: the label and SE equal those with rho = 1
    reward = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    small = torch.tensor([[0.0, -0.3, 0.2, 0.1]], dtype=torch.float64)
    big = small.clone()
    big[0, 0] = wrong_log_ratio
    ref, ref_se = label_with_se("cv", small, reward, 3.0, base_reward=0.0)
    got, got_se = label_with_se("cv", big, reward, 3.0, base_reward=0.0)
    assert float(got) == pytest.approx(float(ref), rel=1e-14) and float(got_se) == pytest.approx(float(ref_se), rel=1e-12)
    assert float(got_se) > 0.01


def test_cv_needs_a_constant_base_reward():
    # the group's own smallest reward as base is biased: +85 % at N = 2 in this enumeration
    # (every tuple whose two samples are both correct takes r0 = r1 and returns e^{beta r1})
    with pytest.raises(ValueError, match="needs base_reward"):
        label_with_se("cv", torch.zeros(1, 2), torch.ones(1, 2), 1.0)
    with pytest.raises(ValueError, match="needs base_reward"):
        label_with_se("regression_cv", torch.zeros(1, 3), torch.ones(1, 3), 1.0)
    assert _expected_z("cv", [Q], [2]) == pytest.approx(EXACT_Z, rel=1e-12)


def _stratified_variance_ratio(n_per):
    """E[estimated Var(Z^)] / Var(Z^) of cv on the q + pi_ref mixture, by enumerating every stratified tuple."""
    draws_from = [Q, PI_REF]
    props = [p for p, k in zip(draws_from, n_per) for _ in range(k)]
    idx = torch.tensor(list(itertools.product(range(4), repeat=len(props))))
    prob = torch.ones(len(idx), dtype=torch.float64)
    for j, p in enumerate(props):
        prob = prob * p[idx[:, j]]
    log_q = torch.stack([torch.log(p)[idx] for p in draws_from], dim=2)
    log_ratio = mixture_log_ratio(torch.log(PI_REF)[idx], log_q, torch.tensor(n_per))
    strata = torch.cat([torch.full((len(idx), k), j) for j, k in enumerate(n_per)], dim=1)
    log_z, se = label_with_se("cv", log_ratio, REWARD[idx], BETA, base_reward=0.0, strata=strata)
    z = torch.exp(log_z)
    mean = (prob * z).sum()
    return float((prob * (se * z) ** 2).sum() / (prob * (z - mean) ** 2).sum())


def test_a_one_sample_stratum_contributes_variance():
    # with two samples per stratum the stratified variance estimate is exactly unbiased; a stratum of one
    # borrows the row's variance (errs high) instead of contributing nothing (0.70 of the truth before)
    assert _stratified_variance_ratio([2, 2]) == pytest.approx(1.0, rel=1e-12)
    assert 1.0 <= _stratified_variance_ratio([2, 1]) < 1.5


# --------------------------------------------------------------------------- the batch-estimated log Z source


def _write_samples(folder, rows, with_proposal=False):
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder / "samples", exist_ok=True)
    keys = ["prompt_id", "sample_idx", "reward", "logp_ref", "logp_q"] + (["proposal"] if with_proposal else [])
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in keys}), folder / "samples" / "shard-00000.parquet")


def test_label_stage_writes_estimator_se_flag_and_recommendation(tmp_path):
    from disa.stages.label import label_summary, run_labelling

    reward = [1.0, 0.0, 1.0, 0.0]
    ref, q = [-3.0, -1.0, -4.0, -2.0], [-2.0, -3.0, -3.5, -2.5]
    rows = [dict(prompt_id="a", sample_idx=j, reward=r, logp_ref=a, logp_q=b) for j, (r, a, b) in enumerate(zip(reward, ref, q))]
    rows += [dict(prompt_id="b", sample_idx=j, reward=0.0, logp_ref=-1.0, logp_q=-1.5) for j in range(3)]
    _write_samples(tmp_path, rows)
    eq8 = run_labelling(str(tmp_path), beta=2.0, out_path=str(tmp_path / "eq8.parquet")).to_pydict()
    cv = run_labelling(str(tmp_path), beta=2.0, estimator="cv", target_se=0.1, out_path=str(tmp_path / "cv.parquet")).to_pydict()
    assert eq8["estimator"] == ["lse", "lse"] and cv["estimator"] == ["cv", "cv"]
    rho = [math.exp(a - b) for a, b in zip(ref, q)]
    p_hat = sum(x * r for x, r in zip(rho, reward)) / 4
    assert cv["log_z"][0] == pytest.approx(math.log(1 + (math.exp(2.0) - 1) * p_hat), abs=1e-12)
    assert cv["log_z"][1] == pytest.approx(0.0, abs=1e-12) and cv["log_z_se"][1] == 0.0  # nothing correct: base only
    terms = [1 + x * (math.exp(2.0 * r) - 1) for x, r in zip(rho, reward)]
    mean = sum(terms) / 4
    sd = math.sqrt(sum((t - mean) ** 2 for t in terms) / 3)
    assert cv["log_z_se"][0] == pytest.approx(sd / 2 / mean, rel=1e-9)
    assert cv["log_z_se"][0] < 0.5 and cv["reliable"] == [True, False]  # b: se 0, nothing seen above the base
    assert cv["n_recommended"][0] == math.ceil(4 * (cv["log_z_se"][0] / 0.1) ** 2)
    assert eq8["log_z_geometric"] == cv["log_z_geometric"] and "n_recommended" not in eq8
    summary = label_summary(cv)
    assert summary["unreliable"] == 1 and summary["unreliable_ids"] == ["b"] and summary["n_recommended_max"] == max(cv["n_recommended"])
    with pytest.raises(ValueError, match="estimator must be one of"):
        run_labelling(str(tmp_path), beta=2.0, estimator="median")


def test_label_stage_weights_two_proposals_against_their_mixture(tmp_path):
    from disa.stages.label import run_labelling

    # prompt a: 2 samples from q and 2 from pi_ref (tagged), every one scored under both
    samples = [(1.0, -3.0, -1.0, "q"), (0.0, -1.0, -3.0, "q"), (1.0, -2.0, -4.0, "reference"), (0.0, -0.5, -2.0, "reference")]
    rows = [dict(prompt_id="a", sample_idx=j, reward=r, logp_ref=a, logp_q=b, proposal=p) for j, (r, a, b, p) in enumerate(samples)]
    _write_samples(tmp_path, rows, with_proposal=True)
    out = run_labelling(str(tmp_path), beta=1.5, estimator="cv").to_pydict()
    mix = [math.log(0.5 * math.exp(b) + 0.5 * math.exp(a)) for _, a, b, _ in samples]
    rho = [math.exp(a - m) for (_, a, _, _), m in zip(samples, mix)]
    p_hat = sum(x * r for x, (r, _, _, _) in zip(rho, samples)) / 4
    assert out["log_z"][0] == pytest.approx(math.log(1 + (math.exp(1.5) - 1) * p_hat), abs=1e-12)
    assert max(rho) <= 2.0 + 1e-12  # defensive: pi_ref's half bounds every weight by N / n_ref


# --------------------------------------------------------------------------- SE-weighted Stage 2
def test_se_weights_and_weighted_fit_follow_the_precise_labels():
    from disa.regressor import fit_regressor, se_weights

    w = se_weights(torch.tensor([0.1, 0.0, 0.3]))
    # se 0 counts as the largest (0.3); mean se^2 = (0.01 + 0.09 + 0.09) / 3
    m = (0.01 + 0.09 + 0.09) / 3
    assert torch.allclose(w, torch.tensor([1 / (0.01 + m), 1 / (0.09 + m), 1 / (0.09 + m)]), rtol=1e-6)
    with pytest.raises(ValueError, match="log_z_se"):
        se_weights(torch.tensor([0.1, float("nan")]))
    # one embedding for everyone: the fit is a weighted mean; weights 9:1 pull it towards the precise label
    x = torch.ones(40, 3)
    y = torch.tensor([0.0, 1.0] * 20)
    weights = torch.tensor([9.0, 1.0] * 20)
    _, plain = fit_regressor(x, y, max_epochs=200, patience=200, lr=1e-2, val_fraction=0.25, progress=False)
    model, weighted = fit_regressor(x, y, max_epochs=200, patience=200, lr=1e-2, val_fraction=0.25, progress=False,
                                    sample_weights=weights)
    assert float(model(x[:1])) < 0.3
    with pytest.raises(ValueError, match="sample_weights"):
        fit_regressor(x, y, sample_weights=torch.zeros(40), progress=False)


def test_control_variate_is_exact_beside_a_huge_wrong_answer_weight():
    # one wrong answer with rho = e^60 and one right answer with rho = e^-3: Z^ = 1 + (e^2 - 1) e^-3 / 2
    log_ratio = torch.tensor([[60.0, -3.0]], dtype=torch.float64)
    log_z, _ = label_with_se("cv", log_ratio, torch.tensor([[0.0, 1.0]], dtype=torch.float64), 2.0, base_reward=0.0)
    assert float(log_z) == pytest.approx(math.log(1 + (math.exp(2.0) - 1) * math.exp(-3.0) / 2), rel=1e-12)


def _exact_term_variance(estimator, q):
    """Var_q of one sample's term on the 4-outcome space, in float64 by its definition."""
    rho = PI_REF / q
    terms = rho * torch.exp(BETA * REWARD) if estimator == "lse" else 1 + rho * torch.expm1(BETA * REWARD)
    mean = (q * terms).sum()
    assert float(mean) == pytest.approx(EXACT_Z, rel=1e-12)  # both unbiased
    return float((q * (terms - mean) ** 2).sum())


@pytest.mark.parametrize("q_name", ["tilted beyond pi*", "pi* itself"])
def test_auto_choice_follows_the_exact_variances(q_name):
    target = PI_REF * torch.exp(BETA * REWARD) / EXACT_Z
    q = Q if q_name == "tilted beyond pi*" else target
    exact = {e: _exact_term_variance(e, q) for e in ("lse", "cv")}
    expected = min(exact, key=exact.get)
    assert expected == ("cv" if q_name == "tilted beyond pi*" else "lse")
    gen = torch.Generator().manual_seed(8)
    idx = torch.multinomial(q.expand(200, 4), 8, replacement=True, generator=gen)
    log_ratio = (torch.log(PI_REF) - torch.log(q))[idx]
    assert choose_estimator(log_ratio, REWARD[idx], BETA, base_reward=0.0) == expected
    # no rewarded sample anywhere: no evidence, the first candidate
    assert choose_estimator(log_ratio, torch.zeros_like(log_ratio), BETA, base_reward=0.0) == "lse"


def test_allocate_samples_by_hand():
    # per-sample variances se^2 N: 0.16 * 4 = 0.64, 0.01 * 4 = 0.04, unknown (nothing rewarded) -> their mean 0.34
    se = torch.tensor([0.4, 0.1, 0.0])
    n = torch.tensor([4, 4, 4])
    rewarded = torch.tensor([2, 2, 0])
    add = allocate_samples(se, n, rewarded, 6)
    assert int(add.sum()) == 6
    # greedy marginal gains s / (N (N + 1)): prompt 0 from 0.032, prompt 2 from 0.017, prompt 1 from 0.002
    gains = sorted(((s / (m * (m + 1)), i) for i, s in enumerate([0.64, 0.04, 0.34]) for m in range(4, 20)),
                   reverse=True)[:6]
    assert add.tolist() == [sum(1 for _, i in gains if i == j) for j in range(3)]
    # a target: stop each prompt once s / N <= target^2 (0.2^2 = 0.04: prompt 0 needs N = 16, prompt 2 N = 9)
    assert allocate_samples(se, n, rewarded, 100, target_se=0.2).tolist() == [12, 0, 5]
    assert allocate_samples(se, n, rewarded, 100, cap=torch.tensor([6, 6, 6])).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="extra"):
        allocate_samples(se, n, rewarded, -1)


def test_label_study_refuses_a_sample_budget_below_its_reported_n(capsys):
    from disa.studies.label_estimators import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--n-max", "4", "--quick"])
    assert exit_info.value.code == 2
    assert "--n-max must be at least 8" in capsys.readouterr().err
