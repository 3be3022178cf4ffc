"""disa.objectives against values and gradients worked out by hand in float64 NumPy.

Every batch is padded (mask zeros) and the padded positions hold garbage (1e3, and NaN/inf in one test),
so a loss that reads padding gives a different number or a NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from disa.objectives import (
    AGGREGATIONS,
    aspo_loss,
    compute_objective,
    disa_loss,
    flowrl_loss,
    flowrl_no_logz_loss,
    get_objective,
    grpo_loss,
    gspo_loss,
    sft_loss,
    trajectory_balance_loss,
)

F64 = torch.float64
GARBAGE = 1e3

MASK = np.array(
    [
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
    ],
    dtype=bool,
)


def padded(values: np.ndarray, garbage: float = GARBAGE, requires_grad: bool = False) -> torch.Tensor:
    out = torch.tensor(np.where(MASK, values, garbage), dtype=F64)
    return out.requires_grad_(requires_grad)


def mask_tensor() -> torch.Tensor:
    return torch.tensor(MASK)


@pytest.fixture
def batch():
    """Three rollouts (lengths 3, 4, 1) of token log-probs; numpy copies for the hand computations."""
    rng = np.random.default_rng(0)
    logp = -rng.uniform(0.1, 2.0, size=MASK.shape)
    old_logp = logp + rng.uniform(-0.4, 0.4, size=MASK.shape)
    ref_logp = -rng.uniform(0.1, 2.0, size=MASK.shape)
    return {
        "logp": logp,
        "old_logp": old_logp,
        "ref_logp": ref_logp,
        "rewards": np.array([1.0, -0.5, 0.25]),
        "log_z": np.array([0.7, -0.3, 1.2]),
        "advantages": np.array([1.0, -0.8, 0.5]),
    }


def torch_inputs(b, requires_grad: bool = True) -> dict:
    return {
        # signs chosen so that exp(ref - logp) in the KL term would overflow if padding were read
        "logp": padded(b["logp"], garbage=-GARBAGE, requires_grad=requires_grad),
        "old_logp": padded(b["old_logp"], garbage=GARBAGE),
        "ref_logp": padded(b["ref_logp"], garbage=GARBAGE),
        "mask": mask_tensor(),
        "rewards": torch.tensor(b["rewards"], dtype=F64),
        "advantages": torch.tensor(b["advantages"], dtype=F64),
    }


def lengths() -> np.ndarray:
    return MASK.sum(axis=1).astype(float)


def seq(values: np.ndarray, normalize: bool) -> np.ndarray:
    total = np.where(MASK, values, 0.0).sum(axis=1)
    return total / lengths() if normalize else total


# --------------------------------------------------------------------------- trajectory balance
@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("weight_mode", ["on_policy", "clipped_is"])
def test_trajectory_balance_value_and_policy_gradient(batch, length_normalize, weight_mode):
    b = dict(batch)
    # make rollout 1's trajectory ratio exceed the clip of 10 (exp(4 * 0.8) ~ 24.5) to exercise the clip
    b["old_logp"] = b["old_logp"].copy()
    b["old_logp"][1] = b["logp"][1] - 0.8
    beta = 2.0
    inp = torch_inputs(b)
    log_z = torch.tensor(b["log_z"], dtype=F64)
    loss, metrics = trajectory_balance_loss(
        logp=inp["logp"], ref_logp=inp["ref_logp"], old_logp=inp["old_logp"], mask=inp["mask"],
        rewards=inp["rewards"], log_z=log_z, beta=beta, length_normalize=length_normalize,
        rollout_weight_mode=weight_mode,
    )
    residual = b["log_z"] + seq(b["logp"], length_normalize) - beta * b["rewards"] - seq(b["ref_logp"], length_normalize)
    if weight_mode == "on_policy":
        w = np.ones(3)
    else:
        w = np.minimum(np.exp(seq(b["logp"] - b["old_logp"], False)), 10.0)
        assert w[1] == 10.0 and w[0] < 10.0
    expected = np.mean(w * residual**2)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    assert metrics["tb_residual_mean"] == pytest.approx(residual.mean(), rel=1e-12)
    assert metrics["rollout_weight_mean"] == pytest.approx(w.mean(), rel=1e-12)

    loss.backward()
    # w is detached: d loss / d logp_bt = 2 w_b residual_b / B (/ |y_b| when length-normalised), 0 on padding
    per_rollout = 2 * w * residual / 3 / (lengths() if length_normalize else 1.0)
    expected_grad = np.where(MASK, per_rollout[:, None], 0.0)
    np.testing.assert_allclose(inp["logp"].grad.numpy(), expected_grad, rtol=1e-12, atol=1e-15)


def test_disa_log_z_gets_no_gradient(batch):
    inp = torch_inputs(batch)
    log_z = torch.tensor(batch["log_z"], dtype=F64, requires_grad=True)
    beta = 1.5
    loss, _ = disa_loss(
        logp=inp["logp"], ref_logp=inp["ref_logp"], old_logp=inp["old_logp"], mask=inp["mask"],
        rewards=inp["rewards"], log_z=log_z, beta=beta,
    )
    # defaults: trajectory-level residual, clipped IS weight
    residual = batch["log_z"] + seq(batch["logp"], False) - beta * batch["rewards"] - seq(batch["ref_logp"], False)
    w = np.minimum(np.exp(seq(batch["logp"] - batch["old_logp"], False)), 10.0)
    assert float(loss.detach()) == pytest.approx(np.mean(w * residual**2), rel=1e-12)
    loss.backward()
    assert log_z.grad is None  # the frozen partition function never receives a gradient
    assert inp["logp"].grad is not None and float(inp["logp"].grad.abs().sum()) > 0


def test_flowrl_log_z_gradient(batch):
    inp = torch_inputs(batch)
    log_z = torch.tensor(batch["log_z"], dtype=F64, requires_grad=True)
    beta = 15.0
    loss, _ = flowrl_loss(
        logp=inp["logp"], ref_logp=inp["ref_logp"], old_logp=inp["old_logp"], mask=inp["mask"],
        rewards=inp["rewards"], log_z=log_z, beta=beta,
    )
    # defaults follow the FlowRL code: length-normalised log-probs, clipped trajectory IS weight
    residual = batch["log_z"] + seq(batch["logp"], True) - beta * batch["rewards"] - seq(batch["ref_logp"], True)
    w = np.minimum(np.exp(seq(batch["logp"] - batch["old_logp"], False)), 10.0)
    assert float(loss.detach()) == pytest.approx(np.mean(w * residual**2), rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(log_z.grad.numpy(), 2 * w * residual / 3, rtol=1e-12)


def test_flowrl_no_logz(batch):
    inp = torch_inputs(batch)
    beta = 3.0
    loss, metrics = flowrl_no_logz_loss(
        logp=inp["logp"], ref_logp=inp["ref_logp"], old_logp=inp["old_logp"], mask=inp["mask"],
        rewards=inp["rewards"], beta=beta, rollout_weight_mode="on_policy",
    )
    residual = seq(batch["logp"], True) - beta * batch["rewards"] - seq(batch["ref_logp"], True)
    assert float(loss.detach()) == pytest.approx(np.mean(residual**2), rel=1e-12)
    assert metrics["log_z_mean"] == 0.0


def test_trajectory_balance_errors(batch):
    inp = torch_inputs(batch)
    base = dict(logp=inp["logp"], ref_logp=inp["ref_logp"], mask=inp["mask"], rewards=inp["rewards"],
                log_z=torch.zeros(3, dtype=F64), beta=1.0)
    with pytest.raises(ValueError, match="beta must be"):
        trajectory_balance_loss(**{**base, "beta": 0.0})
    with pytest.raises(ValueError, match="needs old_logp"):
        trajectory_balance_loss(**base, rollout_weight_mode="clipped_is")
    with pytest.raises(ValueError, match="unknown rollout_weight 'ppo'"):
        trajectory_balance_loss(**base, rollout_weight_mode="ppo")
    with pytest.raises(ValueError, match="weight_clip must be > 0"):
        trajectory_balance_loss(**base, old_logp=inp["old_logp"], rollout_weight_mode="clipped_is", weight_clip=0.0)
    with pytest.raises(ValueError, match=r"log_z must have shape \(3,\)"):
        trajectory_balance_loss(**{**base, "log_z": torch.zeros(2, dtype=F64)})
    with pytest.raises(ValueError, match=r"rewards has a non-finite"):
        trajectory_balance_loss(**{**base, "rewards": torch.tensor([0.0, math.nan, 0.0], dtype=F64)})


# --------------------------------------------------------------------------- GRPO
def np_grpo_token_loss(logp, old_logp, adv, low, high):
    ratio = np.exp(logp - old_logp)
    a = adv[:, None]
    return -np.minimum(ratio * a, np.clip(ratio, 1 - low, 1 + high) * a)


def np_aggregate(token_loss, mode, max_len=None):
    tl = np.where(MASK, token_loss, 0.0)
    if mode == "seq_mean_token_mean":
        return np.mean(tl.sum(axis=1) / lengths())
    if mode == "token_mean":
        return tl.sum() / MASK.sum()
    if mode == "seq_mean_token_sum":
        return np.mean(tl.sum(axis=1))
    return np.mean(tl.sum(axis=1) / (max_len if max_len is not None else MASK.shape[1]))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_grpo_value_each_aggregation(batch, aggregation):
    inp = torch_inputs(batch)
    loss, metrics = grpo_loss(
        logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"], mask=inp["mask"],
        clip_eps=0.2, aggregation=aggregation,
    )
    token_loss = np_grpo_token_loss(batch["logp"], batch["old_logp"], batch["advantages"], 0.2, 0.2)
    assert float(loss.detach()) == pytest.approx(np_aggregate(token_loss, aggregation), rel=1e-12)
    ratio = np.exp(batch["logp"] - batch["old_logp"])
    assert metrics["ratio_mean"] == pytest.approx(ratio[MASK].mean(), rel=1e-12)


def test_grpo_seq_mean_token_sum_norm_uses_max_len(batch):
    inp = torch_inputs(batch)
    loss, _ = grpo_loss(logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"],
                        mask=inp["mask"], aggregation="seq_mean_token_sum_norm", max_len=10)
    token_loss = np_grpo_token_loss(batch["logp"], batch["old_logp"], batch["advantages"], 0.2, 0.2)
    assert float(loss.detach()) == pytest.approx(np_aggregate(token_loss, "seq_mean_token_sum_norm", 10), rel=1e-12)


def test_grpo_clip_higher_and_gradient():
    # one rollout, A = +1, token ratios 1.25 (inside [0.8, 1.28] only with clip-higher), 0.9, 0.5
    log_ratio = np.log(np.array([1.25, 0.9, 0.5]))
    logp = torch.tensor([[-1.0, -2.0, -0.5, GARBAGE]], dtype=F64, requires_grad=True)
    old = logp.detach() - torch.tensor([[*log_ratio, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    adv = torch.tensor([1.0], dtype=F64)

    sym, m_sym = grpo_loss(logp=logp, old_logp=old, advantages=adv, mask=mask, clip_eps=0.2)
    assert float(sym.detach()) == pytest.approx(-(1.2 + 0.9 + 0.5) / 3, rel=1e-12)  # 1.25 clipped to 1.2
    assert m_sym["clip_frac"] == pytest.approx(1 / 3)
    sym.backward()
    # clipped token: no gradient; others: -A * rho / |y|
    np.testing.assert_allclose(logp.grad.numpy(), [[0.0, -0.9 / 3, -0.5 / 3, 0.0]], rtol=1e-12, atol=1e-15)

    logp.grad = None
    high, m_high = grpo_loss(logp=logp, old_logp=old, advantages=adv, mask=mask, clip_eps=0.2, clip_eps_high=0.28)
    assert float(high.detach()) == pytest.approx(-(1.25 + 0.9 + 0.5) / 3, rel=1e-12)
    assert m_high["clip_frac"] == 0.0
    high.backward()
    np.testing.assert_allclose(logp.grad.numpy(), [[-1.25 / 3, -0.9 / 3, -0.5 / 3, 0.0]], rtol=1e-12, atol=1e-15)

    # negative advantage: the lower clip binds at 0.5 < 0.8 (value -A * 0.8, no gradient)
    logp.grad = None
    neg, _ = grpo_loss(logp=logp, old_logp=old, advantages=-adv, mask=mask, clip_eps=0.2, clip_eps_high=0.28)
    assert float(neg.detach()) == pytest.approx((1.25 + 0.9 + 0.8) / 3, rel=1e-12)
    neg.backward()
    np.testing.assert_allclose(logp.grad.numpy(), [[1.25 / 3, 0.9 / 3, 0.0, 0.0]], rtol=1e-12, atol=1e-15)


def test_grpo_k3_kl_term(batch):
    inp = torch_inputs(batch)
    kl_coef = 0.05
    loss, metrics = grpo_loss(
        logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"], mask=inp["mask"],
        ref_logp=inp["ref_logp"], kl_coef=kl_coef, aggregation="token_mean",
    )
    d = batch["ref_logp"] - batch["logp"]
    k3 = np.exp(d) - d - 1
    assert bool((k3 >= 0).all())
    token_loss = np_grpo_token_loss(batch["logp"], batch["old_logp"], batch["advantages"], 0.2, 0.2) + kl_coef * k3
    assert float(loss.detach()) == pytest.approx(np_aggregate(token_loss, "token_mean"), rel=1e-12)
    assert metrics["kl_ref"] == pytest.approx(k3[MASK].mean(), rel=1e-12)
    loss.backward()
    assert bool(torch.isfinite(inp["logp"].grad).all())
    # the KL gradient per token is kl_coef * (1 - exp(d)) / n_tokens on top of the surrogate's
    inp2 = torch_inputs(batch)
    surrogate, _ = grpo_loss(logp=inp2["logp"], old_logp=inp2["old_logp"], advantages=inp2["advantages"],
                             mask=inp2["mask"], aggregation="token_mean")
    surrogate.backward()
    kl_grad = np.where(MASK, kl_coef * (1 - np.exp(d)) / MASK.sum(), 0.0)
    np.testing.assert_allclose((inp["logp"].grad - inp2["logp"].grad).numpy(), kl_grad, rtol=1e-10, atol=1e-15)


def test_nan_and_inf_padding_is_ignored(batch):
    reference = torch_inputs(batch)
    kwargs = dict(ref_logp=reference["ref_logp"], kl_coef=0.1)
    ref_loss, _ = grpo_loss(logp=reference["logp"], old_logp=reference["old_logp"],
                            advantages=reference["advantages"], mask=reference["mask"], **kwargs)
    ref_loss.backward()
    logp = padded(batch["logp"], garbage=math.nan, requires_grad=True)
    old = padded(batch["old_logp"], garbage=math.inf)
    ref = padded(batch["ref_logp"], garbage=-math.inf)
    for name in ("grpo", "gspo", "aspo"):
        loss, _ = get_objective(name)(logp=logp, old_logp=old, advantages=reference["advantages"],
                                      mask=reference["mask"], ref_logp=ref, kl_coef=0.1)
        assert math.isfinite(float(loss.detach())), name
        logp.grad = None
        loss.backward()
        assert bool(torch.isfinite(logp.grad).all()), name
        assert float(logp.grad[~reference["mask"]].abs().sum()) == 0.0, name
        if name == "grpo":
            assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-12)
            np.testing.assert_allclose(logp.grad.numpy(), reference["logp"].grad.numpy(), rtol=1e-12)
    tb, _ = disa_loss(logp=logp, ref_logp=ref, old_logp=old, mask=reference["mask"], beta=1.0,
                      rewards=reference["rewards"], log_z=torch.zeros(3, dtype=F64))
    assert math.isfinite(float(tb.detach()))
    nll, _ = sft_loss(logp=logp, mask=reference["mask"])
    assert math.isfinite(float(nll.detach()))


# --------------------------------------------------------------------------- GSPO
def test_gspo_value_and_gradient(batch):
    b = dict(batch)
    b["old_logp"] = b["logp"] - np.array([[0.02, -0.01, 0.05, 0], [-0.03, -0.02, 0.01, 0.0], [0.04, 0, 0, 0]])
    inp = torch_inputs(b)
    clip = 0.5  # wide enough that no sequence ratio is clipped
    loss, metrics = gspo_loss(logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"],
                              mask=inp["mask"], clip_eps=clip, clip_eps_high=clip)
    s = np.exp(seq(b["logp"] - b["old_logp"], normalize=True))
    adv = b["advantages"]
    expected = np.mean(-np.minimum(s * adv, np.clip(s, 1 - clip, 1 + clip) * adv))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    assert metrics["seq_ratio_mean"] == pytest.approx(s.mean(), rel=1e-12)
    loss.backward()
    # GSPO-token gradient under seq_mean_token_mean: -A_i * s_i * grad log pi(y_t) / |y_i| / B
    expected_grad = np.where(MASK, (-adv * s / lengths() / 3)[:, None], 0.0)
    np.testing.assert_allclose(inp["logp"].grad.numpy(), expected_grad, rtol=1e-12, atol=1e-15)


def test_gspo_sequence_clip_stops_gradient(batch):
    inp = torch_inputs(batch)  # sequence ratios far outside the default (3e-4, 4e-4) range
    loss, metrics = gspo_loss(logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"],
                              mask=inp["mask"])
    s = np.exp(seq(batch["logp"] - batch["old_logp"], normalize=True))
    adv = batch["advantages"]
    clipped = np.clip(s, 1 - 3e-4, 1 + 4e-4)
    assert float(loss.detach()) == pytest.approx(np.mean(-np.minimum(s * adv, clipped * adv)), rel=1e-12)
    loss.backward()
    took_clip = clipped * adv < s * adv
    grad = inp["logp"].grad.numpy()
    for i in range(3):
        if took_clip[i]:
            assert np.all(grad[i] == 0.0)
        else:
            np.testing.assert_allclose(grad[i][MASK[i]], -adv[i] * s[i] / lengths()[i] / 3, rtol=1e-12)
    assert metrics["clip_frac"] == pytest.approx((took_clip[:, None] * MASK).sum() / MASK.sum())


# --------------------------------------------------------------------------- ASPO
def test_aspo_branches_value_and_gradient():
    # rollout 0 (A = -2): rho = 0.5 (lower clip to 0.8), 1.5 (plain), 4.0 (> c_neg = 3: dual clip)
    # rollout 1 (A = +1): rho = 0.9 (flipped), 1.5 (upper clip to 1.28), 0.25 (1/rho = 4 > c_pos = 3: dual clip)
    # rollout 2 (A = 0): contributes 0
    rho = np.array([[0.5, 1.5, 4.0, 1.0], [0.9, 1.5, 0.25, 1.0], [1.3, 1.0, 1.0, 1.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)
    logp_np = np.array([[-1.0, -0.7, -2.0, 0.0], [-0.3, -1.1, -0.9, 0.0], [-0.5, -0.6, 0.0, 0.0]])
    logp = torch.tensor(np.where(mask, logp_np, GARBAGE), dtype=F64, requires_grad=True)
    old = torch.tensor(np.where(mask, logp_np - np.log(rho), -GARBAGE), dtype=F64)
    adv = torch.tensor([-2.0, 1.0, 0.0], dtype=F64)
    loss, metrics = aspo_loss(logp=logp, old_logp=old, advantages=adv, mask=torch.tensor(mask))

    n = mask.sum()
    token_values = np.array([
        [2.0 * 0.8, 2.0 * 1.5, 2.0 * 3.0 * logp_np[0, 2]],  # -A rho_c ; -A c_neg log pi
        [-1.0 / 0.9, -1.0 / 1.28, -1.0 * 3.0 * logp_np[1, 2]],  # -A / rho_c ; -A c_pos log pi
    ])
    assert float(loss.detach()) == pytest.approx(token_values.sum() / n, rel=1e-12)  # token_mean, A = 0 adds 0
    assert metrics["dual_clip_frac"] == pytest.approx(2 / n)
    loss.backward()
    expected_grad = np.zeros_like(rho)
    expected_grad[0, :3] = [0.0, 2.0 * 1.5, 2.0 * 3.0]  # clipped: 0 ; -A rho ; -A c_neg
    expected_grad[1, :3] = [-1.0 / 0.9, 0.0, -3.0]  # flipped: -A / rho ; clipped: 0 ; -A c_pos
    np.testing.assert_allclose(logp.grad.numpy(), expected_grad / n, rtol=1e-12, atol=1e-15)


def test_aspo_errors(batch):
    inp = torch_inputs(batch)
    base = dict(logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"], mask=inp["mask"])
    with pytest.raises(ValueError, match="dual_clip_neg=1.0"):
        aspo_loss(**base, dual_clip_neg=1.0)
    with pytest.raises(ValueError, match="clip_eps=1.5"):
        aspo_loss(**base, clip_eps=1.5)


# --------------------------------------------------------------------------- SFT
def test_sft_loss(batch):
    inp = torch_inputs(batch)
    loss, metrics = sft_loss(logp=inp["logp"], mask=inp["mask"])
    assert float(loss.detach()) == pytest.approx(-batch["logp"][MASK].mean(), rel=1e-12)
    assert metrics["nll"] == pytest.approx(float(loss.detach()))
    loss.backward()
    np.testing.assert_allclose(inp["logp"].grad.numpy(), np.where(MASK, -1.0 / MASK.sum(), 0.0), rtol=1e-12)
    per_seq, _ = sft_loss(logp=inp["logp"], mask=inp["mask"], aggregation="seq_mean_token_mean")
    assert float(per_seq.detach()) == pytest.approx(np.mean(-seq(batch["logp"], True)), rel=1e-12)


# --------------------------------------------------------------------------- registry and errors
def test_compute_objective_dispatch_and_unknown_hparams(batch):
    inp = torch_inputs(batch)
    inputs = {**inp, "log_z": torch.tensor(batch["log_z"], dtype=F64), "extra_column": torch.zeros(3)}
    loss, _ = compute_objective("disa", inputs=inputs, beta=2.0)
    direct, _ = disa_loss(logp=inp["logp"], ref_logp=inp["ref_logp"], old_logp=inp["old_logp"], mask=inp["mask"],
                          rewards=inp["rewards"], log_z=inputs["log_z"], beta=2.0)
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-14)
    g, _ = compute_objective("grpo", inputs=inputs, clip_eps=0.1, clip_eps_high=0.3)
    g_direct, _ = grpo_loss(logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"],
                            mask=inp["mask"], ref_logp=inp["ref_logp"], clip_eps=0.1, clip_eps_high=0.3)
    assert float(g.detach()) == pytest.approx(float(g_direct.detach()), rel=1e-14)
    for name in ("disa", "flowrl", "flowrl_no_logz", "grpo", "gspo", "aspo", "sft"):
        hparams = {"beta": 1.0} if name in ("disa", "flowrl", "flowrl_no_logz") else {}
        out, metrics = compute_objective(name, inputs=inputs, **hparams)
        assert out.dim() == 0 and math.isfinite(float(out.detach())) and isinstance(metrics, dict)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['clip_epsilon'\]"):
        compute_objective("grpo", inputs=inputs, clip_epsilon=0.2)
    with pytest.raises(TypeError, match="unknown hyperparameter.*'kl_coef'"):
        compute_objective("disa", inputs=inputs, beta=1.0, kl_coef=0.1)
    with pytest.raises(KeyError, match="unknown objective 'ppo'"):
        get_objective("ppo")


def test_bad_token_inputs(batch):
    inp = torch_inputs(batch)
    base = dict(logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"], mask=inp["mask"])
    with pytest.raises(ValueError, match=r"old_logp must have the shape of mask \(3, 4\), got \(3, 3\)"):
        grpo_loss(**{**base, "old_logp": inp["old_logp"][:, :3]})
    bad = inp["logp"].detach().clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"logp has a non-finite value nan at index \(1, 2\)"):
        grpo_loss(**{**base, "logp": bad})
    empty_mask = inp["mask"].clone()
    empty_mask[2] = False
    with pytest.raises(ValueError, match=r"rollout\(s\) \[2\] have no response tokens"):
        grpo_loss(**{**base, "mask": empty_mask})
    with pytest.raises(ValueError, match=r"advantages must have shape \(3,\)"):
        grpo_loss(**{**base, "advantages": torch.zeros(2, dtype=F64)})
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        grpo_loss(**base, aggregation="mean")
    with pytest.raises(ValueError, match="clip_eps must be in"):
        grpo_loss(**base, clip_eps=0.0)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        grpo_loss(**base, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        grpo_loss(**base, ref_logp=inp["ref_logp"], kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\)"):
        sft_loss(logp=inp["logp"], mask=inp["mask"][0])


# --------------------------------------------------------------------------- every aggregation / KL, GSPO and ASPO
def np_gspo_token_loss(b, low, high):
    s = np.exp(seq(b["logp"] - b["old_logp"], normalize=True))
    a = b["advantages"]
    per_rollout = -np.minimum(s * a, np.clip(s, 1 - low, 1 + high) * a)
    return np.repeat(per_rollout[:, None], MASK.shape[1], axis=1)  # every token carries its rollout's value


def np_aspo_token_loss(b, low=0.2, high=0.28, c_neg=3.0, c_pos=3.0):
    rho = np.exp(b["logp"] - b["old_logp"])
    a = b["advantages"][:, None] * np.ones_like(rho)
    rho_neg = np.maximum(rho, 1 - low)
    neg = np.where(rho_neg > c_neg, -a * c_neg * b["logp"], -a * rho_neg)
    rho_pos = np.minimum(rho, 1 + high)
    pos = np.where(1 / rho_pos > c_pos, -a * c_pos * b["logp"], -a / rho_pos)
    return np.where(a < 0, neg, np.where(a > 0, pos, 0.0))


def np_k3(b):
    d = b["ref_logp"] - b["logp"]
    return np.exp(d) - d - 1


@pytest.mark.parametrize("kl_coef", [0.0, 0.07])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", ["grpo", "gspo", "aspo"])
def test_policy_gradient_losses_each_aggregation_and_kl(batch, name, aggregation, kl_coef):
    b = dict(batch)
    if name == "gspo":  # sequence ratios near 1, inside a clip range wide enough to leave some unclipped
        b["old_logp"] = b["logp"] - np.array([[0.02, -0.01, 0.05, 0], [-0.03, -0.02, 0.01, 0.0], [0.04, 0, 0, 0]])
    inp = torch_inputs(b)
    hp = {"clip_eps": 0.03, "clip_eps_high": 0.03} if name == "gspo" else {}
    loss, metrics = get_objective(name)(
        logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"], mask=inp["mask"],
        ref_logp=inp["ref_logp"], kl_coef=kl_coef, aggregation=aggregation, max_len=6, **hp,
    )
    if name == "grpo":
        token_loss = np_grpo_token_loss(b["logp"], b["old_logp"], b["advantages"], 0.2, 0.2)
    elif name == "gspo":
        token_loss = np_gspo_token_loss(b, 0.03, 0.03)
    else:
        token_loss = np_aspo_token_loss(b)
    token_loss = token_loss + kl_coef * np_k3(b)
    assert float(loss.detach()) == pytest.approx(np_aggregate(token_loss, aggregation, max_len=6), rel=1e-12)
    if kl_coef:
        assert metrics["kl_ref"] == pytest.approx(np_k3(b)[MASK].mean(), rel=1e-12)
    else:
        assert "kl_ref" not in metrics


def test_policy_gradient_kl_gradient_is_k3s_for_gspo_and_aspo(batch):
    """The KL term adds kl_coef * (1 - exp(ref - logp)) per token (token_mean), whatever the surrogate."""
    kl_coef = 0.3
    for name in ("gspo", "aspo"):
        grads = []
        for coef in (kl_coef, 0.0):
            inp = torch_inputs(batch)
            loss, _ = get_objective(name)(logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"],
                                          mask=inp["mask"], ref_logp=inp["ref_logp"], kl_coef=coef,
                                          aggregation="token_mean")
            loss.backward()
            grads.append(inp["logp"].grad.numpy())
        d = batch["ref_logp"] - batch["logp"]
        expected = np.where(MASK, kl_coef * (1 - np.exp(d)) / MASK.sum(), 0.0)
        np.testing.assert_allclose(grads[0] - grads[1], expected, rtol=1e-10, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("weight_mode", ["on_policy", "clipped_is"])
def test_frozen_log_z_gets_no_gradient_in_every_mode(batch, length_normalize, weight_mode):
    inp = torch_inputs(batch)
    log_z = torch.tensor(batch["log_z"], dtype=F64, requires_grad=True)
    for fn, kw in ((disa_loss, {}), (trajectory_balance_loss, {"freeze_log_z": True})):
        loss, _ = fn(logp=inp["logp"], ref_logp=inp["ref_logp"], old_logp=inp["old_logp"], mask=inp["mask"],
                     rewards=inp["rewards"], log_z=log_z, beta=2.0, length_normalize=length_normalize,
                     rollout_weight_mode=weight_mode, **kw)
        assert loss.grad_fn is not None
        (grad,) = torch.autograd.grad(loss, [log_z], allow_unused=True)
        assert grad is None  # no path from the loss to log Z at all, not merely a zero gradient
    loss, _ = trajectory_balance_loss(logp=inp["logp"], ref_logp=inp["ref_logp"], old_logp=inp["old_logp"],
                                      mask=inp["mask"], rewards=inp["rewards"], log_z=log_z, beta=2.0,
                                      freeze_log_z=False, length_normalize=length_normalize,
                                      rollout_weight_mode=weight_mode)
    (grad,) = torch.autograd.grad(loss, [log_z])  # the trainable (FlowRL) switch does reach it
    assert float(grad.abs().sum()) > 0


# --------------------------------------------------------------------------- bad input, every objective
ALL_OBJECTIVES = ("disa", "flowrl", "flowrl_no_logz", "grpo", "gspo", "aspo", "sft")
TB_HPARAMS = {"disa": {"beta": 1.0}, "flowrl": {"beta": 1.0}, "flowrl_no_logz": {"beta": 1.0}}
USES = {  # the inputs each objective reads (grpo/gspo/aspo read ref_logp only with kl_coef > 0)
    "disa": {"logp", "old_logp", "ref_logp", "rewards", "log_z"},
    "flowrl": {"logp", "old_logp", "ref_logp", "rewards", "log_z"},
    "flowrl_no_logz": {"logp", "old_logp", "ref_logp", "rewards"},
    "grpo": {"logp", "old_logp", "ref_logp", "advantages"},
    "gspo": {"logp", "old_logp", "ref_logp", "advantages"},
    "aspo": {"logp", "old_logp", "ref_logp", "advantages"},
    "sft": {"logp"},
}


def _objective_inputs(batch):
    inp = torch_inputs(batch, requires_grad=False)
    inp["log_z"] = torch.tensor(batch["log_z"], dtype=F64)
    return inp


def _call(name, inputs, **extra):
    hp = dict(TB_HPARAMS.get(name, {}))
    if name in ("grpo", "gspo", "aspo"):
        hp["kl_coef"] = 0.1
    hp.update(extra)
    return compute_objective(name, inputs=inputs, **hp)


@pytest.mark.parametrize("name", ALL_OBJECTIVES)
def test_every_objective_rejects_bad_token_inputs_naming_them(batch, name):
    inp = _objective_inputs(batch)
    assert math.isfinite(float(_call(name, inp)[0]))  # the unmodified batch is fine
    for arg in sorted(USES[name] & {"logp", "old_logp", "ref_logp"}):
        with pytest.raises(ValueError, match=rf"{arg} must have the shape of mask \(3, 4\), got \(3, 3\)"):
            _call(name, {**inp, arg: inp[arg][:, :3]})
        for bad in (math.nan, math.inf, -math.inf):
            broken = inp[arg].clone()
            broken[1, 3] = bad
            with pytest.raises(ValueError, match=rf"{arg} has a non-finite value .* at index \(1, 3\)"):
                _call(name, {**inp, arg: broken})
    for arg in sorted(USES[name] & {"rewards", "advantages", "log_z"}):
        with pytest.raises(ValueError, match=rf"{arg} must have shape \(3,\), got \(2,\)"):
            _call(name, {**inp, arg: inp[arg][:2]})
        broken = inp[arg].clone()
        broken[0] = math.nan
        with pytest.raises(ValueError, match=rf"{arg} has a non-finite value nan"):
            _call(name, {**inp, arg: broken})
    empty = inp["mask"].clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"rollout\(s\) \[1\] have no response tokens"):
        _call(name, {**inp, "mask": empty})
    with pytest.raises(ValueError, match=r"mask has an empty batch"):
        _call(name, {k: v[:0] for k, v in inp.items()})
    with pytest.raises(ValueError, match=r"mask must be boolean or 0/1"):
        _call(name, {**inp, "mask": inp["mask"].long() * 2})
    # a 0/1 float mask is the same as the boolean one
    as_float = _call(name, {**inp, "mask": inp["mask"].to(F64)})[0]
    assert float(as_float) == pytest.approx(float(_call(name, inp)[0]), rel=1e-14)


@pytest.mark.parametrize(
    "name, hparams, match",
    [
        ("disa", {"beta": math.nan}, "beta must be a finite number > 0"),
        ("disa", {"beta": -1.0}, "beta must be a finite number > 0"),
        ("disa", {"beta": True}, "beta must be a finite number > 0"),
        ("flowrl", {"beta": 0.0}, "beta must be a finite number > 0"),
        ("flowrl_no_logz", {"beta": math.inf}, "beta must be a finite number > 0"),
        ("disa", {"beta": 1.0, "weight_clip": math.nan}, "weight_clip must be > 0"),
        ("flowrl", {"beta": 1.0, "weight_clip": -1.0}, "weight_clip must be > 0"),
        ("grpo", {"kl_coef": math.nan}, "kl_coef must be >= 0"),
        ("gspo", {"kl_coef": math.inf}, "kl_coef must be >= 0"),
        ("aspo", {"kl_coef": -0.1}, "kl_coef must be >= 0"),
        ("grpo", {"clip_eps_high": math.nan}, "clip_eps_high > 0"),
        ("gspo", {"clip_eps": math.nan}, "clip_eps must be in"),
        ("aspo", {"clip_eps_high": math.nan}, "clip_eps_high=nan"),
        ("aspo", {"dual_clip_neg": math.nan}, "dual_clip_neg=nan"),
        ("aspo", {"dual_clip_pos": 0.5}, "dual_clip_pos=0.5"),
        ("grpo", {"aggregation": "sum"}, "unknown aggregation 'sum'"),
        ("sft", {"aggregation": "seq_mean"}, "unknown aggregation 'seq_mean'"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(batch, name, hparams, match):
    inp = _objective_inputs(batch)
    inp["ref_logp"] = torch_inputs(batch)["ref_logp"]
    with pytest.raises(ValueError, match=match):
        compute_objective(name, inputs=inp, **hparams)


@pytest.mark.parametrize("max_len", [0, -3, math.nan, True])
def test_bad_max_len_raises(batch, max_len):
    inp = torch_inputs(batch)
    with pytest.raises(ValueError, match="max_len must be None or a number > 0"):
        grpo_loss(logp=inp["logp"], old_logp=inp["old_logp"], advantages=inp["advantages"], mask=inp["mask"],
                  aggregation="seq_mean_token_sum_norm", max_len=max_len)


# --------------------------------------------------------------------------- declared needs, resolved once
@pytest.mark.parametrize("name, hparams, inputs, token_weighted, length_normalized", [
    ("grpo", {}, {"old_logp", "advantages", "max_len"}, False, False),
    ("grpo", {"kl_coef": 0.1, "aggregation": "token_mean"}, {"old_logp", "advantages", "max_len", "ref_logp"}, True, False),
    ("aspo", {}, {"old_logp", "advantages", "max_len"}, True, False),  # ASPO's default aggregation is token_mean
    ("gspo", {"kl_coef": 0.0}, {"old_logp", "advantages", "max_len"}, False, False),
    ("disa", {"beta": 1.0}, {"ref_logp", "rewards", "log_z", "old_logp"}, False, False),
    ("disa", {"beta": 1.0, "rollout_weight_mode": "on_policy"}, {"ref_logp", "rewards", "log_z"}, False, False),
    ("flowrl", {"beta": 1.0}, {"ref_logp", "rewards", "log_z", "old_logp"}, False, True),
    ("flowrl_no_logz", {"beta": 1.0, "length_normalize": False}, {"ref_logp", "rewards", "old_logp"}, False, False),
    ("sft", {}, set(), True, False),
    ("sft", {"aggregation": "seq_mean_token_mean"}, set(), False, False),
])
def test_needs_follow_the_objectives_own_hyperparameters(name, hparams, inputs, token_weighted, length_normalized):
    from disa.objectives import bind_objective

    needs = bind_objective(name, hparams).needs
    assert (set(needs.inputs), needs.token_weighted, needs.length_normalized) == (inputs, token_weighted,
                                                                                  length_normalized)


def test_objective_inputs_check_shapes_and_a_missing_needed_field_is_named(batch):
    from disa.objectives import ObjectiveInputs, ObjectiveNeeds, bind_objective, register_objective
    from disa.objectives.registry import OBJECTIVES

    inp = torch_inputs(batch)
    with pytest.raises(ValueError, match=r"ref_logp must have the shape of mask \(3, 4\), got \(3, 3\)"):
        ObjectiveInputs(logp=inp["logp"], mask=inp["mask"], ref_logp=inp["ref_logp"][:, :3])
    with pytest.raises(ValueError, match=r"log_z must have shape \(3,\), got \(2,\)"):
        ObjectiveInputs(logp=inp["logp"], mask=inp["mask"], log_z=torch.zeros(2))
    with pytest.raises(ValueError, match="objective 'grpo' needs advantages, which this batch does not carry"):
        bind_objective("grpo", {})(ObjectiveInputs(logp=inp["logp"], mask=inp["mask"], old_logp=inp["old_logp"]))
    with pytest.raises(ValueError, match=r"needs: \['kl'\] are not ObjectiveInputs fields"):
        ObjectiveNeeds({"kl"})
    try:
        register_objective("needs_what_it_lacks", family="policy_gradient", needs={"ref_logp"})(
            lambda *, logp, mask: (logp.sum(), {}))
        with pytest.raises(TypeError, match=r"declares it needs \['ref_logp'\], but its function takes no such keyword"):
            bind_objective("needs_what_it_lacks", {})
    finally:
        OBJECTIVES.pop("needs_what_it_lacks", None)


@pytest.mark.parametrize("name", ["disa", "flowrl", "grpo", "gspo", "aspo", "sft"])
def test_metrics_stay_tensors_so_a_step_reads_them_back_at_once(batch, name):
    inp = _objective_inputs(batch)
    _, metrics = _call(name, inp)
    assert metrics and all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
                           for v in metrics.values())
