"""disa.estimators against float64 NumPy references: labels, diagnostics, masks, extremes, transforms, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from disa.estimators import (
    affine_transform,
    effective_sample_size,
    fit_affine_transform,
    group_normalize,
    label_prompts,
    log_importance_weights,
    log_z_geometric,
    log_z_lse,
    max_weight_share,
    reward_rate,
    transform_rewards,
)

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


@pytest.fixture
def stage1_batch():
    """Three prompts x four proposal samples with known log-probs and binary rewards."""
    torch.manual_seed(0)
    logp_ref = -torch.rand(3, 4, dtype=F64) * 20 - 1
    logp_q = -torch.rand(3, 4, dtype=F64) * 20 - 1
    rewards = t([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    return logp_ref, logp_q, rewards


def np_reference(log_w: np.ndarray) -> dict[str, float]:
    """Direct linear-scale formulas for one prompt's log-weights (safe for moderate values)."""
    w = np.exp(log_w)
    return {
        "log_z": math.log(w.mean()),
        "log_z_geometric": float(log_w.mean()),
        "ess": float(w.sum() ** 2 / (w**2).sum()),
        "max_weight": float(w.max() / w.sum()),
    }


# --------------------------------------------------------------------------- values
def test_log_importance_weights_formula(stage1_batch):
    logp_ref, logp_q, rewards = stage1_batch
    beta = 2.5
    got = log_importance_weights(logp_ref, logp_q, rewards, beta)
    expected = logp_ref.numpy() - logp_q.numpy() + beta * rewards.numpy()
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_estimators_match_numpy(stage1_batch):
    logp_ref, logp_q, rewards = stage1_batch
    beta = 1.5
    log_w = log_importance_weights(logp_ref, logp_q, rewards, beta)
    for p in range(3):
        ref = np_reference(log_w[p].numpy())
        assert float(log_z_lse(log_w)[p]) == pytest.approx(ref["log_z"], rel=1e-12)
        assert float(log_z_geometric(log_w)[p]) == pytest.approx(ref["log_z_geometric"], rel=1e-12)
        assert float(effective_sample_size(log_w)[p]) == pytest.approx(ref["ess"], rel=1e-10)
        assert float(max_weight_share(log_w)[p]) == pytest.approx(ref["max_weight"], rel=1e-10)
    labels = label_prompts(logp_ref, logp_q, rewards, beta)
    assert set(labels) >= {"log_z", "log_z_geometric", "ess", "max_weight", "reward_rate"}
    for key in ("log_z", "log_z_geometric", "ess", "max_weight", "reward_rate"):
        assert labels[key].shape == (3,)
    np.testing.assert_allclose(labels["log_z"].numpy(), log_z_lse(log_w).numpy(), rtol=1e-14)
    np.testing.assert_allclose(labels["reward_rate"].numpy(), [0.5, 0.0, 0.75])
    assert labels["n"].tolist() == [4, 4, 4]


def test_geometric_never_exceeds_lse_and_ess_bounds():
    torch.manual_seed(1)
    log_w = torch.randn(50, 7, dtype=F64) * 5
    lse, geo = log_z_lse(log_w), log_z_geometric(log_w)
    assert bool((geo <= lse + 1e-12).all())  # AM >= GM
    ess = effective_sample_size(log_w)
    assert bool((ess >= 1 - 1e-12).all()) and bool((ess <= 7 + 1e-12).all())
    share = max_weight_share(log_w)
    assert bool((share >= 1 / 7 - 1e-12).all()) and bool((share <= 1 + 1e-12).all())
    # Kish ESS is at least the inverse of the largest share
    assert bool((ess * share >= 1 - 1e-12).all())


def test_equal_weights():
    log_w = torch.full((2, 5), -3.25, dtype=F64)
    np.testing.assert_allclose(effective_sample_size(log_w).numpy(), [5.0, 5.0], rtol=1e-12)
    np.testing.assert_allclose(max_weight_share(log_w).numpy(), [0.2, 0.2], rtol=1e-12)
    np.testing.assert_allclose(log_z_lse(log_w).numpy(), [-3.25, -3.25], rtol=1e-12)
    np.testing.assert_allclose(log_z_geometric(log_w).numpy(), [-3.25, -3.25], rtol=1e-12)


