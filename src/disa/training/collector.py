"""The rollout collector: engine -> verifier -> reward transform -> reference scorer -> log Z source.

``RolloutCollector.collect(policy, prompt_indices, seed)`` makes one ``Rollouts`` batch with everything the
update reads and no gradient: it first hands the engine the policy's current weights
(``RolloutEngine.sync_weights``), samples ``group_size`` rollouts per prompt, scores them with the verifier,
forms r~ (``RewardTransform``, shared with Stage 1 and the TRL bridge) and group advantages, scores
``log pi_old`` / ``log pi_ref`` where the objective or the log Z source reads them, and asks the log Z source
for each rollout's log Z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from disa.estimators import group_normalize
from disa.generation.engine import RolloutEngine
from disa.log_z import LogZRequest, LogZSource
from disa.objectives import ObjectiveNeeds
from disa.scoring import score_token_logprobs
from disa.training.models import autocast, model_device, pad_rows
from disa.training.rollouts import Rollouts, reference_context, score_rewards, target_rewards

Tensor = torch.Tensor


@dataclass(frozen=True)
class RewardTransform:
    """The target's r~ of raw rewards ``(P, G)``: ``raw``, ``affine`` (each prompt's frozen (scale, shift), the
    one Stage 1 labelled with) or ``group``; None for objectives that read the raw reward (policy gradient)."""

    kind: Optional[str]
    affine: Optional[Mapping[Any, tuple[float, float]]] = None

    def check(self, prompt_ids: Sequence[Any]) -> None:
        if self.kind != "affine":
            return
        if self.affine is None:
            raise ValueError("target.reward_transform='affine' needs affine={prompt id: (scale, shift)}")
        missing = [i for i in prompt_ids if i not in self.affine]
        if missing:
            raise ValueError(f"affine has no (scale, shift) for prompt id(s) {missing[:5]}")

    def __call__(self, raw: Tensor, prompt_ids: Sequence[Any]) -> Tensor:
        if self.kind is None:
            return raw
        if self.kind != "affine":
            return target_rewards(self.kind, raw)
        scale = torch.tensor([float(self.affine[i][0]) for i in prompt_ids])
        shift = torch.tensor([float(self.affine[i][1]) for i in prompt_ids])
        return target_rewards("affine", raw, scale=scale, shift=shift)


class ReferenceScorer:
    """Token log-probs of rollouts under pi_ref: ``ref_model``, or (None, under LoRA) the policy with its
    adapter switched off. Padding-free where the model allows (:func:`disa.scoring.score_token_logprobs`),
    ``micro_batch_tokens`` positions per forward (None: ``micro_batch_size`` rows of the longest width)."""

    def __init__(self, ref_model: Optional[nn.Module], *, pad_id: int, micro_batch_size: int, mixed_precision: str,
                 micro_batch_tokens: Optional[int] = None):
        self.ref_model, self.pad_id = ref_model, pad_id
        self.micro_batch_size, self.mixed_precision = micro_batch_size, mixed_precision
        self.micro_batch_tokens = micro_batch_tokens
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

    def score(self, model: nn.Module, prompt_ids, response_ids) -> list[Tensor]:
        with autocast(self.mixed_precision, model_device(model)):
            return score_token_logprobs(model, prompt_ids, response_ids, pad_id=self.pad_id,
                                        batch_size=self.micro_batch_size, max_tokens=self.micro_batch_tokens)

    def reference(self, policy: nn.Module, prompt_ids, response_ids) -> list[Tensor]:
        with reference_context(self.ref_model, policy) as ref_model:
            return self.score(ref_model, prompt_ids, response_ids)


class RolloutCollector:
    """One rollout batch per call. ``prompts``: records with ``id``, ``text`` and verifier columns;
    ``prompt_ids``: their encodings. ``needs``: what the objective reads; ``old_logp_pass``: whether log pi_old
    is scored in a separate pass (else the update uses its own detached log-probs)."""

    def __init__(self, engine: RolloutEngine, reward_fn: Callable[..., list[float]], prompts: Sequence[dict], *,
                 reference: ReferenceScorer, log_z: Optional[LogZSource], transform: RewardTransform,
                 needs: ObjectiveNeeds, old_logp_pass: bool, beta: Optional[float], config):
        self.engine, self.reward_fn, self.prompts = engine, reward_fn, prompts
        self.reference, self.log_z, self.transform = reference, log_z, transform
        self.needs, self.old_logp_pass, self.beta, self.config = needs, old_logp_pass, beta, config

    def _generate(self, policy: nn.Module, prompt_indices: Sequence[int], seed: Optional[int]) -> list:
        cfg = self.config
        self.engine.sync_weights(policy)  # the policy as it is now (a PEFT wrapper under LoRA)
        with autocast(cfg.mixed_precision, model_device(policy)):
            groups = self.engine.generate(
                [self.prompts[i]["text"] for i in prompt_indices], cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, stop=cfg.stop or None, seed=seed,
            )
        return [s for group in groups for s in group]

    def collect(self, policy: nn.Module, prompt_indices: Sequence[int], seed: Optional[int] = None) -> Rollouts:
        """Sample, score and label ``group_size`` rollouts per prompt of ``prompt_indices``; no gradient."""
        G = self.config.group_size
        policy.eval()
        samples = self._generate(policy, prompt_indices, seed)
        flat_prompt_index = [i for i in prompt_indices for _ in range(G)]
        flat_prompt_ids = [s.prompt_ids for s in samples]
        flat_responses = [s.response_ids for s in samples]
        completions = [s.text for s in samples]
        ids = [self.prompts[i]["id"] for i in prompt_indices]

        raw = score_rewards(self.reward_fn, [self.prompts[i] for i in flat_prompt_index], completions)
        raw = raw.view(len(prompt_indices), G)
        rewards = self.transform(raw, ids)
        advantages = group_normalize(raw)

        width = max(len(r) for r in flat_responses)
        old = None
        if self.old_logp_pass:
            old = pad_rows(self.reference.score(policy, flat_prompt_ids, flat_responses), width)
        ref = None
        if "ref_logp" in self.needs.inputs:
            ref = pad_rows(self.reference.reference(policy, flat_prompt_ids, flat_responses), width)
        mask = pad_rows([torch.ones(len(r)) for r in flat_responses], width).bool()
        log_z = None
        if self.log_z is not None:
            log_z = self.log_z.rollout_log_z(LogZRequest(
                prompt_ids=ids, prompt_texts=[self.prompts[i]["text"] for i in prompt_indices], group_size=G,
                beta=self.beta, rewards=rewards.flatten(), mask=mask, ref_logp=ref, old_logp=old,
                length_normalized=self.needs.length_normalized))
        return Rollouts(
            prompt_index=flat_prompt_index, prompt_ids=flat_prompt_ids, response_ids=flat_responses,
            completions=completions, finish_reasons=[s.finish_reason for s in samples], raw_rewards=raw.flatten(),
            rewards=rewards.flatten(), advantages=advantages.flatten(), old_logp=old, mask=mask, ref_logp=ref,
            log_z=log_z,
        )
