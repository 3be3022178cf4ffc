"""``train.log_z: learned`` (FlowRL): ``log Z_phi(x)`` learned jointly with the policy.

``LogZHead`` projects the policy's LAST hidden states mean-pooled over the PROMPT tokens. The hidden states are
not detached, so the squared residual also trains the policy trunk through the head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from disa.embeddings import masked_mean_pool
from disa.log_z.base import LogZContext, LogZRequest, LogZSource, register_log_z_source

HEAD_WEIGHTS = "logz_head.safetensors"
HEAD_CONFIG = "logz_head.json"


def policy_hidden_size(policy: nn.Module) -> int:
    config = policy.config
    return config.hidden_size if hasattr(config, "hidden_size") else config.n_embd


class LogZHead(nn.Module):
    """``log Z_phi(x)`` from pooled prompt states: ``num_layers - 1`` blocks of Linear-GELU-LayerNorm, then Linear(H, 1).

    ``num_layers=1`` is a plain linear probe. The last layer starts at zero weight and bias ``init_log_z`` so the
    first residuals are not dominated by a random ``log Z`` (the head and the policy start from a known point).
    The head always computes in float32: its output enters a squared loss where bf16 rounding of ``log Z`` would
    show up directly in the gradient.
    """

    def __init__(self, hidden_size: int, num_layers: int = 2, init_log_z: float = 0.0):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        blocks: list[nn.Module] = []
        for _ in range(num_layers - 1):
            blocks += [nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size)]
        last = nn.Linear(hidden_size, 1)
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, float(init_log_z))
        self.net = nn.Sequential(*blocks, last)

    def forward(self, hidden_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """``hidden_states (B, L, H)`` (policy's last layer, with grad), ``prompt_mask (B, L)`` -> ``log Z (B,)``."""
        pooled = masked_mean_pool(hidden_states.float(), prompt_mask)
        return self.net(pooled).squeeze(-1)

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """Write ``logz_head.safetensors`` and ``logz_head.json`` (shape arguments) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(directory / HEAD_WEIGHTS))
        (directory / HEAD_CONFIG).write_text(json.dumps({"hidden_size": self.hidden_size, "num_layers": self.num_layers}))

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "LogZHead":
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / HEAD_CONFIG
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: no saved log Z head here")
        head = cls(**json.loads(cfg_path.read_text()))
        head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
        return head.to(device)


@register_log_z_source("learned")
class LearnedLogZ(LogZSource):
    """A ``LogZHead`` of ``num_layers`` on the policy, trained with it (``module`` is checkpointed)."""

    trains = True
    needs_hidden_states = True

    def __init__(self, num_layers: int = 2):
        self.num_layers = num_layers
        self.module = None

    @classmethod
    def from_run(cls, context: LogZContext) -> "LearnedLogZ":
        return cls(num_layers=context.train.logz_head_layers)

    def bind(self, policy: nn.Module) -> None:
        """Build the head on the policy's device (its initial weights come from the global RNG, seeded by the trainer)."""
        device = next(policy.parameters()).device
        self.module = LogZHead(policy_hidden_size(policy), num_layers=self.num_layers).to(device)

    def rollout_log_z(self, request: LogZRequest) -> None:
        return None

    def update_log_z(self, hidden_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            return self.module(hidden_states, prompt_mask)
