"""One rollout batch and what is computed from it alone: the prompt records, the verifier's rewards, and the
per-step rollout metrics the RL trainer logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from disa.estimators import transform_rewards
from disa.training.learner import TokenBatch

Tensor = torch.Tensor


@dataclass(kw_only=True)
class Rollouts(TokenBatch):
    """One rollout batch, ``B = prompts_per_step * group_size`` rows grouped by prompt (rows ``i*G .. i*G+G-1``).

    Besides the ``TokenBatch`` fields: each row's prompt, its text and finish reason, the verifier's raw reward,
    ``mask (B, T)``. ``rewards`` is r~ for trajectory balance, the raw reward otherwise.
    """

    prompt_index: list[int]
    completions: list[str]
    finish_reasons: list[str]
    raw_rewards: Tensor
    mask: Tensor


def prompt_record(item: Any, row: int) -> dict:
    """A prompt as a dict with ``id`` and ``text`` (plus verifier columns); errors name the row and field."""
    if isinstance(item, Mapping):
        record = dict(item)
    elif dataclasses.is_dataclass(item):
        record = dataclasses.asdict(item)
    elif hasattr(item, "__dict__"):
        record = dict(vars(item))
    else:
        raise TypeError(f"prompts[{row}]: expected a dict or an object with id and text, got {type(item).__name__}")
    for name in ("id", "text"):
        if name not in record:
            raise ValueError(f"prompts[{row}]: missing field {name!r}")
    if not isinstance(record["text"], str) or not record["text"]:
        raise ValueError(f"prompts[{row}].text: must be a non-empty string, got {record['text']!r}")
    return record


def score_rewards(reward_fn: Callable[..., list[float]], records: list[dict], completions: list[str]) -> Tensor:
    """``reward_fn`` (TRL signature, the records' other fields as columns) -> float32 ``(B,)``; a missing or
    non-finite reward is an error naming the prompt, since it would poison every loss of the step."""
    columns: dict[str, list] = {}
    for key in {k for r in records for k in r} - {"id", "text"}:
        columns[key] = [r.get(key) for r in records]
    values = reward_fn(prompts=[r["text"] for r in records], completions=completions, **columns)
    if len(values) != len(completions):
        raise ValueError(f"reward_fn returned {len(values)} rewards for {len(completions)} completions")
    for i, v in enumerate(values):
        if v is None or not math.isfinite(float(v)):
            raise ValueError(f"reward_fn returned {v!r} for completion {i} (prompt id {records[i]['id']!r})")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def rollout_metrics(rollouts: Rollouts, group_size: int) -> dict[str, float]:
    """Rewards, lengths and truncation of one rollout batch, for the step's log row."""
    lengths = torch.tensor([float(len(r)) for r in rollouts.response_ids])
    raw = rollouts.raw_rewards.view(-1, group_size)
    return {
        "reward_mean": float(rollouts.raw_rewards.mean()),
        "reward_std": float(rollouts.raw_rewards.std()) if len(rollouts) > 1 else 0.0,
        "reward_transformed_mean": float(rollouts.rewards.mean()),
        "zero_variance_groups": float((raw.max(dim=1).values == raw.min(dim=1).values).float().mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "truncated_frac": rollouts.finish_reasons.count("length") / len(rollouts),
    }


def target_rewards(transform: str, raw: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """The target's ``r~`` of raw rewards ``(P, G)`` (groups of one prompt in a row): ``affine`` reads each prompt's
    frozen ``scale, shift (P,)``, so Stage 1 and Stage 3 see the same r~; ``group`` normalises within a row."""
    if transform != "affine":
        return transform_rewards(transform, raw)
    return transform_rewards("affine", raw, scale=scale, shift=shift)


def reference_context(ref_model: Optional[nn.Module], policy: nn.Module):
    """The model that plays pi_ref: ``ref_model``, else the LoRA policy with its adapter switched off."""
    if ref_model is not None:
        return contextlib.nullcontext(ref_model)
    return _adapter_off(policy)


@contextlib.contextmanager
def _adapter_off(policy: nn.Module):
    with policy.disable_adapter():
        yield policy


def default_generator(policy: nn.Module, tokenizer, config):
    """The library default: ``disa.generation.hf.HFGenerator``, the sampler Stage 1 uses (same prompt encoding,
    same EOS set, a neutral generation config, so no checkpoint top_k / repetition_penalty tilts pi_old)."""
    from disa.generation.hf import HFGenerator

    return HFGenerator(policy, tokenizer, batch_size=config.generation_batch_size, device=None, progress=False)
