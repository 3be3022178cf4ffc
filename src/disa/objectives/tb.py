"""Trajectory balance (eqs. 5, 6, 10, docs/formulas.md): DISA, FlowRL and FlowRL without log Z.

The residual is computed once (``tb_residual``) and squared; where ``log Z`` comes from is an input, not
part of the loss: a frozen tensor for DISA (detached here, so no gradient can reach it whatever the caller
passes), a trainable one for FlowRL, zeros for the no-log-Z ablation.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import Tensor, check_per_rollout, check_token_inputs, zero_padding
from .registry import ObjectiveNeeds, register_objective

ROLLOUT_WEIGHTS = ("on_policy", "clipped_is")


def sequence_logprob(token_logp: Tensor, mask: Tensor, length_normalize: bool) -> Tensor:
    """``sum_t`` (or ``mean_t`` when ``length_normalize``) of masked token log-probs: ``(B, T) -> (B,)``."""
    total = (token_logp * mask).sum(dim=1)
    return total / mask.sum(dim=1) if length_normalize else total


def tb_residual(log_z: Tensor, logp_seq: Tensor, ref_logp_seq: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """``log Z(x) + log pi_theta(y|x) - beta r~(x,y) - log pi_ref(y|x)`` (eq. 5), shape ``(B,)``."""
    return log_z + logp_seq - beta * rewards - ref_logp_seq


def rollout_weight(
    logp: Tensor, old_logp: Optional[Tensor], mask: Tensor, mode: str = "on_policy", clip: float = 10.0
) -> Tensor:
    """Detached non-negative rollout weight ``w`` of eq. 6, shape ``(B,)``.

    ``on_policy``: 1. ``clipped_is``: ``min(exp(sum_t log pi_theta - log pi_old), clip)`` as the FlowRL code
    does (a trajectory-level ratio, unlike PPO's token ratio), never differentiated.
    """
    if mode == "on_policy":
        return torch.ones(mask.shape[0], dtype=logp.dtype, device=logp.device)
    if mode == "clipped_is":
        if old_logp is None:
            raise ValueError("rollout_weight='clipped_is' needs old_logp")
        if not clip > 0:  # NaN fails too; inf means no clip
            raise ValueError(f"weight_clip must be > 0, got {clip}")
        log_ratio = ((logp.detach() - old_logp) * mask).sum(dim=1)
        return torch.exp(torch.clamp(log_ratio, max=torch.log(torch.tensor(clip, dtype=logp.dtype)).item()))
    raise ValueError(f"unknown rollout_weight {mode!r}; choose one of {ROLLOUT_WEIGHTS}")


def trajectory_balance_needs(hparams, reads_log_z: bool = True) -> ObjectiveNeeds:
    """Trajectory balance reads ``ref_logp``, ``rewards`` (r~) and ``log_z``; ``old_logp`` only for an
    importance weight (``rollout_weight_mode`` other than ``on_policy``, whose weight is 1)."""
    inputs = {"ref_logp", "rewards"} | ({"log_z"} if reads_log_z else set())
    if hparams["rollout_weight_mode"] != "on_policy":
        inputs.add("old_logp")
    return ObjectiveNeeds(inputs, length_normalized=hparams["length_normalize"] is True)


@register_objective("tb", family="trajectory_balance", log_z="table", needs=trajectory_balance_needs)
def trajectory_balance_loss(
    *,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    rewards: Tensor,
    log_z: Tensor,
    beta: float,
    old_logp: Optional[Tensor] = None,
    freeze_log_z: bool = True,
    length_normalize: bool = False,
    rollout_weight_mode: str = "on_policy",
    weight_clip: float = 10.0,
) -> tuple[Tensor, dict]:
    """``mean_b w_b * residual_b^2`` (eq. 6 / eq. 10).

    Shapes: ``logp, ref_logp, old_logp, mask (B, T)``; ``rewards, log_z (B,)``. ``freeze_log_z`` detaches
    ``log_z`` (DISA's stop-gradient); with ``length_normalize`` the log-probs are token means, as in the
    FlowRL code (``mean_t r~ = r~`` since the reward is broadcast over tokens), otherwise trajectory sums, the
    residual the paper's guarantees are about.
    """
    from disa.estimators import check_beta

    check_beta(beta)
    check_token_inputs(mask, logp=logp, ref_logp=ref_logp, old_logp=old_logp)
    check_per_rollout(mask.shape[0], rewards=rewards, log_z=log_z)
    logp, ref_logp, old_logp = zero_padding(mask, logp, ref_logp, old_logp)
    mask = mask.to(logp.dtype)
    if freeze_log_z:
        log_z = log_z.detach()
    logp_seq = sequence_logprob(logp, mask, length_normalize)
    ref_seq = sequence_logprob(ref_logp, mask, length_normalize)
    residual = tb_residual(log_z, logp_seq, ref_seq, rewards.to(logp.dtype), beta)
    w = rollout_weight(logp, old_logp, mask, rollout_weight_mode, weight_clip)
    loss = (w * residual**2).mean()
    metrics = {
        "tb_residual_mean": residual.detach().mean(),
        "tb_residual_abs": residual.detach().abs().mean(),
        "log_z_mean": log_z.detach().mean(),
        "rollout_weight_mean": w.mean(),
    }
    return loss, metrics


@register_objective("disa", family="trajectory_balance", log_z="table", needs=trajectory_balance_needs,
                    extends=trajectory_balance_loss)
def disa_loss(*, log_z: Tensor, rollout_weight_mode: str = "clipped_is", **kw) -> tuple[Tensor, dict]:
    """DISA (eq. 10): trajectory balance with the frozen offline ``log Z``; no gradient ever reaches it.

    The label is a trajectory-level ``log Z``, so the residual is trajectory-level by default
    (``length_normalize=False``); the clipped IS weight equals 1 on the first, on-policy step.
    """
    return trajectory_balance_loss(log_z=log_z, freeze_log_z=True, rollout_weight_mode=rollout_weight_mode, **kw)


@register_objective("flowrl", family="trajectory_balance", log_z="learned", trains_log_z=True,
                    needs=trajectory_balance_needs, extends=trajectory_balance_loss)
def flowrl_loss(*, log_z: Tensor, length_normalize: bool = True, rollout_weight_mode: str = "clipped_is", **kw):
    """FlowRL: trajectory balance with a ``log Z`` learned jointly (its gradient flows into ``log_z``).

    Defaults follow the FlowRL code: length-normalised log-probs, clipped trajectory IS weight.
    """
    return trajectory_balance_loss(
        log_z=log_z, freeze_log_z=False, length_normalize=length_normalize, rollout_weight_mode=rollout_weight_mode, **kw
    )


@register_objective("flowrl_no_logz", family="trajectory_balance", log_z="zero",
                    needs=lambda hp: trajectory_balance_needs(hp, reads_log_z=False), extends=trajectory_balance_loss)
def flowrl_no_logz_loss(*, mask: Tensor, log_z: Optional[Tensor] = None, length_normalize: bool = True,
                        rollout_weight_mode: str = "clipped_is", **kw):
    """The later FlowRL variant with ``log Z`` dropped (fixed at 0): an ablation of where ``log Z`` comes from."""
    zeros = torch.zeros(mask.shape[0], dtype=kw["logp"].dtype, device=mask.device)
    return trajectory_balance_loss(
        mask=mask, log_z=zeros, freeze_log_z=True, length_normalize=length_normalize,
        rollout_weight_mode=rollout_weight_mode, **kw
    )
