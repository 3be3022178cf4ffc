"""Up-front checks of a verb's inputs: every problem found at once, before any model loads or any file is written.

``check_inputs(cfg, verb)`` looks at what the verb will read and write:

* the prompt file(s): readable, every row carrying the columns the verifier needs (``answer`` for ``math``,
  ``tests`` for ``code``), each named by file, line and id;
* the verifier: registered and importable (``math`` needs the ``math-verify`` package);
* the model folders the verb loads: a folder with ``config.json`` and a tokenizer that loads, each named by
  its setting (``models.proposal``);
* prompt lengths: prompt tokens plus the longest ``max_new_tokens`` must fit each model's context; with
  ``data.long_prompts: refuse`` every offending id is listed, with ``skip`` they are left out later
  (:func:`long_prompts`, used by :func:`disa.stages.common.prompts`);
* ``output_dir``: creatable and writable (probed without creating it), and ``stage1_dir`` when set.

All problems are joined into one ``ConfigError`` (the CLI prints it and exits with code 2).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from disa.config import ConfigError, PipelineConfig

# config.json keys that hold a model's context length, in the order transformers' configs use them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len")
MAX_LISTED = 10  # problems of one kind listed before "... and N more"


@dataclass(frozen=True)
class LongPrompt:
    id: str
    where: str  # "file, line N"
    tokens: int
    limit: int
    setting: str  # models.<name>
    at_least: bool = False  # counted on a prefix only: the prompt has at least ``tokens`` tokens


CHARS_PER_TOKEN_BOUND = 32  # a prompt is tokenized on a prefix of this many characters per context token first


def count_prompt_tokens(tokenizer, text: str, limit: int) -> tuple[int, bool]:
    """``(tokens, at_least)``: the prompt's token count, or when a prefix of ``CHARS_PER_TOKEN_BOUND * (limit + 1)``
    characters alone exceeds ``limit`` tokens, that lower bound (``at_least``). A 10 MB prompt costs a prefix's
    tokenization, not the gigabytes a tokenizer's offsets over the whole text take."""
    cut = CHARS_PER_TOKEN_BOUND * (limit + 1)
    if len(text) > cut:
        # ended at a whitespace where there is one (pre-tokenizers split there), less the one token that may still be
        # cut in two: the whole text's tokens cover the prefix with at least this many
        space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
        n = len(tokenizer(text[:space if space > cut // 2 else cut], add_special_tokens=False)["input_ids"]) - 1
        if n > limit:
            return n, True
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]), False


def _models_of(cfg: PipelineConfig, verb: str) -> list[str]:
    """The ``models.*`` settings whose folders ``verb`` loads (declared in :data:`disa.artifacts.STAGE_IO`)."""
    from disa.artifacts import run_verbs, stage_io

    if verb == "run":  # every stage's models, in the order the stages load them
        names = [n for v in run_verbs(cfg) for n in stage_io(cfg, v).config_inputs(cfg, "models.")]
    else:
        names = stage_io(cfg, verb).config_inputs(cfg, "models.") if verb in ("sample", "label", "fit-z", "train",
                                                                               "eval") else []
    return list(dict.fromkeys(names))


def _prompt_fields(cfg: PipelineConfig, verb: str) -> list[str]:
    """The prompt sets ``verb`` reads; ``eval_prompts`` falls back to ``prompts`` when unset."""
    from disa.artifacts import run_verbs, stage_io

    verbs = run_verbs(cfg) if verb == "run" else ((verb,) if verb in ("sample", "label", "fit-z", "train", "eval") else ())
    names = [n for v in verbs for n in stage_io(cfg, v).config_inputs(cfg, "data.")]
    if "eval_prompts" in names and not cfg.data.eval_prompts:
        names = [n if n != "eval_prompts" else "prompts" for n in names]
    return list(dict.fromkeys(names))


def model_setting(cfg: PipelineConfig, name: str) -> tuple[str, str]:
    """``(field, value)`` of ``models.<name>``; policy and proposal fall back to the reference."""
    value, field = getattr(cfg.models, name), f"models.{name}"
    if not value and name != "reference":
        value, field = cfg.models.reference, "models.reference"
    return field, value


def check_model_folder(field: str, value: str) -> Optional[str]:
    """None, or one line saying why ``value`` is not a loadable model folder."""
    if not value:
        return f"{field}: not set; give the local folder of a Hugging Face causal LM (--set {field}=/path/to/model)"
    path = Path(value).expanduser()
    if not path.is_dir():
        return f"{field}: {value!r} is not a local folder (models load from local paths only)"
    if not (path / "config.json").is_file():
        return f"{field}: {value!r} has no config.json; give a folder written by save_pretrained"
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        return f"{field}: {value!r} has no weights (*.safetensors or *.bin); give a folder written by save_pretrained"
    problem = weights_problem(path)
    if problem is not None:
        return f"{field}: {value!r}: {problem}; the weights do not belong to this config.json"
    problem = tokenizer_problem(path)
    if problem is not None:
        return f"{field}: {value!r} has no usable tokenizer ({problem}); save the tokenizer into the folder " \
               "(tokenizer.save_pretrained)"
    return None


def weights_problem(path: Path) -> Optional[str]:
    """None, or which tensors of the folder's ``*.safetensors`` do not fit the model its ``config.json`` builds:
    missing ones (tied weights excepted: they share storage with a present one), unexpected ones, and ones of
    another shape. Read from the file headers and a model built on the meta device, so nothing is loaded; without
    this, 2-layer weights under ``n_layer: 4`` load with two random layers and no error."""
    import re

    files = sorted(path.glob("*.safetensors"))
    if not files or (path / "adapter_config.json").is_file():
        return None  # *.bin weights or an adapter: left to the loader
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json does not parse ({e})"
    if "quantization_config" in config:
        return None  # packed tensors: their shapes are not the module's
    try:
        from safetensors import safe_open

        found: dict[str, tuple] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                found.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    except Exception as e:  # a truncated or foreign file
        return f"{f.name} cannot be read ({type(e).__name__}: {str(e)[:120]})"
    model = _meta_model(str(path))
    if model is None:
        return None  # an architecture transformers cannot build here: the loader reports it
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def canonical(key: str) -> str:
        if key in expected or not prefix:
            return key
        if f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        return key[len(prefix) + 1:] if key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected else key

    present = {canonical(k): shape for k, shape in found.items()}
    ignore_missing = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    ignore_unexpected = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    tied = {n for group in aliases.values() if len(group) > 1 and any(a in present for a in group) for n in group}
    missing = [k for k in expected if k not in present and k not in tied and not any(r.search(k) for r in ignore_missing)]
    unexpected = [k for k in present if k not in expected and not any(r.search(k) for r in ignore_unexpected)]
    wrong = [f"{k} {list(present[k])} (config: {list(expected[k])})" for k in expected
             if k in present and present[k] != expected[k]]
    parts = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''} ({len(items)})"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if items]
    return "weights " + "; ".join(parts) if parts else None