def test_all_zero_reward_prompt_is_plain_monte_carlo():
    # q = pi_ref and r~ = 0: every weight is 1, so log Z^ = 0 (Z = 1), full ESS, reward rate 0.
    logp = t([[-4.0, -7.5, -2.0]])
    labels = label_prompts(logp, logp.clone(), torch.zeros(1, 3, dtype=F64), beta=15.0)
    assert float(labels["log_z"][0]) == pytest.approx(0.0, abs=1e-14)
    assert float(labels["log_z_geometric"][0]) == pytest.approx(0.0, abs=1e-14)
    assert float(labels["ess"][0]) == pytest.approx(3.0, rel=1e-12)
    assert float(labels["reward_rate"][0]) == 0.0


# --------------------------------------------------------------------------- extremes
def test_extreme_log_weights_one_dominant():
    log_w = t([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4], [-1e4, -1e4 + math.log(3), -1e4]])
    lse = log_z_lse(log_w)
    ess = effective_sample_size(log_w)
    share = max_weight_share(log_w)
    geo = log_z_geometric(log_w)
    for out in (lse, ess, share, geo):
        assert bool(torch.isfinite(out).all())
    # row 0: one weight dominates completely
    assert float(lse[0]) == pytest.approx(1e4 - math.log(3), rel=1e-15)
    assert float(ess[0]) == pytest.approx(1.0, rel=1e-12)
    assert float(share[0]) == pytest.approx(1.0, rel=1e-12)
    assert float(geo[0]) == pytest.approx(0.0, abs=1e-9)
    # row 1: equal huge weights
    assert float(lse[1]) == pytest.approx(1e4, rel=1e-15)
    assert float(ess[1]) == pytest.approx(3.0, rel=1e-12)
    # row 2: tiny weights (1, 3, 1) * e^-1e4: share 3/5, ESS 25/11, log Z^ = -1e4 + log(5/3)
    assert float(lse[2]) == pytest.approx(-1e4 + math.log(5 / 3), rel=1e-15)
    assert float(share[2]) == pytest.approx(0.6, rel=1e-9)
    assert float(ess[2]) == pytest.approx(25 / 11, rel=1e-9)


def test_extreme_log_weights_float32():
    log_w = torch.tensor([[1e4, 0.0, -1e4]], dtype=torch.float32)
    assert bool(torch.isfinite(log_z_lse(log_w)).all())
    assert float(effective_sample_size(log_w)[0]) == pytest.approx(1.0, rel=1e-5)


# --------------------------------------------------------------------------- masks (ragged N)
@pytest.mark.parametrize("padding", [0.0, 1e4, -math.inf, math.nan])
def test_ragged_mask_equals_per_prompt_computation(padding):
    torch.manual_seed(2)
    counts = [4, 2, 1]
    log_w = torch.randn(3, 4, dtype=F64) * 3
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for p, n in enumerate(counts):
        mask[p, :n] = True
    padded = log_w.masked_fill(~mask, padding)
    lse = log_z_lse(padded, mask)
    geo = log_z_geometric(padded, mask)
    ess = effective_sample_size(padded, mask)
    share = max_weight_share(padded, mask)
    for p, n in enumerate(counts):
        ref = np_reference(log_w[p, :n].numpy())
        assert float(lse[p]) == pytest.approx(ref["log_z"], rel=1e-12)
        assert float(geo[p]) == pytest.approx(ref["log_z_geometric"], rel=1e-12)
        assert float(ess[p]) == pytest.approx(ref["ess"], rel=1e-10)
        assert float(share[p]) == pytest.approx(ref["max_weight"], rel=1e-10)
    assert float(ess[2]) == pytest.approx(1.0) and float(share[2]) == pytest.approx(1.0)  # single sample


