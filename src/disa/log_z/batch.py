"""``train.log_z: batch``: no model, each group's own estimate (Trajectory Balance with Asynchrony)."""

from __future__ import annotations

import torch

from disa.log_z.base import LogZRequest, LogZSource, register_log_z_source


def batch_log_z(policy_logp: torch.Tensor, ref_logp: torch.Tensor, rewards: torch.Tensor, beta: float,
                group_size: int) -> torch.Tensor:
    """The model-free ``log Z`` of Trajectory Balance with Asynchrony, per rollout ``(P * G,)``, detached.

    Per prompt, the group mean of ``log pi_ref(y) - log pi_theta(y) + beta r~(y)`` over its ``G`` rollouts: the
    value of ``log Z`` that minimises the group's summed squared residual (eq. 5) with the policy held fixed. All
    inputs are per-rollout ``(P * G,)`` sequence log-probs (sums, or token means for a length-normalised
    objective) grouped consecutively. Under ``y ~ pi_theta`` it is ``log Z - KL(pi_theta || pi*)``: biased low
    until the policy reaches ``pi*``, and recomputed from every batch, so it needs neither Stage 1 nor a head.
    """
    shapes = {tuple(t.shape) for t in (policy_logp, ref_logp, rewards)}
    if len(shapes) != 1 or policy_logp.dim() != 1 or policy_logp.numel() % group_size:
        raise ValueError(f"batch_log_z: expected three (P * G,) tensors with G = {group_size}, got shapes {shapes}")
    residual = (ref_logp - policy_logp + beta * rewards).detach().double().view(-1, group_size)
    return residual.mean(dim=1).repeat_interleave(group_size).float()


@register_log_z_source("batch")
class BatchLogZ(LogZSource):
    """Reads log pi_old of the rollouts (``needs_old_logp``) and pi_ref's, on the log-probs the objective's
    residual uses (sums, or token means when it length-normalises)."""

    needs_old_logp = True

    def rollout_log_z(self, request: LogZRequest) -> torch.Tensor:
        from disa.objectives.tb import sequence_logprob

        if request.old_logp is None or request.ref_logp is None:
            raise ValueError("train.log_z: batch needs the rollouts' old_logp and ref_logp")
        mask = request.mask.float()
        seq = lambda t: sequence_logprob(t.float(), mask, request.length_normalized)  # noqa: E731
        return batch_log_z(seq(request.old_logp), seq(request.ref_logp), request.rewards.float(), request.beta,
                           request.group_size)
