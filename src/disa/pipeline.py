"""The pipeline verbs (``disa sample|label|fit-z|train|eval|run``): config fields -> stage functions -> artefacts.

Thin orchestration: every stage's work lives in ``disa.stages``, ``disa.trainer`` and ``disa.sft``. Each stage
reads only the previous stage's files under ``cfg.output_dir`` (plus the prompt files and model folders named in
the config), so any verb can be re-run alone:

    output_dir/
      meta.json, samples/shard-*.parquet     disa sample   (resumable: finished shards are kept)
      labels.parquet                         disa label    (log Z label, diagnostics, frozen reward map)
      log_z/{model.safetensors, config.json, report.json, embeddings.safetensors}
                                             disa fit-z
      checkpoints/checkpoint-<step>/, checkpoints/metrics.csv
                                             disa train    (resumes from the newest checkpoint)
      eval/<checkpoint>/{eval.json, eval.md, eval_samples.parquet}
                                             disa eval     (one folder per evaluated checkpoint or model,
      eval.json, eval.md, eval_samples.parquet             e.g. eval/checkpoint-100/; the top-level copies
                                                           are the latest evaluation)

A missing input raises ``ConfigError`` naming the file and the verb that writes it (the CLI exits with code 2).
Models load from local folders only (``models.*``); ``models.device: auto`` picks CUDA when available.

Field mapping worth knowing: ``sample.temperature`` / ``sample.top_p`` are shared by the proposal and evaluation
(the paper); ``sample.stop`` applies to Stage 1, Stage 3 rollouts and evaluation; ``label.beta`` and
``label.reward_transform`` are the ``beta`` and ``r~`` of Stage 3's trajectory-balance objectives (``affine`` reads
the per-prompt map frozen in ``labels.parquet``). Every other ``train.*`` field reaches ``disa.trainer.TrainConfig``
(and ``disa.sft.SFTConfig``) by name (``_from_train_section``); ``TRAIN_CONFIG_FROM_ELSEWHERE`` lists the rest.
Objective ``sft`` fine-tunes on the reward-1 Stage 1 samples with ``disa.sft.train_sft`` for ``train.sft_epochs``
epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from disa.config import ConfigError, PipelineConfig

SAMPLES_DIR = "samples"
LABELS_FILE = "labels.parquet"
LOG_Z_DIR = "log_z"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
EMBED_CACHE = "embeddings.safetensors"
TB_OBJECTIVES = ("disa", "flowrl", "flowrl_no_logz")
# TrainConfig / SFTConfig fields that may change between a run and its resume
_RESUMABLE_CHANGES = {"num_steps", "num_epochs", "save_every", "keep_checkpoints", "log_with", "eval_every", "output_dir"}

__all__ = ["stage_sample", "stage_label", "stage_fit_z", "stage_train", "stage_eval", "run_all", "paths"]


# ==================================================================================================
# paths, inputs, models
# ==================================================================================================
def paths(cfg: PipelineConfig) -> dict[str, Path]:
    """Every artefact location of a run."""
    out = Path(cfg.output_dir)
    return {
        "out": out,
        "samples": out / SAMPLES_DIR,
        "labels": out / LABELS_FILE,
        "log_z": out / LOG_Z_DIR,
        "checkpoints": out / CHECKPOINTS_DIR,
        "eval": out / EVAL_DIR,  # eval/<checkpoint name>/ per evaluated policy
        "eval_latest": out,  # eval.json / eval.md / eval_samples.parquet of the latest `disa eval`
    }


def _stage(fn):
    """Every stage: applies ``models.cpu_threads``; a prompt that cannot be rendered for a model
    (``DataError``) is reported like a config error."""
    import functools

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        from disa.data import DataError

        if cfg.models.cpu_threads is not None:
            torch.set_num_threads(cfg.models.cpu_threads)
        try:
            return fn(cfg, *args, **kwargs)
        except DataError as e:
            raise ConfigError(f"data: {e}") from None

    return wrapper


def _say(verb: str, message: str) -> None:
    print(f"disa {verb}: {message}", flush=True)


def _missing(path: Path, verb: str, what: str = "") -> ConfigError:
    what = f" ({what})" if what else ""
    return ConfigError(f"{path}: not found{what}; run `disa {verb}` first (it writes this file)")


def _model_path(cfg: PipelineConfig, name: str) -> str:
    """Resolved local folder of ``models.<name>`` (``policy``/``proposal`` default to the reference)."""
    value = getattr(cfg.models, name)
    field = f"models.{name}"
    if not value and name != "reference":
        value, field = cfg.models.reference, "models.reference"
    if not value:
        raise ConfigError(
            f"{field}: not set; give the local folder of a Hugging Face causal LM, e.g. --set {field}=/path/to/model"
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{field}: {str(value)!r} is not a local folder (models load from local paths only)")
    return str(path.resolve())


def _device(cfg: PipelineConfig) -> torch.device:
    from disa.generation.hf import resolve_device

    try:
        device = resolve_device(cfg.models.device)
    except RuntimeError as e:
        raise ConfigError(f"models.device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"models.device: {cfg.models.device!r}, but no CUDA device is available (use auto or cpu)")
    return device


def _load(cfg: PipelineConfig, path: str):
    from disa.generation.hf import load_model_and_tokenizer

    return load_model_and_tokenizer(path, device=_device(cfg), dtype=cfg.models.dtype)


def _prompts(cfg: PipelineConfig, field: str = "prompts"):
    from disa.data import DataError, load_prompts

    path = getattr(cfg.data, field) if field == "prompts" else (cfg.data.eval_prompts or cfg.data.prompts)
    name = "data.prompts" if field == "prompts" or not cfg.data.eval_prompts else "data.eval_prompts"
    if not path:
        raise ConfigError(f"{name}: not set; give a .jsonl, .parquet or `datasets` folder of prompts")
    try:
        return load_prompts(path)
    except FileNotFoundError:
        raise ConfigError(f"{name}: prompt file {path!r} does not exist") from None
    except DataError as e:
        raise ConfigError(f"{name}: {e}") from None


def _verifier(cfg: PipelineConfig):
    from disa.verifiers import get_verifier

    try:
        return get_verifier(cfg.data.verifier)
    except KeyError as e:
        raise ConfigError(f"data.verifier: {e.args[0]}") from None


def _generator(cfg: PipelineConfig, model_path: str, batch_size: int):
    from disa.generation import make_generator

    if cfg.sample.backend == "vllm":
        return make_generator("vllm", model_path, dtype=cfg.models.dtype, seed=cfg.sample.seed)
    return make_generator("hf", model_path, batch_size=batch_size, device=str(_device(cfg)), dtype=cfg.models.dtype)


def _embedder(cfg: PipelineConfig):
    """The Stage 2 prompt embedder; Stage 3 builds it the same way, so the fingerprints agree."""
    from disa.embeddings import make_embedder
    from disa.generation.hf import resolve_dtype

    if cfg.fit_z.embedder == "reference":
        return make_embedder("reference", model=_model_path(cfg, "reference"), device=_device(cfg),
                             dtype=resolve_dtype(cfg.models.dtype))
    return make_embedder("sentence", path=cfg.fit_z.embedder_path, device=str(_device(cfg)))


def _reference_texts(cfg: PipelineConfig, records) -> dict[str, str]:
    """Prompt id -> the prompt rendered with pi_ref's tokenizer: what the log Z regressor reads in Stages 2 and 3."""
    from transformers import AutoTokenizer

    from disa.data import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(_model_path(cfg, "reference"), local_files_only=True)
    return {r.id: render_prompt(r, tokenizer) for r in records}


