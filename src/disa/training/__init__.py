"""Stage 3 training: the RL loop (``RLTrainer``) and the SFT baseline (``train_sft``), built from small parts:

    models        device, LoRA, dropout, precision, the response log-prob forward
    step          optimiser, warm-up schedule, micro-batch weights, the one optimiser step (clip, skip non-finite)
    log_z         where trajectory balance reads log Z: resolve_log_z_kind, the frozen source, FlowRL's head
    rollouts      one rollout batch, rewards, rollout metrics
    update / rl   the RL update and loop
    sft           the SFT loop
    checkpoints   atomic checkpoints and exact resume
    logger        metrics.csv / TensorBoard
"""

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
from disa.training.log_z import LogZHead, resolve_log_z_kind
from disa.training.logger import MetricsLogger
from disa.training.models import apply_lora, is_peft_model, model_device, response_logprobs, zero_dropout
from disa.training.rl import RLTrainer
from disa.training.rollouts import Rollouts, prompt_record
from disa.training.sft import load_sft_config, tokenize_examples, train_sft
from disa.training.step import optimizer_step

__all__ = [
    "CHECKPOINT_PREFIX", "LogZHead", "MetricsLogger", "RLTrainer", "Rollouts", "apply_lora", "checkpoint_step",
    "find_checkpoint", "is_peft_model", "load_policy_weights", "load_sft_config", "load_training_checkpoint",
    "model_device", "optimizer_step", "prompt_record", "read_checkpoint_json", "resolve_log_z_kind",
    "response_logprobs", "rng_state", "save_policy", "save_training_checkpoint", "set_rng_state",
    "tokenize_examples", "train_sft", "zero_dropout",
]
