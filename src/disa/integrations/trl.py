"""DISA's Stage 3 inside TRL: ``DisaGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss is trajectory balance.

TRL keeps what users came for (its generation, vLLM colocation, accelerate / DeepSpeed, logging); this
subclass changes two documented hooks:

* ``_generate_and_score_completions``: after TRL's own, each rollout also carries its target reward ``r~``
  (the raw weighted reward through Stage 3's own transform) and its log Z from the ``disa.log_z`` source
  that ``log_z`` names (``train.log_z``'s values): a source that reads run artefacts (table, labels,
  regressor) arrives as the dataset's ``log_z`` column, filled by ``add_log_z_column``; zero and learned are
  built as ``disa train`` builds them; batch is refused (TRL does not expose log pi_old at that point);
* ``compute_loss`` (TRL documents overriding it): our registered objective (``disa``, ``tb``, ``flowrl`` or
  ``flowrl_no_logz``) on TRL's per-token log-probs, reference log-probs and the frozen ``log Z``.

TRL computes reference log-probs only when its KL coefficient ``GRPOConfig.beta`` is non-zero; trajectory
balance always needs them, so the trainer asks for a non-zero value and never uses it as a KL weight. DISA's
``beta`` is the target's, read from the log Z table. A learned source (``flowrl``) attaches its head to the
model, so TRL's optimizer trains it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch

from disa.config import TargetConfig, TrainConfig
from disa.integrations.log_z_column import AFFINE_COLUMNS, LOG_Z_COLUMN, add_log_z_column
from disa.log_z import LogZContext, LogZRequest, LogZTable, resolve_log_z_source
from disa.objectives import ObjectiveInputs, bind_objective, get_spec
from disa.objectives.registry import check_hyperparameters
from disa.training.learner import read_back
from disa.training.rollouts import target_rewards

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("disa.integrations.trl needs TRL: pip install 'disa[trl]'") from e

HEAD_NAME = "disa_log_z_head"
__all__ = ["DisaGRPOTrainer", "add_log_z_column", "code_reward_isolation", "target_rewards_for_rollouts",
           "trl_batch_to_objective_inputs"]


def code_reward_isolation(reward_funcs: Any, allow_fallback: bool) -> Optional[str]:
    """The sandbox ("bwrap"/"fallback") that the reward functions which run code (the registered ``code``
    verifier, or a ``functools.partial`` of it) will get, None when none runs code; raises ``RuntimeError``
    with how to install bubblewrap when only the fallback is there and ``allow_fallback`` is False."""
    from disa.verifiers import runs_code
    from disa.verifiers.sandbox_fallback import ISOLATION_SUMMARY, check_code_isolation

    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not any(callable(f) and runs_code(f) for f in funcs):
        return None
    level, problem = check_code_isolation(allow_fallback)
    if problem:
        raise RuntimeError(f"DisaGRPOTrainer: {problem.replace('verifier.allow_fallback: true', 'allow_sandbox_fallback=True')}")
    log = logging.getLogger("disa")
    (log.warning if level == "fallback" else log.info)("code sandbox: %s", ISOLATION_SUMMARY[level])
    return level


def target_rewards_for_rollouts(transform: str, raw: torch.Tensor, num_generations: int,
                                scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None):
    """``r~`` of TRL's flat ``(B,)`` rewards with Stage 3's own transform (``disa.training.rollouts.target_rewards``):
    ``group`` normalises each group of ``num_generations`` rows (TRL's order); ``raw`` and ``affine`` (each
    row's frozen scale, shift) act row by row."""
    group = num_generations if transform == "group" else 1
    if raw.numel() % group:
        raise ValueError(f"{raw.numel()} rewards do not split into groups of {num_generations}")
    return target_rewards(transform, raw.view(-1, group), scale, shift).reshape(-1)


def trl_batch_to_objective_inputs(per_token_logps: torch.Tensor, inputs: dict,
                                  log_z: Optional[torch.Tensor]) -> ObjectiveInputs:
    """Map a TRL micro-batch onto ``ObjectiveInputs``."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    if "ref_per_token_logps" not in inputs:
        raise ValueError("the TRL batch has no ref_per_token_logps: trajectory balance needs pi_ref; set "
                         "GRPOConfig.beta to a non-zero value (it is not used as a KL weight here)")
    old = inputs.get("old_per_token_logps")
    return ObjectiveInputs(logp=per_token_logps, mask=mask,
                           old_logp=per_token_logps.detach() if old is None else old,
                           ref_logp=inputs["ref_per_token_logps"], rewards=inputs["disa_rewards"], log_z=log_z)


class DisaGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the trajectory-balance loss (DISA by default).

    Extra arguments: ``target`` (beta and reward transform: the one ``add_log_z_column`` returns, so it is the
    table's), ``objective`` (a registered trajectory-balance objective), ``objective_kwargs`` (its
    hyperparameters). The train dataset needs a ``log_z`` column for a frozen ``log Z`` and
    ``reward_scale``/``reward_shift`` for the affine transform. A reward function that runs code (the ``code``
    verifier) needs bubblewrap unless ``allow_sandbox_fallback=True`` (:func:`code_reward_isolation`).
    """

    def __init__(self, *args, target: TargetConfig, objective: str = "disa",
                 objective_kwargs: Optional[dict] = None, log_z: str = "auto",
                 allow_sandbox_fallback: bool = False, **kwargs):
        spec = get_spec(objective)
        if spec.family != "trajectory_balance":
            raise ValueError(f"objective {objective!r} is {spec.family}; DisaGRPOTrainer runs trajectory-balance "
                             "objectives (disa, tb, flowrl, flowrl_no_logz); use trl.GRPOTrainer for GRPO")
        check_hyperparameters(objective, objective_kwargs or {})
        self.disa_objective = bind_objective(objective, {**(objective_kwargs or {}), "beta": target.beta})
        self.disa_target = target
        entry = resolve_log_z_source(log_z, spec)  # train.log_z, with the errors of `disa train`
        if entry.cls.needs_old_logp:
            raise ValueError(f"log_z={log_z!r}: the {entry.name!r} source reads each group's log pi_old before the "
                             "update, which TRL's rollout step does not expose; use table, labels, regressor, learned "
                             "or zero")
        # a source that reads run artefacts arrives as the dataset's log_z column (add_log_z_column); any other
        # is built as `disa train` builds it
        self.disa_log_z_column = bool(entry.requires)
        self.disa_log_z = None if self.disa_log_z_column else entry.cls.from_run(LogZContext(
            train=TrainConfig(objective=objective, objective_kwargs=dict(objective_kwargs or {}), log_z=log_z)))
        grpo_args = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if grpo_args is None or float(getattr(grpo_args, "beta", 0.0)) == 0.0:
            raise ValueError("DisaGRPOTrainer: pass a GRPOConfig with beta != 0 so that TRL computes reference "
                             "log-probs (trajectory balance needs log pi_ref; the value is not used as a KL weight)")
        if float(getattr(grpo_args, "temperature", 1.0)) != 1.0:
            warnings.warn("GRPOConfig.temperature != 1: TRL divides the policy's logits by it, so the residual "
                          "is about a tempered policy, not pi_theta itself", stacklevel=2)
        self.disa_code_isolation = code_reward_isolation(
            kwargs.get("reward_funcs", args[1] if len(args) > 1 else None), allow_sandbox_fallback)
        super().__init__(*args, **kwargs)
        if self.disa_log_z is not None and self.disa_log_z.trains:
            self._attach_log_z_module()

    # ------------------------------------------------------------------ rollouts
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._disa_rewards_per_func = rewards_per_func  # gathered over processes, as TRL's advantages use it
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        device = output["completion_ids"].device
        weights = self.reward_weights.to(device).unsqueeze(0)
        raw_all = (self._disa_rewards_per_func.to(device) * weights).nansum(dim=1)
        n = len(inputs)
        start = self.accelerator.process_index * n
        raw = raw_all[start:start + n]
        transform = self.disa_target.reward_transform
        if transform == "group":  # group statistics over the whole (gathered) group, then this process's rows
            rewards = target_rewards_for_rollouts("group", raw_all, self.num_generations)[start:start + n]
        elif transform == "affine":
            missing = [c for c in AFFINE_COLUMNS if c not in inputs[0]]
            if missing:
                raise KeyError(f"reward_transform='affine' needs dataset columns {list(AFFINE_COLUMNS)}; missing "
                               f"{missing}: fill them with add_log_z_column(..., labels_path=labels.parquet)")
            scale, shift = (torch.tensor([float(x[c]) for x in inputs], device=device) for c in AFFINE_COLUMNS)
            rewards = target_rewards_for_rollouts("affine", raw, self.num_generations, scale, shift)
        else:
            rewards = target_rewards_for_rollouts(transform, raw, self.num_generations)
        output["disa_rewards"] = rewards.float()
        source = self.disa_log_z
        if self.disa_log_z_column:
            if LOG_Z_COLUMN not in inputs[0]:
                raise KeyError(f"objective {self.disa_objective.name!r} reads a frozen log Z: the dataset needs a "
                               f"{LOG_Z_COLUMN!r} column (add_log_z_column(dataset, 'log_z/table.parquet'))")
            source = LogZTable({row: float(x[LOG_Z_COLUMN]) for row, x in enumerate(inputs)})
        log_z = source.rollout_log_z(LogZRequest(
            prompt_ids=list(range(n)), prompt_texts=[str(x.get("prompt", "")) for x in inputs], group_size=1,
            beta=self.disa_target.beta, rewards=output["disa_rewards"], mask=output["completion_mask"]))
        if log_z is not None:
            output["disa_log_z"] = log_z.to(device)
        return output

    # ------------------------------------------------------------------ loss
    def _attach_log_z_module(self) -> None:
        """Bind the learned source to the policy and attach its module, so that TRL's optimiser trains it."""
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, HEAD_NAME):
            self.disa_log_z.bind(model)
            model.add_module(HEAD_NAME, self.disa_log_z.module)

    def learned_log_z(self, model, inputs) -> torch.Tensor:
        """The source's log Z from the policy's last hidden states over the prompt tokens (a separate forward)."""
        out = model(input_ids=inputs["prompt_ids"], attention_mask=inputs["prompt_mask"], output_hidden_states=True)
        return self.disa_log_z.update_log_z(out.hidden_states[-1], inputs["prompt_mask"])

    def policy_logps(self, model, inputs) -> torch.Tensor:
        """Per-token ``log pi_theta`` of the completion tokens, as TRL's own loss computes them."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1))
        return logps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("DisaGRPOTrainer does not return outputs")
        reads_hidden = self.disa_log_z is not None and self.disa_log_z.needs_hidden_states
        log_z = self.learned_log_z(model, inputs) if reads_hidden else inputs.get("disa_log_z")
        loss, metrics = self.disa_objective(trl_batch_to_objective_inputs(self.policy_logps(model, inputs), inputs, log_z))
        mode = "train" if self.model.training else "eval"
        for name, value in read_back(metrics).items():
            self._metrics[mode][f"disa/{name}"].append(value)
        if mode == "train":  # TRL turns off the Trainer's own scaling; its losses divide by the accumulation
            loss = loss / self.current_gradient_accumulation_steps
        return loss
