"""Numerical checks of the paper's propositions (docs/formulas.md) on small discrete problems.

Everything is float64 and exact where it can be: expectations over the proposal are sums over all
N-tuples of outcomes (or over the multinomial count vectors, which determine both labels), and the
trajectory-balance loss is computed by ``disa_loss`` on a batch that enumerates the outcomes, one
single-token rollout per outcome, so the policy's log-probability of the rollout is ``log pi(y)``.

A uniform batch mean over the ``K`` enumerated outcomes becomes an expectation under a sampling
distribution ``s`` by giving rollout ``y`` the detached weight ``K s(y)``: ``disa_loss``'s clipped
trajectory IS weight ``exp(log pi(y) - old_logp(y))`` does exactly that with ``old_logp = log pi - log(K s)``
and a clip that never binds. On-policy, ``s = sg(pi)``; off-policy, ``s`` is a fixed behaviour distribution.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from disa.estimators import log_importance_weights, log_z_geometric, log_z_lse
from disa.metrics import kl_divergence, total_variation
from disa.objectives import disa_loss

F64 = torch.float64
NO_CLIP = 1e12


def t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64)


# --------------------------------------------------------------------------- exact quantities
def partition_function(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """``Z = sum_y pi_ref(y) exp(beta r(y))`` over the last dimension."""
    return (pi_ref * torch.exp(beta * rewards)).sum(dim=-1)


def tilted_target(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """``pi*(y) = pi_ref(y) exp(beta r(y)) / Z`` (eq. 4)."""
    unnorm = pi_ref * torch.exp(beta * rewards)
    return unnorm / unnorm.sum(dim=-1, keepdim=True)


def expected_tb_loss(
    log_pi: torch.Tensor,
    log_ref: torch.Tensor,
    rewards: torch.Tensor,
    log_z: torch.Tensor,
    beta: float,
    sampling: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean_x E_{y~s(.|x)}[(log_z(x) + log pi(y|x) - beta r(x,y) - log pi_ref(y|x))^2]`` via ``disa_loss``.

    Shapes: ``log_pi, log_ref, rewards (P, K)``, ``log_z (P,)``; ``sampling`` ``(P, K)`` is the fixed
    behaviour distribution, ``None`` for on-policy (``s = sg(pi)``). Outcomes are the batch's rollouts.
    """
    num_prompts, num_outcomes = log_pi.shape
    log_s = log_pi.detach() if sampling is None else torch.log(sampling)
    logp = log_pi.reshape(-1, 1)
    old_logp = logp.detach() - (math.log(num_outcomes) + log_s).reshape(-1, 1)
    loss, _ = disa_loss(
        logp=logp,
        old_logp=old_logp,
        ref_logp=log_ref.reshape(-1, 1),
        mask=torch.ones_like(logp, dtype=torch.bool),
        rewards=rewards.reshape(-1),
        log_z=log_z.repeat_interleave(num_outcomes),
        beta=beta,
        rollout_weight_mode="clipped_is",
        weight_clip=NO_CLIP,
    )
    return loss  # mean over P*K rows of K s(y|x) res^2 = mean_x sum_y s(y|x) res^2


# --------------------------------------------------------------------------- Prop 1 and 2 setup
PI_REF = t([0.6, 0.3, 0.1])
REWARDS = t([0.0, 1.0, 1.0])
BETA = 2.0
Q = t([0.3, 0.4, 0.3])


def exact_problem():
    z = float(partition_function(PI_REF, REWARDS, BETA))
    weights = PI_REF * torch.exp(BETA * REWARDS) / Q  # w(y) = pi_ref exp(beta r) / q = Z pi*(y) / q(y)
    var_w = float((Q * (weights - z) ** 2).sum())
    return z, var_w


