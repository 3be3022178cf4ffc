"""Stage 1 label estimators beyond eq. 8: exact unbiasedness on the linear scale (float64, by enumerating
every sample tuple), their standard errors against a bootstrap, diagnostics and the N recommendation."""

import itertools
import math

import pytest
import torch

from disa.estimators import log_z_lse
from disa.label_estimators import (
    bootstrap_se,
    label_prompts_with,
    label_with_se,
    mixture_log_ratio,
    recommended_n,
    reliability,
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
    # the fitted coefficient extrapolates from few samples: at N = 4 the bias is large (the measurement in
    # docs/label-estimators.md shows it), at N = 2000 it is gone
    assert _expected_z("regression_cv", [Q], [4]) > 1.5 * EXACT_Z
    gen = torch.Generator().manual_seed(5)
    idx = torch.multinomial(Q.expand(20, 4), 2000, replacement=True, generator=gen)
    log_z, _ = label_with_se("regression_cv", (torch.log(PI_REF) - torch.log(Q))[idx], REWARD[idx], BETA)
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
    ess = torch.tensor([1.0, 6.0, 6.0, 6.0])
    se = torch.tensor([0.1, 0.0, 0.9, 0.2])
    assert reliability(ess, se, min_ess=2.0, max_se=0.5).tolist() == [False, False, False, True]
    # se 0.4 at N = 8 -> target 0.2 needs 4x the samples
    assert recommended_n(torch.tensor([0.4, 0.1, 0.0]), torch.tensor([8, 8, 8]), 0.2).tolist() == [32, 2, 8]
    with pytest.raises(ValueError, match="target_se"):
        recommended_n(torch.tensor([0.4]), torch.tensor([8]), 0.0)
    assert split_budget(8, [1, 1]) == [4, 4] and split_budget(7, [3, 1]) == [5, 2] and sum(split_budget(16, [1, 2, 1])) == 16


# --------------------------------------------------------------------------- the label stage
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
