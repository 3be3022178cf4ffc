"""ASPO (arXiv 2510.06062; docs/formulas.md: reward-maximisation baselines): asymmetric, flipped ratios for positive tokens.

In outcome-supervised RL every token of a rollout shares one advantage, so PPO's ratio acts as a token
weight that favours tokens whose probability already went up. ASPO keeps the usual clipped ratio for
negative advantages and, for positive ones, weights each token by ``1/rho`` instead of ``rho``, with dual
clips that fall back to a bounded-weight log-likelihood term.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import Tensor, add_kl_penalty, policy_gradient_needs, aggregate, check_per_rollout, check_token_inputs, masked_mean, zero_padding
from .registry import register_objective


def aspo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip_neg: float = 3.0,
    dual_clip_pos: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Per-token ASPO loss ``(B, T)`` and a 0/1 tensor marking tokens handled by a dual clip.

    ``A < 0``: ``rho_c = max(rho, 1 - eps_low)``, loss ``-A rho_c``; where ``rho_c > c_neg`` the loss is
    ``-A c_neg log pi_theta``. ``A > 0``: ``rho_c = min(rho, 1 + eps_high)``, loss
    ``-A (rho_c / sg(rho_c)) / sg(rho_c)`` (value ``-A / rho_c``, gradient weight ``1/rho_c``); where
    ``1/rho_c > c_pos`` the loss is ``-A c_pos log pi_theta``. ``A = 0`` contributes nothing.
    """
    adv = advantages[:, None].to(logp.dtype).expand_as(logp)
    rho = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))

    rho_neg = torch.clamp(rho, min=1.0 - clip_low)
    neg_dual = rho_neg > dual_clip_neg
    loss_neg = torch.where(neg_dual, -adv * dual_clip_neg * logp, -adv * rho_neg)

    rho_pos = torch.clamp(rho, max=1.0 + clip_high)
    flipped = (rho_pos / rho_pos.detach()) / rho_pos.detach()
    pos_dual = (1.0 / rho_pos.detach()) > dual_clip_pos
    loss_pos = torch.where(pos_dual, -adv * dual_clip_pos * logp, -adv * flipped)

    loss = torch.where(adv < 0, loss_neg, torch.where(adv > 0, loss_pos, torch.zeros_like(logp)))
    dual = torch.where(adv < 0, neg_dual, torch.where(adv > 0, pos_dual, torch.zeros_like(neg_dual)))
    return loss, dual.to(logp.dtype)


@register_objective("aspo", family="policy_gradient", needs=policy_gradient_needs)
def aspo_loss(
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    clip_eps: float = 0.2,
    clip_eps_high: float = 0.28,
    dual_clip_neg: float = 3.0,
    dual_clip_pos: float = 3.0,
    kl_coef: float = 0.0,
    aggregation: str = "token_mean",
    max_len: Optional[int] = None,
) -> tuple[Tensor, dict]:
    """ASPO policy loss over a batch; shapes as in ``grpo_loss``. Default aggregation follows the Archer code."""
    check_token_inputs(mask, logp=logp, old_logp=old_logp, ref_logp=ref_logp)
    check_per_rollout(mask.shape[0], advantages=advantages)
    if not (0 < clip_eps < 1 and clip_eps_high > 0 and dual_clip_neg > 1 and dual_clip_pos > 1):  # NaN fails too
        raise ValueError(
            "need 0 < clip_eps < 1, clip_eps_high > 0 and dual clips > 1, got "
            f"clip_eps={clip_eps}, clip_eps_high={clip_eps_high}, dual_clip_neg={dual_clip_neg}, dual_clip_pos={dual_clip_pos}"
        )
    logp, old_logp, ref_logp = zero_padding(mask, logp, old_logp, ref_logp)
    token_loss, dual = aspo_token_loss(logp, old_logp, advantages, clip_eps, clip_eps_high, dual_clip_neg, dual_clip_pos)
    metrics: dict = {}
    token_loss = add_kl_penalty(token_loss, logp, ref_logp, mask, kl_coef, metrics)
    loss = aggregate(token_loss, mask, aggregation, max_len)
    metrics["dual_clip_frac"] = masked_mean(dual, mask)
    return loss, metrics
