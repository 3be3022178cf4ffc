"""``train.log_z: zero``: log Z fixed at 0 (FlowRL without log Z; an ablation of where log Z comes from)."""

from __future__ import annotations

import torch

from disa.log_z.base import LogZRequest, LogZSource, register_log_z_source


@register_log_z_source("zero")
class ZeroLogZ(LogZSource):
    def rollout_log_z(self, request: LogZRequest) -> torch.Tensor:
        return torch.zeros(len(request.prompt_ids) * request.group_size)
