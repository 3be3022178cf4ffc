"""The learner: the policy, its optimiser and one objective, fed micro-batches of a token batch.

``Learner.update(batch, ...)`` is what the RL loop calls with a rollout batch; ``Learner.optimizer_step`` is
the one optimiser step (micro-batches accumulated, weighted so accumulation reproduces one big batch) that
SFT reuses on its fixed examples. What the objective reads is its declaration (``BoundObjective.needs``),
resolved once; metrics stay on the device until a step is done and are read back in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from disa.config import OptimisationConfig
from disa.log_z import LogZSource
from disa.objectives import BoundObjective, ObjectiveInputs
from disa.packing import padded_micro_batches, plan_micro_batches
from disa.training.models import autocast, model_device, response_logprobs
from disa.training.step import (
    build_optimizer,
    build_scaler,
    build_scheduler,
    micro_batch_weights,
    optimizer_step,
    split_micro_batches,
    trainable_parameters,
)

Tensor = torch.Tensor


@dataclass(kw_only=True)
class TokenBatch:
    """Rows of ``prompt + response`` token ids, and the per-row inputs an objective may read (None: not
    computed). Token tensors ``(B, T)`` response-only, right-padded, per-row ones ``(B,)``; kept on the CPU."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    old_logp: Optional[Tensor] = None  # None: the update uses its own log-probs, detached (one step per batch)
    ref_logp: Optional[Tensor] = None
    rewards: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    log_z: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.response_ids)


@dataclass
class StepMetrics:
    """One optimiser step's micro-batch-weighted metrics (device tensors, float64), its gradient norm and
    whether a non-finite gradient made it skip."""

    values: dict[str, Tensor] = field(default_factory=dict)
    grad_norm: float = 0.0
    skipped: bool = False


def read_back(values: dict[str, Tensor]) -> dict[str, float]:
    """Device scalars -> floats in one transfer (one host sync for all of a step's metrics)."""
    if not values:
        return {}
    device = next(iter(values.values())).device
    return dict(zip(values, torch.stack([v.to(device, torch.float64) for v in values.values()]).tolist()))