def _free() -> None:
    """Release what the caller just dropped (models between stages; matters on a GPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ==================================================================================================
# Stage 1
# ==================================================================================================
@_stage
def stage_sample(cfg: PipelineConfig) -> dict:
    """``disa sample``: N proposal samples per prompt, verified and re-scored -> ``samples/shard-*.parquet``."""
    import pyarrow.parquet as pq

    from disa.stages.sample import list_shards, run_sampling

    p = paths(cfg)
    records = _prompts(cfg)
    _verifier(cfg)  # an unknown name fails here, before any model is loaded
    ref_path, proposal_path = _model_path(cfg, "reference"), _model_path(cfg, "proposal")
    generator = _generator(cfg, proposal_path, cfg.sample.batch_size)
    if proposal_path == ref_path and cfg.sample.backend == "hf":
        ref_model, ref_tokenizer = generator.model, generator.tokenizer  # plain Monte Carlo: one copy
    else:
        ref_model, ref_tokenizer = _load(cfg, ref_path)
    try:
        result = run_sampling(
            records, generator=generator, n=cfg.sample.n, out_dir=str(p["out"]), verifier=cfg.data.verifier,
            ref_model=ref_model, ref_tokenizer=ref_tokenizer, shard_size=cfg.sample.shard_size,
            max_new_tokens=cfg.sample.max_new_tokens, temperature=cfg.sample.temperature, top_p=cfg.sample.top_p,
            stop=cfg.sample.stop, seed=cfg.sample.seed, score_batch_size=cfg.sample.batch_size,
            verifier_kwargs=cfg.data.verifier_kwargs,
        )
    except ValueError as e:
        if "meta.json" in str(e):  # a resume with other settings: a config problem, not a crash
            raise ConfigError(str(e)) from None
        raise
    finally:
        del generator, ref_model
        _free()
    rewards = [v for f in list_shards(str(p["samples"])) for v in pq.read_table(f, columns=["reward"]).column(0).to_pylist()]
    result["mean_reward"] = sum(rewards) / len(rewards)
    _say("sample", f"{result['rows']} rows ({len(records)} prompts x n={cfg.sample.n}) in {result['shards']} shard(s) "
         f"({result['written']} written, {result['skipped']} already there) -> {p['samples']}; "
         f"mean reward {result['mean_reward']:.4f}")
    return result


def _check_samples_complete(p: dict[str, Path]) -> list[str]:
    from disa.stages.sample import META_FILE, list_shards

    shards = list_shards(str(p["samples"]))
    if not shards:
        raise _missing(p["samples"] / "shard-*.parquet", "sample", "Stage 1 samples")
    meta_path = p["out"] / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        expected = math.ceil(meta["num_prompts"] / meta["shard_size"])
        if len(shards) < expected:
            raise ConfigError(
                f"{p['samples']}: {len(shards)} of {expected} shards; the sampling run did not finish: "
                "run `disa sample` again (it resumes)"
            )
    return shards


@_stage
def stage_label(cfg: PipelineConfig) -> dict:
    """``disa label``: one ``log Z`` label per prompt (eq. 8) + diagnostics -> ``labels.parquet``."""
    from disa.stages.label import run_labelling

    p = paths(cfg)
    _check_samples_complete(p)
    table = run_labelling(str(p["samples"]), beta=cfg.label.beta, reward_transform=cfg.label.reward_transform,
                          out_path=str(p["labels"]))
    cols = table.to_pydict()
    mean = lambda name: sum(cols[name]) / len(cols[name])  # noqa: E731
    result = {"rows": table.num_rows, "mean_log_z": mean("log_z"), "mean_ess": mean("ess"),
              "mean_reward_rate": mean("reward_rate"), "path": str(p["labels"])}
    _say("label", f"{table.num_rows} prompts -> {p['labels']}; mean log Z label {result['mean_log_z']:.4f} "
         f"(beta {cfg.label.beta}, r~ {cfg.label.reward_transform}), mean ESS {result['mean_ess']:.2f}, "
         f"mean reward rate under q {result['mean_reward_rate']:.4f}")
    return result


# ==================================================================================================
# Stage 2
# ==================================================================================================
@_stage
def stage_fit_z(cfg: PipelineConfig) -> dict:
    """``disa fit-z``: the 2-layer MLP ``Z_psi`` on frozen prompt embeddings -> ``log_z/``."""
    from disa.stages.fit_z import run_fit_z

    p = paths(cfg)
    if not p["labels"].is_file():
        raise _missing(p["labels"], "label", "Stage 1 labels")
    texts = _reference_texts(cfg, _prompts(cfg))
    embedder = _embedder(cfg)
    f = cfg.fit_z
    try:
        report = run_fit_z(
            str(p["labels"]), texts, embedder, str(p["log_z"]), cache_path=str(p["log_z"] / EMBED_CACHE),
            verbose=False, hidden=f.hidden, lr=f.lr, max_epochs=f.max_epochs, patience=f.patience,
            val_fraction=f.val_fraction, seed=f.seed,
        )
    except ValueError as e:
        if "too few for a train/validation split" in str(e):
            raise ConfigError(f"fit_z.val_fraction: {e}") from None
        if "have no prompt text" in str(e):
            raise ConfigError(f"data.prompts: {e}; re-run `disa sample` and `disa label` on this prompt set") from None
        raise
    finally:
        del embedder
        _free()
    r2 = "n/a" if not math.isfinite(report.val_r2) else f"{report.val_r2:.4f}"
    _say("fit-z", f"{report.n_train + report.n_val} prompts ({report.n_train} train / {report.n_val} held out) -> "
         f"{p['log_z']}; held-out MSE {report.val_mse:.4g} (predict-the-mean baseline {report.baseline_val_mse:.4g}), "
         f"R^2 {r2}, {report.epochs} epochs")
    return {"val_mse": report.val_mse, "val_r2": report.val_r2, "baseline_val_mse": report.baseline_val_mse,
            "n_train": report.n_train, "n_val": report.n_val, "path": str(p["log_z"])}


# ==================================================================================================
# Stage 3
# ==================================================================================================
def _frozen_log_z(cfg: PipelineConfig, records, p) -> "LogZTable":
    from disa.stages.fit_z import FrozenLogZ, LogZTable

    for name in ("model.safetensors", "config.json"):
        if not (p["log_z"] / name).is_file():
            raise _missing(p["log_z"] / name, "fit-z", "the frozen log Z regressor")
    texts = _reference_texts(cfg, records)
    embedder = _embedder(cfg)
    try:
        frozen = FrozenLogZ(str(p["log_z"]), embedder)
        ids = [r.id for r in records]
        values = frozen([texts[i] for i in ids], ids)
    except ValueError as e:
        raise ConfigError(f"{p['log_z']}: {e}; re-run `disa fit-z` with this fit_z.embedder") from None
    finally:
        del embedder
        _free()
    return LogZTable(dict(zip(ids, values.tolist())))


def _affine_map(p, records) -> dict[str, tuple[float, float]]:
    import pyarrow.parquet as pq

    if not p["labels"].is_file():
        raise _missing(p["labels"], "label", "the frozen reward map that label.reward_transform=affine reads")
    cols = pq.read_table(str(p["labels"]), columns=["prompt_id", "reward_scale", "reward_shift"]).to_pydict()
    affine = {pid: (a, b) for pid, a, b in zip(cols["prompt_id"], cols["reward_scale"], cols["reward_shift"])}
    missing = [r.id for r in records if r.id not in affine]
    if missing:
        raise ConfigError(f"{p['labels']}: no reward_scale/reward_shift for prompt id(s) {missing[:5]}; "
                          "run `disa sample` and `disa label` on data.prompts")
    return affine


def _existing_checkpoint(train_dir: Path):
    from disa.trainer import find_checkpoint

    try:
        return find_checkpoint(train_dir)
    except FileNotFoundError:
        return None


def _check_resume(ckpt: Path, new: dict, key: Optional[str] = None) -> None:
    old = json.loads((ckpt / "train_config.json").read_text())
    if key is not None:
        if key not in old:
            raise ConfigError(f"{ckpt}: a checkpoint of an RL run, but train.objective is sft; use another output_dir")
        old = old[key]
    elif "sft" in old and len(old) == 1:
        raise ConfigError(f"{ckpt}: a checkpoint of an sft run, but train.objective is {new['objective']!r}; "
                          "use another output_dir")
    diff = [k for k in sorted(set(old) | set(new)) if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ConfigError(f"{ckpt} was trained with different settings ({details}); resuming would mix two runs: "
                          "use a new output_dir or delete the checkpoints folder")


def _train_config(cfg: PipelineConfig, train_dir: Path):
    from disa.trainer import TrainConfig

    t = cfg.train
    kwargs = dict(t.objective_kwargs)
    reward_transform = cfg.label.reward_transform
    if t.objective in TB_OBJECTIVES:
        if "beta" in kwargs and float(kwargs["beta"]) != cfg.label.beta:
            raise ConfigError(f"train.objective_kwargs.beta: {kwargs['beta']!r} differs from label.beta = "
                              f"{cfg.label.beta!r}; set label.beta (Stage 1 labels and Stage 3 must share one beta)")
        kwargs["beta"] = cfg.label.beta
    else:
        reward_transform = "raw"  # GRPO/GSPO/ASPO read group advantages of the raw reward, never r~
    try:
        return _from_train_section(
            t, TrainConfig, objective_kwargs=kwargs, stop=list(cfg.sample.stop), reward_transform=reward_transform,
            output_dir=str(train_dir),
        )
    except ValueError as e:
        raise ConfigError(str(e).replace("TrainConfig.", "train.")) from None


# TrainConfig fields that do not come from a same-named ``train.*`` field, and where they come from instead.
TRAIN_CONFIG_FROM_ELSEWHERE = {
    "objective_kwargs": "train.objective_kwargs, with beta = label.beta for the trajectory-balance objectives",
    "stop": "sample.stop (shared by Stage 1, Stage 3 rollouts and eval)",
    "reward_transform": "label.reward_transform (raw for grpo/gspo/aspo)",
    "output_dir": "output_dir/checkpoints",
    "eval_every": "left at 0: disa train evaluates with `disa eval` on the checkpoints instead",
}


def _from_train_section(section, config_cls, **supplied):
    """``config_cls(**kwargs)``: every ``train.*`` field with the same name as a ``config_cls`` field, then
    ``supplied`` (the fields filled from elsewhere). The field names are the single source of truth: a knob added to
    both ``TrainSection`` and ``TrainConfig`` / ``SFTConfig`` reaches the trainer without a line here."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    kwargs = {f.name: copy.deepcopy(getattr(section, f.name)) for f in dataclasses.fields(section) if f.name in names}
    kwargs.update(supplied)
    return config_cls(**kwargs)