def labels_over_all_tuples(n: int):
    """Every N-tuple of outcomes (K^N rows): its probability under q^N and both labels via disa.estimators."""
    tuples = torch.tensor(list(itertools.product(range(3), repeat=n)))
    log_w = log_importance_weights(torch.log(PI_REF)[tuples], torch.log(Q)[tuples], REWARDS[tuples], BETA)
    prob = torch.exp(torch.log(Q)[tuples].sum(dim=1))
    return prob, log_z_lse(log_w), log_z_geometric(log_w)


def labels_over_count_vectors(n: int):
    """Exact law of the labels for large N: both depend only on the counts (n_1, n_2, n_3) ~ Multinomial(N, q)."""
    counts = torch.tensor([(a, b, n - a - b) for a in range(n + 1) for b in range(n + 1 - a)])
    log_prob = (
        math.lgamma(n + 1)
        - torch.lgamma(counts.to(F64) + 1).sum(dim=1)
        + (counts * torch.log(Q)).sum(dim=1)
    )
    # one (N,)-row per count vector: outcome k repeated n_k times
    position = torch.arange(n)[None, :]
    bounds = counts.cumsum(dim=1)
    outcome = (position >= bounds[:, :1]).long() + (position >= bounds[:, 1:2]).long()
    log_w = log_importance_weights(torch.log(PI_REF)[outcome], torch.log(Q)[outcome], REWARDS[outcome], BETA)
    return torch.exp(log_prob), log_z_lse(log_w), log_z_geometric(log_w)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_prop1_linear_estimator_is_unbiased_by_enumeration(n):
    z, _ = exact_problem()
    prob, log_z_hat, _ = labels_over_all_tuples(n)
    assert float(prob.sum()) == pytest.approx(1.0, abs=1e-14)
    assert float((prob * torch.exp(log_z_hat)).sum()) == pytest.approx(z, rel=1e-13)  # E[Z^_N] = Z
    assert float((prob * log_z_hat).sum()) < math.log(z)  # E[log Z^_N] < log Z (Jensen)


def test_prop1_count_vector_law_matches_tuple_enumeration():
    prob_t, lse_t, geo_t = labels_over_all_tuples(4)
    prob_c, lse_c, geo_c = labels_over_count_vectors(4)
    assert float((prob_t * lse_t).sum()) == pytest.approx(float((prob_c * lse_c).sum()), rel=1e-13)
    assert float((prob_t * geo_t).sum()) == pytest.approx(float((prob_c * geo_c).sum()), rel=1e-13)


