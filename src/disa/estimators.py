"""Stage 1 math: importance-sampled partition-function labels, their diagnostics, and reward transforms.

Pure functions on tensors. Shapes: ``(P, N)`` = prompts x proposal samples; an optional boolean ``mask``
``(P, N)`` marks real samples when prompts have different sample counts. Everything is computed in
log space, so log-weights of +-1e4 are fine. Equation numbers refer to ``docs/formulas.md``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor

from disa.names import REWARD_TRANSFORMS  # noqa: E402  (declared torch-free for the config)


# --------------------------------------------------------------------------- validation helpers
def check_finite(name: str, x: Tensor, mask: Optional[Tensor] = None) -> None:
    """Raise ``ValueError`` naming ``name`` and the first offending index if ``x`` has NaN or inf."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask.bool()
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{name} has a non-finite value {x[idx].item()} at index {idx}")


def check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _prepare_mask(log_w: Tensor, mask: Optional[Tensor]) -> Tensor:
    if log_w.dim() != 2:
        raise ValueError(f"log_w must have shape (P, N), got {tuple(log_w.shape)}")
    if mask is None:
        mask = torch.ones_like(log_w, dtype=torch.bool)
    else:
        _check_same_shape(log_w=log_w, mask=mask)
        mask = mask.bool()
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"prompt(s) {torch.nonzero(empty).flatten().tolist()} have no samples (empty group)")
    if log_w.shape[1] == 0:
        raise ValueError("log_w has zero samples per prompt (empty group)")
    check_finite("log_w", log_w, mask)
    return mask


def _masked_lse(x: Tensor, mask: Tensor) -> Tensor:
    return torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=1)


# --------------------------------------------------------------------------- estimators
def log_importance_weights(
    logp_ref: Tensor, logp_q: Tensor, rewards: Tensor, beta: float, mask: Optional[Tensor] = None
) -> Tensor:
    """``log w_i = log pi_ref(y_i|x) - log q(y_i|x) + beta * r~(x, y_i)`` (Stage 1, docs/formulas.md), shape ``(P, N)``.

    ``rewards`` is the already-transformed reward ``r~``. Raises on NaN/inf inputs (where ``mask`` is set)
    and ``beta <= 0``. Padded positions (``mask`` False) may hold anything; they come out as 0.
    """
    check_beta(beta)
    _check_same_shape(logp_ref=logp_ref, logp_q=logp_q, rewards=rewards, mask=mask)
    for name, t in (("logp_ref", logp_ref), ("logp_q", logp_q), ("rewards", rewards)):
        check_finite(name, t, mask)
    log_w = logp_ref - logp_q + beta * rewards
    return log_w if mask is None else log_w.masked_fill(~mask.bool(), 0.0)