def test_label_prompts_with_mask_ignores_padding():
    logp_ref = t([[-1.0, -2.0, math.nan], [-3.0, -1.0, -2.0]])
    logp_q = t([[-1.5, -1.0, math.inf], [-2.0, -2.0, -2.0]])
    rewards = t([[1.0, 0.0, math.nan], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    labels = label_prompts(logp_ref, logp_q, rewards, beta=1.0, mask=mask)
    for p, n in enumerate([2, 3]):
        log_w = logp_ref[p, :n] - logp_q[p, :n] + rewards[p, :n]
        ref = np_reference(log_w.numpy())
        assert float(labels["log_z"][p]) == pytest.approx(ref["log_z"], rel=1e-12)
        assert float(labels["log_z_geometric"][p]) == pytest.approx(ref["log_z_geometric"], rel=1e-12)
    np.testing.assert_allclose(labels["reward_rate"].numpy(), [0.5, 2 / 3])
    assert labels["n"].tolist() == [2, 3]


def test_reward_rate_with_mask():
    rewards = t([[1.0, 0.0, math.nan], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    np.testing.assert_allclose(reward_rate(rewards, mask).numpy(), [0.5, 2 / 3])


# --------------------------------------------------------------------------- reward transforms
def test_group_normalize_matches_numpy():
    rewards = t([[1.0, 0.0, 0.0, 1.0], [0.2, 0.9, 0.4, 0.5]])
    got = group_normalize(rewards, eps=1e-6)
    r = rewards.numpy()
    expected = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    biased = group_normalize(rewards, eps=0.0, unbiased=False)
    expected_b = (r - r.mean(axis=1, keepdims=True)) / r.std(axis=1, ddof=0, keepdims=True)
    np.testing.assert_allclose(biased.numpy(), expected_b, rtol=1e-12)
    np.testing.assert_allclose(biased.numpy().std(axis=1), [1.0, 1.0], rtol=1e-12)


def test_group_normalize_zero_variance_and_single_sample():
    rewards = t([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, False, False]])
    got = group_normalize(rewards, mask=mask)
    assert torch.equal(got, torch.zeros(3, 3, dtype=F64))  # no preference inside such groups
    single = group_normalize(t([[5.0], [-2.0]]))
    assert torch.equal(single, torch.zeros(2, 1, dtype=F64))


def test_group_normalize_ragged_mask_with_nan_padding():
    rewards = t([[1.0, 0.0, math.nan], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    got = group_normalize(rewards, eps=0.0, mask=mask)
    s = math.sqrt(0.5)  # row 0: mean 0.5, unbiased std sqrt(0.5)
    np.testing.assert_allclose(got[0].numpy(), [0.5 / s, -0.5 / s, 0.0], rtol=1e-12)
    r1 = np.array([0.0, 1.0, 1.0])
    np.testing.assert_allclose(got[1].numpy(), (r1 - r1.mean()) / r1.std(ddof=1), rtol=1e-12)


def test_affine_transform():
    rewards = t([[1.0, 0.0], [1.0, 1.0]])
    got = affine_transform(rewards, scale=t([2.0, 0.5]), shift=t([-1.0, 3.0]))
    np.testing.assert_allclose(got.numpy(), [[1.0, -1.0], [3.5, 3.5]])
    with pytest.raises(ValueError, match="scale must be > 0"):
        affine_transform(rewards, scale=t([1.0, 0.0]), shift=t([0.0, 0.0]))
    with pytest.raises(ValueError, match=r"shift must have shape \(2,\)"):
        affine_transform(rewards, scale=t([1.0, 1.0]), shift=t([0.0]))
    with pytest.raises(ValueError, match="scale has a non-finite"):
        affine_transform(rewards, scale=t([1.0, math.inf]), shift=t([0.0, 0.0]))


def test_fit_affine_transform_freezes_group_normalization():
    rewards = t([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 1.0, 1.0]])
    scale, shift = fit_affine_transform(rewards, eps=1e-6)
    r = rewards.numpy()
    std = r.std(axis=1, ddof=1)
    assert scale.shape == (3,) and shift.shape == (3,)
    np.testing.assert_allclose(scale.numpy()[[0, 2]], 1.0 / (std[[0, 2]] + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(shift.numpy()[[0, 2]], -r.mean(axis=1)[[0, 2]] * scale.numpy()[[0, 2]], rtol=1e-12)
    # zero variance: the transform only centres (scale 1, shift -mean), so the rewards all map to 0
    assert float(scale[1]) == 1.0
    assert float(shift[1]) == pytest.approx(-0.3, rel=1e-12)
    frozen = affine_transform(rewards, scale, shift)
    np.testing.assert_allclose(frozen.numpy(), group_normalize(rewards, eps=1e-6).numpy(), atol=1e-12)
    # the frozen transform applies to new (policy) rewards of the same prompts: r~ = a r + b
    new = t([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(
        affine_transform(new, scale, shift).numpy(), scale.numpy()[:, None] * new.numpy() + shift.numpy()[:, None]
    )


def test_transform_rewards_dispatch():
    rewards = t([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert torch.equal(transform_rewards("raw", rewards), rewards)
    np.testing.assert_allclose(transform_rewards("group", rewards).numpy(), group_normalize(rewards).numpy())
    scale, shift = fit_affine_transform(rewards)
    np.testing.assert_allclose(
        transform_rewards("affine", rewards, scale=scale, shift=shift).numpy(),
        affine_transform(rewards, scale, shift).numpy(),
    )
    with pytest.raises(ValueError, match="needs scale and shift"):
        transform_rewards("affine", rewards)
    with pytest.raises(ValueError, match="unknown reward transform 'softmax'"):
        transform_rewards("softmax", rewards)


# --------------------------------------------------------------------------- errors
def test_shape_mismatch_errors():
    a = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="shape mismatch.*logp_q"):
        log_importance_weights(a, torch.zeros(2, 4, dtype=F64), a, beta=1.0)
    with pytest.raises(ValueError, match="shape mismatch.*mask"):
        log_z_lse(a, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"log_w must have shape \(P, N\)"):
        log_z_lse(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"rewards must have shape \(P, G\)"):
        group_normalize(torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["logp_ref", "logp_q", "rewards"])
def test_non_finite_inputs_name_the_argument(bad, which):
    inputs = {"logp_ref": torch.zeros(2, 3, dtype=F64), "logp_q": torch.zeros(2, 3, dtype=F64),
              "rewards": torch.zeros(2, 3, dtype=F64)}
    inputs[which][1, 2] = bad
    with pytest.raises(ValueError, match=rf"{which} has a non-finite value .* at index \(1, 2\)"):
        log_importance_weights(**inputs, beta=1.0)
    with pytest.raises(ValueError, match=which):
        label_prompts(**inputs, beta=1.0)


def test_non_finite_log_w_is_rejected_where_unmasked():
    log_w = t([[0.0, math.nan]])
    with pytest.raises(ValueError, match="log_w has a non-finite value"):
        log_z_lse(log_w)
    assert float(log_z_lse(log_w, mask=torch.tensor([[True, False]]))[0]) == 0.0


def test_empty_group_errors():
    log_w = torch.zeros(3, 2, dtype=F64)
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    for fn in (log_z_lse, log_z_geometric, effective_sample_size, max_weight_share):
        with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] have no samples"):
            fn(log_w, mask)
    with pytest.raises(ValueError, match="no samples"):
        group_normalize(log_w, mask=mask)
    with pytest.raises(ValueError, match="empty group"):
        log_z_lse(torch.zeros(2, 0, dtype=F64))


@pytest.mark.parametrize("beta", [0.0, -1.0, math.nan, math.inf])
def test_bad_beta(beta):
    z = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        log_importance_weights(z, z, z, beta)
    with pytest.raises(ValueError, match="beta"):
        label_prompts(z, z, z, beta)


# --------------------------------------------------------------------------- gaps found in the audit
@pytest.mark.parametrize("kind", ["raw", "affine", "group"])
def test_all_zero_reward_prompt_with_a_different_proposal_and_extreme_ratios(kind):
    """Every sample of prompt 0 has reward 0 and log pi_ref - log q spans +-1e4: the transformed reward is 0 for
    every transform (zero-variance group), so the label is the plain IS estimate of sum pi_ref/q, finite."""
    logp_ref = t([[-1.0, -5.0, -1e4, -2.0], [-1.0, -2.0, -3.0, -4.0]])
    logp_q = t([[-1e4, -2.0, -3.0, -2.0], [-2.0, -2.0, -2.0, -2.0]])
    raw = t([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    scale, shift = fit_affine_transform(raw)
    r_tilde = transform_rewards(kind, raw, scale=scale, shift=shift)
    assert torch.equal(r_tilde[0], torch.zeros(4, dtype=F64))
    labels = label_prompts(logp_ref, logp_q, r_tilde, beta=15.0, raw_rewards=raw)
    for key in ("log_z", "log_z_geometric", "ess", "max_weight", "reward_rate"):
        assert bool(torch.isfinite(labels[key]).all()), key
    log_w = [-1.0 + 1e4, -3.0, -1e4 + 3.0, 0.0]  # log pi_ref - log q
    top = max(log_w)
    expected = top + math.log(sum(math.exp(v - top) for v in log_w)) - math.log(4)
    assert float(labels["log_z"][0]) == pytest.approx(expected, rel=1e-15)
    assert float(labels["log_z_geometric"][0]) == pytest.approx(sum(log_w) / 4, abs=1e-9)
    assert float(labels["ess"][0]) == pytest.approx(1.0, rel=1e-12)
    assert float(labels["max_weight"][0]) == pytest.approx(1.0, rel=1e-12)
    assert float(labels["reward_rate"][0]) == 0.0 and float(labels["reward_rate"][1]) == 0.5


def test_every_sample_reward_zero_and_q_equals_ref_gives_log_z_zero_for_every_beta():
    logp = t([[-3.0, -1e4, -0.5], [-7.0, -2.0, -1.0]])
    for beta in (0.1, 15.0, 1e3):
        labels = label_prompts(logp, logp.clone(), torch.zeros(2, 3, dtype=F64), beta=beta)
        assert torch.equal(labels["log_z"], torch.zeros(2, dtype=F64))  # Z = 1 exactly when r~ = 0 everywhere


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_reward_transforms_reject_non_finite_rewards(bad):
    rewards = t([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    rewards[1, 1] = bad
    scale, shift = t([1.0, 1.0]), t([0.0, 0.0])
    with pytest.raises(ValueError, match=r"rewards has a non-finite value .* at index \(1, 1\)"):
        affine_transform(rewards, scale, shift)
    with pytest.raises(ValueError, match=r"rewards has a non-finite value .* at index \(1, 1\)"):
        fit_affine_transform(rewards)
    with pytest.raises(ValueError, match=r"rewards has a non-finite value .* at index \(1, 1\)"):
        group_normalize(rewards)
    with pytest.raises(ValueError, match=r"rewards has a non-finite value .* at index \(1, 1\)"):
        reward_rate(rewards)
    for kind in ("affine", "group"):
        with pytest.raises(ValueError, match="rewards has a non-finite value"):
            transform_rewards(kind, rewards, scale=scale, shift=shift)


def test_reward_transform_shape_and_empty_group_errors():
    with pytest.raises(ValueError, match=r"rewards must have shape \(P, N\)"):
        fit_affine_transform(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"rewards must have shape \(P, N\)"):
        affine_transform(torch.zeros(3, dtype=F64), t([1.0]), t([0.0]))
    with pytest.raises(ValueError, match=r"shape mismatch.*mask"):
        fit_affine_transform(torch.zeros(2, 3, dtype=F64), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] have no samples"):
        fit_affine_transform(torch.zeros(2, 3, dtype=F64), mask=torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] have no samples"):
        reward_rate(torch.zeros(2, 3, dtype=F64), mask=torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool))


@pytest.mark.parametrize("fn", [effective_sample_size, max_weight_share, log_z_geometric])
def test_diagnostics_reject_non_finite_log_w(fn):
    with pytest.raises(ValueError, match=r"log_w has a non-finite value inf at index \(0, 1\)"):
        fn(t([[0.0, math.inf]]))


def test_beta_bool_is_rejected():
    z = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        log_importance_weights(z, z, z, True)
