"""What every verb loads from the config: prompts, models, the verifier, a generator, the prompt embedder.

Each helper turns a bad setting into a ``ConfigError`` that names the field, before any long work starts.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from disa.config import ConfigError, PipelineConfig
from disa.log import stage_logger
from disa.run_dir import RunDir


def stage(verb: str):
    """Decorator of every ``stages.<verb>.run``: checks every input up front (:mod:`disa.stages.validate`),
    applies ``models.cpu_threads``, holds the stage's lock on ``output_dir`` (:func:`disa.run_dir.stage_lock`) and
    reports a prompt that cannot be rendered (``DataError``) like a config
    error."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(cfg: PipelineConfig, *args, **kwargs):
            from disa.data import DataError
            from disa.run_dir import stage_lock
            from disa.stages.validate import check_inputs

            check_inputs(cfg, verb, kwargs.get("checkpoint"))
            apply_cpu_threads(verb, cfg.models.cpu_threads)
            try:
                with stage_lock(cfg.output_dir, verb):  # one writer per stage and output_dir
                    return fn(cfg, *args, **kwargs)
            except DataError as e:
                raise ConfigError(f"data: {e}") from None

        wrapper.verb = verb
        return wrapper

    return deco


def apply_cpu_threads(verb: str, setting) -> None:
    """``models.cpu_threads``: ``auto`` picks the free cores of this machine now (and says so), an int is taken
    as it is, null leaves torch's default."""
    from disa.threads import choose_threads, describe, machine_load

    if setting == "auto":
        cores, load = machine_load()
        threads = choose_threads(cores, cores, load)
        torch.set_num_threads(threads)
        say(verb, f"{describe(threads, cores, load)} (models.cpu_threads: auto)")
    elif setting is not None:
        torch.set_num_threads(setting)


def say(verb: str, message: str, level: int = logging.INFO) -> None:
    """A stage's message, on its logger (``disa.stages.<verb>``); the command shows it as ``disa <verb>: ...``
    on stderr (:mod:`disa.log`)."""
    stage_logger(verb).log(level, message, extra={"verb": verb})


def run_dir(cfg: PipelineConfig) -> RunDir:
    return RunDir(cfg.output_dir)


def stage1_run_dir(cfg: PipelineConfig) -> RunDir:
    """Where Stage 3 reads the Stage 1-2 files: ``stage1_dir`` when set (a baseline beside a DISA run), else
    ``output_dir``."""
    return RunDir(cfg.stage1_dir or cfg.output_dir)


def model_path(cfg: PipelineConfig, name: str) -> str:
    """Resolved local folder of ``models.<name>`` (``policy``/``proposal`` default to the reference)."""
    value, field = getattr(cfg.models, name), f"models.{name}"
    if not value and name != "reference":
        value, field = cfg.models.reference, "models.reference"
    if not value:
        raise ConfigError(f"{field}: not set; give the local folder of a Hugging Face causal LM, e.g. "
                          f"--set {field}=/path/to/model")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{field}: {str(value)!r} is not a local folder (models load from local paths only)")
    return str(path.resolve())