def _meta_model(path: str):
    """The model ``config.json`` describes, built on the meta device (no memory, no weights), or None."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config)
    except Exception:
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tiktoken.model")


def tokenizer_problem(path: Path) -> Optional[str]:
    """None, or why the folder's tokenizer does not load or does not tokenize (transformers may build an empty
    tokenizer from a folder with no tokenizer files at all)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return f"none of {', '.join(TOKENIZER_FILES[:3])}, ... in the folder"
    try:
        tokenizer = _tokenizer(str(path))
        if not tokenizer("1 + 2 = 3", add_special_tokens=False)["input_ids"]:
            return "it turns text into no tokens"
    except Exception as e:  # transformers raises many types for a folder without a tokenizer
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return None


_TOKENIZERS: dict = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _TOKENIZERS[path]


def context_length(path: str | os.PathLike) -> Optional[int]:
    """The model's context length from its ``config.json`` (None when it states none)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in CONTEXT_KEYS:
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def row_locations(path: str) -> dict[str, str]:
    """Prompt id -> ``"file, line N"`` (JSONL) or ``"file, row N"``: where a message points the user."""
    from disa.data import _iter_jsonl

    out = {}
    if str(path).lower().endswith(".jsonl"):
        try:
            for line, row in _iter_jsonl(str(path)):
                if isinstance(row, dict) and isinstance(row.get("id"), (str, int)):
                    out.setdefault(str(row["id"]), f"{path}, line {line}")
        except Exception:  # the loader reports a malformed file itself
            pass
    return out


def new_tokens_budget(cfg: PipelineConfig) -> int:
    """The longest response any stage may generate: what a prompt must leave room for in every stage."""
    return max(cfg.sample.max_new_tokens, cfg.train.max_new_tokens, cfg.eval.max_new_tokens)


def new_tokens_field(cfg: PipelineConfig) -> str:
    """The setting that :func:`new_tokens_budget` comes from (the first stage in pipeline order on a tie), so that
    an error names the one a user has to lower: ``train.max_new_tokens``."""
    budget = new_tokens_budget(cfg)
    return next(f"{stage}.max_new_tokens" for stage in ("sample", "train", "eval")
                if getattr(cfg, stage).max_new_tokens == budget)


def long_prompts(cfg: PipelineConfig, records, path: str, model_names=("reference", "proposal", "policy")) -> list[LongPrompt]:
    """Every prompt whose tokens plus :func:`new_tokens_budget` exceed the context of one of the models."""
    from disa.data import render_prompt

    budget, where = new_tokens_budget(cfg), row_locations(path)
    found: dict[str, LongPrompt] = {}
    seen_paths = set()
    for name in model_names:
        field, value = model_setting(cfg, name)
        if not value or check_model_folder(field, value) is not None:
            continue
        resolved = str(Path(value).expanduser().resolve())
        if resolved in seen_paths:
            continue
        seen_paths.add(resolved)
        limit = context_length(resolved)
        if limit is None:
            continue
        tokenizer = _tokenizer(resolved)
        for r in records:
            if r.id in found:
                continue
            n, at_least = count_prompt_tokens(tokenizer, render_prompt(r, tokenizer), limit)
            if n + budget > limit:
                found[r.id] = LongPrompt(r.id, where.get(r.id, f"{path}, id {r.id!r}"), n, limit, field, at_least)
    return [found[r.id] for r in records if r.id in found]


def _missing_columns(cfg: PipelineConfig, records, path: str, field: str) -> list[str]:
    """Rows the verifier cannot score, from what it declares (:class:`disa.verifiers.VerifierSpec`): a required
    column absent, or a row its ``check_row`` refuses (countdown: ``numbers`` without ``target``)."""
    from disa.verifiers import verifier_spec

    try:
        spec = verifier_spec(cfg.data.verifier)
    except (KeyError, ImportError):
        return []  # reported by _verifier_problem
    where = row_locations(path)
    out = []
    for r in records:
        columns = r.verifier_columns()
        for column in spec.columns:
            if columns.get(column) is None:
                out.append(f"{field}: {where.get(r.id, path)} (id {r.id!r}): no {column!r}, which verifier "
                           f"{cfg.data.verifier!r} needs; add it or set data.verifier")
        if spec.check_row is not None and not any(columns.get(c) is None for c in spec.columns):
            prompt = r.prompt if r.prompt is not None else r.messages[-1]["content"]
            problem = spec.check_row(prompt, columns)
            if problem:
                out.append(f"{field}: {where.get(r.id, path)} (id {r.id!r}): {problem} (verifier "
                           f"{cfg.data.verifier!r})")
    return out


def _verifier_problem(cfg: PipelineConfig) -> Optional[str]:
    from disa.verifiers import get_verifier

    try:
        get_verifier(cfg.data.verifier)
    except KeyError as e:
        return f"data.verifier: {e.args[0]}"
    except ImportError as e:
        extra = " (pip install 'disa[math]')" if cfg.data.verifier == "math" else ""
        return f"data.verifier: {cfg.data.verifier!r} cannot load: {e}{extra}"
    return None


def writable_problem(field: str, value: str) -> Optional[str]:
    """None if ``value`` is (or can be created as) a writable folder; probed without creating it."""
    path = Path(value).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{field}: cannot create {value!r}: {existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".disa-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{field}: cannot write to {value!r} ({existing}: {e.strerror or e}); choose another output_dir"
    return None


def problems(cfg: PipelineConfig, verb: str, checkpoint: Optional[str] = None) -> list[str]:
    """Every problem with ``verb``'s inputs, one line each (empty when all is well)."""
    from disa.data import DataError, load_prompts

    from disa.artifacts import missing_inputs

    out: list[str] = missing_inputs(cfg, verb, checkpoint)  # declared per verb in disa.artifacts.STAGE_IO
    if cfg.stage1_dir and verb in ("sample", "label", "fit-z"):
        out.append(f"stage1_dir: set to {cfg.stage1_dir!r}, so Stage 1-2 files are read from there; run "
                   f"`disa {verb}` on that run's config (without stage1_dir)")
    if cfg.stage1_dir and verb in ("train", "run") and not Path(cfg.stage1_dir).expanduser().is_dir():
        out.append(f"stage1_dir: {cfg.stage1_dir!r} is not a folder; give the output_dir of the run that holds "
                   "the Stage 1 files")
    generates = verb in ("sample", "train", "eval", "run")
    supervised = cfg.train.objective == "sft"
    if verb in ("train", "run"):
        from disa.training.logger import report_to_problem

        field = "train.sft.report_to" if supervised else "train.report_to"
        out += [p for p in [report_to_problem((cfg.train.sft if supervised else cfg.train).report_to, field)] if p]
        if not supervised:
            from disa.stages.train import settings_cannot_learn

            out += settings_cannot_learn(cfg)  # a run that cannot learn is refused, not run for hours
    if generates and not (verb == "train" and supervised):
        verifier = _verifier_problem(cfg)
        out += [verifier] if verifier else []
        if not verifier:
            from disa.stages.common import isolation_problem, verifier_names

            isolation = isolation_problem(cfg, verifier_names(cfg, verb))
            out += [isolation] if isolation else []
    model_problems = {}
    for name in _models_of(cfg, verb):
        field, value = model_setting(cfg, name)
        if field not in model_problems:
            model_problems[field] = check_model_folder(field, value)
    out += [p for p in model_problems.values() if p]
    for name in _prompt_fields(cfg, verb):
        field = f"data.{name}"
        path = getattr(cfg.data, name)
        if not path:
            out.append(f"{field}: not set; give a .jsonl, .parquet or `datasets` folder of prompts")
            continue
        try:
            records = load_prompts(path)
        except FileNotFoundError:
            out.append(f"{field}: prompt file {path!r} does not exist")
            continue
        except (DataError, ImportError) as e:
            out.append(f"{field}: {e}")
            continue
        too_long = []
        if generates:
            names = [n for n in _models_of(cfg, verb) if n in ("reference", "proposal", "policy")]
            too_long = long_prompts(cfg, records, path, names)
        if verb in ("sample", "eval", "run") or (verb == "train" and not supervised):
            skipped = {p.id for p in too_long}  # left out (skip), or already named (refuse): one line per row
            out += _capped(_missing_columns(cfg, [r for r in records if r.id not in skipped], path, field))
        if cfg.data.long_prompts == "refuse":
            out += _capped([f"{field}: {p.where} (id {p.id!r}): {'at least ' if p.at_least else ''}{p.tokens} prompt "
                            f"tokens + {new_tokens_budget(cfg)} new tokens ({new_tokens_field(cfg)}, the longest of any "
                            f"stage) exceed the context of {p.setting} ({p.limit}); shorten it, lower "
                            f"{new_tokens_field(cfg)}, or set data.long_prompts: skip" for p in too_long])
    out += [p for p in [writable_problem("output_dir", cfg.output_dir)] if p]
    return out


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_LISTED:
        return lines
    return lines[:MAX_LISTED] + [f"... and {len(lines) - MAX_LISTED} more like these"]


def check_inputs(cfg: PipelineConfig, verb: str, checkpoint: Optional[str] = None) -> None:
    """Raise one ``ConfigError`` listing every problem of ``verb``'s inputs."""
    found = problems(cfg, verb, checkpoint)
    if len(found) == 1:
        raise ConfigError(found[0])
    if found:
        raise ConfigError(f"{len(found)} problems with the inputs:\n  " + "\n  ".join(found))
