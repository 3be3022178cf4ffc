"""The SFT baseline: supervised fine-tuning (LoRA by default) on the proposal's reward-1 samples.

The paper's ablation asks whether DISA's gain is just distillation of the proposal: train the same policy by
plain maximum likelihood on the proposal trajectories the verifier accepted, with the ``sft`` objective of
``disa.objectives``. Same building blocks, logging and checkpoint layout as ``disa.trainer.RLTrainer``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from disa.generation import encode_prompt
from disa.objectives import AGGREGATIONS, compute_objective
from disa.trainer import (
    DictConfig,
    MetricsLogger,
    _f,
    apply_lora,
    autocast,
    check_mixed_precision,
    check_shared_run_fields,
    enable_gradient_checkpointing,
    find_checkpoint,
    load_training_checkpoint,
    model_device,
    response_logprobs,
    save_training_checkpoint,
)

DEFAULT_LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


@dataclass
class SFTConfig(DictConfig):
    """Hyperparameters of the SFT baseline; each field says why it exists."""

    num_epochs: int = _f(3, "Passes over the examples.")
    micro_batch_size: int = _f(8, "Examples per forward/backward: bounds activation memory.")
    gradient_accumulation: int = _f(1, "Micro-batches per optimiser step (effective batch = the product).")
    lr: float = _f(1e-4, "AdamW learning rate (LoRA adapters take much larger rates than full fine-tuning).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(0, "Linear warm-up over this many optimiser steps, then constant.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this; <= 0 turns clipping off.")
    lora: Optional[dict] = _f(dict(DEFAULT_LORA), "LoRA via PEFT (the paper's baseline is LoRA-SFT); None trains every weight.")
    aggregation: str = _f("token_mean", "How token NLLs are averaged (see disa.objectives.AGGREGATIONS): token_mean "
                          "weighs every response token equally, as causal-LM fine-tuning usually does.")
    max_response_tokens: Optional[int] = _f(None, "Truncate longer responses to this many tokens (None = keep all).")
    append_eos: bool = _f(True, "End every response with EOS, so the model learns where to stop.")
    mixed_precision: str = _f("no", "no, bf16 or fp16 autocast (fp16 only on CUDA).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: trades compute for memory.")
    seed: int = _f(0, "Seeds the example order of every epoch and the dropout of every step.")
    output_dir: str = _f("runs/sft", "Checkpoints (checkpoint-<step>/) and metrics.csv / tensorboard/ go here.")
    save_every: int = _f(0, "Checkpoint every this many optimiser steps (0 = only at the end).")
    keep_checkpoints: int = _f(0, "Keep only the newest k checkpoints (0 = keep all).")
    log_with: str = _f("csv", "csv (output_dir/metrics.csv) or tensorboard.")

    def __post_init__(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"SFTConfig.{name}: {why}, got {getattr(self, name)!r}")

        for name in ("num_epochs", "micro_batch_size", "gradient_accumulation"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, "must be an int > 0")
        for name in ("warmup_steps", "save_every", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be an int >= 0")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.max_response_tokens is not None and self.max_response_tokens <= 0:
            bad("max_response_tokens", "must be None or > 0")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"must be one of {list(AGGREGATIONS)}")
        check_shared_run_fields(self, bad)


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


def _micro_weights(response_ids: list[list[int]], micro_batches: list[list[int]], aggregation: str) -> list[float]:
    """Each micro-batch's share of the mini-batch loss (token share under token_mean, example share otherwise)."""
    if aggregation == "token_mean":
        sizes = [float(sum(len(response_ids[i]) for i in rows)) for rows in micro_batches]
    else:
        sizes = [float(len(rows)) for rows in micro_batches]
    return [s / sum(sizes) for s in sizes]