def device(cfg: PipelineConfig) -> torch.device:
    from disa.generation.hf import resolve_device

    try:
        resolved = resolve_device(cfg.models.device)
    except RuntimeError as e:
        raise ConfigError(f"models.device: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"models.device: {cfg.models.device!r}, but no CUDA device is available (use auto or cpu)")
    return resolved


def load_model(cfg: PipelineConfig, path: str):
    from disa.generation.hf import load_model_and_tokenizer

    return load_model_and_tokenizer(path, device=device(cfg), dtype=cfg.models.dtype)


def prompts(cfg: PipelineConfig, which: str = "prompts"):
    """``data.prompts`` (or, for ``which="eval_prompts"``, ``data.eval_prompts`` falling back to it)."""
    from disa.data import DataError, load_prompts

    name = "data.eval_prompts" if which == "eval_prompts" and cfg.data.eval_prompts else "data.prompts"
    path = cfg.data.eval_prompts if name == "data.eval_prompts" else cfg.data.prompts
    if not path:
        raise ConfigError(f"{name}: not set; give a .jsonl, .parquet or `datasets` folder of prompts")
    try:
        records = load_prompts(path)
    except FileNotFoundError:
        raise ConfigError(f"{name}: prompt file {path!r} does not exist") from None
    except DataError as e:
        raise ConfigError(f"{name}: {e}") from None
    if cfg.data.long_prompts == "skip":
        records = _without_long_prompts(cfg, records, path, name)
    return records


def _without_long_prompts(cfg: PipelineConfig, records, path: str, name: str):
    """``records`` less those too long for a model's context (``data.long_prompts: skip``); the skipped ids are
    printed and recorded in ``output_dir/skipped_prompts.json``."""
    from disa.io import atomic_write_json
    from disa.stages.validate import long_prompts, new_tokens_budget, new_tokens_field

    skipped = long_prompts(cfg, records, path)
    if not skipped:
        return records
    kept = [r for r in records if r.id not in {p.id for p in skipped}]
    if not kept:
        raise ConfigError(f"{name}: every prompt of {path} is too long for the models' context with "
                          f"{new_tokens_field(cfg)} {new_tokens_budget(cfg)}; nothing is left to run on")
    say("data", f"skipping {len(skipped)} of {len(records)} prompts of {name} that do not fit the context "
                f"(data.long_prompts: skip): {', '.join(p.id for p in skipped[:20])}"
                f"{' ...' if len(skipped) > 20 else ''}; listed in {Path(cfg.output_dir) / 'skipped_prompts.json'}")
    record = Path(cfg.output_dir) / "skipped_prompts.json"
    old = json.loads(record.read_text()) if record.is_file() else {}
    old[name] = {"file": str(path), "max_new_tokens": new_tokens_budget(cfg),
                 "skipped": [{"id": p.id, "where": p.where, "prompt_tokens": p.tokens, "context": p.limit,
                              "model": p.setting} for p in skipped]}
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, old)
    return kept


def verifier(cfg: PipelineConfig):
    """The configured reward function, with :func:`verifier_kwargs` bound (TRL's signature); for a verifier that
    runs code, first :func:`code_isolation`."""
    from disa.verifiers import get_verifier

    try:
        fn = get_verifier(cfg.data.verifier)
    except KeyError as e:
        raise ConfigError(f"data.verifier: {e.args[0]}") from None
    code_isolation(cfg, [cfg.data.verifier], "verifier")  # refuses the fallback unless allowed; says which
    kwargs = verifier_kwargs(cfg, cfg.data.verifier)
    return functools.partial(fn, **kwargs) if kwargs else fn


def verifier_kwargs(cfg: PipelineConfig, name: str) -> dict:
    """Keyword arguments for verifier ``name``: ``data.verifier_kwargs`` when it is ``data.verifier``, and for
    a verifier that runs code, ``require_os_isolation`` unless ``verifier.allow_fallback`` (so that a worker on
    a machine without bubblewrap fails instead of silently scoring in the fallback)."""
    from disa.verifiers import runs_code

    kwargs = dict(cfg.data.verifier_kwargs) if name == cfg.data.verifier else {}
    if runs_code(name) and not cfg.verifier.allow_fallback:
        kwargs["require_os_isolation"] = True
    return kwargs


def isolation_problem(cfg: PipelineConfig, names) -> Optional[str]:
    """Why verifiers ``names`` must not run here (one of them runs code and only the fallback sandbox
    would hold it, without ``verifier.allow_fallback``), else None."""
    from disa.verifiers import runs_code
    from disa.verifiers.sandbox_fallback import check_code_isolation

    if not any(runs_code(name) for name in names):
        return None
    backend = cfg.data.verifier_kwargs.get("backend") if cfg.data.verifier in names else None
    if backend == "fallback" and not cfg.verifier.allow_fallback:
        return "data.verifier_kwargs.backend: 'fallback' needs verifier.allow_fallback: true"
    _, problem = check_code_isolation(cfg.verifier.allow_fallback)
    return f"verifier.allow_fallback: {problem}" if problem else None


