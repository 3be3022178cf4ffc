"""Where trajectory balance reads ``log Z(x)`` (eq. 5): a frozen offline source, a learned head, or zero.

A fourth source needs no model at all: ``batch`` (:func:`batch_log_z`), each group's own estimate.
DISA (eq. 10) reads a frozen per-prompt ``log Z`` computed offline (a table, the Stage 2 regressor, or the
Stage 1 labels): the trainer receives it as ``log_z_fn(texts, ids) -> (P,)`` and never optimises it. FlowRL
learns ``log Z_phi(x)`` jointly with the policy: ``LogZHead``, a projection of the policy's LAST hidden states
mean-pooled over the PROMPT tokens. The hidden states are not detached, so the squared residual also trains
the policy trunk through the head. ``resolve_log_z_kind`` turns ``train.log_z`` and the objective's declaration
into one of these kinds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from disa.config import ConfigError
from disa.embeddings import masked_mean_pool
from disa.objectives import ObjectiveSpec

FROZEN_SOURCES = ("table", "regressor", "labels")


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


def resolve_log_z_kind(source: str, spec: ObjectiveSpec) -> Optional[str]:
    """``train.log_z`` + the objective's declaration -> None, "frozen", "learned", "zero" or "batch".

    ``auto`` is the objective's own declaration; table / regressor / labels are all a frozen offline source
    (the caller builds it). Objectives outside trajectory balance read no log Z, so anything but ``auto`` is
    an error; a learned head only makes sense for an objective that lets its gradient reach log Z (flowrl).
    """
    if spec.family != "trajectory_balance":
        if source != "auto":
            raise ConfigError(f"train.log_z: objective {spec.name!r} ({spec.family}) reads no log Z; "
                              f"leave train.log_z at 'auto', got {source!r}")
        return None
    if source == "auto":
        return spec.log_z
    if source in FROZEN_SOURCES:
        return "frozen"
    if source == "learned":
        if spec.log_z != "learned":
            raise ConfigError(f"train.log_z: 'learned' trains a log Z head, but objective {spec.name!r} "
                              f"{'detaches' if spec.log_z == 'frozen' else 'does not read'} log Z, so the head "
                              "would never learn; only an objective that trains log Z (flowrl) can use a learned head")
        return "learned"
    if source in ("zero", "batch"):
        return source
    raise ConfigError(f"train.log_z: {source!r} is not one of auto, table, regressor, labels, learned, zero, batch")


def read_frozen_log_z(log_z_fn: Callable[[list[str], list[Any]], torch.Tensor], texts: Sequence[str],
                      ids: Sequence[Any]) -> torch.Tensor:
    """``log_z_fn(texts, ids)`` as a float32 CPU ``(P,)`` tensor without a graph; wrong shapes and non-finite
    values are errors naming the prompts, since a bad label would silently bias every residual."""
    with torch.no_grad():
        log_z = torch.as_tensor(log_z_fn(list(texts), list(ids))).detach().float().cpu()
    if log_z.shape != (len(texts),):
        raise ValueError(f"log_z_fn must return shape ({len(texts)},) for {len(texts)} prompts, got {tuple(log_z.shape)}")
    if not bool(torch.isfinite(log_z).all()):
        bad = [ids[i] for i in torch.nonzero(~torch.isfinite(log_z)).flatten().tolist()]
        raise ValueError(f"log_z_fn returned a non-finite log Z for prompt id(s) {bad}")
    return log_z


def check_log_z_fn_is_frozen(log_z_fn, optimizer: torch.optim.Optimizer) -> None:
    """DISA's log Z is frozen by construction: none of ``log_z_fn``'s parameters may be optimised."""
    owner = log_z_fn if isinstance(log_z_fn, nn.Module) else getattr(log_z_fn, "__self__", None)
    if not isinstance(owner, nn.Module):
        return
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    shared = [n for n, p in owner.named_parameters() if id(p) in optimised]
    if shared:
        raise ValueError(f"log_z_fn shares parameters with the policy optimiser ({shared[:3]}); DISA's log Z must be frozen")


def policy_hidden_size(policy: nn.Module) -> int:
    config = policy.config
    return config.hidden_size if hasattr(config, "hidden_size") else config.n_embd


HEAD_WEIGHTS = "logz_head.safetensors"
HEAD_CONFIG = "logz_head.json"


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