def train_sft(
    policy: nn.Module,
    tokenizer,
    examples: Sequence[tuple[str, str]],
    config: SFTConfig,
    resume_from: Optional[str | Path] = None,
) -> tuple[nn.Module, list[dict]]:
    """Fine-tune ``policy`` on ``(prompt_text, response_text)`` pairs with the ``sft`` objective.

    Returns the trained policy (a PEFT model under ``config.lora``) and the per-optimiser-step metrics
    (also in ``output_dir/metrics.csv``). ``resume_from`` (a checkpoint or an output_dir) continues exactly:
    the order of epoch ``e`` and the randomness of step ``s`` are seeded from ``(seed, e)`` and ``(seed, s)``.
    """
    if not isinstance(config, SFTConfig):
        raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
    if len(examples) == 0:
        raise ValueError("examples is empty: no reward-1 proposal samples to fine-tune on")
    device = model_device(policy)
    check_mixed_precision(config.mixed_precision, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    prompt_ids, response_ids = tokenize_examples(tokenizer, examples, config)
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn from the global RNG: same config, same start
    if config.lora is not None:
        policy = apply_lora(policy, config.lora)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(policy)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if warmup == 0 else min(1.0, (s + 1) / warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    output_dir = Path(config.output_dir)

    step, history = 0, []
    if resume_from is not None:
        state = load_training_checkpoint(find_checkpoint(resume_from), policy=policy, optimizer=optimizer,
                                         scheduler=scheduler, scaler=scaler)
        step, history = int(state["step"]), list(state["history"])
    logger = MetricsLogger(output_dir, config.log_with, resume_step=step if resume_from is not None else None)

    mini = config.micro_batch_size * config.gradient_accumulation
    steps_per_epoch = math.ceil(len(examples) / mini)
    total_steps = config.num_epochs * steps_per_epoch
    clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")

    def save() -> None:
        save_training_checkpoint(output_dir, step, policy=policy, tokenizer=tokenizer, optimizer=optimizer,
                                 scheduler=scheduler, scaler=scaler, trainer_state={"step": step, "history": history},
                                 config={"sft": config.to_dict()}, keep=config.keep_checkpoints)

    bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step", disable=None, dynamic_ncols=True)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            epoch, k = divmod(step, steps_per_epoch)
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = torch.randperm(len(examples), generator=g).tolist()
            rows = order[k * mini : (k + 1) * mini]
            torch.manual_seed(config.seed * 1_000_003 + 7919 * step + 2)  # dropout of this step
            micro_batches = [rows[i : i + config.micro_batch_size] for i in range(0, len(rows), config.micro_batch_size)]
            policy.train()
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for rows_m, weight in zip(micro_batches, _micro_weights(response_ids, micro_batches, config.aggregation)):
                with autocast(config.mixed_precision, device):
                    out = response_logprobs(policy, [prompt_ids[i] for i in rows_m], [response_ids[i] for i in rows_m], pad_id)
                loss, _ = compute_objective("sft", inputs={"logp": out["logp"].float(), "mask": out["mask"]},
                                            aggregation=config.aggregation)
                scaler.scale(loss * weight).backward()
                loss_value += weight * float(loss.detach())
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            row = {"step": step, "epoch": epoch + (k + 1) / steps_per_epoch, "loss": loss_value, "grad_norm": grad_norm,
                   "lr": lr, "tokens": sum(len(response_ids[i]) for i in rows), "time_step_s": time.perf_counter() - t0}
            history.append(row)
            logger.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}")
            if config.save_every and step % config.save_every == 0:
                save()
    finally:
        bar.close()
    if not (output_dir / f"checkpoint-{step}" / "trainer_state.json").exists():
        save()
    logger.close()
    policy.eval()
    return policy, history


def load_sft_config(checkpoint: str | Path) -> SFTConfig:
    """The SFTConfig a checkpoint was written with (for resuming with the same settings)."""
    data = json.loads((find_checkpoint(checkpoint) / "train_config.json").read_text())
    return SFTConfig.from_dict(data["sft"])
