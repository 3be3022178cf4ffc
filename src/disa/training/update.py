"""The update half of the RL step: the configured objective on micro-batches of a rollout batch, accumulated
into optimiser steps (``RLTrainer`` inherits it; the rollout half and the loop live in ``disa.training.rl``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from disa.objectives import compute_objective, get_spec, objective_aggregation
from disa.training.models import autocast, response_logprobs
from disa.training.rollouts import Rollouts
from disa.training.step import micro_batch_weights, optimizer_step, split_micro_batches, trainable_parameters

Tensor = torch.Tensor


class PolicyUpdate:
    """Needs from the trainer: ``config``, ``policy``, ``device``, ``pad_id``, ``logz_head``, ``optimizer``,
    ``scaler``, ``objective_kwargs`` (with the target's beta), ``aggregation``, ``target``, ``global_step``."""

    def _micro_loss(
        self, rollouts: Rollouts, rows: list[int], objective: Optional[str] = None, objective_kwargs: Optional[dict] = None
    ) -> tuple[Tensor, dict]:
        """The objective (default: the configured one) on one micro-batch, gradient kept."""
        cfg = self.config
        if objective is None:
            objective, objective_kwargs = cfg.objective, self.objective_kwargs
        with autocast(cfg.mixed_precision, self.device):
            out = response_logprobs(
                self.policy, [rollouts.prompt_ids[i] for i in rows], [rollouts.response_ids[i] for i in rows],
                self.pad_id, keep_hidden=self.logz_head is not None,
            )
        logp, mask = out["logp"].float(), out["mask"]
        width, dev = logp.shape[1], self.device
        take = lambda t: None if t is None else t[rows].to(dev)  # noqa: E731
        inputs = {
            "logp": logp, "mask": mask, "old_logp": logp.detach() if rollouts.old_logp is None else rollouts.old_logp[rows, :width].to(dev),
            "ref_logp": None if rollouts.ref_logp is None else rollouts.ref_logp[rows, :width].to(dev),
            "rewards": take(rollouts.rewards), "advantages": take(rollouts.advantages),
            "log_z": take(rollouts.log_z), "max_len": cfg.max_new_tokens,
        }
        if self.logz_head is not None:
            with torch.autocast(device_type=dev.type, enabled=False):
                inputs["log_z"] = self.logz_head(out["hidden"], out["prompt_mask"])
        return compute_objective(objective, inputs=inputs, **(objective_kwargs or {}))

    def _weights(self, rollouts: Rollouts, micro_batches: list[list[int]], aggregation: Optional[str]) -> list[float]:
        return micro_batch_weights(micro_batches, [len(r) for r in rollouts.response_ids], aggregation)

    def _trainable(self) -> list[nn.Parameter]:
        return trainable_parameters(self.optimizer)

    def _mini_batch_step(self, rollouts: Rollouts, rows: list[int]) -> dict[str, float]:
        """One optimiser step on ``rows``, accumulated over micro-batches; the step's weighted metrics."""
        micro_batches = split_micro_batches(rows, self.config.micro_batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        for rows_m, weight in zip(micro_batches, self._weights(rollouts, micro_batches, self.aggregation)):
            loss, objective_metrics = self._micro_loss(rollouts, rows_m)
            self.scaler.scale(loss * weight).backward()
            for k, v in {"loss": float(loss.detach()), **objective_metrics}.items():
                metrics[k] = metrics.get(k, 0.0) + weight * float(v)
        metrics["grad_norm"], skipped = optimizer_step(self.optimizer, self.scaler, self.config.max_grad_norm)
        metrics["skipped_steps"] = float(skipped)
        return metrics

    def update(self, rollouts: Rollouts) -> dict:
        """``updates_per_batch`` passes of optimiser steps over ``rollouts``; returns averaged metrics."""
        cfg = self.config
        self.policy.train()
        mini = cfg.micro_batch_size * cfg.gradient_accumulation
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * self.global_step + 1)
        totals: dict[str, float] = {}
        n_steps = skipped = 0
        for _ in range(cfg.updates_per_batch):
            order = torch.randperm(len(rollouts), generator=g).tolist()
            for start in range(0, len(order), mini):
                metrics = self._mini_batch_step(rollouts, order[start : start + mini])
                skipped += int(metrics.pop("skipped_steps"))
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
                n_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / n_steps for k, v in totals.items()}
        out["optimizer_steps"] = n_steps
        out["skipped_steps"] = skipped
        return out

    @torch.no_grad()
    def evaluate_loss(self, rollouts: Rollouts, objective: Optional[str] = None, **objective_kwargs) -> float:
        """An objective (default: the configured one with its kwargs) over the whole rollout batch under the
        current policy, without updating: a diagnostic, e.g. the GRPO surrogate of an ASPO run. A trajectory-
        balance objective gets the target's beta unless ``objective_kwargs`` sets one."""
        self.policy.eval()
        if objective is None:
            objective, objective_kwargs = self.config.objective, self.objective_kwargs
        elif get_spec(objective).needs_beta:
            objective_kwargs = {"beta": self.target.beta, **objective_kwargs}
        rows = list(range(len(rollouts)))
        micro = split_micro_batches(rows, self.config.micro_batch_size)
        weights = self._weights(rollouts, micro, objective_aggregation(objective, objective_kwargs))
        return sum(w * float(self._micro_loss(rollouts, m, objective, objective_kwargs)[0]) for m, w in zip(micro, weights))
