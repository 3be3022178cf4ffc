"""DISA's Stage 3 inside TRL: ``DisaGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss is trajectory balance.

TRL keeps what users came for (its generation, vLLM colocation, accelerate / DeepSpeed, logging); this
subclass changes two documented hooks:

* ``_generate_and_score_completions``: after TRL's own, each rollout also carries its target reward ``r~``
  (TRL's weighted reward sum through Stage 3's own transform, on the ``(prompts, num_generations)`` view),
  whether any reward function scored it, and its log Z from the ``disa.log_z`` source that ``log_z`` names
  (``train.log_z``'s values): a source that reads run artefacts (table, labels, regressor) arrives as the
  dataset's ``log_z`` column, filled by ``add_log_z_column``; zero and learned are built as ``disa train``
  builds them; batch is refused (TRL does not expose log pi_old at that point);
* ``compute_loss`` (TRL documents overriding it): our registered objective (``disa``, ``tb``, ``flowrl`` or
  ``flowrl_no_logz``) on TRL's per-token log-probs, reference log-probs and the frozen ``log Z``, over the
  rollouts that have loss tokens and a reward (:func:`kept_rollouts`), each weighted by TRL's sequence-level
  vLLM importance ratio when there is one.

TRL computes reference log-probs only when its KL coefficient ``GRPOConfig.beta`` is non-zero; trajectory
balance always needs them, so the trainer asks for a non-zero value and never uses it as a KL weight. DISA's
``beta`` is the target's, read from the log Z table. A learned source (``flowrl``) attaches its head to the
model, so TRL's optimizer trains it. The settings refused, and why: :func:`check_grpo_args`; every setting's
behaviour: docs/engines.md (TRL).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Optional, Sequence

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
# GRPOConfig fields that add a term to or mask tokens of TRL's own loss (refused when not at these defaults)
GRPO_LOSS_TERMS = {"entropy_coef": 0.0, "use_adaptive_entropy": False, "top_entropy_quantile": 1.0,
                   "off_policy_mask_threshold": None}
# TRL's vLLM importance-sampling modes with one ratio per rollout (B, 1): applied as a trajectory weight
SEQUENCE_IS_MODES = ("sequence_mask", "sequence_truncate")
__all__ = ["DisaGRPOTrainer", "UnscoredCompletionWarning", "add_log_z_column", "check_grpo_args",
           "code_reward_isolation", "prompts_dataset", "target_rewards_for_rollouts", "trl_batch_to_objective_inputs",
           "weighted_objective"]


class UnscoredCompletionWarning(UserWarning):
    """Some completions were scored by no reward function (TRL's NaN): they are excluded, never given r~ = 0."""


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


def check_grpo_args(grpo_args: Any, num_reward_funcs: int) -> None:
    """Refuse the ``GRPOConfig`` settings under which TRL's batch cannot give the trajectory-balance loss its
    meaning (each error says why and what to set instead); warn on ``temperature != 1``."""
    if grpo_args is None or float(getattr(grpo_args, "beta", 0.0)) == 0.0:
        raise ValueError("DisaGRPOTrainer: pass a GRPOConfig with beta != 0 so that TRL computes reference "
                         "log-probs (trajectory balance needs log pi_ref; the value is not used as a KL weight)")
    if getattr(grpo_args, "sync_ref_model", False):
        raise ValueError("DisaGRPOTrainer: sync_ref_model=True is refused: TRL would copy the policy into pi_ref "
                         "every ref_model_sync_steps, but the frozen log Z(x) = log E_pi_ref[exp(beta r~)] was "
                         "estimated under the starting pi_ref; after a sync the residual targets a pi* that this "
                         "log Z does not normalise. Keep sync_ref_model=False")
    if getattr(grpo_args, "use_vllm", False) and getattr(grpo_args, "vllm_importance_sampling_correction", False):
        mode = getattr(grpo_args, "vllm_importance_sampling_mode", None)
        if mode not in SEQUENCE_IS_MODES:
            raise ValueError(f"DisaGRPOTrainer: vllm_importance_sampling_mode={mode!r} gives one ratio per token, "
                             "which has no place in a trajectory-level squared residual; use one of "
                             f"{SEQUENCE_IS_MODES} (applied as a trajectory weight) or "
                             "vllm_importance_sampling_correction=False")
    shaping = {name: getattr(grpo_args, name) for name, default in GRPO_LOSS_TERMS.items()
               if hasattr(grpo_args, name) and getattr(grpo_args, name) != default}
    if shaping:
        raise ValueError(f"DisaGRPOTrainer: {shaping} add a term to or mask tokens of TRL's own GRPO loss, which "
                         "DisaGRPOTrainer replaces by the trajectory-balance residual; they would be ignored. Leave "
                         f"them at TRL's defaults {dict((k, GRPO_LOSS_TERMS[k]) for k in shaping)}")
    aggregation = getattr(grpo_args, "multi_objective_aggregation", "sum_then_normalize")
    if num_reward_funcs > 1 and aggregation != "sum_then_normalize":
        raise ValueError(f"DisaGRPOTrainer: multi_objective_aggregation={aggregation!r} normalises each reward "
                         "function over the batch, which is not a fixed reward r(x, y) that log Z could have been "
                         "estimated under; use 'sum_then_normalize' (r = sum_k reward_weights[k] * r_k)")
    if float(getattr(grpo_args, "temperature", 1.0)) != 1.0:
        warnings.warn("GRPOConfig.temperature != 1: TRL divides the policy's logits by it, so the residual "
                      "is about a tempered policy, not pi_theta itself", stacklevel=3)


def target_rewards_for_rollouts(transform: str, raw: torch.Tensor, num_generations: int,
                                scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                                scored: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``r~`` of TRL's flat ``(B,)`` rewards (``B = P * num_generations``, each prompt's rollouts adjacent, TRL's
    order) through Stage 3's own transform (:func:`disa.training.rollouts.target_rewards` on the ``(P, G)``
    view). ``affine``: ``scale, shift (B,)`` are the rows' dataset columns, one value per group (a group whose
    rows disagree is an error). ``scored (B,)``: False for a completion no reward function scored; it is left
    out of its group's statistics and gets ``r~ = 0`` (the trainer excludes it from the loss)."""
    if raw.dim() != 1 or raw.numel() % num_generations:
        raise ValueError(f"{tuple(raw.shape)} rewards do not split into groups of num_generations={num_generations}")
    shape = (raw.numel() // num_generations, num_generations)
    mask = None if scored is None else scored.bool().view(shape)
    grouped = raw.view(shape) if mask is None else raw.view(shape).masked_fill(~mask, 0.0)
    if transform == "affine":
        if scale is None or shift is None:
            raise ValueError("reward_transform='affine' needs each row's reward_scale and reward_shift")
        scale, shift = scale.view(shape), shift.view(shape)
        bad = ((scale != scale[:, :1]) | (shift != shift[:, :1])).any(dim=1)
        if bool(bad.any()):
            raise ValueError(f"group {int(torch.nonzero(bad)[0])}: its {num_generations} rows carry different "
                             "reward_scale/reward_shift; the rows of one group must be one prompt")
        scale, shift = scale[:, 0], shift[:, 0]
    if mask is None:
        return target_rewards(transform, grouped, scale, shift).reshape(-1)
    some = mask.any(dim=1)  # a group nobody scored has no statistics: all its rows are excluded anyway
    out = torch.zeros_like(grouped)
    if bool(some.any()):
        out[some] = target_rewards(transform, grouped[some], None if scale is None else scale[some],
                                   None if shift is None else shift[some], mask=mask[some])
    return out.masked_fill(~mask, 0.0).reshape(-1)


def trl_prompt_text(text: str, tokenizer, where: str = "prompt") -> str:
    """The prompt string on which TRL's ``tokenizer(text)`` (special tokens added) gives the ids Stage 1 was
    conditioned on (:func:`disa.generation.encode_prompt`): a rendered chat template that writes the BOS itself
    loses it, since TRL's tokenizer call adds it again. Raises ``ValueError`` naming ``where`` when no string
    does (then give TRL conversational ``prompt`` rows instead)."""
    from disa.generation import encode_prompt

    want = encode_prompt(tokenizer, text)
    bos = getattr(tokenizer, "bos_token", None)
    for candidate in ([text[len(bos):]] if bos and text.startswith(bos) else []) + [text]:
        if list(tokenizer(candidate)["input_ids"]) == want:
            return candidate
    raise ValueError(f"{where}: TRL's tokenizer(prompt) cannot give the token ids Stage 1 used for it "
                     f"({want[:8]}...); pass TRL conversational 'prompt' rows (lists of messages) instead")


def prompts_dataset(records: Sequence[Any], tokenizer=None, id_column: str = "prompt_id"):
    """A TRL train dataset from disa prompt records (:func:`disa.data.load_prompts`): ``prompt`` is each record
    rendered by :func:`disa.data.render_prompt` (the chat template applied to ``messages``, or a plain
    ``prompt``), as the string TRL tokenizes into the very ids Stage 1 sampled and scored
    (:func:`trl_prompt_text`), so the frozen log Z is about the same prompt. ``id_column`` holds the record id
    (what ``add_log_z_column`` looks up); the verifier's columns (``answer``, ``tests``, extra columns) ride
    along for the reward function."""
    import datasets

    from disa.data import render_prompt

    texts = [render_prompt(r, tokenizer) for r in records]
    if tokenizer is not None:
        texts = [trl_prompt_text(t, tokenizer, f"prompt {r.id!r}") for t, r in zip(texts, records)]
    columns: dict[str, list] = {"prompt": texts, id_column: [r.id for r in records]}
    for key in dict.fromkeys(k for r in records for k in r.verifier_columns() if k != "metadata"):
        values = [r.verifier_columns().get(key) for r in records]
        if any(v is not None for v in values):
            columns[key] = values
    return datasets.Dataset.from_dict(columns)


def trl_batch_to_objective_inputs(per_token_logps: torch.Tensor, inputs: dict,
                                  log_z: Optional[torch.Tensor]) -> ObjectiveInputs:
    """Map a TRL micro-batch onto ``ObjectiveInputs``."""
    mask = loss_mask(inputs)
    if "ref_per_token_logps" not in inputs:
        raise ValueError("the TRL batch has no ref_per_token_logps: trajectory balance needs pi_ref; set "
                         "GRPOConfig.beta to a non-zero value (it is not used as a KL weight here)")
    old = inputs.get("old_per_token_logps")
    return ObjectiveInputs(logp=per_token_logps, mask=mask,
                           old_logp=per_token_logps.detach() if old is None else old,
                           ref_logp=inputs["ref_per_token_logps"], rewards=inputs["disa_rewards"], log_z=log_z)


def loss_mask(inputs: dict) -> torch.Tensor:
    """The tokens TRL's loss counts: ``completion_mask`` (times ``tool_mask`` in multi-turn batches)."""
    mask = inputs["completion_mask"]
    return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask


def kept_rollouts(inputs: dict) -> torch.Tensor:
    """``(B,)`` bool: the rollouts that enter the loss: at least one token in the loss mask (TRL's
    ``mask_truncated_completions`` zeroes a truncated rollout's whole row) and scored by some reward function."""
    keep = loss_mask(inputs).sum(dim=1) > 0
    return keep & inputs["disa_scored"].bool() if "disa_scored" in inputs else keep


def select_rollouts(batch: ObjectiveInputs, keep: torch.Tensor) -> ObjectiveInputs:
    """The rows ``keep`` selects of every per-rollout and per-token field."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[keep] for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def weighted_objective(objective: Any, batch: ObjectiveInputs,
                       weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """``objective(batch)``, or with a detached per-rollout ``weight (B,)``: ``mean_b weight_b * loss_b`` where
    ``loss_b`` is the objective on rollout ``b`` alone. Trajectory-balance losses are means over rollouts
    (``ObjectiveNeeds.token_weighted`` False), so this multiplies each rollout's term ``w_b residual_b^2`` by
    ``weight_b``; with ``weight = 1`` it is ``objective(batch)``. Metrics are the rollouts' means."""
    if weight is None:
        return objective(batch)
    rows = [objective(select_rollouts(batch, torch.arange(batch.mask.shape[0], device=batch.mask.device) == b))
            for b in range(batch.mask.shape[0])]
    loss = (weight.detach().to(rows[0][0].dtype) * torch.stack([r[0] for r in rows])).mean()
    metrics = {k: torch.stack([r[1][k] for r in rows]).mean() for k in rows[0][1]}
    return loss, metrics


class DisaGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the trajectory-balance loss (DISA by default).

    Extra arguments: ``target`` (beta and reward transform: the one ``add_log_z_column`` returns, so it is the
    table's), ``objective`` (a registered trajectory-balance objective), ``objective_kwargs`` (its
    hyperparameters). The train dataset needs a ``log_z`` column for a frozen ``log Z`` and
    ``reward_scale``/``reward_shift`` for the affine transform. A reward function that runs code (the ``code``
    verifier) needs bubblewrap unless ``allow_sandbox_fallback=True`` (:func:`code_reward_isolation`).
    What each TRL setting does here: :func:`check_grpo_args` and docs/engines.md (TRL).
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
        if self.disa_objective.needs.token_weighted:
            raise ValueError(f"objective {objective!r} declares a token-weighted loss; DisaGRPOTrainer weights and "
                             "drops whole rollouts and needs a mean over rollouts")
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
        reward_funcs = kwargs.get("reward_funcs", args[1] if len(args) > 1 else None)
        check_grpo_args(grpo_args, len(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else 1)
        dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        names = getattr(dataset, "column_names", None) or []
        if "messages" in names and "prompt" not in names:
            raise ValueError("train_dataset has a 'messages' column but no 'prompt': TRL reads 'prompt'. Build it "
                             "with disa.integrations.trl.prompts_dataset(load_prompts(path), tokenizer), which "
                             "renders each row as Stage 1 did, or rename the column to 'prompt' (TRL's "
                             "conversational format)")
        self.disa_code_isolation = code_reward_isolation(reward_funcs, allow_sandbox_fallback)
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
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        per_func = self._disa_rewards_per_func.to(device)  # (B_all, K), NaN where a function gave None
        scored_all = ~torch.isnan(per_func).all(dim=1)
        raw_all = (per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)  # TRL's weighted sum
        n = len(inputs)
        rows = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        scale = shift = None
        if self.disa_target.reward_transform == "affine":
            missing = [c for c in AFFINE_COLUMNS if c not in inputs[0]]
            if missing:
                raise KeyError(f"reward_transform='affine' needs dataset columns {list(AFFINE_COLUMNS)}; missing "
                               f"{missing}: fill them with add_log_z_column(..., labels_path=labels.parquet)")
            scale, shift = (self.accelerator.gather(torch.tensor([float(x[c]) for x in inputs], device=device))
                            for c in AFFINE_COLUMNS)
        rewards = target_rewards_for_rollouts(self.disa_target.reward_transform, raw_all, group, scale, shift,
                                              scored_all)
        unscored = int((~scored_all).sum())
        if unscored:
            warnings.warn(UnscoredCompletionWarning(
                f"{unscored} of {scored_all.numel()} completions were scored by no reward function (each returned "
                "None): they are left out of their group's reward statistics and of the loss"), stacklevel=2)
        self._metrics[mode]["disa/unscored_frac"].append(unscored / scored_all.numel())
        output["disa_rewards"] = rewards[rows].float()
        output["disa_scored"] = scored_all[rows]
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
        """Our objective on the micro-batch's kept rollouts (:func:`kept_rollouts`), each weighted by TRL's
        sequence-level vLLM importance ratio when TRL computed one; 0 (with a graph) when none is kept."""
        if return_outputs:
            raise ValueError("DisaGRPOTrainer does not return outputs")
        reads_hidden = self.disa_log_z is not None and self.disa_log_z.needs_hidden_states
        log_z = self.learned_log_z(model, inputs) if reads_hidden else inputs.get("disa_log_z")
        logp = self.policy_logps(model, inputs)
        keep = kept_rollouts(inputs)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["disa/excluded_frac"].append(float((~keep).float().mean()))
        if not bool(keep.any()):  # every rollout masked or unscored: nothing to learn, but keep the graph
            loss = (logp * 0.0).sum() + (0.0 if log_z is None or not log_z.requires_grad else (log_z * 0.0).sum())
        else:
            ratio = inputs.get("importance_sampling_ratio")  # TRL's vLLM correction, (B, 1) in sequence modes
            weight = None if ratio is None else ratio.reshape(ratio.shape[0], -1)[:, 0][keep]
            batch = select_rollouts(trl_batch_to_objective_inputs(logp, inputs, log_z), keep)
            loss, metrics = weighted_objective(self.disa_objective, batch, weight)
            for name, value in read_back(metrics).items():
                self._metrics[mode][f"disa/{name}"].append(value)
            if weight is not None:
                self._metrics[mode]["disa/vllm_is_weight_mean"].append(float(weight.mean()))
        if mode == "train":  # TRL turns off the Trainer's own scaling; its losses divide by the accumulation
            loss = loss / self.current_gradient_accumulation_steps
        return loss