def log_z_lse(log_w: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """The DISA label ``log Z^_N = logsumexp_i(log w_i) - log N`` (eq. 8), shape ``(P,)``.

    The log of the unbiased linear-scale estimator (eq. 7): biased low by about ``Var(w) / (2 N Z^2)``.
    """
    mask = _prepare_mask(log_w, mask)
    n = mask.sum(dim=1).to(log_w.dtype)
    return _masked_lse(log_w, mask) - torch.log(n)


def log_z_geometric(log_w: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Geometric-mean label ``(1/N) sum_i log w_i`` (Stage 1, docs/formulas.md): its bias ``-KL(q||pi*)`` does not shrink with N."""
    mask = _prepare_mask(log_w, mask)
    n = mask.sum(dim=1).to(log_w.dtype)
    return log_w.masked_fill(~mask, 0.0).sum(dim=1) / n


def effective_sample_size(log_w: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Kish effective sample size ``(sum w)^2 / sum w^2`` in ``[1, N]``, computed in log space."""
    mask = _prepare_mask(log_w, mask)
    return torch.exp(2 * _masked_lse(log_w, mask) - _masked_lse(2 * log_w, mask))


def max_weight_share(log_w: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Largest normalised weight ``max_i w_i / sum_j w_j`` in ``[1/N, 1]``: near 1 means one sample decides the label."""
    mask = _prepare_mask(log_w, mask)
    top = log_w.masked_fill(~mask, -math.inf).max(dim=1).values
    return torch.exp(top - _masked_lse(log_w, mask))


def reward_rate(rewards: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean raw reward per prompt under the proposal (the fraction correct for a binary reward)."""
    mask = _prepare_mask(torch.zeros_like(rewards, dtype=torch.float64), mask)
    check_finite("rewards", rewards, mask)
    return rewards.masked_fill(~mask, 0.0).sum(dim=1) / mask.sum(dim=1)


def label_prompts(
    logp_ref: Tensor,
    logp_q: Tensor,
    rewards: Tensor,
    beta: float,
    mask: Optional[Tensor] = None,
    raw_rewards: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """All Stage 1 outputs for a batch of prompts: labels (eq. 8 and geometric) and diagnostics.

    ``rewards`` is ``r~`` (used in the weights); ``raw_rewards`` (default ``rewards``) feeds ``reward_rate``.
    Returns a dict of ``(P,)`` tensors: ``log_z``, ``log_z_geometric``, ``ess``, ``max_weight``,
    ``reward_rate``, ``n``.
    """
    log_w = log_importance_weights(logp_ref, logp_q, rewards, beta, mask)
    mask = _prepare_mask(log_w, mask)
    return {
        "log_z": log_z_lse(log_w, mask),
        "log_z_geometric": log_z_geometric(log_w, mask),
        "ess": effective_sample_size(log_w, mask),
        "max_weight": max_weight_share(log_w, mask),
        "reward_rate": reward_rate(rewards if raw_rewards is None else raw_rewards, mask),
        "n": mask.sum(dim=1),
    }


# --------------------------------------------------------------------------- reward transforms
def group_normalize(
    rewards: Tensor, eps: float = 1e-6, mask: Optional[Tensor] = None, unbiased: bool = True
) -> Tensor:
    """GRPO/FlowRL group-normalised reward ``(r - mean) / (std + eps)`` within each row, shape ``(P, G)``.

    Zero-variance groups (all rewards equal, or a single sample) map to exactly 0: such a group carries no
    preference between its members. ``unbiased`` uses the ``G - 1`` denominator as ``torch.std`` (TRL, veRL).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (P, G), got {tuple(rewards.shape)}")
    mask = _prepare_mask(torch.zeros_like(rewards, dtype=torch.float64), mask).to(rewards.dtype)
    check_finite("rewards", rewards, mask.bool())
    rewards = rewards.masked_fill(~mask.bool(), 0.0)  # padding may hold NaN; NaN * 0 would still be NaN
    n = mask.sum(dim=1, keepdim=True)
    mean = (rewards * mask).sum(dim=1, keepdim=True) / n
    centred = (rewards - mean) * mask
    denom = (n - 1).clamp(min=1) if unbiased else n
    std = torch.sqrt((centred**2).sum(dim=1, keepdim=True) / denom)
    out = centred / (std + eps)
    return torch.where(std > 0, out, torch.zeros_like(out)) * mask


def affine_transform(rewards: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Fixed per-prompt affine transform ``r~ = a(x) r + b(x)`` with ``a > 0`` (docs/formulas.md).

    ``rewards`` is ``(P, N)``; ``scale`` and ``shift`` are ``(P,)``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (P, N), got {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != rewards.shape[:1]:
            raise ValueError(f"{name} must have shape ({rewards.shape[0]},), got {tuple(t.shape)}")
        check_finite(name, t)
    if bool((scale <= 0).any()):
        raise ValueError(f"scale must be > 0, got {scale[scale <= 0][0].item()} at index {int(torch.nonzero(scale <= 0)[0])}")
    return scale[:, None] * rewards + shift[:, None]


def fit_affine_transform(
    rewards: Tensor, eps: float = 1e-6, mask: Optional[Tensor] = None, unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    """Freeze a group normalisation into a per-prompt affine transform ``(scale, shift)``, each ``(P,)``.

    Estimated once, offline, from the proposal's group, and then shared by Stage 1 and Stage 3 so both see
    the same ``r~`` (the plug-in group statistic would differ between proposal and policy groups). Where the
    group has zero variance, the transform only centres: ``scale = 1, shift = -mean``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (P, N), got {tuple(rewards.shape)}")
    maskf = _prepare_mask(torch.zeros_like(rewards, dtype=torch.float64), mask).to(rewards.dtype)
    check_finite("rewards", rewards, maskf.bool())
    rewards = rewards.masked_fill(~maskf.bool(), 0.0)  # padding may hold NaN; NaN * 0 would still be NaN
    n = maskf.sum(dim=1)
    mean = (rewards * maskf).sum(dim=1) / n
    denom = (n - 1).clamp(min=1) if unbiased else n
    std = torch.sqrt((((rewards - mean[:, None]) * maskf) ** 2).sum(dim=1) / denom)
    has_spread = std > 0
    scale = torch.where(has_spread, 1.0 / (std + eps), torch.ones_like(std))
    shift = -mean * scale
    return scale, shift


def transform_rewards(
    kind: str,
    rewards: Tensor,
    *,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    eps: float = 1e-6,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Apply the named reward transform shared by Stage 1 and Stage 3: ``raw``, ``affine`` or ``group``."""
    if kind == "raw":
        return rewards
    if kind == "affine":
        if scale is None or shift is None:
            raise ValueError("reward transform 'affine' needs scale and shift (see fit_affine_transform)")
        return affine_transform(rewards, scale, shift)
    if kind == "group":
        return group_normalize(rewards, eps=eps, mask=mask)
    raise ValueError(f"unknown reward transform {kind!r}; choose one of {REWARD_TRANSFORMS}")