def _sft_examples(cfg: PipelineConfig, p, records, tokenizer) -> list[tuple[str, str]]:
    """(prompt rendered for the policy, response) for every Stage 1 sample with reward 1."""
    import pyarrow.parquet as pq

    from disa.data import render_prompt

    shards = _check_samples_complete(p)
    by_id = {r.id: r for r in records}
    examples, total = [], 0
    for shard in shards:
        cols = pq.read_table(shard, columns=["prompt_id", "response", "reward"]).to_pydict()
        total += len(cols["reward"])
        for pid, response, reward in zip(cols["prompt_id"], cols["response"], cols["reward"]):
            if reward >= 1.0 and response:
                if pid not in by_id:
                    raise ConfigError(f"{shard}: prompt id {pid!r} is not in data.prompts")
                examples.append((render_prompt(by_id[pid], tokenizer), response))
    if not examples:
        raise ConfigError(f"{p['samples']}: no reward-1 samples among {total} Stage 1 samples, so objective sft has "
                          "nothing to fine-tune on (use a stronger models.proposal, a larger sample.n, or easier prompts)")
    return examples


def _stage_sft(cfg: PipelineConfig, p, records) -> dict:
    from disa import sft

    try:
        config = _from_train_section(cfg.train, sft.SFTConfig, num_epochs=cfg.train.sft_epochs,
                                     output_dir=str(p["checkpoints"]))
    except ValueError as e:
        raise ConfigError(str(e).replace("SFTConfig.", "train.")) from None
    ckpt = _existing_checkpoint(p["checkpoints"])
    if ckpt is not None:
        _check_resume(ckpt, config.to_dict(), key="sft")
    policy, tokenizer = _load(cfg, _model_path(cfg, "policy"))
    examples = _sft_examples(cfg, p, records, tokenizer)
    policy, history = sft.train_sft(policy, tokenizer, examples, config, resume_from=ckpt)
    del policy
    _free()
    final = _existing_checkpoint(p["checkpoints"])
    loss = history[-1]["loss"] if history else float("nan")
    _say("train", f"sft on {len(examples)} reward-1 samples, {len(history)} steps"
         f"{f' (resumed from {ckpt.name})' if ckpt else ''} -> {final}; final loss {loss:.4g}")
    return {"objective": "sft", "examples": len(examples), "steps": len(history), "final_loss": loss,
            "checkpoint": str(final)}


