"""Stage 3: the small RL loop. Rollouts -> rewards -> log-probs -> objective -> optimiser step.

One step, top to bottom (``RLTrainer.step``):

1. pick ``prompts_per_step`` prompts (a seeded shuffle, epoch after epoch);
2. sample ``group_size`` rollouts for each from the current policy (``pi_old``) with the generator;
3. score them with the verifier (TRL signature ``reward_fn(prompts, completions, **columns)``), transform the
   reward as the target says (``raw`` / ``affine`` / ``group``, shared with Stage 1) for trajectory balance,
   and form group advantages (GRPO) from the raw reward for policy gradient;
4. compute, without gradient, ``old_logp`` under the policy that made the rollouts (only where the update
   reads it from a policy that has moved: see ``needs_old_logp_pass``; otherwise the update uses its own
   log-probs, detached, as TRL does), ``ref_logp`` under ``pi_ref`` (only for objectives that declare it)
   and, for a frozen source, ``log Z`` (eq. 10);
5. ``updates_per_batch`` passes over the rollouts: mini-batches of ``micro_batch_size * gradient_accumulation``
   rollouts, one optimiser step each (``disa.training.step``);
6. log one row of metrics, checkpoint every ``save_every`` steps.

The losses live in ``disa.objectives`` (looked up by name, with what they need declared there); this file
only feeds them. Everything random in a step is seeded from ``(seed, step)``, which is what makes
``train 2 + resume 2 == train 4`` exact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from disa.config import TargetConfig, TrainConfig
from disa.estimators import group_normalize
from disa.generation import encode_prompt
from disa.objectives import get_spec, objective_aggregation
from disa.scoring import score_token_logprobs
from disa.training.checkpoints import (
    CHECKPOINT_PREFIX,
    find_checkpoint,
    load_training_checkpoint,
    read_checkpoint_json,
    save_training_checkpoint,
)
from disa.objectives.tb import sequence_logprob
from disa.training.log_z import (
    batch_log_z,
    LogZHead,
    check_log_z_fn_is_frozen,
    policy_hidden_size,
    read_frozen_log_z,
    resolve_log_z_kind,
)
from disa.training.logger import MetricsLogger
from disa.training.models import (
    apply_lora,
    autocast,
    check_mixed_precision,
    enable_gradient_checkpointing,
    model_device,
    pad_rows,
    zero_dropout,
)
from disa.training.rollouts import (
    Rollouts,
    default_generator,
    prompt_record,
    reference_context,
    rollout_metrics,
    score_rewards,
    target_rewards,
)
from disa.training.step import build_optimizer, build_scaler, build_scheduler
from disa.training.update import PolicyUpdate

Tensor = torch.Tensor
TRAIN_CONFIG_FILE = "train_config.json"
TARGET_FILE = "target.json"


class RLTrainer(PolicyUpdate):
    """Stage 3 RL for one policy. See the module docstring for one step, top to bottom.

    Args:
        policy: a Hugging Face causal LM (trained in place; wrapped by PEFT under ``config.lora``: use
            ``trainer.policy`` afterwards).
        ref_model: frozen ``pi_ref``; ``None`` under LoRA means "the policy with its adapter off", and for
            objectives that never read ``ref_logp`` (policy gradient without ``kl_coef``).
        tokenizer: the policy's tokenizer (prompts are encoded with ``disa.generation.encode_prompt``).
        prompts: dicts/objects with ``id``, ``text`` (the rendered prompt) and verifier columns.
        reward_fn: ``reward_fn(prompts, completions, **columns) -> list[float]`` (TRL signature).
        config: ``TrainConfig``; ``config.objective_kwargs`` are the objective's hyperparameters.
        output_dir: checkpoints (``checkpoint-<step>/``) and ``metrics.csv`` / ``tensorboard/`` go here.
        target: ``pi* ~ pi_ref exp(beta r~)``: ``beta`` for trajectory balance and the reward transform ``r~``.
        affine: ``{prompt id: (scale, shift)}`` for ``target.reward_transform='affine'``.
        log_z_fn: the frozen log Z, ``log_z_fn(texts, ids) -> Tensor (P,)``, when ``train.log_z`` resolves to
            ``frozen``; called under no_grad, and none of its parameters may be in the optimiser.
        generator: the rollout sampler (``.generate(prompts, n, max_new_tokens=, temperature=, top_p=, stop=,
            seed=)``, ``.pad_id``, ``.eos_ids``); None builds the library default, ``HFGenerator``.
        eval_fn: ``eval_fn(policy, tokenizer) -> dict[str, float]`` run every ``eval_every`` steps.
        resume_from: a checkpoint folder (or an output_dir, meaning its newest checkpoint) to continue from.
    """

    def __init__(
        self,
        policy: nn.Module,
        ref_model: Optional[nn.Module],
        tokenizer,
        prompts: Sequence[Any],
        reward_fn: Callable[..., list[float]],
        config: TrainConfig,
        *,
        output_dir: str | Path,
        target: TargetConfig,
        affine: Optional[Mapping[Any, tuple[float, float]]] = None,
        log_z_fn: Optional[Callable[[list[str], list[Any]], Tensor]] = None,
        generator=None,
        eval_fn: Optional[Callable[..., Mapping[str, float]]] = None,
        resume_from: Optional[str | Path] = None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(target, TargetConfig):
            raise TypeError(f"target must be a TargetConfig, got {type(target).__name__}")
        if config.objective == "sft":
            raise ValueError("objective 'sft' trains on fixed examples: use disa.training.train_sft")
        self.config, self.target = config, target
        self.spec = get_spec(config.objective)
        self.log_z_kind = resolve_log_z_kind(config.log_z, self.spec)
        self.objective_kwargs = dict(config.objective_kwargs)
        if self.spec.needs_beta:
            self.objective_kwargs["beta"] = target.beta
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.eval_fn = eval_fn
        self.log_z_fn = log_z_fn
        self.prompts = [prompt_record(p, i) for i, p in enumerate(prompts)]
        if not self.prompts:
            raise ValueError("prompts is empty")
        self.reward_transform = target.reward_transform if self.spec.family == "trajectory_balance" else None
        self._check_inputs(ref_model, log_z_fn, affine)
        self.affine = dict(affine) if affine is not None else None

        self.device = model_device(policy)
        check_mixed_precision(config.mixed_precision, self.device)
        if config.disable_dropout:
            zero_dropout(policy)
        # LoRA's A matrices and the log Z head are initialised from the global RNG: seed it, so two runs with
        # one config start from the same point whatever ran before them in the process
        torch.manual_seed(config.seed)
        if config.lora is not None:
            policy = apply_lora(policy, config.lora)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        self.policy = policy
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

        self.generator = generator if generator is not None else default_generator(policy, tokenizer, config)
        self.pad_id, self.eos_ids = self.generator.pad_id, sorted(self.generator.eos_ids)
        self.prompt_ids = [self._encode(i, p["text"]) for i, p in enumerate(self.prompts)]

        self.logz_head: Optional[LogZHead] = None
        if self.log_z_kind == "learned":
            self.logz_head = LogZHead(policy_hidden_size(policy), num_layers=config.logz_head_layers).to(self.device)
        self.optimizer = build_optimizer(self._param_groups(), config)
        check_log_z_fn_is_frozen(self.log_z_fn, self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps)
        self.scaler = build_scaler(self.device, config.mixed_precision)
        self.aggregation = objective_aggregation(config.objective, config.objective_kwargs)
        self.old_logp_pass = self.needs_old_logp_pass()

        self.global_step = 0
        self.history: list[dict] = []
        self._perm_cache: dict[int, list[int]] = {}
        self.output_dir = Path(output_dir)
        resume_step = None
        if resume_from is not None:
            resume_step = self._load_checkpoint(find_checkpoint(resume_from))
        self.logger = MetricsLogger(self.output_dir, config.report_to, resume_step=resume_step)

    # ------------------------------------------------------------------ construction
    def _check_inputs(self, ref_model, log_z_fn, affine) -> None:
        cfg, kind = self.config, self.log_z_kind
        self.needs_ref = self.spec.needs_ref_logp(cfg.objective_kwargs)
        if self.needs_ref and ref_model is None and cfg.lora is None:
            raise ValueError(f"objective {cfg.objective!r} needs ref_model (or config.lora, to use the adapter-off policy)")
        if kind == "frozen" and log_z_fn is None:
            raise ValueError(f"objective {cfg.objective!r} with train.log_z={cfg.log_z!r} reads a frozen log Z: it "
                             "needs log_z_fn (the table, regressor or labels of Stage 2)")
        if kind != "frozen" and log_z_fn is not None:
            raise ValueError(f"log_z_fn is only read when train.log_z resolves to a frozen source; objective "
                             f"{cfg.objective!r} with train.log_z={cfg.log_z!r} uses {kind or 'no'} log Z")
        if self.reward_transform == "affine":
            if affine is None:
                raise ValueError("target.reward_transform='affine' needs affine={prompt id: (scale, shift)}")
            missing = [p["id"] for p in self.prompts if p["id"] not in affine]
            if missing:
                raise ValueError(f"affine has no (scale, shift) for prompt id(s) {missing[:5]}")

    def _encode(self, row: int, text: str) -> list[int]:
        try:
            return encode_prompt(self.tokenizer, text)
        except ValueError as e:
            raise ValueError(f"prompts[{row}].text: {e}") from None

    def _param_groups(self) -> list[dict]:
        """The policy's trainable weights, and the learned log Z head's at its own rate and no weight decay."""
        cfg = self.config
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay, "name": "policy"}]
        if self.logz_head is not None:
            groups.append({"params": list(self.logz_head.parameters()), "lr": cfg.logz_lr, "weight_decay": 0.0,
                           "name": "logz_head"})
        return groups

    def _objective_setting(self, name: str):
        return self.objective_kwargs.get(name, self.spec.default(name))

    def optimizer_steps_per_batch(self) -> int:
        cfg = self.config
        rollouts = cfg.prompts_per_step * cfg.group_size
        mini = cfg.micro_batch_size * cfg.gradient_accumulation
        return cfg.updates_per_batch * -(-rollouts // mini)

    def needs_old_logp_pass(self) -> bool:
        """Whether rollouts need a separate no-grad pass for ``old_logp`` (log pi_old of the sampled tokens).

        Not needed when nothing reads it (trajectory balance with ``rollout_weight_mode='on_policy'``, whose
        weight is 1), nor when every gradient is taken before the policy moves (one optimiser step per rollout
        batch): then pi_old is the policy of the update's own forward, and its detached log-probs are old_logp
        (equal to a separate pass up to float rounding). ``train.log_z: batch`` reads old_logp to form log Z."""
        if self.log_z_kind == "batch":
            return True
        if self.spec.family == "supervised":
            return False
        if self.spec.family == "trajectory_balance" and self._objective_setting("rollout_weight_mode") == "on_policy":
            return False
        return self.optimizer_steps_per_batch() > 1

    # ------------------------------------------------------------------ prompt order
    def _epoch_permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self._perm_cache[epoch]

    def prompt_indices(self, step: int) -> list[int]:
        """Prompts of rollout step ``step``: positions ``step*P .. step*P+P-1`` of a stream of seeded epoch shuffles."""
        n, per_step = len(self.prompts), self.config.prompts_per_step
        return [self._epoch_permutation(pos // n)[pos % n] for pos in range(step * per_step, (step + 1) * per_step)]

    # ------------------------------------------------------------------ rollouts
    def _score(self, model: nn.Module, prompt_ids, response_ids) -> list[Tensor]:
        with autocast(self.config.mixed_precision, model_device(model)):
            return score_token_logprobs(
                model, prompt_ids, response_ids, pad_id=self.pad_id, batch_size=self.config.micro_batch_size
            )

    def _generate(self, prompt_indices: Sequence[int], seed: Optional[int]) -> list:
        cfg = self.config
        if hasattr(self.generator, "model"):
            self.generator.model = self.policy  # the policy as it is now (a PEFT wrapper under LoRA)
        with autocast(cfg.mixed_precision, self.device):
            groups = self.generator.generate(
                [self.prompts[i]["text"] for i in prompt_indices], cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, stop=cfg.stop or None, seed=seed,
            )
        return [s for group in groups for s in group]

    def collect_rollouts(self, prompt_indices: Sequence[int], seed: Optional[int] = None) -> Rollouts:
        """Sample, score and label ``group_size`` rollouts per prompt; everything the update needs, no gradient.

        ``seed`` makes the sampling reproducible (``step`` passes one derived from ``(config.seed, step)``)."""
        G = self.config.group_size
        self.policy.eval()
        samples = self._generate(prompt_indices, seed)
        flat_prompt_index = [i for i in prompt_indices for _ in range(G)]
        flat_prompt_ids = [s.prompt_ids for s in samples]
        flat_responses = [s.response_ids for s in samples]
        completions = [s.text for s in samples]

        raw = score_rewards(self.reward_fn, [self.prompts[i] for i in flat_prompt_index], completions)
        raw = raw.view(len(prompt_indices), G)
        rewards = self._target_rewards(raw, prompt_indices)
        advantages = group_normalize(raw)

        width = max(len(r) for r in flat_responses)
        old = self._score(self.policy, flat_prompt_ids, flat_responses) if self.old_logp_pass else None
        ref = None
        if self.needs_ref:
            with reference_context(self.ref_model, self.policy) as ref_model:
                ref = pad_rows(self._score(ref_model, flat_prompt_ids, flat_responses), width)
        mask = pad_rows([torch.ones(len(r)) for r in flat_responses], width).bool()
        return Rollouts(
            prompt_index=flat_prompt_index, prompt_ids=flat_prompt_ids, response_ids=flat_responses,
            completions=completions, finish_reasons=[s.finish_reason for s in samples], raw_rewards=raw.flatten(),
            rewards=rewards.flatten(), advantages=advantages.flatten(), old_logp=None if old is None else pad_rows(old, width), mask=mask,
            ref_logp=ref, log_z=self._rollout_log_z(prompt_indices) if self.log_z_kind != "batch"
            else self._batch_log_z(old, ref, mask, rewards),
        )

    def _batch_log_z(self, old: list[Tensor], ref: Tensor, mask: Tensor, rewards: Tensor) -> Tensor:
        """``train.log_z: batch``: each group's mean of ``log pi_ref - log pi_old + beta r~`` (see ``batch_log_z``),
        on the log-probs the objective's residual uses (sums, or token means when it length-normalises)."""
        mean = self.objective_kwargs.get("length_normalize", self.spec.default("length_normalize")) is True
        seq = lambda t: sequence_logprob(t.float(), mask.float(), mean)  # noqa: E731
        return batch_log_z(seq(pad_rows(old, mask.shape[1])), seq(ref), rewards.flatten().float(),
                           self.target.beta, self.config.group_size)

    def _target_rewards(self, raw: Tensor, prompt_indices: Sequence[int]) -> Tensor:
        """``r~`` for trajectory balance, ``(P, G)``; policy gradient reads advantages of the raw reward instead,
        so its ``rewards`` are the raw ones."""
        if self.reward_transform is None:
            return raw
        return target_rewards(self.reward_transform, raw, [self.prompts[i]["id"] for i in prompt_indices], self.affine)

    def _rollout_log_z(self, prompt_indices: Sequence[int]) -> Optional[Tensor]:
        """Per-rollout ``log Z`` known before the update: the frozen source's, or zeros; None otherwise (a
        learned head computes it inside the update, with gradient)."""
        G = self.config.group_size
        if self.log_z_kind == "frozen":
            texts = [self.prompts[i]["text"] for i in prompt_indices]
            ids = [self.prompts[i]["id"] for i in prompt_indices]
            return read_frozen_log_z(self.log_z_fn, texts, ids).repeat_interleave(G)
        if self.log_z_kind == "zero":
            return torch.zeros(len(prompt_indices) * G)
        return None

    # ------------------------------------------------------------------ the loop
    def step(self) -> dict:
        """One rollout batch and its updates; logs and returns the step's metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        # everything random in this step derives from (seed, step): resuming at any step replays it exactly
        step_seed = cfg.seed * 1_000_003 + self.global_step
        torch.manual_seed(step_seed)
        rollouts = self.collect_rollouts(self.prompt_indices(self.global_step), seed=step_seed)
        t1 = time.perf_counter()
        metrics = self.update(rollouts)
        t2 = time.perf_counter()
        lrs = {g.get("name", "policy" if i == 0 else str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        self.scheduler.step()
        self.global_step += 1
        row = {
            "step": self.global_step,
            "loss": metrics.pop("loss"),
            **rollout_metrics(rollouts, cfg.group_size),
            "lr": lrs["policy"],
            **({"logz_lr": lrs["logz_head"]} if "logz_head" in lrs else {}),
            **metrics,
            "time_rollout_s": t1 - t0,
            "time_update_s": t2 - t1,
        }
        if self.eval_fn is not None and cfg.eval_every and self.global_step % cfg.eval_every == 0:
            row.update(self._evaluate())
        row["time_step_s"] = time.perf_counter() - t0
        self.history.append(row)
        self.logger.log(row)
        if cfg.save_every and self.global_step % cfg.save_every == 0:
            self.save_checkpoint()
        return row

    def _evaluate(self) -> dict:
        self.policy.eval()
        with torch.no_grad():
            result = self.eval_fn(self.policy, self.tokenizer)
        return {f"eval_{k}": float(v) for k, v in result.items()}

    def train(self) -> list[dict]:
        """Run until ``config.num_steps`` (from wherever a resume left off); checkpoint at the end."""
        cfg = self.config
        bar = tqdm(total=cfg.num_steps, initial=self.global_step, desc=f"train[{cfg.objective}]", unit="step",
                   disable=None, dynamic_ncols=True)
        try:
            while self.global_step < cfg.num_steps:
                row = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4g}", reward=f"{row['reward_mean']:.3f}")
            last = self.output_dir / f"{CHECKPOINT_PREFIX}{self.global_step}"
            if not (last / "trainer_state.json").exists():
                self.save_checkpoint()
        finally:
            bar.close()
            self.logger.close()  # also on a crash: TensorBoard's event file is complete
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-<step>/`` with the train config and the target it trained towards."""
        return save_training_checkpoint(
            self.output_dir, self.global_step, policy=self.policy, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            trainer_state={"step": self.global_step, "history": self.history},
            config_files={TRAIN_CONFIG_FILE: self.config.to_dict(), TARGET_FILE: self.target.to_dict()},
            keep=self.config.keep_checkpoints, logz_head=self.logz_head,
        )

    def _load_checkpoint(self, ckpt: Path) -> int:
        saved = TargetConfig.from_dict(read_checkpoint_json(ckpt, TARGET_FILE))
        if saved != self.target:
            raise ValueError(f"{ckpt}: the run trained towards target {saved.to_dict()}, not {self.target.to_dict()}; "
                             "resuming towards another target would mix two objectives")
        state = load_training_checkpoint(
            ckpt, policy=self.policy, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            logz_head=self.logz_head,
        )
        self.global_step = int(state["step"])
        self.history = list(state["history"])
        return self.global_step

    @classmethod
    def resume(
        cls,
        output_dir: str | Path,
        policy: nn.Module,
        ref_model: Optional[nn.Module],
        tokenizer,
        prompts: Sequence[Any],
        reward_fn: Callable[..., list[float]],
        config: Optional[TrainConfig] = None,
        *,
        target: Optional[TargetConfig] = None,
        **kwargs,
    ) -> "RLTrainer":
        """Continue a run from ``output_dir``'s newest checkpoint (or a checkpoint folder), with the config and
        target it saved unless given (e.g. a larger ``num_steps``); a different target is an error. ``policy`` is
        the same base model the run started from; its weights are replaced by the checkpoint's. Checkpoints
        keep writing to ``output_dir`` (a run folder, or the checkpoint's parent)."""
        ckpt = find_checkpoint(output_dir)
        if config is None:
            config = TrainConfig.from_dict(read_checkpoint_json(ckpt, TRAIN_CONFIG_FILE))
        if target is None:
            target = TargetConfig.from_dict(read_checkpoint_json(ckpt, TARGET_FILE))
        kwargs.setdefault("output_dir", ckpt.parent)
        return cls(policy, ref_model, tokenizer, prompts, reward_fn, config, target=target, resume_from=ckpt, **kwargs)
