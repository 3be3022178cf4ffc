"""FlowRL's learned partition function: a small head on the policy's own prompt representation.

FlowRL (SPEC, "Trajectory balance") learns ``log Z_phi(x)`` jointly with the policy: a projection of the
policy's LAST hidden states, mean-pooled over the PROMPT tokens. The hidden states are not detached, so the
squared trajectory-balance residual also trains the policy trunk through the head. DISA replaces this head by a
frozen offline regressor; keeping the head in its own module makes that swap one argument of the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

HEAD_WEIGHTS = "logz_head.safetensors"
HEAD_CONFIG = "logz_head.json"


def mean_pool(hidden_states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden_states (B, L, H)`` over positions where ``token_mask (B, L)`` is set -> ``(B, H)``."""
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must have shape (B, L, H), got {tuple(hidden_states.shape)}")
    if token_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"token_mask must have shape {tuple(hidden_states.shape[:2])} (B, L), got {tuple(token_mask.shape)}"
        )
    counts = token_mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"row(s) {torch.nonzero(counts == 0).flatten().tolist()} have no prompt tokens to pool")
    weights = token_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / counts.to(hidden_states.dtype).unsqueeze(-1)


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
        pooled = mean_pool(hidden_states.float(), prompt_mask)
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