def test_prop1_log_label_gap_matches_delta_method_and_shrinks_like_one_over_n():
    z, var_w = exact_problem()
    gaps, ratios = {}, {}
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        prob, log_z_hat, _ = labels_over_count_vectors(n)
        assert float(prob.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float((prob * torch.exp(log_z_hat)).sum()) == pytest.approx(z, rel=1e-12)  # unbiased at every N
        gaps[n] = math.log(z) - float((prob * log_z_hat).sum())
        ratios[n] = gaps[n] / (var_w / (2 * n * z**2))
    assert all(g > 0 for g in gaps.values())
    # the second-order term Var_q(w) / (2 N Z^2) describes the gap better and better
    errors = [abs(ratios[n] - 1) for n in (2, 4, 8, 16, 32, 64, 128)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert abs(ratios[16] - 1) < 0.03
    assert abs(ratios[128] - 1) < 0.005
    # ~1/N: doubling N halves the gap
    for n in (16, 32, 64):
        assert gaps[n] / gaps[2 * n] == pytest.approx(2.0, rel=0.02)


def test_prop1_monte_carlo_agrees_with_exact_law():
    torch.manual_seed(0)
    n, reps = 32, 20000
    draws = torch.multinomial(Q, reps * n, replacement=True).reshape(reps, n)
    log_w = log_importance_weights(torch.log(PI_REF)[draws], torch.log(Q)[draws], REWARDS[draws], BETA)
    mc = log_z_lse(log_w)
    prob, log_z_hat, _ = labels_over_count_vectors(n)
    exact_mean = float((prob * log_z_hat).sum())
    standard_error = float(mc.std()) / math.sqrt(reps)
    assert abs(float(mc.mean()) - exact_mean) < 4 * standard_error
    z, _ = exact_problem()
    assert float(torch.exp(mc).mean()) == pytest.approx(z, rel=0.02)


def test_prop2_geometric_label_bias_is_kl_and_does_not_shrink():
    z, _ = exact_problem()
    pi_star = tilted_target(PI_REF, REWARDS, BETA)
    expected = math.log(z) - float(kl_divergence(Q, pi_star))
    assert float(kl_divergence(Q, pi_star)) > 0.05  # a visible bias for this proposal
    for n in (1, 2, 3, 4):
        prob, _, geo = labels_over_all_tuples(n)
        assert float((prob * geo).sum()) == pytest.approx(expected, rel=1e-13)
    for n in (16, 128):
        prob, log_z_hat, geo = labels_over_count_vectors(n)
        assert float((prob * geo).sum()) == pytest.approx(expected, rel=1e-12)
        # at large N the LSE label is far closer to log Z than the geometric one
        assert math.log(z) - float((prob * log_z_hat).sum()) < 0.1 * (math.log(z) - expected)


# --------------------------------------------------------------------------- Prop 3
REF5 = t([0.4, 0.25, 0.15, 0.12, 0.08])
REWARDS5 = t([0.0, 1.0, 0.0, 1.0, 0.5])
BETA5 = 1.5


INITIAL_LOGITS = [[2.0, -1.0, 0.5, -2.0, 1.0]]


def gradient_descent_on_tb(sampling, steps: int = 300, lr: float = 1.0) -> torch.Tensor:
    """Plain gradient descent on eq. 10 over the logits of a softmax policy, exact log Z; returns pi."""
    log_z = torch.log(partition_function(REF5, REWARDS5, BETA5)).reshape(1)
    logits = torch.tensor(INITIAL_LOGITS, dtype=F64, requires_grad=True)
    for _ in range(steps):
        loss = expected_tb_loss(torch.log_softmax(logits, dim=-1), torch.log(REF5)[None], REWARDS5[None],
                                log_z, BETA5, sampling=sampling)
        (grad,) = torch.autograd.grad(loss, logits)
        with torch.no_grad():
            logits -= lr * grad
    return torch.softmax(logits.detach(), dim=-1)[0]


def test_prop3_on_policy_gradient_descent_reaches_pi_star():
    pi_star = tilted_target(REF5, REWARDS5, BETA5)
    start = torch.softmax(t(INITIAL_LOGITS), dim=-1)[0]
    assert float(total_variation(start, pi_star)) > 0.4  # a long way to go
    pi = gradient_descent_on_tb(sampling=None)
    assert float(total_variation(pi, pi_star)) < 1e-6


def test_prop3_off_policy_full_support_behaviour_reaches_pi_star():
    behaviour = t([[0.1, 0.3, 0.2, 0.15, 0.25]])
    pi = gradient_descent_on_tb(sampling=behaviour)
    pi_star = tilted_target(REF5, REWARDS5, BETA5)
    assert float(total_variation(pi, pi_star)) < 1e-6


def test_prop3_pi_star_is_the_unique_global_minimiser():
    torch.manual_seed(0)
    pi_star = tilted_target(REF5, REWARDS5, BETA5)
    log_z = torch.log(partition_function(REF5, REWARDS5, BETA5)).reshape(1)
    at_star = expected_tb_loss(torch.log(pi_star)[None], torch.log(REF5)[None], REWARDS5[None], log_z, BETA5)
    assert float(at_star) == pytest.approx(0.0, abs=1e-25)
    for _ in range(50):
        pi = torch.softmax(torch.randn(1, 5, dtype=F64) * 2, dim=-1)
        loss = expected_tb_loss(torch.log(pi), torch.log(REF5)[None], REWARDS5[None], log_z, BETA5)
        assert float(loss) > 1e-6


@pytest.mark.parametrize("delta", [-0.7, 0.3])
def test_prop3_prompt_only_bias_keeps_pi_star_stationary_on_policy(delta):
    pi_star = tilted_target(REF5, REWARDS5, BETA5)
    log_z = torch.log(partition_function(REF5, REWARDS5, BETA5)).reshape(1) + delta
    logits = torch.log(pi_star)[None].clone().requires_grad_(True)
    loss = expected_tb_loss(torch.log_softmax(logits, dim=-1), torch.log(REF5)[None], REWARDS5[None], log_z, BETA5)
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(loss.detach()) == pytest.approx(delta**2, rel=1e-12)  # every residual equals delta at pi*
    assert float(grad.abs().max()) < 1e-13  # 2 delta E_pi*[grad log pi] = 0
    # off-policy the same bias does move pi*: the gradient is 2 delta (b - pi*) in logit space
    behaviour = t([[0.1, 0.3, 0.2, 0.15, 0.25]])
    loss_b = expected_tb_loss(torch.log_softmax(logits, dim=-1), torch.log(REF5)[None], REWARDS5[None], log_z,
                              BETA5, sampling=behaviour)
    (grad_b,) = torch.autograd.grad(loss_b, logits)
    np.testing.assert_allclose(grad_b.numpy(), (2 * delta * (behaviour - pi_star[None])).numpy(), atol=1e-13)


# --------------------------------------------------------------------------- Prop 4
def test_prop4_frozen_log_z_error_envelope_on_random_instances():
    torch.manual_seed(4)
    num_prompts, num_outcomes = 4, 5
    gaps_to_bound = []
    for _ in range(200):
        pi_ref = torch.distributions.Dirichlet(torch.ones(num_outcomes, dtype=F64)).sample((num_prompts,))
        rewards = torch.where(torch.rand(num_prompts, num_outcomes) < 0.5, 1.0, 0.0).to(F64)
        rewards = rewards + 0.3 * torch.randn(num_prompts, num_outcomes, dtype=F64) * (torch.rand(()) < 0.5)
        beta = float(torch.empty(()).uniform_(0.3, 4.0))
        log_pi = torch.log_softmax(torch.randn(num_prompts, num_outcomes, dtype=F64) * 2, dim=-1)
        log_z = torch.log(partition_function(pi_ref, rewards, beta))
        errors = torch.randn(num_prompts, dtype=F64) * float(torch.empty(()).uniform_(0.01, 2.0))
        eps = math.sqrt(float((errors**2).mean()))  # prompts weighted uniformly, as the batch mean does

        l_exact = float(expected_tb_loss(log_pi, torch.log(pi_ref), rewards, log_z, beta))
        l_frozen = float(expected_tb_loss(log_pi, torch.log(pi_ref), rewards, log_z + errors, beta))
        upper = l_exact + eps**2 + 2 * eps * math.sqrt(l_exact)
        lower = (math.sqrt(l_exact) - eps) ** 2  # the same Cauchy-Schwarz argument, other side
        assert lower - 1e-12 <= l_frozen <= upper + 1e-12
        gaps_to_bound.append((upper - l_frozen) / upper)
    # the envelope is informative: some instances come within 10% of it
    assert min(gaps_to_bound) < 0.1


# --------------------------------------------------------------------------- App C.5 counterexample
C5_REF = t([[0.5, 0.5]])
C5_REWARDS = t([[1.0, 0.0]])
C5_BETA = math.log(2)
C5_THRESHOLD = -math.log(1.5) / 2


def c5_loss(p_y1: float, delta: float) -> float:
    """On-policy loss of the policy (p, 1 - p) with log Z + delta, through disa_loss; 0 < p <= 1 or p = 0."""
    log_z = torch.log(partition_function(C5_REF, C5_REWARDS, C5_BETA)) + delta
    support = [k for k, p in enumerate((p_y1, 1 - p_y1)) if p > 0]  # a zero-probability answer is never sampled
    log_pi = torch.log(t([[p_y1, 1 - p_y1]]))[:, support]
    return float(expected_tb_loss(log_pi, torch.log(C5_REF)[:, support], C5_REWARDS[:, support], log_z, C5_BETA))


def test_c5_exact_numbers():
    assert float(partition_function(C5_REF, C5_REWARDS, C5_BETA)) == pytest.approx(1.5, rel=1e-15)
    np.testing.assert_allclose(tilted_target(C5_REF, C5_REWARDS, C5_BETA).numpy(), [[2 / 3, 1 / 3]], rtol=1e-15)
    for delta in (-1.0, -0.5, 0.0, 0.4):
        assert c5_loss(2 / 3, delta) == pytest.approx(delta**2, abs=1e-15)  # L(pi*) = delta^2
    # delta = -0.5: always answering y1 costs (log(3/2) - 0.5)^2 ~ 0.0089 < 0.25
    assert c5_loss(1.0, -0.5) == pytest.approx((math.log(1.5) - 0.5) ** 2, rel=1e-12)
    assert c5_loss(1.0, -0.5) == pytest.approx(0.00894, abs=1e-5)
    assert c5_loss(1.0, -0.5) < c5_loss(2 / 3, -0.5)
    # delta = -1: always answering y2 costs (log 3 - 1)^2 ~ 0.0097 < 1
    assert c5_loss(0.0, -1.0) == pytest.approx((math.log(3) - 1) ** 2, rel=1e-12)
    assert c5_loss(0.0, -1.0) == pytest.approx(0.0097, abs=1e-4)
    assert c5_loss(0.0, -1.0) < c5_loss(1.0, -1.0) < c5_loss(2 / 3, -1.0)


def test_c5_loss_decomposition():
    # L(pi) = delta^2 + 2 delta KL(pi || pi*) + E_pi[(log pi / pi*)^2]
    pi_star = np.array([2 / 3, 1 / 3])
    for p in (0.1, 0.5, 0.9):
        pi = np.array([p, 1 - p])
        log_ratio = np.log(pi / pi_star)
        for delta in (-0.6, 0.25):
            expected = delta**2 + 2 * delta * (pi * log_ratio).sum() + (pi * log_ratio**2).sum()
            assert c5_loss(p, delta) == pytest.approx(expected, rel=1e-12)


def test_c5_threshold_and_global_minimiser_by_grid_search():
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, 301), [2 / 3]]))

    def argmin_loss(delta):
        losses = np.array([c5_loss(p, delta) for p in grid])
        return grid[losses.argmin()], losses.min()

    for delta in (0.1, 0.5, 2.0, 0.0, -0.1, C5_THRESHOLD + 0.01):
        best_p, best = argmin_loss(delta)
        assert best_p == pytest.approx(2 / 3, abs=1e-12)  # pi* stays the global minimiser
        assert best == pytest.approx(delta**2, abs=1e-15)
    # just below the threshold the always-y1 policy beats pi*; just above it does not
    assert c5_loss(1.0, C5_THRESHOLD - 0.01) < c5_loss(2 / 3, C5_THRESHOLD - 0.01)
    assert c5_loss(1.0, C5_THRESHOLD + 0.01) > c5_loss(2 / 3, C5_THRESHOLD + 0.01)
    assert c5_loss(1.0, C5_THRESHOLD) == pytest.approx(c5_loss(2 / 3, C5_THRESHOLD), rel=1e-12)
    assert argmin_loss(-0.5)[0] == 1.0
    assert argmin_loss(-1.0)[0] == 0.0


@pytest.mark.parametrize("delta", [-1.0, -0.5, 0.3])
def test_c5_on_policy_gradient_at_pi_star_is_zero(delta):
    logits = torch.log(t([[2 / 3, 1 / 3]])).requires_grad_(True)
    log_z = torch.log(partition_function(C5_REF, C5_REWARDS, C5_BETA)) + delta
    loss = expected_tb_loss(torch.log_softmax(logits, dim=-1), torch.log(C5_REF), C5_REWARDS, log_z, C5_BETA)
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(grad.abs().max()) < 1e-14