@_stage
def stage_train(cfg: PipelineConfig) -> dict:
    """``disa train``: Stage 3 with ``train.objective`` -> ``checkpoints/`` (resumes from the newest checkpoint)."""
    from disa.data import render_prompt
    from disa.trainer import RLTrainer

    p = paths(cfg)
    records = _prompts(cfg)
    if cfg.train.objective == "sft":
        return _stage_sft(cfg, p, records)
    verifier = _verifier(cfg)
    config = _train_config(cfg, p["checkpoints"])
    ckpt = _existing_checkpoint(p["checkpoints"])
    if ckpt is not None:
        _check_resume(ckpt, config.to_dict())
    log_z_fn = _frozen_log_z(cfg, records, p) if config.objective == "disa" else None
    affine = _affine_map(p, records) if config.reward_transform == "affine" else None

    policy_path, ref_path = _model_path(cfg, "policy"), _model_path(cfg, "reference")
    policy, tokenizer = _load(cfg, policy_path)
    needs_ref = config.objective in TB_OBJECTIVES or float(config.objective_kwargs.get("kl_coef", 0) or 0) > 0
    ref_model = None
    if needs_ref and not (config.lora is not None and policy_path == ref_path):
        ref_model = _load(cfg, ref_path)[0]  # under LoRA from pi_ref itself, pi_ref = the adapter switched off
    prompts = [{**r.verifier_columns(), "id": r.id, "text": render_prompt(r, tokenizer)} for r in records]
    reward_fn = verifier
    if cfg.data.verifier_kwargs:
        def reward_fn(prompts, completions, **columns):  # noqa: F811 - the configured verifier with its kwargs
            return verifier(prompts, completions, **columns, **cfg.data.verifier_kwargs)

    trainer = RLTrainer(policy, ref_model, tokenizer, prompts, reward_fn, config, log_z_fn=log_z_fn, affine=affine,
                        resume_from=ckpt)
    start = trainer.global_step
    history = trainer.train()
    steps = trainer.global_step
    final = _existing_checkpoint(p["checkpoints"])
    del trainer, policy, ref_model
    _free()
    last = history[-1] if history else {}
    result = {"objective": config.objective, "steps": steps, "new_steps": steps - start,
              "final_reward": last.get("reward_mean", float("nan")), "final_loss": last.get("loss", float("nan")),
              "checkpoint": str(final)}
    if log_z_fn is not None:
        result["mean_frozen_log_z"] = sum(log_z_fn.values.values()) / len(log_z_fn.values)
    resumed = f" (resumed at step {start})" if ckpt is not None else ""
    _say("train", f"{config.objective}, {result['steps']} steps{resumed} -> {final}; final reward "
         f"{result['final_reward']:.4f}, loss {result['final_loss']:.4g}; metrics in {p['checkpoints'] / 'metrics.csv'}")
    return result


