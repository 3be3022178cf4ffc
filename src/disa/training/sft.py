"""The SFT baseline: supervised fine-tuning (LoRA by default) on the proposal's reward-1 samples.

The paper's ablation asks whether DISA's gain is just distillation of the proposal: train the same policy by
plain maximum likelihood on the proposal trajectories the verifier accepted, with the ``sft`` objective of
``disa.objectives``. The RL loop's learner and checkpointer, so the same optimiser step, logging and checkpoint layout.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from disa.config import SFTConfig
from disa.generation import encode_prompt, pad_token_id
from disa.objectives import bind_objective
from disa.training.checkpointer import Checkpointer
from disa.training.checkpoints import find_checkpoint, read_checkpoint_json
from disa.training.learner import Learner, TokenBatch, read_back
from disa.training.logger import MetricsLogger
from disa.training.models import apply_lora, check_mixed_precision, enable_gradient_checkpointing, model_device

TRAIN_CONFIG_FILE = "train_config.json"


def tokenize_examples(
    tokenizer, examples: Sequence[tuple[str, str]], config: SFTConfig
) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompt_ids, response_ids)`` lists. Prompt and response are tokenized separately, so the response tokens
    are exactly what the policy would have to generate after the prompt (no merge across the boundary)."""
    eos = tokenizer.eos_token_id
    if config.append_eos and eos is None:
        raise ValueError("SFTConfig.append_eos needs a tokenizer with an EOS token")
    prompt_ids, response_ids = [], []
    for i, example in enumerate(examples):
        if not (isinstance(example, (tuple, list)) and len(example) == 2):
            raise ValueError(f"examples[{i}]: expected a (prompt_text, response_text) pair, got {example!r}")
        prompt, response = example
        for name, text in (("prompt_text", prompt), ("response_text", response)):
            if not isinstance(text, str) or not text:
                raise ValueError(f"examples[{i}].{name}: must be a non-empty string, got {text!r}")
        p = encode_prompt(tokenizer, prompt)  # the prompt encoding of sampling and RL (no double BOS)
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if config.max_response_tokens is not None:
            r = r[: config.max_response_tokens]
        if config.append_eos and (not r or r[-1] != eos):
            r.append(eos)
        prompt_ids.append(p)
        response_ids.append(r)
    return prompt_ids, response_ids


def _step_rows(num_examples: int, step: int, steps_per_epoch: int, mini: int, seed: int) -> tuple[int, int, list[int]]:
    """(epoch, position in the epoch, example rows) of optimiser step ``step``: epoch ``e``'s order is a
    shuffle seeded from ``(seed, e)``, so a resume at any step sees the same rows."""
    epoch, k = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=g).tolist()
    return epoch, k, order[k * mini : (k + 1) * mini]


def train_sft(
    policy: nn.Module,
    tokenizer,
    examples: Sequence[tuple[str, str]],
    config: SFTConfig,
    *,
    output_dir: str | Path,
    resume_from: Optional[str | Path] = None,
) -> tuple[nn.Module, list[dict]]:
    """Fine-tune ``policy`` on ``(prompt_text, response_text)`` pairs with the ``sft`` objective: the RL
    loop's ``Learner`` (one optimiser step per mini-batch) and ``Checkpointer`` on fixed examples.

    Returns the trained policy (a PEFT model under ``config.lora``) and the per-optimiser-step metrics
    (also in ``output_dir/metrics.csv``). ``resume_from`` (a checkpoint or an output_dir) continues exactly:
    the order of epoch ``e`` and the randomness of step ``s`` are seeded from ``(seed, e)`` and ``(seed, s)``.
    A step whose gradient is not finite is skipped (``skipped_steps`` 1 in its row), as in RL.
    """
    if not isinstance(config, SFTConfig):
        raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
    if len(examples) == 0:
        raise ValueError("examples is empty: no reward-1 proposal samples to fine-tune on")
    check_mixed_precision(config.mixed_precision, model_device(policy))
    pad_id = pad_token_id(tokenizer)
    prompt_ids, response_ids = tokenize_examples(tokenizer, examples, config)
    batch = TokenBatch(prompt_ids=prompt_ids, response_ids=response_ids)
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn from the global RNG: same config, same start
    if config.lora is not None:
        policy = apply_lora(policy, config.lora)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(policy)

    learner = Learner(policy, bind_objective("sft", {"aggregation": config.aggregation}), config, pad_id=pad_id)
    checkpointer = Checkpointer(output_dir, tokenizer, keep=config.keep_checkpoints,
                                config_files={TRAIN_CONFIG_FILE: {"sft": config.to_dict()}})
    step, history = 0, []
    if resume_from is not None:
        state = checkpointer.load(find_checkpoint(resume_from), learner)
        step, history = int(state["step"]), list(state["history"])
    logger = MetricsLogger(output_dir, config.report_to, resume_step=step if resume_from is not None else None,
                           history=history if resume_from is not None else None,
                           hparams={"sft": config.to_dict()})

    mini = config.micro_batch_size * config.gradient_accumulation
    steps_per_epoch = math.ceil(len(examples) / mini)
    total_steps = config.num_epochs * steps_per_epoch
    save = lambda: checkpointer.save(step, learner, {"step": step, "history": history})  # noqa: E731

    bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step", disable=None, dynamic_ncols=True)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            epoch, k, rows = _step_rows(len(examples), step, steps_per_epoch, mini, config.seed)
            torch.manual_seed(config.seed * 1_000_003 + 7919 * step + 2)  # dropout of this step
            policy.train()
            result = learner.optimizer_step(batch, rows)
            loss_value = read_back(result.values)["loss"]
            lr = learner.learning_rates()["policy"]
            learner.scheduler.step()
            step += 1
            row = {"step": step, "epoch": epoch + (k + 1) / steps_per_epoch, "loss": loss_value,
                   "grad_norm": result.grad_norm, "skipped_steps": int(result.skipped), "lr": lr,
                   "tokens": sum(len(response_ids[i]) for i in rows), "time_step_s": time.perf_counter() - t0}
            history.append(row)
            logger.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}")
            if config.save_every and step % config.save_every == 0:
                save()
        if not checkpointer.exists(step):
            save()
    finally:
        bar.close()
        logger.close()  # also on a crash: TensorBoard's event file is complete
    policy.eval()
    return policy, history


def load_sft_config(checkpoint: str | Path) -> SFTConfig:
    """The SFTConfig a checkpoint was written with (for resuming with the same settings)."""
    return SFTConfig.from_dict(read_checkpoint_json(checkpoint, TRAIN_CONFIG_FILE)["sft"])
