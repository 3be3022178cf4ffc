"""DISA's Stage 3 inside veRL (PyPI ``verl`` 0.9) through its own extension points, no fork and no custom actor.

veRL's registered policy losses receive ``old_log_prob, log_prob, advantages, response_mask`` but not
``log pi_ref`` or a per-prompt ``log Z``. Trajectory balance needs both, and the smallest supported route is
to let veRL's existing plumbing carry the constant part of the residual into ``advantages``:

1. reward: ``disa_score`` (``custom_reward_function``) returns ``r~ - log Z(x) / beta``, reading the frozen
   ``log Z`` (and the affine map, beta) from the row's ``extra_info`` (``verl_extra_info``);
2. ``algorithm.use_kl_in_reward=True, kl_penalty=kl, kl_ctrl.type=fixed, kl_ctrl.kl_coef=1/beta``: veRL's
   ``apply_kl_penalty`` subtracts ``(1/beta) (log pi_old - log pi_ref)`` per token, so
   ``-beta * sum_t token_level_rewards = log Z + log pi_old - beta r~ - log pi_ref = delta_old``, the residual
   (eq. 5) at the rollout policy;
3. ``register_adv_est("disa_tb")`` broadcasts ``delta_old`` over the response tokens as the "advantage";
4. ``register_policy_loss("disa_tb")`` rebuilds ``delta_theta = delta_old + sum_t (log pi_theta - log pi_old)``
   and hands it to our ``trajectory_balance_loss`` (frozen ``log Z``: no gradient reaches it).

Normalisation (what veRL 0.9's engine expects of a policy loss): the actor's ``ppo_loss``
(``verl.workers.utils.losses``) calls the loss once per micro-batch, back-propagates each result as it is and
lets FSDP/DDP average the gradients over data-parallel ranks; it puts ``dp_size`` and ``global_batch_size``
(the mini-batch's rollout count over all ranks) into ``config.global_batch_info``. A per-rollout loss must
then return ``sum_{micro-batch} loss_b / global_batch_size * dp_size`` (core_algos ``agg_loss``'s seq-mean
modes), so that the micro-batches and ranks add up to the mini-batch mean, our objective. Without that
information (veRL <= 0.7's ``dp_actor``, which scales each micro-batch *mean* by ``1 / gradient_accumulation``
itself, or a direct call) the loss is the micro-batch mean. ``.ci/verl_check.sh`` checks both against our
objective through veRL's own code.

This is exact for trajectory-level residuals (DISA's default, ``length_normalize=False``). Importing this
module registers both names; veRL imports it through ``VERL_USE_EXTERNAL_MODULES=disa.integrations.verl``
or the ``verl.plugins`` entry point that ``disa[verl]`` declares. A worked config: ``examples/verl_disa.sh``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from disa.objectives import compute_objective
from disa.training.learner import read_back
from disa.training.rollouts import target_rewards

try:
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("disa.integrations.verl needs veRL: pip install 'disa[verl]'") from e

NAME = "disa_tb"
KL_ESTIMATOR = "kl"  # log pi_old - log pi_ref, unclamped: the only veRL estimator that is the log-ratio itself


def verl_extra_info(log_z: float, beta: float, reward_scale: float = 1.0, reward_shift: float = 0.0) -> dict:
    """The ``extra_info`` entries ``disa_score`` reads (merge them into each veRL dataset row's ``extra_info``)."""
    return {"disa_log_z": float(log_z), "disa_beta": float(beta), "disa_reward_scale": float(reward_scale),
            "disa_reward_shift": float(reward_shift)}


def disa_reward(raw: float, extra_info: Mapping[str, Any]) -> float:
    """``r~ - log Z / beta`` with ``r~ = scale * raw + shift``: the reward whose KL-shaped sum is ``-delta / beta``."""
    missing = [k for k in ("disa_log_z", "disa_beta") if k not in (extra_info or {})]
    if missing:
        raise KeyError(f"veRL row extra_info lacks {missing}: build the dataset with disa.integrations.verl."
                       "verl_extra_info (log Z from `disa fit-z`'s table)")
    scale, shift = (torch.tensor([float(extra_info.get(k, d))], dtype=torch.float64)
                    for k, d in (("disa_reward_scale", 1.0), ("disa_reward_shift", 0.0)))
    # Stage 3's own r~ (disa.training.rollouts.target_rewards), one row of one rollout
    r_tilde = float(target_rewards("affine", torch.tensor([[float(raw)]], dtype=torch.float64), scale, shift))
    return r_tilde - float(extra_info["disa_log_z"]) / float(extra_info["disa_beta"])


def make_disa_score(base_score: Callable[..., float]) -> Callable[..., dict]:
    """Wrap a veRL ``compute_score(data_source, solution_str, ground_truth, extra_info)`` into DISA's reward."""

    def disa_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        raw = base_score(data_source, solution_str, ground_truth, extra_info=extra_info, **kwargs)
        raw = raw["score"] if isinstance(raw, dict) else raw
        return {"score": disa_reward(raw, extra_info), "disa_raw_reward": float(raw)}

    return disa_score


def beta_from_algo_config(config) -> float:
    """DISA's beta is ``1 / kl_ctrl.kl_coef``; any other KL set-up would put something else in the rewards."""
    get = (lambda c, k: c.get(k)) if isinstance(config, Mapping) else getattr
    if config is None or not get(config, "use_kl_in_reward") or get(config, "kl_penalty") != KL_ESTIMATOR:
        raise ValueError("adv_estimator=disa_tb needs algorithm.use_kl_in_reward=True and algorithm.kl_penalty=kl "
                         "(veRL then puts log pi_old - log pi_ref into the token rewards)")
    ctrl = get(config, "kl_ctrl")
    if get(ctrl, "type") != "fixed" or not get(ctrl, "kl_coef") > 0:
        raise ValueError("adv_estimator=disa_tb needs algorithm.kl_ctrl.type=fixed and kl_ctrl.kl_coef = 1/beta > 0")
    return 1.0 / float(get(ctrl, "kl_coef"))


@register_adv_est(NAME)
def disa_tb_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None, config=None,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta_old = -beta * sum_t token_level_rewards`` per rollout, broadcast over its response tokens."""
    beta = beta_from_algo_config(config)
    delta_old = -beta * (token_level_rewards * response_mask).sum(dim=-1)
    adv = delta_old.unsqueeze(-1) * response_mask
    return adv, adv


def row_value(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The per-rollout constant a ``(B, T)`` broadcast holds (its masked mean)."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def check_actor_config(config) -> None:
    """Refuse actor settings that would add non-trajectory-balance terms to ``disa_tb``'s loss.

    veRL's ``ppo_loss`` subtracts ``entropy_coeff * entropy`` and adds ``kl_loss_coef * KL(pi_theta, pi_ref)``
    after the policy loss: either would change DISA's objective (its KL to ``pi_ref`` is already inside the
    residual, through the rewards).
    """
    if config is None:
        return
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (
        lambda k, d=None: getattr(config, k, d))
    bad = []
    if float(get("entropy_coeff", 0.0) or 0.0) != 0.0:
        bad.append(f"actor_rollout_ref.actor.entropy_coeff={get('entropy_coeff')} (set it to 0)")
    if bool(get("use_kl_loss", False)):
        bad.append("actor_rollout_ref.actor.use_kl_loss=True (set it to False: DISA's KL to pi_ref is in the "
                   "residual, through algorithm.use_kl_in_reward)")
    if bad:
        raise ValueError("policy_loss.loss_mode=disa_tb is trajectory balance alone; these settings would add "
                         "other terms to the loss: " + "; ".join(bad))


def global_batch_scale(local_rollouts: int, config) -> float:
    """The factor that turns a micro-batch *mean* into veRL's share of the global mini-batch mean.

    ``local_rollouts * dp_size / global_batch_size`` when veRL's engine gave ``config.global_batch_info``
    (``ppo_loss`` does); 1 without it (a caller that averages micro-batch means itself, as veRL <= 0.7's
    ``dp_actor`` did). ``dp_size > 1`` without ``global_batch_size`` cannot be normalised and is refused.
    """
    info = getattr(config, "global_batch_info", None) if not isinstance(config, Mapping) else config.get(
        "global_batch_info")
    info = info or {}
    dp_size = int(info.get("dp_size") or 1)
    global_batch_size = info.get("global_batch_size")
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError(f"disa_tb: dp_size={dp_size} but config.global_batch_info has no global_batch_size "
                             "(the mini-batch's rollout count over all ranks), so the loss cannot be normalised")
        return 1.0
    if not int(global_batch_size) > 0:
        raise ValueError(f"disa_tb: global_batch_size must be > 0, got {global_batch_size}")
    return local_rollouts * dp_size / int(global_batch_size)


@register_policy_loss(NAME)
def disa_tb_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                        rollout_is_weights: Optional[torch.Tensor] = None, **kwargs):
    """Our ``trajectory_balance_loss`` on ``delta_theta = delta_old + sum_t (log pi_theta - log pi_old)``.

    Passing ``ref_logp = old_log_prob``, ``log_z = delta_old``, ``rewards = 0``, ``beta = 1`` makes our residual
    ``delta_old + sum_t log pi_theta - sum_t log pi_old``: the same number, and the same gradient, as eq. 10
    with the frozen ``log Z`` (``log_z`` is detached inside). The micro-batch mean is then scaled by
    ``global_batch_scale`` (see the module docstring). ``loss_agg_mode`` does not apply (a squared trajectory
    residual has one aggregation, the mean over rollouts); the rollout weight is DISA's clipped trajectory
    ratio. veRL's token-level rollout-correction weights (``algorithm.rollout_correction``) are refused: they
    are a different correction of the same off-policy gap.
    """
    check_actor_config(config)
    if rollout_is_weights is not None:
        raise ValueError("disa_tb does not take veRL's rollout-correction weights (rollout_is_weights): DISA's "
                         "trajectory IS weight min(pi_theta/pi_old, clip) already corrects the rollout; turn "
                         "algorithm.rollout_correction's rollout_is off")
    mask = response_mask.to(log_prob.dtype)
    delta_old = row_value(advantages, mask).detach()
    old = old_log_prob.detach()
    loss, metrics = compute_objective("disa", inputs={
        "logp": log_prob, "old_logp": old, "ref_logp": old, "mask": mask,
        "rewards": torch.zeros_like(delta_old), "log_z": delta_old}, beta=1.0)
    metrics.pop("log_z_mean")  # here it would be delta_old's mean, not log Z's
    loss = loss * global_batch_scale(mask.shape[0], config)
    return loss, {f"actor/disa_{k}": v for k, v in read_back(metrics).items()}
