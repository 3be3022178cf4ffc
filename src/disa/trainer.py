"""Stage 3: the small RL loop. Rollouts -> rewards -> log-probs -> objective -> optimiser step.

One step, top to bottom (``RLTrainer.step``):

1. pick ``prompts_per_step`` prompts (a seeded shuffle, epoch after epoch);
2. sample ``group_size`` rollouts for each from the current policy (``pi_old``) with ``disa.generation``;
3. score them with the verifier (TRL signature ``reward_fn(prompts, completions, **columns)``), transform the
   reward (``raw`` / ``affine`` / ``group``, shared with Stage 1) and form GRPO advantages from the raw reward;
4. compute, without gradient, ``old_logp`` under the policy that made the rollouts, ``ref_logp`` under
   ``pi_ref`` and, for DISA, the frozen ``log Z`` from the Stage 2 regressor;
5. ``updates_per_batch`` passes over the rollouts: mini-batches of ``micro_batch_size * gradient_accumulation``
   rollouts, one optimiser step each, with gradient clipping;
6. log one row of metrics, checkpoint every ``save_every`` steps.

The losses live in ``disa.objectives`` (looked up by name); this file only feeds them. Everything random in a
step is seeded from ``(seed, step)``, which is what makes ``train 2 + resume 2 == train 4`` exact.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from disa.estimators import REWARD_TRANSFORMS, group_normalize, transform_rewards
from disa.generation import encode_prompt
from disa.generation.hf import HFGenerator
from disa.logz_head import LogZHead
from disa.objectives import (
    DISTRIBUTION_MATCHING,
    NEEDS_LOG_Z,
    OBJECTIVES,
    compute_objective,
    get_objective,
)
from disa.scoring import pad_batch, score_token_logprobs, token_logprobs

Tensor = torch.Tensor

CHECKPOINT_PREFIX = "checkpoint-"
MIXED_PRECISION = ("no", "bf16", "fp16")
LOG_BACKENDS = ("csv", "tensorboard")
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "bias"}


# ==================================================================================================
# configuration
# ==================================================================================================
def _f(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class DictConfig:
    """``to_dict`` / ``from_dict`` for the config dataclasses (saved beside checkpoints, read on resume);
    ``from_dict`` names an unknown field instead of failing in ``__init__``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
        return cls(**data)


@dataclass
class TrainConfig(DictConfig):
    """Every knob of Stage 3 in one place; each field says why it exists (``dataclasses.fields(...).metadata``)."""

    objective: str = _f("disa", "Loss name in disa.objectives.OBJECTIVES (disa, flowrl, flowrl_no_logz, tb, grpo, gspo, aspo); "
                        "SFT has its own loop, disa.sft.train_sft.")
    objective_kwargs: dict = _f({}, "Hyperparameters passed to the objective as keywords: beta (required by the trajectory-"
                                "balance losses), clip_eps, length_normalize, aggregation, kl_coef... Unknown names are an error.")
    group_size: int = _f(8, "Rollouts per prompt, G: the group that GRPO's advantage and the 'group' reward transform "
                         "normalise over (paper: 8).")
    prompts_per_step: int = _f(8, "Prompts per rollout batch; a step trains on prompts_per_step * group_size rollouts.")
    num_steps: int = _f(100, "Rollout batches to train for (one progress-bar tick each).")
    updates_per_batch: int = _f(1, "Passes over each rollout batch. Each pass is several optimiser steps; every pass "
                                "uses the log-probs of the policy that MADE the rollouts as old_logp, so passes after "
                                "the first are off-policy and the ratios/IS weights do their job.")
    micro_batch_size: int = _f(8, "Rollouts per forward/backward: bounds activation memory.")
    gradient_accumulation: int = _f(1, "Micro-batches per optimiser step: one step sees micro_batch_size * "
                                    "gradient_accumulation rollouts without holding them in memory at once.")
    lr: float = _f(1e-6, "Policy learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay on the policy (not on the log Z head): RL fine-tuning usually uses none.")
    warmup_steps: int = _f(0, "Linear learning-rate warm-up over this many rollout steps, then constant.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm (policy + head) to this; <= 0 turns clipping off "
                              "(the norm is still logged).")
    max_new_tokens: int = _f(512, "Longest rollout; a rollout cut here has no EOS (logged as truncated_frac).")
    temperature: float = _f(1.0, "Rollout temperature. The losses score rollouts at temperature 1, so anything else "
                            "makes the data slightly off-policy.")
    top_p: float = _f(1.0, "Rollout nucleus sampling (1.0 = the full distribution, as distribution matching assumes).")
    generation_batch_size: int = _f(8, "Prompts per model.generate call (each expands to group_size sequences).")
    stop: list = _f([], "Stop strings: a rollout is cut right after the first one (kept in the text).")
    seed: int = _f(0, "Seeds the prompt order, sampling and mini-batch order of every step (step s uses (seed, s)).")
    reward_transform: str = _f("group", "r~ fed to the trajectory-balance losses: raw, affine (the frozen per-prompt "
                               "(scale, shift) of Stage 1, passed as RLTrainer(affine=...)) or group (recomputed on "
                               "each rollout group, as FlowRL). DISA should use what Stage 1 used. GRPO/GSPO/ASPO "
                               "advantages are always the group-normalised RAW reward.")
    lora: Optional[dict] = _f(None, "LoRA through PEFT, e.g. {r: 16, alpha: 32, dropout: 0.05, target_modules: "
                              "all-linear}; None trains every weight. Under LoRA only the adapter is saved, and "
                              "pi_ref can be the policy with the adapter switched off (ref_model=None).")
    mixed_precision: str = _f("no", "no, bf16 or fp16 autocast for the policy forward (fp16 only on CUDA, with a grad "
                              "scaler; bf16 where the device supports it). Losses and the log Z head stay float32.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: trades compute for memory on real models.")
    disable_dropout: bool = _f(True, "Set every dropout probability to 0, so old_logp (no grad) and logp (training "
                               "forward) are the same function and the first ratio is exactly 1.")
    logz_lr: float = _f(1e-3, "Learning rate of FlowRL's log Z head (much larger than the policy's, as in FlowRL).")
    logz_head_layers: int = _f(2, "FlowRL head depth: 1 = Linear(hidden, 1); 2+ adds Linear-GELU-LayerNorm blocks.")
    output_dir: str = _f("runs/train", "Checkpoints (checkpoint-<step>/) and metrics.csv / tensorboard/ go here.")
    save_every: int = _f(50, "Checkpoint every this many steps (0 = only at the end). The last step is always saved.")
    keep_checkpoints: int = _f(0, "Keep only the newest k checkpoints (0 = keep all).")
    log_with: str = _f("csv", "csv (output_dir/metrics.csv) or tensorboard (needs the tensorboard package).")
    eval_every: int = _f(0, "Call eval_fn every this many steps and log its metrics with an eval_ prefix (0 = never).")

    def __post_init__(self) -> None:
        _validate_train_config(self)


