"""One rollout batch and what is computed from it alone: the prompt records, the verifier's rewards, and the
per-step rollout metrics the RL trainer logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    """Rewards of one rollout batch as float32 ``(B,)``, through the one verifier path
    (:func:`disa.verifiers.score`: the records' other fields are the columns; an item whose reward is garbage
    gets the verifier's failure reward and a warning naming its prompt id)."""
    from disa.verifiers import score

    columns = {key: [r.get(key) for r in records] for key in {k for r in records for k in r} - {"id", "text"}}
    values = score(reward_fn, [r["text"] for r in records], completions, columns, ids=[r["id"] for r in records])
    return torch.tensor(values, dtype=torch.float32)


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


def target_rewards(transform: str, raw: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> Tensor:
    """The target's ``r~`` of raw rewards ``(P, G)`` (groups of one prompt in a row): ``affine`` reads each prompt's
    frozen ``scale, shift (P,)``, so Stage 1 and Stage 3 see the same r~; ``group`` normalises within a row, over
    the rollouts ``mask (P, G)`` keeps when given (the others get 0)."""
    if transform == "group":
        return transform_rewards("group", raw, mask=mask)
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
    """The rollout engine ``config.generation`` names (default ``hf``: the sampler Stage 1 uses, over the policy
    module itself), built through the engine registry; the trainer calls its ``sync_weights(policy)`` before
    every rollout batch."""
    from disa.generation import make_engine

    return make_engine(config.generation, policy, tokenizer, batch_size=config.generation_batch_size, device=None,
                       progress=False)