class Learner:
    """Trains ``policy`` (and a trained log Z source's module, at ``logz_lr``) on ``objective``.

    ``max_len`` is the objective's ``max_len`` input (the run's longest response). ``log_z`` gives ``log_z`` to
    objectives that read it when the source computes it in the update (a learned head); otherwise it comes from
    the batch.
    """

    def __init__(self, policy: nn.Module, objective: BoundObjective, config: OptimisationConfig, *, pad_id: int,
                 log_z: Optional[LogZSource] = None, logz_lr: Optional[float] = None, max_len: Optional[int] = None):
        self.policy, self.objective, self.config = policy, objective, config
        self.pad_id, self.log_z, self.max_len = pad_id, log_z, max_len
        self.device = model_device(policy)
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": config.lr,
                   "weight_decay": config.weight_decay, "name": "policy"}]
        if log_z is not None and log_z.trains:
            groups.append({"params": list(log_z.module.parameters()), "lr": logz_lr, "weight_decay": 0.0,
                           "name": "logz_head"})
        self.optimizer = build_optimizer(groups, config)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps)
        self.scaler = build_scaler(self.device, config.mixed_precision)
        self.hidden_log_z = log_z is not None and log_z.needs_hidden_states and "log_z" in objective.needs.inputs

    # ------------------------------------------------------------------ one micro-batch
    def micro_loss(self, batch: TokenBatch, rows: Sequence[int],
                   objective: Optional[BoundObjective] = None) -> tuple[Tensor, dict]:
        """``objective`` (default: the learner's) on rows ``rows`` of ``batch``, gradient kept."""
        objective = objective or self.objective
        needs = objective.needs.inputs
        with autocast(self.config.mixed_precision, self.device):
            out = response_logprobs(self.policy, [batch.prompt_ids[i] for i in rows],
                                    [batch.response_ids[i] for i in rows], self.pad_id, keep_hidden=self.hidden_log_z)
        logp, mask = out["logp"].float(), out["mask"]
        width, dev = logp.shape[1], self.device
        tokens = lambda t: None if t is None else t[rows, :width].to(dev)  # noqa: E731
        per_row = lambda t: None if t is None else t[rows].to(dev)  # noqa: E731
        old_logp = None
        if "old_logp" in needs:
            old_logp = logp.detach() if batch.old_logp is None else tokens(batch.old_logp)
        log_z = None
        if "log_z" in needs:
            log_z = self.log_z.update_log_z(out["hidden"], out["prompt_mask"]) if self.hidden_log_z else per_row(batch.log_z)
        inputs = ObjectiveInputs(
            logp=logp, mask=mask, old_logp=old_logp,
            ref_logp=tokens(batch.ref_logp) if "ref_logp" in needs else None,
            rewards=per_row(batch.rewards) if "rewards" in needs else None,
            advantages=per_row(batch.advantages) if "advantages" in needs else None,
            log_z=log_z, max_len=self.max_len,
        )
        return objective(inputs)

    def _weights(self, batch: TokenBatch, micro_batches: list[list[int]], objective: BoundObjective) -> list[float]:
        aggregation = "token_mean" if objective.needs.token_weighted else None
        return micro_batch_weights(micro_batches, [len(r) for r in batch.response_ids], aggregation)

    def micro_batches(self, batch: TokenBatch, rows: Sequence[int]) -> list[list[int]]:
        """``rows`` split into micro-batches: ``config.micro_batch_size`` rows each, or with
        ``config.micro_batch_tokens`` as many as fit that token budget (packed rows as wide as the longest
        sequence, or sorted padded rows for a model that cannot take packed ones; :mod:`disa.packing`). The
        weights of :meth:`_weights` make any split give the same mini-batch loss."""
        budget = self.config.micro_batch_tokens
        if budget is None:
            return split_micro_batches(rows, self.config.micro_batch_size)
        rows = list(rows)
        prompts, responses = [batch.prompt_ids[i] for i in rows], [batch.response_ids[i] for i in rows]
        if self.hidden_log_z:  # the log Z head reads padded hidden states: padded micro-batches
            return [[rows[i] for i in g] for g in padded_micro_batches(prompts, responses, max_tokens=budget)]
        _, plan = plan_micro_batches(self.policy, prompts, responses, max_tokens=budget)
        return [[rows[i] for row in micro for i in row] for micro in plan]

    # ------------------------------------------------------------------ one optimiser step
    def optimizer_step(self, batch: TokenBatch, rows: Sequence[int]) -> StepMetrics:
        """One optimiser step on ``rows``, accumulated over micro-batches of ``config.micro_batch_size``."""
        micro_batches = self.micro_batches(batch, rows)
        self.optimizer.zero_grad(set_to_none=True)
        step = StepMetrics()
        for rows_m, weight in zip(micro_batches, self._weights(batch, micro_batches, self.objective)):
            loss, objective_metrics = self.micro_loss(batch, rows_m)
            self.scaler.scale(loss * weight).backward()
            for k, v in {"loss": loss, **objective_metrics}.items():
                term = weight * torch.as_tensor(v).detach().to(torch.float64)
                step.values[k] = step.values[k] + term if k in step.values else term
        step.grad_norm, step.skipped = optimizer_step(self.optimizer, self.scaler, self.config.max_grad_norm)
        return step

    def update(self, batch: TokenBatch, *, passes: int, seed: int) -> dict[str, float]:
        """``passes`` shuffled passes of mini-batches (``micro_batch_size * gradient_accumulation`` rows, one
        optimiser step each) over ``batch``; returns the metrics averaged over optimiser steps."""
        cfg = self.config
        self.policy.train()
        mini = cfg.micro_batch_size * cfg.gradient_accumulation
        g = torch.Generator().manual_seed(seed)
        totals: dict[str, Tensor] = {}
        grad_norms, n_steps, skipped = 0.0, 0, 0
        for _ in range(passes):
            order = torch.randperm(len(batch), generator=g).tolist()
            for start in range(0, len(order), mini):
                step = self.optimizer_step(batch, order[start : start + mini])
                for k, v in step.values.items():
                    totals[k] = totals[k] + v if k in totals else v
                grad_norms += step.grad_norm
                skipped += int(step.skipped)
                n_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / n_steps for k, v in read_back(totals).items()}
        out["grad_norm"] = grad_norms / n_steps
        out["optimizer_steps"] = n_steps
        out["skipped_steps"] = skipped
        return out

    @torch.no_grad()
    def evaluate_loss(self, batch: TokenBatch, objective: Optional[BoundObjective] = None) -> float:
        """``objective`` (default: the learner's) over the whole batch under the current policy, no update."""
        objective = objective or self.objective
        self.policy.eval()
        micro = self.micro_batches(batch, list(range(len(batch))))
        weights = self._weights(batch, micro, objective)
        return sum(w * float(self.micro_loss(batch, m, objective)[0]) for m, w in zip(micro, weights))

    def trainable(self) -> list[nn.Parameter]:
        return trainable_parameters(self.optimizer)

    def learning_rates(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
