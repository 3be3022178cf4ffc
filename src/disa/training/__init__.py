"""Stage 3 training: the RL loop (``RLTrainer``) and the SFT baseline (``train_sft``), built from parts:

    collector     RolloutCollector: engine -> verifier -> r~ -> pi_old / pi_ref log-probs -> log Z; RewardTransform
    learner       Learner: policy + optimiser + objective, micro-batched optimiser steps (RL and SFT)
    checkpointer  Checkpointer: a learner's state through checkpoints (atomic checkpoints, exact resume)
    logger        MetricsLogger: metrics.csv / TensorBoard
    rl / sft      the two loops
    models        device, LoRA, dropout, precision, the response log-prob forward
    step          optimiser, warm-up schedule, micro-batch weights, the one optimiser step (clip, skip non-finite)
    rollouts      the Rollouts batch, rewards, rollout metrics

Where log Z comes from is ``disa.log_z``; what an objective reads is its declaration in ``disa.objectives``.
"""

from disa.training.checkpointer import Checkpointer
from disa.training.checkpoints import (
    CHECKPOINT_PREFIX,
    checkpoint_step,
    find_checkpoint,
    load_policy_weights,
    load_training_checkpoint,
    read_checkpoint_json,
    rng_state,
    save_policy,
    save_training_checkpoint,
    set_rng_state,
)
from disa.training.collector import ReferenceScorer, RewardTransform, RolloutCollector
from disa.training.learner import Learner, TokenBatch
from disa.training.logger import MetricsLogger
from disa.training.models import apply_lora, is_peft_model, model_device, response_logprobs, zero_dropout
from disa.training.rl import RLTrainer
from disa.training.rollouts import Rollouts, prompt_record
from disa.training.sft import load_sft_config, tokenize_examples, train_sft
from disa.training.step import optimizer_step

__all__ = [
    "CHECKPOINT_PREFIX", "Checkpointer", "Learner", "MetricsLogger", "RLTrainer", "ReferenceScorer",
    "RewardTransform", "RolloutCollector", "Rollouts", "TokenBatch", "apply_lora", "checkpoint_step",
    "find_checkpoint", "is_peft_model", "load_policy_weights", "load_sft_config", "load_training_checkpoint",
    "model_device", "optimizer_step", "prompt_record", "read_checkpoint_json", "response_logprobs", "rng_state",
    "save_policy", "save_training_checkpoint", "set_rng_state", "tokenize_examples", "train_sft", "zero_dropout",
]
