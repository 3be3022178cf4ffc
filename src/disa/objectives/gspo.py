"""GSPO (docs/formulas.md: reward-maximisation baselines): one length-normalised sequence ratio per rollout."""

from __future__ import annotations

from typing import Optional

import torch

from .common import Tensor, add_kl_penalty, policy_gradient_needs, aggregate, check_per_rollout, check_token_inputs, masked_mean, zero_padding
from .registry import register_objective
from .grpo import _check_clip, clipped_surrogate


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``s_i = exp(mean_t (log pi_theta - log pi_old))`` over response tokens, shape ``(B,)``."""
    mask = mask.to(logp.dtype)
    log_s = ((logp - old_logp) * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.exp(torch.clamp(log_s, -20.0, 20.0))


@register_objective("gspo", family="policy_gradient", needs=policy_gradient_needs)
def gspo_loss(
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    clip_eps: float = 3e-4,
    clip_eps_high: Optional[float] = 4e-4,
    kl_coef: float = 0.0,
    aggregation: str = "seq_mean_token_mean",
    max_len: Optional[int] = None,
) -> tuple[Tensor, dict]:
    """GSPO: the clipped surrogate with ``s_i`` in place of the token ratios.

    Written in the GSPO-token form ``s_{i,t} = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)]``: every token's
    ratio has the value ``s_i`` and the gradient ``s_i * grad log pi_theta(y_t)``, so with the default
    per-sequence aggregation it equals the sequence-level objective. The default clip range is the GSPO
    paper's (3e-4, 4e-4): sequence ratios sit much closer to 1 than token ratios.
    """
    check_token_inputs(mask, logp=logp, old_logp=old_logp, ref_logp=ref_logp)
    check_per_rollout(mask.shape[0], advantages=advantages)
    low, high = _check_clip(clip_eps, clip_eps_high)
    logp, old_logp, ref_logp = zero_padding(mask, logp, old_logp, ref_logp)
    s = sequence_ratio(logp, old_logp, mask)
    token_ratio = s.detach()[:, None] * torch.exp(logp - logp.detach())
    token_loss, was_clipped = clipped_surrogate(token_ratio, advantages, low, high)
    metrics: dict = {}
    token_loss = add_kl_penalty(token_loss, logp, ref_logp, mask, kl_coef, metrics)
    loss = aggregate(token_loss, mask, aggregation, max_len)
    metrics["clip_frac"] = masked_mean(was_clipped, mask)
    metrics["seq_ratio_mean"] = s.detach().mean()
    return loss, metrics
