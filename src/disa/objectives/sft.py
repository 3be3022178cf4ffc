"""Supervised fine-tuning on the proposal's reward-1 samples: the paper's SFT baseline (LoRA or full)."""

from __future__ import annotations

from typing import Optional

from .common import Tensor, aggregate, check_token_inputs, zero_padding
from .registry import ObjectiveNeeds, register_objective


@register_objective("sft", family="supervised",
                    needs=lambda hp: ObjectiveNeeds(token_weighted=hp["aggregation"] == "token_mean"))
def sft_loss(
    *, logp: Tensor, mask: Tensor, aggregation: str = "token_mean", max_len: Optional[int] = None
) -> tuple[Tensor, dict]:
    """Negative log-likelihood of the response tokens, ``(B, T)`` in, scalar out."""
    check_token_inputs(mask, logp=logp)
    (logp,) = zero_padding(mask, logp)
    loss = aggregate(-logp, mask, aggregation, max_len)
    return loss, {"nll": loss.detach()}
