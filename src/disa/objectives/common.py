"""Shared pieces of the objectives: input checks, masked aggregation, the KL-to-reference penalty."""

from __future__ import annotations

import math
from typing import Optional

import torch

from disa.estimators import check_finite

from .registry import ObjectiveNeeds

Tensor = torch.Tensor

# The aggregation names follow veRL's ``loss_agg_mode`` (TRL's ``loss_type`` maps onto them):
#   seq_mean_token_mean      mean over each sequence's tokens, then over sequences (GRPO paper, TRL "grpo")
#   token_mean               one mean over every response token in the batch (DAPO, TRL "bnpo"/"dapo")
#   seq_mean_token_sum       sum over tokens, mean over sequences
#   seq_mean_token_sum_norm  sum over tokens / a constant max length, mean over sequences (Dr. GRPO)
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def check_token_inputs(mask: Tensor, **tensors: Optional[Tensor]) -> None:
    """Every ``(B, T)`` input has the mask's shape and is finite where the mask is set."""
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    if mask.shape[0] == 0:
        raise ValueError("mask has an empty batch (B = 0)")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        # the losses multiply by the mask: a 2 would count a token twice, a 0.5 half
        raise ValueError(f"mask must be boolean or 0/1, got values {sorted(set(mask.unique().tolist()))[:5]}")
    empty = mask.sum(dim=1) == 0
    if bool(empty.any()):
        raise ValueError(f"rollout(s) {torch.nonzero(empty).flatten().tolist()} have no response tokens in mask")
    for name, t in tensors.items():
        if t is None:
            continue
        if t.shape != mask.shape:
            raise ValueError(f"{name} must have the shape of mask {tuple(mask.shape)}, got {tuple(t.shape)}")
        check_finite(name, t.detach(), mask)


def zero_padding(mask: Tensor, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Each ``(B, T)`` tensor with its padded positions (``mask`` False) set to 0; ``None`` passes through.

    ``check_token_inputs`` lets padding hold anything (NaN, inf, 1e3), but ``x * mask`` keeps a NaN and
    ``exp`` of a large padded value overflows, so every objective zeroes padding before any arithmetic.
    ``torch.where`` sends a zero gradient to the padded entries.
    """
    keep = mask.bool()
    return tuple(None if t is None else torch.where(keep, t, torch.zeros_like(t)) for t in tensors)


def check_per_rollout(batch_size: int, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if t.shape != (batch_size,):
            raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(t.shape)}")
        check_finite(name, t.detach())


def aggregate(token_loss: Tensor, mask: Tensor, mode: str = "seq_mean_token_mean", max_len: Optional[int] = None) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar under ``mode`` (see ``AGGREGATIONS``)."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")
    if max_len is not None and (
        isinstance(max_len, bool) or not isinstance(max_len, (int, float)) or not (0 < max_len < math.inf)
    ):
        raise ValueError(f"max_len must be None or a number > 0, got {max_len!r}")
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    if mode == "seq_mean_token_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1)).mean()
    if mode == "token_mean":
        return masked.sum() / mask.sum()
    if mode == "seq_mean_token_sum":
        return masked.sum(dim=1).mean()
    if mode == "seq_mean_token_sum_norm":
        norm = max_len if max_len is not None else mask.shape[1]
        return (masked.sum(dim=1) / norm).mean()
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum()


def kl_to_reference(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): ``exp(d) - d - 1`` with ``d = ref - logp`` (>= 0).

    The unbiased, low-variance estimator used by GRPO (TRL, veRL ``low_var_kl`` without its clamp).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def add_kl_penalty(
    token_loss: Tensor, logp: Tensor, ref_logp: Optional[Tensor], mask: Tensor, kl_coef: float, metrics: dict
) -> Tensor:
    """``token_loss + kl_coef * KL_k3`` per token; records the masked mean KL in ``metrics['kl_ref']``."""
    if not (isinstance(kl_coef, (int, float)) and math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be >= 0 and finite, got {kl_coef!r}")
    if kl_coef == 0:
        return token_loss
    if ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    kl = kl_to_reference(logp, ref_logp)
    metrics["kl_ref"] = masked_mean(kl.detach(), mask)
    return token_loss + kl_coef * kl


def policy_gradient_needs(hparams) -> ObjectiveNeeds:
    """GRPO, GSPO and ASPO read ``old_logp`` and ``advantages`` (and ``max_len`` for Dr. GRPO's aggregation);
    ``ref_logp`` only when their KL penalty is on; a ``token_mean`` loss weighs micro-batches by tokens."""
    kl_coef = hparams["kl_coef"]
    kl_on = isinstance(kl_coef, (int, float)) and not isinstance(kl_coef, bool) and kl_coef > 0
    return ObjectiveNeeds({"old_logp", "advantages", "max_len"} | ({"ref_logp"} if kl_on else set()),
                          token_weighted=hparams["aggregation"] == "token_mean")