# ==================================================================================================
# evaluation
# ==================================================================================================
def _policy_folder(cfg: PipelineConfig, checkpoint: Optional[str]) -> Path:
    """The folder to evaluate: a ``checkpoint-<step>/policy`` (full weights or a LoRA adapter) or a model folder."""
    from disa.trainer import find_checkpoint

    p = paths(cfg)
    if checkpoint is None:
        ckpt = _existing_checkpoint(p["checkpoints"])
        if ckpt is None:
            raise ConfigError(f"{p['checkpoints']}: no checkpoint-<step>/ found; run `disa train` first "
                              "(or pass --checkpoint PATH)")
        return ckpt / "policy"
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ConfigError(f"--checkpoint: {str(path)!r} does not exist")
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path  # a model folder, a checkpoint's policy/ folder or a LoRA adapter
    try:  # a checkpoint-<step>/ folder, or a training output folder (its newest checkpoint)
        return find_checkpoint(path) / "policy"
    except FileNotFoundError:
        raise ConfigError(f"--checkpoint: {str(path)!r} is neither a model folder, a LoRA adapter folder nor a "
                          "training output folder with checkpoint-<step>/") from None


def _load_eval_policy(cfg: PipelineConfig, folder: Path):
    """(model, tokenizer) of ``folder``; a LoRA adapter is applied to the run's starting policy and merged."""
    from transformers import AutoTokenizer

    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tokenizer = _load(cfg, _model_path(cfg, "policy"))
        model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload().to(_device(cfg)).eval()
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return model, tokenizer
    return _load(cfg, str(folder))