def _validate_train_config(cfg: TrainConfig) -> None:
    def bad(name: str, why: str):
        raise ValueError(f"TrainConfig.{name}: {why}, got {getattr(cfg, name)!r}")

    if cfg.objective not in OBJECTIVES:
        bad("objective", f"must be one of {sorted(OBJECTIVES)}")
    for name in ("group_size", "prompts_per_step", "num_steps", "updates_per_batch", "micro_batch_size",
                 "gradient_accumulation", "max_new_tokens", "generation_batch_size", "logz_head_layers"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            bad(name, "must be an int > 0")
    for name in ("warmup_steps", "save_every", "eval_every", "keep_checkpoints"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            bad(name, "must be an int >= 0")
    for name in ("lr", "logz_lr", "temperature"):
        if not (isinstance(getattr(cfg, name), (int, float)) and getattr(cfg, name) > 0):
            bad(name, "must be > 0")
    if not 0 < cfg.top_p <= 1:
        bad("top_p", "must be in (0, 1]")
    if cfg.weight_decay < 0:
        bad("weight_decay", "must be >= 0")
    if cfg.reward_transform not in REWARD_TRANSFORMS:
        bad("reward_transform", f"must be one of {list(REWARD_TRANSFORMS)}")
    check_shared_run_fields(cfg, bad)
    if not isinstance(cfg.objective_kwargs, dict):
        bad("objective_kwargs", "must be a dict")
    accepted = objective_hyperparameters(cfg.objective)
    unknown = sorted(set(cfg.objective_kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"TrainConfig.objective_kwargs: {unknown[0]!r} is not a hyperparameter of objective {cfg.objective!r} "
            f"(it accepts {sorted(accepted)})"
        )
    if cfg.objective in DISTRIBUTION_MATCHING and "beta" not in cfg.objective_kwargs:
        raise ValueError(f"TrainConfig.objective_kwargs: objective {cfg.objective!r} needs beta (FlowRL and the paper use 15)")


def check_shared_run_fields(cfg, bad: Callable[[str, str], None]) -> None:
    """The fields ``TrainConfig`` and ``SFTConfig`` share: mixed precision, logger, LoRA."""
    if cfg.mixed_precision not in MIXED_PRECISION:
        bad("mixed_precision", f"must be one of {list(MIXED_PRECISION)}")
    if cfg.log_with not in LOG_BACKENDS:
        bad("log_with", f"must be one of {list(LOG_BACKENDS)}")
    check_lora_config(cfg.lora, f"{type(cfg).__name__}.lora")


# Inputs the trainer supplies itself: never hyperparameters.
_TRAINER_INPUTS = {"logp", "old_logp", "ref_logp", "mask", "rewards", "advantages", "log_z", "max_len"}


def objective_hyperparameters(name: str) -> set[str]:
    """Keyword hyperparameters objective ``name`` accepts (its tensor inputs excluded)."""
    fn = get_objective(name)
    names: set[str] = set()
    stack = [fn]
    while stack:  # follow ``**kw`` pass-throughs into trajectory_balance_loss, as compute_objective does
        params = inspect.signature(stack.pop()).parameters
        names |= {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            stack.append(OBJECTIVES["tb"])
    return names - _TRAINER_INPUTS


def objective_aggregation(name: str, objective_kwargs: Mapping[str, Any]) -> Optional[str]:
    """The aggregation mode the objective will use (its default unless overridden), None for per-rollout means."""
    if "aggregation" in objective_kwargs:
        return objective_kwargs["aggregation"]
    param = inspect.signature(get_objective(name)).parameters.get("aggregation")
    return None if param is None else param.default


def check_lora_config(lora: Optional[dict], where: str) -> None:
    if lora is None:
        return
    if not isinstance(lora, dict):
        raise ValueError(f"{where}: must be None or a dict, got {lora!r}")
    unknown = sorted(set(lora) - LORA_KEYS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown LoRA field (known: {sorted(LORA_KEYS)})")
    r = lora.get("r", 16)
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}.r: must be an int > 0, got {r!r}")
    if not 0 <= lora.get("dropout", 0.0) < 1:
        raise ValueError(f"{where}.dropout: must be in [0, 1), got {lora.get('dropout')!r}")


# ==================================================================================================
# model helpers shared with disa.sft
# ==================================================================================================
def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def apply_lora(model: nn.Module, lora: dict) -> nn.Module:
    """Wrap ``model`` with a PEFT LoRA adapter (in place on the base weights, which PEFT freezes)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("the policy is already a PeftModel: pass the base model and set the lora config")
    r = lora.get("r", 16)
    config = LoraConfig(
        r=r,
        lora_alpha=lora.get("alpha", 2 * r),
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora.get("target_modules", "all-linear"),
        bias=lora.get("bias", "none"),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a declared extra
        return False
    return isinstance(model, PeftModel)


def zero_dropout(model: nn.Module) -> None:
    """Set every ``nn.Dropout`` probability to 0 (the module stays trainable; only the noise goes)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def enable_gradient_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_peft_model(model):
        # the frozen embeddings would otherwise cut the graph before the first checkpointed block
        model.enable_input_require_grads()


def check_mixed_precision(mixed_precision: str, device: torch.device) -> None:
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(f"mixed_precision='fp16' needs a CUDA device (the policy is on {device}); use 'bf16' or 'no'")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("mixed_precision='bf16': this GPU does not support bfloat16; use 'fp16' or 'no'")


def autocast(mixed_precision: str, device: torch.device):
    """Autocast context for the policy forward (a no-op for 'no')."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def pad_rows(rows: Sequence[Tensor], width: int) -> Tensor:
    """Stack 1-D float tensors into ``(B, width)``, zero-padded on the right."""
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row.float()
    return out


class _KeepLastHidden:
    """Calls a causal LM with ``output_hidden_states=True`` and keeps the last layer's states.

    Lets ``disa.scoring.token_logprobs`` (the one log-prob primitive) serve FlowRL too: the head needs the same
    forward pass's hidden states, with their graph, so that its gradient reaches the trunk.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.last_hidden: Optional[Tensor] = None

    def __call__(self, **inputs):
        out = self.model(**inputs, output_hidden_states=True)
        self.last_hidden = out.hidden_states[-1]
        return out

    def get_output_embeddings(self):
        """The wrapped model's LM head, so that ``token_logprobs`` can restrict it to response positions."""
        get_head = getattr(self.model, "get_output_embeddings", None)
        return get_head() if callable(get_head) else None


def response_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    keep_hidden: bool = False,
) -> dict[str, Tensor]:
    """One forward pass (gradient kept) over ``prompt + response`` rows.

    Returns ``logp (B, T)`` response-token log-probs and ``mask (B, T)`` (``T`` = longest response), and with
    ``keep_hidden`` also ``hidden (B, L, H)`` (last layer) and ``prompt_mask (B, L)`` for the log Z head.
    """
    device = model_device(model)
    batch = pad_batch(prompt_ids, response_ids, pad_id)
    caller = _KeepLastHidden(model) if keep_hidden else model
    # (B, L-1), computed (LM head included) at response positions only, 0 elsewhere
    full = token_logprobs(
        caller, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["response_mask"].to(device)
    )
    prompt_len = torch.tensor([len(p) for p in prompt_ids], device=device)
    resp_len = torch.tensor([len(r) for r in response_ids], device=device)
    width = int(resp_len.max())
    offsets = torch.arange(width, device=device)
    # response token j of row i is predicted at shifted position prompt_len_i - 1 + j (see disa.scoring)
    index = (prompt_len[:, None] - 1 + offsets[None, :]).clamp(max=full.shape[1] - 1)
    mask = offsets[None, :] < resp_len[:, None]
    logp = torch.gather(full, 1, index) * mask
    out = {"logp": logp, "mask": mask}
    if keep_hidden:
        positions = torch.arange(batch["input_ids"].shape[1], device=device)
        out["hidden"] = caller.last_hidden
        out["prompt_mask"] = positions[None, :] < prompt_len[:, None]
    return out


# ==================================================================================================
# rollouts
# ==================================================================================================
@dataclass
class Rollouts:
    """One rollout batch, ``B = prompts_per_step * group_size`` rows grouped by prompt (rows ``i*G .. i*G+G-1``).

    Token tensors are ``(B, T)`` response-only, right-padded (``T`` = longest response); per-rollout ones ``(B,)``.
    Kept on CPU; micro-batches are moved to the policy's device.
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    completions: list[str]
    finish_reasons: list[str]
    raw_rewards: Tensor
    rewards: Tensor
    advantages: Tensor
    old_logp: Tensor
    mask: Tensor
    ref_logp: Optional[Tensor] = None
    log_z: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.response_ids)


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


# ==================================================================================================
# logging and checkpoints (shared with disa.sft)
# ==================================================================================================
class MetricsLogger:
    """One row per step to ``output_dir/metrics.csv`` (header grows when a new metric appears) or TensorBoard.

    ``resume_step``: rows after it are dropped (they belong to a run that crashed before its next checkpoint).
    """

    def __init__(self, output_dir: str | Path, log_with: str = "csv", resume_step: Optional[int] = None):
        if log_with not in LOG_BACKENDS:
            raise ValueError(f"log_with must be one of {list(LOG_BACKENDS)}, got {log_with!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_with = log_with
        self.writer = None
        self.path = self.output_dir / "metrics.csv"
        self.rows: list[dict] = []
        self.columns: list[str] = []
        if log_with == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log_with='tensorboard' needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=resume_step)
            return
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
        self._rewrite()

    def log(self, metrics: Mapping[str, Any]) -> None:
        step = int(metrics["step"])
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
            return
        row = {k: v for k, v in metrics.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the newest ``checkpoint-<step>`` inside it."""
    path = Path(path)
    if (path / "trainer_state.json").exists():
        return path
    candidates = [p for p in path.glob(f"{CHECKPOINT_PREFIX}*")
                  if _checkpoint_step(p) is not None and (p / "trainer_state.json").exists()]
    if not candidates:
        raise FileNotFoundError(f"{path}: no checkpoint found (expected {CHECKPOINT_PREFIX}<step>/trainer_state.json)")
    return max(candidates, key=_checkpoint_step)


def save_policy(model: nn.Module, tokenizer, directory: Path) -> None:
    """``save_pretrained`` (PEFT saves only the adapter) plus the tokenizer, so the folder loads on its own."""
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def load_policy_weights(model: nn.Module, directory: Path) -> None:
    """Load what ``save_policy`` wrote back into ``model`` in place (adapter under PEFT, else every weight)."""
    from safetensors.torch import load_file

    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        adapter = directory / "adapter_model.safetensors"
        if not adapter.exists():
            raise FileNotFoundError(f"{adapter}: the checkpoint has no LoRA adapter, but the policy is a LoRA model")
        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights (was this a LoRA run? set lora in the config)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{directory}: weights {unexpected[:5]} do not belong to this policy")
    # keys save_pretrained leaves out are tied weights (e.g. lm_head = wte): they share storage with a loaded one
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{directory}: weights missing for {untied[:5]}")


def _checkpoint_step(path: Path) -> Optional[int]:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def save_training_checkpoint(
    output_dir: Path,
    step: int,
    *,
    policy: nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    trainer_state: dict,
    config: dict,
    keep: int = 0,
    logz_head: Optional[LogZHead] = None,
) -> Path:
    """``output_dir/checkpoint-<step>/``: ``policy/`` (save_pretrained: the adapter only under LoRA, plus the
    tokenizer), the log Z head, ``optimizer.pt`` (optimiser, scheduler, grad scaler), ``rng.pt``,
    ``trainer_state.json`` and ``train_config.json``. Written to a temporary folder and renamed, so a crash
    never leaves a half checkpoint that a resume would pick; ``keep > 0`` deletes all but the newest ``keep``."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_policy(policy, tokenizer, tmp / "policy")
    if logz_head is not None:
        logz_head.save(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
               tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    (tmp / "train_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        ckpts = sorted((p for p in output_dir.iterdir() if _checkpoint_step(p) is not None), key=_checkpoint_step)
        for old in ckpts[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(
    ckpt: Path,
    *,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    logz_head: Optional[LogZHead] = None,
) -> dict:
    """Restore everything ``save_training_checkpoint`` wrote, in place; returns the trainer state dict."""
    ckpt = Path(ckpt)
    load_policy_weights(policy, ckpt / "policy")
    if logz_head is not None:
        from safetensors.torch import load_file

        head_file = ckpt / "logz_head.safetensors"
        if not head_file.exists():
            raise FileNotFoundError(f"{head_file}: the checkpoint has no log Z head (was it a FlowRL run?)")
        logz_head.load_state_dict(load_file(str(head_file)))
    states = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    scaler.load_state_dict(states["scaler"])
    set_rng_state(torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


# ==================================================================================================
# the trainer
# ==================================================================================================
class RLTrainer:
    """Stage 3 RL for one policy. See the module docstring for one step, top to bottom.

    Args:
        policy: a Hugging Face causal LM (trained in place; wrapped by PEFT under ``config.lora``: use
            ``trainer.policy`` afterwards).
        ref_model: frozen ``pi_ref``; ``None`` under LoRA means "the policy with its adapter off", and for
            objectives that never read ``ref_logp`` (GRPO-like without ``kl_coef``).
        tokenizer: the policy's tokenizer (its EOS ends rollouts; prompts are encoded with
            ``disa.generation.encode_prompt``, as in Stage 1).
        prompts: dicts/objects with ``id``, ``text`` (the rendered prompt) and verifier columns.
        reward_fn: ``reward_fn(prompts, completions, **columns) -> list[float]`` (TRL signature).
        config: ``TrainConfig``.
        log_z_fn: DISA's frozen Stage 2 regressor ``log_z_fn(texts, ids) -> Tensor (P,)``; called under no_grad,
            and none of its parameters may be in the optimiser.
        affine: ``{prompt id: (scale, shift)}`` for ``reward_transform='affine'``.
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
        log_z_fn: Optional[Callable[[list[str], list[Any]], Tensor]] = None,
        affine: Optional[Mapping[Any, tuple[float, float]]] = None,
        eval_fn: Optional[Callable[..., Mapping[str, float]]] = None,
        resume_from: Optional[str | Path] = None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.objective == "sft":
            raise ValueError("objective 'sft' trains on fixed examples: use disa.sft.train_sft")
        self.config = config
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.eval_fn = eval_fn
        self.log_z_fn = log_z_fn
        self.prompts = [prompt_record(p, i) for i, p in enumerate(prompts)]
        if not self.prompts:
            raise ValueError("prompts is empty")
        self._check_objective_inputs(ref_model, log_z_fn, affine)
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

        # Rollouts come from disa.generation (the sampler Stage 1 uses): same prompt encoding, same EOS set,
        # and a neutral generation config, so the checkpoint's top_k / repetition_penalty never tilt pi_old.
        self.generator = HFGenerator(policy, tokenizer, batch_size=config.generation_batch_size, device=None,
                                     progress=False)
        self.pad_id, self.eos_ids = self.generator.pad_id, sorted(self.generator.eos_ids)
        self.prompt_ids = []
        for i, p in enumerate(self.prompts):
            try:
                self.prompt_ids.append(encode_prompt(tokenizer, p["text"]))
            except ValueError as e:
                raise ValueError(f"prompts[{i}].text: {e}") from None

        # FlowRL learns log Z with a head on the policy's prompt states; DISA reads a frozen regressor.
        self.logz_head: Optional[LogZHead] = None
        if config.objective == "flowrl":
            hidden = policy.config.hidden_size if hasattr(policy.config, "hidden_size") else policy.config.n_embd
            self.logz_head = LogZHead(hidden, num_layers=config.logz_head_layers).to(self.device)

        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": config.lr,
                   "weight_decay": config.weight_decay, "name": "policy"}]
        if self.logz_head is not None:
            groups.append({"params": list(self.logz_head.parameters()), "lr": config.logz_lr, "weight_decay": 0.0,
                           "name": "logz_head"})
        if not groups[0]["params"]:
            raise ValueError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self._check_frozen_log_z()
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 1.0 if warmup == 0 else min(1.0, (s + 1) / warmup)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.aggregation = objective_aggregation(config.objective, config.objective_kwargs)

        self.global_step = 0
        self.history: list[dict] = []
        self._perm_cache: dict[int, list[int]] = {}
        self.output_dir = Path(config.output_dir)
        resume_step = None
        if resume_from is not None:
            resume_step = self._load_checkpoint(find_checkpoint(resume_from))
        self.logger = MetricsLogger(self.output_dir, config.log_with, resume_step=resume_step)

    # ------------------------------------------------------------------ construction checks
    def _check_objective_inputs(self, ref_model, log_z_fn, affine) -> None:
        cfg = self.config
        needs_ref = cfg.objective in DISTRIBUTION_MATCHING or cfg.objective_kwargs.get("kl_coef", 0) > 0
        if needs_ref and ref_model is None and cfg.lora is None:
            raise ValueError(f"objective {cfg.objective!r} needs ref_model (or config.lora, to use the adapter-off policy)")
        self.needs_ref = needs_ref
        if cfg.objective in NEEDS_LOG_Z and cfg.objective != "flowrl" and log_z_fn is None:
            raise ValueError(f"objective {cfg.objective!r} needs log_z_fn (the frozen Stage 2 regressor)")
        if cfg.objective not in NEEDS_LOG_Z - {"flowrl"} and log_z_fn is not None:
            raise ValueError(f"log_z_fn is only used by {sorted(NEEDS_LOG_Z - {'flowrl'})}, not {cfg.objective!r}")
        if cfg.reward_transform == "affine":
            if affine is None:
                raise ValueError("reward_transform='affine' needs affine={prompt id: (scale, shift)}")
            missing = [p["id"] for p in self.prompts if p["id"] not in affine]
            if missing:
                raise ValueError(f"affine has no (scale, shift) for prompt id(s) {missing[:5]}")

    def _check_frozen_log_z(self) -> None:
        """The Stage 2 regressor is frozen by construction: none of its parameters may be optimised."""
        owner = self.log_z_fn if isinstance(self.log_z_fn, nn.Module) else getattr(self.log_z_fn, "__self__", None)
        if not isinstance(owner, nn.Module):
            return
        optimised = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        shared = [n for n, p in owner.named_parameters() if id(p) in optimised]
        if shared:
            raise ValueError(f"log_z_fn shares parameters with the policy optimiser ({shared[:3]}); DISA's log Z must be frozen")

    # ------------------------------------------------------------------ prompt order
    def _epoch_permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self._perm_cache[epoch]

    def prompt_indices(self, step: int) -> list[int]:
        """Prompts of rollout step ``step``: positions ``step*P .. step*P+P-1`` of a stream of seeded epoch shuffles."""
        n, per_step = len(self.prompts), self.config.prompts_per_step
        out = []
        for pos in range(step * per_step, (step + 1) * per_step):
            out.append(self._epoch_permutation(pos // n)[pos % n])
        return out

    # ------------------------------------------------------------------ rollouts
    def _reference_context(self):
        """The model that plays pi_ref: ``ref_model``, else the LoRA policy with its adapter disabled."""
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        return _adapter_off(self.policy)

    def _score(self, model: nn.Module, prompt_ids, response_ids) -> list[Tensor]:
        with autocast(self.config.mixed_precision, model_device(model)):
            return score_token_logprobs(
                model, prompt_ids, response_ids, pad_id=self.pad_id, batch_size=self.config.micro_batch_size
            )

    def collect_rollouts(self, prompt_indices: Sequence[int], seed: Optional[int] = None) -> Rollouts:
        """Sample, score and label ``group_size`` rollouts per prompt; everything the update needs, no gradient.

        ``seed`` makes the sampling reproducible (``step`` passes one derived from ``(config.seed, step)``)."""
        cfg, G = self.config, self.config.group_size
        self.policy.eval()
        self.generator.model = self.policy  # the policy as it is now (a PEFT wrapper under LoRA)
        with autocast(cfg.mixed_precision, self.device):
            groups = self.generator.generate(
                [self.prompts[i]["text"] for i in prompt_indices], G, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, stop=cfg.stop or None, seed=seed,
            )
        samples = [s for group in groups for s in group]
        flat_prompt_index = [i for i in prompt_indices for _ in range(G)]
        flat_prompt_ids = [s.prompt_ids for s in samples]
        flat_responses = [s.response_ids for s in samples]
        completions = [s.text for s in samples]
        finish = [s.finish_reason for s in samples]

        raw = self._rewards(flat_prompt_index, completions).view(len(prompt_indices), G)
        rewards = self._transform(raw, prompt_indices)
        advantages = group_normalize(raw)

        width = max(len(r) for r in flat_responses)
        old = self._score(self.policy, flat_prompt_ids, flat_responses)
        ref = None
        if self.needs_ref:
            with self._reference_context() as ref_model:
                ref = pad_rows(self._score(ref_model, flat_prompt_ids, flat_responses), width)
        log_z = None
        if self.log_z_fn is not None:
            log_z = self._frozen_log_z(prompt_indices).repeat_interleave(G)
        mask = pad_rows([torch.ones(len(r)) for r in flat_responses], width).bool()
        return Rollouts(
            prompt_index=flat_prompt_index, prompt_ids=flat_prompt_ids, response_ids=flat_responses,
            completions=completions, finish_reasons=finish, raw_rewards=raw.flatten(), rewards=rewards.flatten(),
            advantages=advantages.flatten(), old_logp=pad_rows(old, width), mask=mask, ref_logp=ref, log_z=log_z,
        )

    def _rewards(self, flat_prompt_index: list[int], completions: list[str]) -> Tensor:
        records = [self.prompts[i] for i in flat_prompt_index]
        columns: dict[str, list] = {}
        for key in {k for r in records for k in r} - {"id", "text"}:
            columns[key] = [r.get(key) for r in records]
        values = self.reward_fn(prompts=[r["text"] for r in records], completions=completions, **columns)
        if len(values) != len(completions):
            raise ValueError(f"reward_fn returned {len(values)} rewards for {len(completions)} completions")
        for i, v in enumerate(values):
            if v is None or not math.isfinite(float(v)):
                raise ValueError(f"reward_fn returned {v!r} for completion {i} (prompt id {records[i]['id']!r})")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    def _transform(self, raw: Tensor, prompt_indices: Sequence[int]) -> Tensor:
        """``r~`` for the trajectory-balance losses, ``(P, G)``."""
        if self.config.reward_transform != "affine":
            return transform_rewards(self.config.reward_transform, raw)
        ids = [self.prompts[i]["id"] for i in prompt_indices]
        scale = torch.tensor([float(self.affine[i][0]) for i in ids])
        shift = torch.tensor([float(self.affine[i][1]) for i in ids])
        return transform_rewards("affine", raw, scale=scale, shift=shift)

    def _frozen_log_z(self, prompt_indices: Sequence[int]) -> Tensor:
        texts = [self.prompts[i]["text"] for i in prompt_indices]
        ids = [self.prompts[i]["id"] for i in prompt_indices]
        with torch.no_grad():
            log_z = torch.as_tensor(self.log_z_fn(texts, ids)).detach().float().cpu()
        if log_z.shape != (len(texts),):
            raise ValueError(f"log_z_fn must return shape ({len(texts)},) for {len(texts)} prompts, got {tuple(log_z.shape)}")
        if not bool(torch.isfinite(log_z).all()):
            raise ValueError(f"log_z_fn returned a non-finite log Z for prompt id(s) {[ids[i] for i in torch.nonzero(~torch.isfinite(log_z)).flatten().tolist()]}")
        return log_z

    # ------------------------------------------------------------------ update
    def _micro_loss(
        self, rollouts: Rollouts, rows: list[int], objective: Optional[str] = None, objective_kwargs: Optional[dict] = None
    ) -> tuple[Tensor, dict]:
        """The objective (default: the configured one) on one micro-batch, gradient kept."""
        cfg = self.config
        if objective is None:
            objective, objective_kwargs = cfg.objective, cfg.objective_kwargs
        with autocast(cfg.mixed_precision, self.device):
            out = response_logprobs(
                self.policy, [rollouts.prompt_ids[i] for i in rows], [rollouts.response_ids[i] for i in rows],
                self.pad_id, keep_hidden=self.logz_head is not None,
            )
        logp, mask = out["logp"].float(), out["mask"]
        width, dev = logp.shape[1], self.device
        take = lambda t: None if t is None else t[rows].to(dev)  # noqa: E731
        inputs = {
            "logp": logp, "mask": mask, "old_logp": rollouts.old_logp[rows, :width].to(dev),
            "ref_logp": None if rollouts.ref_logp is None else rollouts.ref_logp[rows, :width].to(dev),
            "rewards": take(rollouts.rewards), "advantages": take(rollouts.advantages),
            "log_z": take(rollouts.log_z), "max_len": cfg.max_new_tokens,
        }
        if self.logz_head is not None:
            with torch.autocast(device_type=dev.type, enabled=False):
                inputs["log_z"] = self.logz_head(out["hidden"], out["prompt_mask"])
        return compute_objective(objective, inputs=inputs, **(objective_kwargs or {}))

    def _micro_weights(
        self, rollouts: Rollouts, micro_batches: list[list[int]], aggregation: Optional[str]
    ) -> list[float]:
        """Each micro-batch's share of the mini-batch loss, so accumulation reproduces one big batch exactly:
        its token share under ``token_mean`` aggregation, its rollout share for per-rollout means."""
        if aggregation == "token_mean":
            sizes = [float(rollouts.mask[rows].sum()) for rows in micro_batches]
        else:
            sizes = [float(len(rows)) for rows in micro_batches]
        total = sum(sizes)
        return [s / total for s in sizes]

    def _trainable(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def update(self, rollouts: Rollouts) -> dict:
        """``updates_per_batch`` passes of optimiser steps over ``rollouts``; returns averaged metrics."""
        cfg = self.config
        self.policy.train()
        mini = cfg.micro_batch_size * cfg.gradient_accumulation
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * self.global_step + 1)
        totals: dict[str, float] = {}
        n_steps = skipped = 0
        for _ in range(cfg.updates_per_batch):
            order = torch.randperm(len(rollouts), generator=g).tolist()
            for start in range(0, len(order), mini):
                rows = order[start : start + mini]
                micro_batches = [rows[i : i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
                self.optimizer.zero_grad(set_to_none=True)
                step_metrics: dict[str, float] = {}
                for rows_m, weight in zip(micro_batches, self._micro_weights(rollouts, micro_batches, self.aggregation)):
                    loss, metrics = self._micro_loss(rollouts, rows_m)
                    self.scaler.scale(loss * weight).backward()
                    for k, v in {"loss": float(loss.detach()), **metrics}.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + weight * float(v)
                self.scaler.unscale_(self.optimizer)
                clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self._trainable(), clip))
                if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                    skipped += 1  # a non-finite gradient would poison Adam's moments: drop this step
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                step_metrics["grad_norm"] = grad_norm
                for k, v in step_metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
                n_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / n_steps for k, v in totals.items()}
        out["optimizer_steps"] = n_steps
        out["skipped_steps"] = skipped
        return out

    @torch.no_grad()
    def evaluate_loss(self, rollouts: Rollouts, objective: Optional[str] = None, **objective_kwargs) -> float:
        """An objective (default: the configured one with its kwargs) over the whole rollout batch under the
        current policy, without updating: a diagnostic, e.g. the GRPO surrogate of an ASPO run."""
        self.policy.eval()
        if objective is None:
            objective, objective_kwargs = self.config.objective, self.config.objective_kwargs
        rows = list(range(len(rollouts)))
        micro = [rows[i : i + self.config.micro_batch_size] for i in range(0, len(rows), self.config.micro_batch_size)]
        weights = self._micro_weights(rollouts, micro, objective_aggregation(objective, objective_kwargs))
        return sum(w * float(self._micro_loss(rollouts, m, objective, objective_kwargs)[0]) for m, w in zip(micro, weights))

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

        lengths = torch.tensor([float(len(r)) for r in rollouts.response_ids])
        raw = rollouts.raw_rewards.view(-1, cfg.group_size)
        row = {
            "step": self.global_step,
            "loss": metrics.pop("loss"),
            "reward_mean": float(rollouts.raw_rewards.mean()),
            "reward_std": float(rollouts.raw_rewards.std()) if len(rollouts) > 1 else 0.0,
            "reward_transformed_mean": float(rollouts.rewards.mean()),
            "zero_variance_groups": float((raw.max(dim=1).values == raw.min(dim=1).values).float().mean()),
            "response_length_mean": float(lengths.mean()),
            "response_length_max": float(lengths.max()),
            "truncated_frac": rollouts.finish_reasons.count("length") / len(rollouts),
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
        finally:
            bar.close()
        last = self.output_dir / f"{CHECKPOINT_PREFIX}{self.global_step}"
        if not (last / "trainer_state.json").exists():
            self.save_checkpoint()
        self.logger.close()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-<step>/`` (see ``save_training_checkpoint``)."""
        return save_training_checkpoint(
            self.output_dir, self.global_step, policy=self.policy, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            trainer_state={"step": self.global_step, "history": self.history}, config=self.config.to_dict(),
            keep=self.config.keep_checkpoints, logz_head=self.logz_head,
        )

    def _load_checkpoint(self, ckpt: Path) -> int:
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
        **kwargs,
    ) -> "RLTrainer":
        """Continue a run from ``output_dir``'s newest checkpoint (or a checkpoint folder), with the config it
        saved unless ``config`` is given (e.g. a larger ``num_steps``). ``policy`` is the same base model the
        run started from; its weights are replaced by the checkpoint's."""
        ckpt = find_checkpoint(output_dir)
        if config is None:
            config = TrainConfig.from_dict(json.loads((ckpt / "train_config.json").read_text()))
        return cls(policy, ref_model, tokenizer, prompts, reward_fn, config, resume_from=ckpt, **kwargs)


@contextlib.contextmanager
def _adapter_off(model: nn.Module):
    """Yield the PEFT policy with its adapter disabled: pi_ref for free under LoRA."""
    with model.disable_adapter():
        yield model
