"""Stage 3: the RL loop, built from four parts a newcomer can read one at a time:

    RolloutCollector  (collector.py)  engine -> verifier -> r~ -> pi_old / pi_ref log-probs -> log Z source
    Learner           (learner.py)    policy + optimiser + objective, micro-batched optimiser steps
    Checkpointer      (checkpointer.py) atomic checkpoints and exact resume
    MetricsLogger     (logger.py)     metrics.csv / TensorBoard

One step (``RLTrainer.step``), top to bottom:

1. pick ``prompts_per_step`` prompts (a seeded shuffle, epoch after epoch);
2. the collector syncs the engine to the policy's weights, samples ``group_size`` rollouts per prompt, scores
   them with the verifier, forms r~ (trajectory balance) and group advantages (policy gradient), scores
   ``old_logp`` / ``ref_logp`` where they are read, and gets each rollout's log Z from the log Z source;
3. the learner makes ``updates_per_batch`` passes of optimiser steps over the rollouts;
4. one row of metrics is logged; every ``save_every`` steps a checkpoint is written.

What the objective reads is its own declaration (``disa.objectives``), where log Z comes from is a
``disa.log_z`` source; this file only wires them. Everything random in a step is seeded from ``(seed, step)``,
which is what makes ``train 2 + resume 2 == train 4`` exact.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from disa.config import TargetConfig, TrainConfig
from disa.generation import encode_prompt
from disa.generation.engine import RolloutEngine
from disa.log_z import FrozenLogZSource, LogZContext, LogZSource, resolve_log_z_source
from disa.objectives import bind_objective, get_spec
from disa.training.checkpointer import Checkpointer
from disa.training.checkpoints import find_checkpoint, read_checkpoint_json
from disa.training.collector import ReferenceScorer, RewardTransform, RolloutCollector
from disa.training.learner import Learner
from disa.training.logger import MetricsLogger
from disa.training.models import (
    apply_lora,
    check_mixed_precision,
    enable_gradient_checkpointing,
    model_device,
    zero_dropout,
)
from disa.training.rollouts import Rollouts, default_generator, prompt_record, rollout_metrics

TRAIN_CONFIG_FILE = "train_config.json"
TARGET_FILE = "target.json"


_log = logging.getLogger(__name__)
LEARNING_WINDOW = 20  # steps without a single rewarded rollout (or with a zero gradient) before the trainer says so


def history_cannot_learn(history: list[dict], num_steps: int) -> list[str]:
    """What the last ``LEARNING_WINDOW`` steps say: no rewarded rollout at all, or a gradient of exactly zero."""
    window = history[-LEARNING_WINDOW:]
    if not window or len(window) < min(LEARNING_WINDOW, num_steps):
        return []
    first, last, out = int(window[0]["step"]), int(window[-1]["step"]), []
    if all(float(r.get("reward_mean", 1.0)) <= 0.0 for r in window):
        out.append(f"the mean reward was 0 or less in every step {first}-{last} (no rewarded rollout): the objective "
                   "has nothing to move towards; check data.verifier on a few responses, or start from a stronger "
                   "models.policy")
    if all(float(r.get("grad_norm", 1.0)) == 0.0 for r in window):
        out.append(f"the gradient was exactly 0 in every step {first}-{last}: nothing is being learned")
    return out


def build_log_z_source(config: TrainConfig, spec, given: Optional[LogZSource]) -> Optional[LogZSource]:
    """The log Z source ``train.log_z`` names: ``given`` when the caller built it (it must be of that source's
    type), else built here for a source that reads no run artefact."""
    entry = resolve_log_z_source(config.log_z, spec)
    if entry is None:
        if given is not None:
            raise ValueError(f"objective {spec.name!r} reads no log Z; do not pass log_z")
        return None
    if given is not None:
        accepted = FrozenLogZSource if issubclass(entry.cls, FrozenLogZSource) else entry.cls  # frozen: any values
        if not isinstance(given, accepted):
            raise ValueError(f"train.log_z={config.log_z!r} is the {entry.name!r} source; log_z is a "
                             f"{type(given).__name__}")
        return given
    if entry.requires:
        raise ValueError(f"objective {spec.name!r} with train.log_z={config.log_z!r} reads the {entry.name!r} log Z "
                         f"source, built from run artefacts {list(entry.requires)}: pass log_z= (e.g. a LogZTable)")
    return entry.cls.from_run(LogZContext(train=config))


class RLTrainer:
    """Stage 3 RL for one policy. See the module docstring for one step, top to bottom.

    Args:
        policy: a Hugging Face causal LM (trained in place; wrapped by PEFT under ``config.lora``: use
            ``trainer.policy`` afterwards).
        ref_model: frozen ``pi_ref``; ``None`` under LoRA means "the policy with its adapter off", and for
            objectives that never read ``ref_logp``.
        tokenizer: the policy's tokenizer (prompts are encoded with ``disa.generation.encode_prompt``).
        prompts: dicts/objects with ``id``, ``text`` (the rendered prompt) and verifier columns.
        reward_fn: ``reward_fn(prompts, completions, **columns) -> list[float]`` (TRL signature).
        config: ``TrainConfig``; ``config.objective_kwargs`` are the objective's hyperparameters.
        output_dir: checkpoints (``checkpoint-<step>/``) and ``metrics.csv`` / ``tensorboard/`` go here.
        target: ``pi* ~ pi_ref exp(beta r~)``: ``beta`` for trajectory balance and the reward transform ``r~``.
        affine: ``{prompt id: (scale, shift)}`` for ``target.reward_transform='affine'``.
        log_z: the ``disa.log_z`` source ``train.log_z`` names, when it reads run artefacts (a ``LogZTable``,
            ``FrozenLogZ``, ``FrozenFunction``); others (learned, zero, batch) are built here.
        engine: a ``RolloutEngine``; None builds the library default, ``HFGenerator``. It receives the policy's
            weights (``sync_weights``) before every rollout batch.
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
        log_z: Optional[LogZSource] = None,
        engine: Optional[RolloutEngine] = None,
        eval_fn: Optional[Callable[..., Mapping[str, float]]] = None,
        resume_from: Optional[str | Path] = None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(target, TargetConfig):
            raise TypeError(f"target must be a TargetConfig, got {type(target).__name__}")
        if config.objective == "sft":
            raise ValueError("objective 'sft' trains on fixed examples: use disa.training.train_sft")
        self.config, self.target, self.tokenizer, self.eval_fn = config, target, tokenizer, eval_fn
        spec = get_spec(config.objective)
        hparams = {**config.objective_kwargs, **({"beta": target.beta} if spec.needs_beta else {})}
        self.objective = bind_objective(config.objective, hparams)
        self.log_z = build_log_z_source(config, spec, log_z)
        self.prompts = [prompt_record(p, i) for i, p in enumerate(prompts)]
        if not self.prompts:
            raise ValueError("prompts is empty")
        transform = RewardTransform(target.reward_transform if spec.family == "trajectory_balance" else None, affine)
        transform.check([p["id"] for p in self.prompts])
        if "ref_logp" in self.objective.needs.inputs and ref_model is None and config.lora is None:
            raise ValueError(f"objective {config.objective!r} needs ref_model (or config.lora, to use the adapter-off policy)")

        check_mixed_precision(config.mixed_precision, model_device(policy))
        if config.disable_dropout:
            zero_dropout(policy)
        # LoRA's A matrices and a learned log Z head are initialised from the global RNG: seed it, so two runs
        # with one config start from the same point whatever ran before them in the process
        torch.manual_seed(config.seed)
        if config.lora is not None:
            policy = apply_lora(policy, config.lora)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        self.engine = engine if engine is not None else default_generator(policy, tokenizer, config)
        self.pad_id, self.eos_ids = self.engine.pad_id, sorted(self.engine.eos_ids)
        self.prompt_ids = [self._encode(i, p["text"]) for i, p in enumerate(self.prompts)]
        if self.log_z is not None:
            self.log_z.bind(policy)

        self.learner = Learner(policy, self.objective, config, pad_id=self.pad_id, log_z=self.log_z,
                               logz_lr=config.logz_lr, max_len=config.max_new_tokens)
        self.collector = RolloutCollector(
            self.engine, reward_fn, self.prompts,
            reference=ReferenceScorer(ref_model, pad_id=self.pad_id, micro_batch_size=config.micro_batch_size,
                                      mixed_precision=config.mixed_precision,
                                      micro_batch_tokens=config.micro_batch_tokens),
            log_z=self.log_z, transform=transform, needs=self.objective.needs, old_logp_pass=self.needs_old_logp_pass(),
            beta=target.beta, config=config)
        self.output_dir = Path(output_dir)
        self.checkpointer = Checkpointer(
            self.output_dir, tokenizer, keep=config.keep_checkpoints,
            config_files={TRAIN_CONFIG_FILE: config.to_dict(), TARGET_FILE: target.to_dict()},
            log_z_module=self.log_z.module if self.log_z is not None else None)

        self.global_step = 0
        self.history: list[dict] = []
        self._perm_cache: dict[int, list[int]] = {}
        resume_step = self._load_checkpoint(find_checkpoint(resume_from)) if resume_from is not None else None
        self.logger = MetricsLogger(self.output_dir, config.report_to, resume_step=resume_step,
                                    history=self.history if resume_step is not None else None,
                                    hparams={"train": config.to_dict(), "target": target.to_dict()})

    @property
    def policy(self) -> nn.Module:
        return self.learner.policy

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    @property
    def old_logp_pass(self) -> bool:
        """Whether the collector scores log pi_old in a separate pass (see ``needs_old_logp_pass``)."""
        return self.collector.old_logp_pass

    def _encode(self, row: int, text: str) -> list[int]:
        try:
            return encode_prompt(self.tokenizer, text)
        except ValueError as e:
            raise ValueError(f"prompts[{row}].text: {e}") from None

    def optimizer_steps_per_batch(self) -> int:
        cfg = self.config
        rollouts = cfg.prompts_per_step * cfg.group_size
        mini = cfg.micro_batch_size * cfg.gradient_accumulation
        return cfg.updates_per_batch * -(-rollouts // mini)

    def needs_old_logp_pass(self) -> bool:
        """Whether rollouts need a separate no-grad pass for ``old_logp`` (log pi_old of the sampled tokens).

        When the log Z source reads it; and when the objective reads it and the policy moves before the last
        gradient of the batch (more than one optimiser step per rollout batch). With one step, pi_old is the
        policy of the update's own forward, and its detached log-probs are old_logp (equal to a separate pass up
        to float rounding)."""
        if self.log_z is not None and self.log_z.needs_old_logp:
            return True
        return "old_logp" in self.objective.needs.inputs and self.optimizer_steps_per_batch() > 1

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

    # ------------------------------------------------------------------ the loop
    def collect_rollouts(self, prompt_indices: Sequence[int], seed: Optional[int] = None) -> Rollouts:
        return self.collector.collect(self.policy, prompt_indices, seed)

    def update(self, rollouts: Rollouts) -> dict:
        """``updates_per_batch`` passes of optimiser steps over ``rollouts``; returns averaged metrics."""
        cfg = self.config
        return self.learner.update(rollouts, passes=cfg.updates_per_batch,
                                   seed=cfg.seed * 1_000_003 + 7919 * self.global_step + 1)

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
        lrs = self.learner.learning_rates()
        self.learner.scheduler.step()
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
        if self.global_step % LEARNING_WINDOW == 0 or self.global_step == cfg.num_steps:  # said as it happens
            for line in history_cannot_learn(self.history, cfg.num_steps):
                _log.warning("%s", line)
        if cfg.save_every and self.global_step % cfg.save_every == 0:
            self.save_checkpoint()
        return row

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
            if not self.checkpointer.exists(self.global_step):
                self.save_checkpoint()
        finally:
            bar.close()
            self.logger.close()  # also on a crash: TensorBoard's event file is complete
        return self.history

    def _evaluate(self) -> dict:
        self.policy.eval()
        with torch.no_grad():
            result = self.eval_fn(self.policy, self.tokenizer)
        return {f"eval_{k}": float(v) for k, v in result.items()}

    def evaluate_loss(self, rollouts: Rollouts, objective: Optional[str] = None, **objective_kwargs) -> float:
        """An objective (default: the configured one) over the whole rollout batch under the current policy,
        without updating: a diagnostic, e.g. the GRPO surrogate of an ASPO run. A trajectory-balance objective
        gets the target's beta unless ``objective_kwargs`` sets one."""
        if objective is None:
            return self.learner.evaluate_loss(rollouts)
        if get_spec(objective).needs_beta:
            objective_kwargs = {"beta": self.target.beta, **objective_kwargs}
        return self.learner.evaluate_loss(rollouts, bind_objective(objective, objective_kwargs))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-<step>/`` with the train config and the target it trained towards."""
        return self.checkpointer.save(self.global_step, self.learner,
                                      {"step": self.global_step, "history": self.history})

    def _load_checkpoint(self, ckpt: Path) -> int:
        saved = TargetConfig.from_dict(read_checkpoint_json(ckpt, TARGET_FILE))
        if saved != self.target:
            raise ValueError(f"{ckpt}: the run trained towards target {saved.to_dict()}, not {self.target.to_dict()}; "
                             "resuming towards another target would mix two objectives")
        state = self.checkpointer.load(ckpt, self.learner)
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
