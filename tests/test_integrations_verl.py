"""DISA inside veRL: the registered advantage estimator + policy loss give our objective's loss and gradient.

veRL 0.9 pins transformers<=5.10 and would downgrade the shared environment, so it is not in the ``dev``
extra: this file runs where ``disa[verl]`` is installed and is skipped elsewhere (see docs/engines.md).
"""

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")

from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.config.algorithm import KLControlConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from disa.integrations.verl import NAME, disa_reward, verl_extra_info  # noqa: E402
from disa.objectives import compute_objective  # noqa: E402

BETA = 4.0


def veRL_token_rewards(scores, old, ref, mask, kl_coef):
    """What veRL's ``apply_kl_penalty`` (trainer/ppo/ray_trainer.py) writes: the reward at each response's last
    token minus ``kl_coef * kl_penalty(old, ref, 'kl')`` per token (its three lines, since importing the trainer
    module needs torchdata)."""
    last = mask.sum(-1).long() - 1
    token_scores = torch.zeros_like(old)
    token_scores[torch.arange(len(scores)), last] = scores
    kld = core_algos.kl_penalty(old, ref, kl_penalty="kl") * mask
    return token_scores - kl_coef * kld


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    old = -1.0 - torch.rand(3, 4, generator=g)
    ref = -1.0 - torch.rand(3, 4, generator=g)
    logp = (old + 0.1 * torch.randn(3, 4, generator=g)).requires_grad_(True)
    raw = torch.tensor([1.0, 0.0, 1.0])
    info = [verl_extra_info(log_z=z, beta=BETA, reward_scale=a, reward_shift=b)
            for z, a, b in [(0.7, 2.0, -0.5), (-0.3, 1.0, 0.0), (0.7, 2.0, -0.5)]]
    return mask, old, ref, logp, raw, info


def test_registered_veRL_loss_equals_our_disa_objective_on_a_fixed_batch():
    mask, old, ref, logp, raw, info = batch()
    scores = torch.tensor([disa_reward(float(r), i) for r, i in zip(raw, info)])
    rewards = veRL_token_rewards(scores, old, ref, mask, kl_coef=1 / BETA)
    algo = AlgoConfig(adv_estimator=NAME, use_kl_in_reward=True, kl_penalty="kl",
                      kl_ctrl=KLControlConfig(type="fixed", kl_coef=1 / BETA))
    adv, _ = core_algos.get_adv_estimator_fn(NAME)(token_level_rewards=rewards, response_mask=mask,
                                                   index=None, config=algo)
    loss, metrics = core_algos.get_policy_loss_fn(NAME)(old_log_prob=old, log_prob=logp, advantages=adv,
                                                        response_mask=mask, loss_agg_mode="token-mean", config=None)
    (grad_verl,) = torch.autograd.grad(loss, logp)

    r_tilde = torch.tensor([2.0 * 1 - 0.5, 0.0, 2.0 * 1 - 0.5])
    log_z = torch.tensor([0.7, -0.3, 0.7])
    ours, ours_metrics = compute_objective("disa", inputs={"logp": logp, "old_logp": old, "ref_logp": ref,
                                                           "mask": mask, "rewards": r_tilde, "log_z": log_z}, beta=BETA)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    assert float(loss) == pytest.approx(float(ours), rel=1e-5)
    assert torch.allclose(grad_verl, grad_ours, atol=1e-6)
    assert metrics["actor/disa_tb_residual_mean"] == pytest.approx(ours_metrics["tb_residual_mean"], rel=1e-5)
    # by hand, rollout 1 (on-policy weight 1 there since logp ~ old; check the residual itself):
    delta1 = -0.3 + float((logp[1] * mask[1]).sum()) - BETA * 0.0 - float((ref[1] * mask[1]).sum())
    resid = -BETA * float(rewards[1].sum()) + float(((logp[1] - old[1]) * mask[1]).sum())
    assert resid == pytest.approx(delta1, abs=1e-5)


def test_estimator_refuses_a_KL_setup_that_does_not_carry_log_pi_ref():
    mask, *_ = batch()
    fn = core_algos.get_adv_estimator_fn(NAME)
    for algo in (AlgoConfig(use_kl_in_reward=False), AlgoConfig(use_kl_in_reward=True, kl_penalty="low_var_kl")):
        with pytest.raises(ValueError, match="use_kl_in_reward"):
            fn(token_level_rewards=torch.zeros(3, 4), response_mask=mask, config=algo)


def test_reward_wrapper_needs_the_log_z_columns():
    with pytest.raises(KeyError, match="disa_log_z"):
        disa_reward(1.0, {})
    assert disa_reward(1.0, verl_extra_info(log_z=2.0, beta=4.0)) == pytest.approx(0.5)