def eval_name(cfg: PipelineConfig, folder: Path) -> str:
    """The ``eval/<name>/`` folder of an evaluated policy folder: ``checkpoint-<step>`` for a checkpoint of this
    run, ``<run>-checkpoint-<step>`` for another run's checkpoint, else the model folder's name."""
    from disa.trainer import CHECKPOINT_PREFIX

    folder = Path(folder).expanduser().resolve()
    name = folder.name
    if name == "policy" and folder.parent.name.startswith(CHECKPOINT_PREFIX):
        ckpt = folder.parent
        name = ckpt.name
        if ckpt.parent != paths(cfg)["checkpoints"].expanduser().resolve():
            run = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS_DIR else ckpt.parent
            name = f"{run.name}-{name}"
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return name or "model"


def _copy_latest(src_dir: Path, dst_dir: Path, names) -> None:
    for name in names:
        tmp = dst_dir / (name + ".tmp")
        shutil.copyfile(src_dir / name, tmp)
        os.replace(tmp, dst_dir / name)


@_stage
def stage_eval(cfg: PipelineConfig, checkpoint: Optional[str] = None) -> dict:
    """``disa eval``: ``eval.k`` samples per eval prompt -> Mean@k, pass@k, distinct correct -> ``eval.json``/``.md``
    and ``eval_samples.parquet`` in ``eval/<checkpoint name>/`` (so evaluating another checkpoint keeps this one),
    copied to ``output_dir`` as the latest evaluation."""
    from disa.generation import make_generator
    from disa.stages.evaluate import EVAL_JSON, EVAL_MD, EVAL_SAMPLES, run_evaluation

    p = paths(cfg)
    folder = _policy_folder(cfg, checkpoint)
    out_dir = p["eval"] / eval_name(cfg, folder)
    records = _prompts(cfg, "eval_prompts")
    _verifier(cfg)
    if cfg.sample.backend == "vllm" and not (folder / "adapter_config.json").is_file():
        generator = make_generator("vllm", str(folder), dtype=cfg.models.dtype, seed=cfg.eval.seed)
        model = None
    else:
        model, tokenizer = _load_eval_policy(cfg, folder)
        generator = make_generator("hf", model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size, device=None, progress=False)
    try:
        summary = run_evaluation(
            records, generator=generator, verifier=cfg.data.verifier, out_dir=out_dir, k=cfg.eval.k,
            pass_at=list(cfg.eval.pass_at), max_new_tokens=cfg.eval.max_new_tokens,
            temperature=cfg.sample.temperature, top_p=cfg.sample.top_p, stop=cfg.sample.stop, seed=cfg.eval.seed,
            batch_size=cfg.eval.batch_size, verifier_kwargs=cfg.data.verifier_kwargs, policy=str(folder),
        )
    finally:
        del generator, model
        _free()
    _copy_latest(out_dir, p["eval_latest"], (EVAL_SAMPLES, EVAL_JSON, EVAL_MD))
    k = cfg.eval.k
    passes = ", ".join(f"pass@{kk} {v:.4f}" for kk, v in summary["pass_at"].items())
    _say("eval", f"{summary['prompts']} prompts x k={k} from {folder}: Mean@{k} {summary['mean_at_k']:.4f}, {passes}, "
         f"distinct correct {summary['distinct_correct']:.3f} per prompt -> {out_dir / EVAL_JSON}, {out_dir / EVAL_MD} "
         f"(latest also in {p['eval_latest'] / EVAL_JSON})")
    return {**summary, "eval_dir": str(out_dir)}


# ==================================================================================================
# everything
# ==================================================================================================
def run_all(cfg: PipelineConfig) -> dict[str, Any]:
    """``disa run``: sample, label, fit-z, train, eval, in order (each stage resumes or redoes its own artefact)."""
    results = {}
    for name, stage in (("sample", stage_sample), ("label", stage_label), ("fit_z", stage_fit_z),
                        ("train", stage_train), ("eval", stage_eval)):
        results[name] = stage(cfg)
    return results
