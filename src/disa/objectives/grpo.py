"""GRPO (docs/formulas.md: reward-maximisation baselines): the token-level clipped PPO surrogate with group advantages."""

from __future__ import annotations

from typing import Optional

import torch

from .common import Tensor, add_kl_penalty, policy_gradient_needs, aggregate, check_per_rollout, check_token_inputs, masked_mean, zero_padding
from .registry import register_objective


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss ``-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)`` and a 0/1 "was clipped" tensor.

    ``ratio (B, T)``, ``advantages (B,)`` broadcast over tokens.
    """
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).to(ratio.dtype)


def _check_clip(clip_eps: float, clip_eps_high: Optional[float]) -> tuple[float, float]:
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0 < clip_eps < 1) or not high > 0:  # written so that NaN fails too
        raise ValueError(f"clip_eps must be in (0, 1) and clip_eps_high > 0, got {clip_eps}, {clip_eps_high}")
    return clip_eps, high


@register_objective("grpo", family="policy_gradient", needs=policy_gradient_needs)
def grpo_loss(
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    kl_coef: float = 0.0,
    aggregation: str = "seq_mean_token_mean",
    max_len: Optional[int] = None,
) -> tuple[Tensor, dict]:
    """GRPO: token ratios ``rho_t = pi_theta / pi_old``, clipped surrogate, optional k3 KL to ``pi_ref``.

    Shapes: ``logp, old_logp, ref_logp, mask (B, T)``; ``advantages (B,)`` (see
    ``disa.estimators.group_normalize``). ``clip_eps_high`` gives DAPO's asymmetric "clip-higher".
    """
    check_token_inputs(mask, logp=logp, old_logp=old_logp, ref_logp=ref_logp)
    check_per_rollout(mask.shape[0], advantages=advantages)
    low, high = _check_clip(clip_eps, clip_eps_high)
    logp, old_logp, ref_logp = zero_padding(mask, logp, old_logp, ref_logp)
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    token_loss, was_clipped = clipped_surrogate(ratio, advantages, low, high)
    metrics: dict = {}
    token_loss = add_kl_penalty(token_loss, logp, ref_logp, mask, kl_coef, metrics)
    loss = aggregate(token_loss, mask, aggregation, max_len)
    metrics["clip_frac"] = masked_mean(was_clipped, mask)
    metrics["ratio_mean"] = masked_mean(ratio.detach(), mask)
    return loss, metrics