def verifier_names(cfg: PipelineConfig, verb: str) -> list[str]:
    """The verifiers ``verb`` calls: ``data.verifier``, and for eval/run each known benchmark's."""
    names = [cfg.data.verifier]
    if verb in ("eval", "run"):
        from disa.benchmarks import BENCHMARKS

        for entry in cfg.eval.benchmarks:
            name = entry.get("name") if isinstance(entry, dict) else entry
            if isinstance(name, str) and name in BENCHMARKS and BENCHMARKS[name].verifier not in names:
                names.append(BENCHMARKS[name].verifier)
    return names


_isolation_said: set[str] = set()


def code_isolation(cfg: PipelineConfig, names, verb: str) -> Optional[str]:
    """The sandbox that verifiers ``names`` run programs in ("bwrap" or "fallback"; None when none runs code):
    raises ``ConfigError`` where it is not allowed, and says which once per process."""
    from disa.verifiers import runs_code
    from disa.verifiers.sandbox_fallback import ISOLATION_SUMMARY, check_code_isolation

    if not any(runs_code(name) for name in names):
        return None
    problem = isolation_problem(cfg, names)
    if problem:
        raise ConfigError(problem)
    level, _ = check_code_isolation(cfg.verifier.allow_fallback)
    if level not in _isolation_said:
        _isolation_said.add(level)
        say(verb, f"code sandbox: {ISOLATION_SUMMARY[level]}")
    return level


CONSUMERS = ("sample", "train", "eval")  # the config sections with a ``generation:`` engine


def generator(cfg: PipelineConfig, model, batch_size: int, *, consumer: str, tokenizer=None, seed: int = 0,
              progress: bool = True):
    """The rollout engine ``<consumer>.generation`` names (``consumer``: sample, train or eval) over ``model`` (a
    local folder, or a loaded model with its ``tokenizer``), built through the engine registry."""
    from disa.generation import make_engine

    if consumer not in CONSUMERS:
        raise ValueError(f"consumer must be one of {CONSUMERS}, got {consumer!r}")
    section = getattr(cfg, consumer).generation
    try:
        return make_engine(section, model, tokenizer, batch_size=batch_size,
                           device=str(device(cfg)) if isinstance(model, str) else None, dtype=cfg.models.dtype,
                           seed=seed, progress=progress)
    except ValueError as e:
        raise ConfigError(f"{consumer}.generation (engine {section.engine!r}): {e}") from None


def embedder(cfg: PipelineConfig):
    """The Stage 2 prompt embedder; Stage 3's ``train.log_z: regressor`` builds it the same way."""
    from disa.embeddings import make_embedder
    from disa.generation.hf import resolve_dtype

    if cfg.fit_z.embedder == "reference":
        return make_embedder("reference", model=model_path(cfg, "reference"), device=device(cfg),
                             dtype=resolve_dtype(cfg.models.dtype), batch_size=cfg.fit_z.embed_batch_size)
    return make_embedder("sentence", path=cfg.fit_z.embedder_path, device=str(device(cfg)))


def reference_texts(cfg: PipelineConfig, records) -> dict[str, str]:
    """Prompt id -> the prompt rendered with pi_ref's tokenizer: what the log Z regressor reads."""
    from transformers import AutoTokenizer

    from disa.data import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_path(cfg, "reference"), local_files_only=True)
    return {r.id: render_prompt(r, tokenizer) for r in records}


def free() -> None:
    """Release what the caller just dropped (models between stages; matters on a GPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def existing_checkpoint(folder: Path) -> Optional[Path]:
    from disa.training import find_checkpoint

    try:
        return find_checkpoint(folder)
    except FileNotFoundError:
        return None
