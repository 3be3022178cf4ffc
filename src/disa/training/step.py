"""What the RL and SFT loops share around the loss: the optimiser and its schedule, how a mini-batch is split
into micro-batches and weighted, and the optimiser step itself (unscale, clip, skip a non-finite gradient).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from disa.config import OptimisationConfig


def build_optimizer(param_groups: list[dict], config: OptimisationConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (each may set its own lr / weight decay); the config's values are defaults."""
    if not param_groups[0]["params"]:
        raise ValueError("the policy has no trainable parameters")
    return torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` scheduler steps (the first at ``1 / warmup_steps``), then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if warmup_steps == 0 else min(1.0, (s + 1) / warmup_steps)
    )


def build_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter the optimiser updates, in group order: what the gradient norm is taken over."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def split_micro_batches(rows: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    return [list(rows[i : i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]


def micro_batch_weights(
    micro_batches: list[list[int]], response_lengths: Sequence[int], aggregation: Optional[str]
) -> list[float]:
    """Each micro-batch's share of the mini-batch loss, so accumulation reproduces one big batch exactly: its
    token share under ``token_mean`` aggregation, its row share for per-sequence means."""
    if aggregation == "token_mean":
        sizes = [float(sum(response_lengths[i] for i in rows)) for rows in micro_batches]
    else:
        sizes = [float(len(rows)) for rows in micro_batches]
    total = sum(sizes)
    return [s / total for s in sizes]


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_grad_norm: float) -> tuple[float, bool]:
    """Unscale, clip the global gradient norm at ``max_grad_norm`` (0: no clip) and step.

    A gradient whose norm is not finite is dropped instead of applied: one NaN would poison Adam's moments for
    good. Under fp16 the scaler makes the same decision itself (and lowers its scale). Returns the pre-clip
    norm and whether the step was skipped.
    """
    scaler.unscale_(optimizer)
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable_parameters(optimizer), clip))
    skipped = not math.isfinite(grad_norm)
    if skipped and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)
    else:
        scaler.step(optimizer)
        scaler.update()
    return grad_norm, skipped
