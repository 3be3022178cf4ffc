"""Evaluation: ``k`` samples per prompt from a policy, verified; Mean@k, unbiased pass@k, distinct correct answers.

Orchestration and I/O only: every number comes from :mod:`disa.metrics`. A sample counts as *correct* when its
reward is at least ``correct_threshold`` (1.0: the verifiers are binary, and the code verifier's partial credit
reaches 1 only when every test passes). Writes into ``out_dir``:

    eval.json              {"summary": {...}, "prompts": [one row per prompt]}
    eval.md                the summary and the per-prompt rows as markdown tables
    eval_samples.parquet   one row per sample (``EVAL_SCHEMA``): what every number above is computed from

Sampling: prompts are rendered with the policy's tokenizer (its chat template, as in Stages 1 and 3) and drawn in
batches of ``batch_size`` prompts; batch ``b`` uses seed ``seed + b``, so a rerun on the same hardware draws the same
samples.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pyarrow as pa
from tqdm.auto import tqdm

from disa import diversity, metrics
from disa.data import PromptRecord, render_prompt
from disa.generation import RolloutEngine
from disa.io import atomic_copy, atomic_write_parquet, atomic_write_text
from disa.stages import common
from disa.stages.common import stage
from disa.verifiers import repeat_columns, resolve_verifier, score

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
EVAL_SAMPLES = "eval_samples.parquet"

EVAL_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("reward", pa.float64()),
        ("correct", pa.bool_()),
        ("logprob", pa.float64()),
        ("response_len", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)

__all__ = ["run_evaluation", "summarize", "format_markdown", "EVAL_JSON", "EVAL_MD", "EVAL_SAMPLES", "EVAL_SCHEMA"]


def summarize(
    prompt_ids: Sequence[str],
    responses: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    k: int,
    pass_at: Sequence[int],
    correct_threshold: float = 1.0,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """Summary dict and per-prompt rows from each prompt's ``k`` responses and rewards (in sampling order).

    Summary keys: ``prompts``, ``k``, ``mean_at_k`` (Mean@k), ``pass_at`` (``{"1": pass@1, ...}``, unbiased),
    ``distinct_correct`` (mean number of distinct correct responses per prompt), ``mean_reward``, ``ci``
    (percentile bootstrap over prompts, one shared draw: ``{"mean_at_k": {"mean", "lo", "hi", "std"},
    "pass@1": ...}``; absent when ``bootstrap`` is 0) and ``pass_curve`` (mean pass@k for k = 1..k).
    """
    if not prompt_ids:
        raise ValueError("no prompts to evaluate")
    correct = [[r >= correct_threshold for r in row] for row in rewards]
    num_correct = [sum(row) for row in correct]
    num_samples = [len(row) for row in correct]
    per_mean = metrics.mean_at_k_per_problem([[float(c) for c in row] for row in correct], k)
    distinct = [metrics.distinct_correct(list(texts), row) for texts, row in zip(responses, correct)]
    rows = []
    for i, pid in enumerate(prompt_ids):
        rows.append({
            "prompt_id": pid,
            "num_samples": num_samples[i],
            "num_correct": num_correct[i],
            "mean_at_k": float(per_mean[i]),
            "pass_at": {str(kk): metrics.pass_at_k(num_samples[i], num_correct[i], kk) for kk in pass_at},
            "distinct_correct": distinct[i],
            "mean_reward": float(sum(rewards[i]) / len(rewards[i])),
        })
    summary = {
        "prompts": len(prompt_ids),
        "k": k,
        "mean_at_k": metrics.mean_at_k([[float(c) for c in row] for row in correct], k),
        "pass_at": {str(kk): metrics.mean_pass_at_k(num_samples, num_correct, kk) for kk in pass_at},
        "distinct_correct": float(sum(distinct) / len(distinct)),
        "mean_reward": float(sum(sum(r) for r in rewards) / sum(num_samples)),
        "correct_threshold": correct_threshold,
        "pass_curve": [float(v) for v in metrics.pass_at_k_curve(num_samples, num_correct)],
    }
    if bootstrap:
        idx = metrics.bootstrap_indices(len(prompt_ids), bootstrap, seed)
        summary["ci"] = {"mean_at_k": metrics.bootstrap_ci(per_mean, confidence=confidence, indices=idx)}
        for kk in pass_at:
            per = [row["pass_at"][str(kk)] for row in rows]
            summary["ci"][f"pass@{kk}"] = metrics.bootstrap_ci(per, confidence=confidence, indices=idx)
        summary["ci_confidence"], summary["ci_resamples"] = confidence, bootstrap
    return summary, rows


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_markdown(summary: dict, rows: list[dict]) -> str:
    """``eval.md``: a summary table and a per-prompt table."""
    k = summary["k"]
    pass_keys = list(summary["pass_at"])
    lines = ["# Evaluation", ""]
    info = [f"policy `{summary.get('policy', '?')}`", f"{summary['prompts']} prompts", f"k = {k} samples per prompt"]
    if "temperature" in summary:
        info.append(f"temperature {summary['temperature']}, top-p {summary['top_p']}, seed {summary['seed']}")
    ci = summary.get("ci", {})

    def interval(key: str) -> str:
        return f" [{ci[key]['lo']:.4f}, {ci[key]['hi']:.4f}] |" if key in ci else ""

    head = ["| metric | value | bootstrap interval |", "|---|---|---|"] if ci else ["| metric | value |", "|---|---|"]
    lines += [", ".join(info), "", *head,
              f"| Mean@{k} | {summary['mean_at_k']:.4f} |{interval('mean_at_k')}"]
    lines += [f"| pass@{kk} | {summary['pass_at'][kk]:.4f} |{interval(f'pass@{kk}')}" for kk in pass_keys]
    lines += [
        f"| distinct correct answers per prompt | {summary['distinct_correct']:.3f} |",
        f"| mean reward | {summary['mean_reward']:.4f} |",
    ]
    if "truncated_frac" in summary:
        lines.append(f"| truncated responses | {summary['truncated_frac']:.3f} |")
    div = summary.get("diversity", {})
    lines += [f"| {name} per prompt | {div[key]:.3f} |" for key, name in (
        ("distinct_answers", "distinct final answers"), ("distinct_solutions", "distinct normalised solutions"),
        ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU")) if key in div]
    if "judge" in summary:
        j = summary["judge"]
        lines.append(f"| LLM-judge diversity (1-5, {j['judge_model']}) | {j['mean']:.3f} ± {j['std']:.3f} "
                     f"({j['judged']} judged, {j['missing']} missing) |")
    if ci:
        lines += ["", f"Brackets: {100 * summary['ci_confidence']:.0f}% percentile bootstrap interval over prompts "
                  f"({summary['ci_resamples']} resamples)."]
    lines += ["", "## Per prompt", ""]
    header = ["prompt", "correct", f"Mean@{k}"] + [f"pass@{kk}" for kk in pass_keys] + ["distinct correct"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_md_cell(row["prompt_id"]), f"{row['num_correct']}/{row['num_samples']}", f"{row['mean_at_k']:.3f}"]
        cells += [f"{row['pass_at'][kk]:.3f}" for kk in pass_keys] + [str(row["distinct_correct"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_evaluation(
    prompts: Sequence[PromptRecord],
    *,
    generator: RolloutEngine,
    verifier: Union[str, Callable],
    out_dir: Union[str, os.PathLike],
    k: int,
    pass_at: Sequence[int] = (1,),
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Optional[Sequence[str]] = None,
    seed: int = 0,
    batch_size: int = 8,
    tokenizer=None,
    verifier_kwargs: Optional[dict] = None,
    correct_threshold: float = 1.0,
    policy: Optional[str] = None,
    progress: bool = True,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    judge: Optional[dict] = None,
    code_isolation: Optional[str] = None,
) -> dict:
    """Draw ``k`` samples per prompt with ``generator``, verify them, write ``eval.json`` / ``eval.md`` /
    ``eval_samples.parquet`` into ``out_dir`` and return the summary (see :func:`summarize`).

    ``tokenizer`` renders the prompts (default: the generator's). ``verifier``: a registry name or a reward
    function with TRL's signature. ``policy``: a label for the report (e.g. the checkpoint folder).
    ``code_isolation``: the sandbox a code verifier ran in ("bwrap"/"fallback"), recorded in the summary.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    bad = [kk for kk in pass_at if not (isinstance(kk, int) and 1 <= kk <= k)]
    if bad:
        raise ValueError(f"pass_at: every k must be an integer in [1, k={k}], got {list(pass_at)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    verifier_spec = resolve_verifier(verifier)
    verifier_name = verifier_spec.name
    tokenizer = tokenizer if tokenizer is not None else generator.tokenizer
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    texts = [render_prompt(r, tokenizer) for r in prompts]

    columns: dict[str, list] = {name: [] for name in EVAL_SCHEMA.names}
    responses: list[list[str]] = []
    rewards: list[list[float]] = []
    bar = tqdm(total=len(prompts), desc="eval", unit="prompt", disable=None if progress else True)
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            records, chunk = prompts[start : start + batch_size], texts[start : start + batch_size]
            groups = generator.generate(
                chunk, k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed + b
            )
            if len(groups) != len(chunk) or any(len(g) != k for g in groups):
                raise RuntimeError(f"generator returned {[len(g) for g in groups]} samples per prompt, expected {k}")
            flat = [s for g in groups for s in g]
            values = score(verifier_spec, [t for t in chunk for _ in range(k)], [s.text for s in flat],
                           repeat_columns(records, k), ids=[r.id for r in records for _ in range(k)],
                           verifier_kwargs=verifier_kwargs)
            for i, record in enumerate(records):
                group, group_rewards = groups[i], values[i * k : (i + 1) * k]
                responses.append([s.text for s in group])
                rewards.append(group_rewards)
                for j, (s, r) in enumerate(zip(group, group_rewards)):
                    for name, value in (
                        ("prompt_id", record.id), ("sample_idx", j), ("prompt", chunk[i]), ("response", s.text),
                        ("reward", r), ("correct", r >= correct_threshold), ("logprob", float(s.logprob)),
                        ("response_len", len(s.response_ids)), ("finish_reason", s.finish_reason),
                    ):
                        columns[name].append(value)
            bar.update(len(records))
            bar.set_postfix(correct=f"{sum(columns['correct']) / max(1, len(columns['correct'])):.3f}")
    finally:
        bar.close()

    summary, rows = summarize([r.id for r in prompts], responses, rewards, k, list(pass_at), correct_threshold,
                              bootstrap=bootstrap, confidence=confidence, seed=seed)
    n = len(columns["finish_reason"])
    summary.update({
        "samples": n,
        "truncated_frac": columns["finish_reason"].count("length") / n,
        "response_length_mean": sum(columns["response_len"]) / n,
        "policy": policy,
        "verifier": verifier_name,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "diversity": diversity.diversity_table(responses),
    })
    if code_isolation is not None:
        summary["code_isolation"] = code_isolation
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(pa.table(columns, schema=EVAL_SCHEMA), out_dir / EVAL_SAMPLES)

    def write_summary() -> None:
        atomic_write_text(out_dir / EVAL_JSON, json.dumps({"summary": summary, "prompts": rows}, indent=2) + "\n")
        atomic_write_text(out_dir / EVAL_MD, format_markdown(summary, rows))

    write_summary()
    if judge:  # after the files are written: a judge that fails never loses the evaluation
        summary["judge"] = run_judge(judge, texts, responses)
        write_summary()
    return summary


def run_judge(judge: dict, problems: Sequence[str], responses: Sequence[Sequence[str]]) -> dict:
    """``eval.judge`` ({base_url, model, api_key_env, ...}) -> the LLM-judge diversity scores (disa.judge)."""
    from disa.judge import JudgeConfig, judge_diversity

    options = dict(judge)
    key_env = options.pop("api_key_env", None)
    config = JudgeConfig(**options, api_key=os.environ.get(key_env) if key_env else None)
    return judge_diversity(config, problems, responses)


# ----------------------------------------------------------------------------------------------- the verb
def policy_folder(cfg, checkpoint: Optional[str]) -> Path:
    """The folder to evaluate: a ``checkpoint-<step>/policy`` (full weights or a LoRA adapter) or a model folder."""
    from disa.config import ConfigError
    from disa.training import find_checkpoint

    rd = common.run_dir(cfg)
    if checkpoint is None:
        ckpt = common.existing_checkpoint(rd.checkpoints)
        if ckpt is None:
            raise ConfigError(f"{rd.checkpoints}: no checkpoint-<step>/ found; run `disa train` first "
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


def load_policy(cfg, folder: Path):
    """(model, tokenizer) of ``folder``; a LoRA adapter is applied to the run's starting policy and merged."""
    from transformers import AutoTokenizer

    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tokenizer = common.load_model(cfg, common.model_path(cfg, "policy"))
        model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload().to(common.device(cfg)).eval()
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return model, tokenizer
    return common.load_model(cfg, str(folder))


def eval_name(cfg, folder: Path) -> str:
    """The ``eval/<name>/`` folder of an evaluated policy folder: ``checkpoint-<step>`` for a checkpoint of this
    run, ``<run>-checkpoint-<step>`` for another run's checkpoint, else the model folder's name."""
    from disa.training import CHECKPOINT_PREFIX

    folder = Path(folder).expanduser().resolve()
    name = folder.name
    if name == "policy" and folder.parent.name.startswith(CHECKPOINT_PREFIX):
        ckpt = folder.parent
        name = ckpt.name
        if ckpt.parent != common.run_dir(cfg).checkpoints.resolve():
            run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            name = f"{run.name}-{name}"
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return name or "model"


BENCHMARKS_JSON = "benchmarks.json"
BENCHMARKS_MD = "benchmarks.md"
SELECTION_JSON = "selection.json"


def _generator_for(cfg, folder: Path):
    """``eval.generation``'s engine sampling from ``folder``: an engine that loads folders itself (vLLM) gets a
    full-weights folder; otherwise (or for a LoRA adapter) the policy is loaded here and the engine follows it
    through ``sync_weights`` (a server engine then serves exactly the evaluated weights)."""
    from disa.generation.registry import engine_class

    e = cfg.eval
    if engine_class(e.generation.engine).loads_from_folder and not (folder / "adapter_config.json").is_file():
        return common.generator(cfg, str(folder), e.batch_size, consumer="eval", seed=e.seed), None
    model, tokenizer = load_policy(cfg, folder)
    engine = common.generator(cfg, model, e.batch_size, consumer="eval", tokenizer=tokenizer, seed=e.seed,
                              progress=False)
    engine.sync_weights(model)
    return engine, model


def evaluate_sets(cfg, folder: Path, sets: Sequence[tuple]) -> list[dict]:
    """Load ``folder`` once and run :func:`run_evaluation` on each ``(records, verifier, verifier_kwargs, out_dir)``."""
    e = cfg.eval
    isolation = [common.code_isolation(cfg, [verifier], "eval") for _, verifier, _, _ in sets]
    generator, model = _generator_for(cfg, folder)
    try:
        return [run_evaluation(
            records, generator=generator, verifier=verifier, out_dir=out_dir, k=e.k, pass_at=list(e.pass_at),
            max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, stop=e.stop, seed=e.seed,
            batch_size=e.batch_size, verifier_kwargs=kwargs, policy=str(folder), bootstrap=e.bootstrap,
            confidence=e.confidence, progress=False, judge=e.judge or None, code_isolation=level,
        ) for (records, verifier, kwargs, out_dir), level in zip(sets, isolation)]
    finally:
        del generator, model
        common.free()


def benchmark_specs(cfg) -> list[tuple[str, Optional[str], Optional[int]]]:
    """``(name, path, limit)`` of each ``eval.benchmarks`` entry (a name, or ``{name, path, limit}``)."""
    from disa.benchmarks import BENCHMARKS
    from disa.config import ConfigError

    specs = []
    for i, entry in enumerate(cfg.eval.benchmarks):
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or set(entry) - {"name", "path", "limit"}:
            raise ConfigError(f"eval.benchmarks[{i}]: expected a name or {{name, path, limit}}, got {entry!r}")
        if entry["name"] not in BENCHMARKS:
            raise ConfigError(f"eval.benchmarks[{i}]: unknown benchmark {entry['name']!r}; known: {sorted(BENCHMARKS)}")
        specs.append((entry["name"], entry.get("path"), entry.get("limit")))
    return specs


def benchmark_table(summaries: dict[str, dict]) -> dict:
    """Per-benchmark Mean@k / pass@k with their intervals, and the unweighted average over benchmarks."""
    first = next(iter(summaries.values()))
    keys = ["mean_at_k"] + [f"pass@{kk}" for kk in first["pass_at"]]

    def value(s: dict, key: str) -> float:
        return s["mean_at_k"] if key == "mean_at_k" else s["pass_at"][key.split("@")[1]]

    rows = {name: {key: {"value": value(s, key), **({"lo": s["ci"][key]["lo"], "hi": s["ci"][key]["hi"]}
                                                    if "ci" in s else {})} for key in keys} | {"prompts": s["prompts"]}
            for name, s in summaries.items()}
    average = {key: metrics.macro_average({n: value(s, key) for n, s in summaries.items()}) for key in keys}
    table = {"k": first["k"], "benchmarks": rows, "average": average}
    judged = {name: s["judge"] for name, s in summaries.items() if "judge" in s}
    if judged:  # App. D.5: one mean and std over the problems of every judged benchmark (the paper: AIME 24 + 25)
        from disa.judge import pool_judge

        table["judge"] = {k: v for k, v in pool_judge(judged).items() if k != "scores"}
    return table


def format_benchmarks(table: dict) -> str:
    keys = list(table["average"])
    names = [f"Mean@{table['k']}" if key == "mean_at_k" else key for key in keys]
    lines = ["# Benchmarks", "", "| benchmark | problems | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(keys)]
    for bench, row in table["benchmarks"].items():
        cells = [f"{row[k]['value']:.4f}" + (f" [{row[k]['lo']:.3f}, {row[k]['hi']:.3f}]" if "lo" in row[k] else "")
                 for k in keys]
        lines.append(f"| {bench} | {row['prompts']} | " + " | ".join(cells) + " |")
    lines.append("| **average** | | " + " | ".join(f"{table['average'][k]:.4f}" for k in keys) + " |")
    if "judge" in table:
        j = table["judge"]
        lines += ["", f"LLM-judge diversity (1-5, {j['judge_model']}) over the problems of {', '.join(j['sets'])}: "
                  f"{j['mean']:.3f} ± {j['std']:.3f} ({j['judged']} judged, {j['missing']} missing)"]
    return "\n".join(lines) + "\n"


def select_policy(cfg) -> Path:
    """App. D.1: score every checkpoint of the run by Mean@k on a seeded held-out slice of the training prompts
    (``eval.select_holdout`` prompts, the same slice and rule for every method) and return the best one's policy."""
    from disa.config import ConfigError
    from disa.training.checkpoints import checkpoint_step

    rd = common.run_dir(cfg)
    ckpts = sorted((p for p in rd.checkpoints.glob("checkpoint-*") if checkpoint_step(p) is not None),
                   key=checkpoint_step) if rd.checkpoints.is_dir() else []
    if not ckpts:
        raise ConfigError(f"{rd.checkpoints}: no checkpoint-<step>/ to select from; run `disa train` first")
    records = common.prompts(cfg, "prompts")
    try:
        keep = set(metrics.held_out_slice([r.id for r in records], cfg.eval.select_holdout, seed=cfg.eval.seed))
    except ValueError as err:
        raise ConfigError(f"eval.select_holdout: {err}") from None
    held_out = [r for r in records if r.id in keep]
    scores = {}
    for ckpt in ckpts:
        [summary] = evaluate_sets(cfg, ckpt / "policy", [(held_out, cfg.data.verifier,
                                                          common.verifier_kwargs(cfg, cfg.data.verifier),
                                                          rd.eval / "selection" / ckpt.name)])
        scores[checkpoint_step(ckpt)] = summary["mean_at_k"]
    best = metrics.select_checkpoint(scores)
    chosen = next(c for c in ckpts if checkpoint_step(c) == best)
    atomic_write_text(rd.eval / "selection" / SELECTION_JSON, json.dumps(
        {"rule": "highest held-out Mean@k, ties to the earliest step", "held_out_ids": sorted(keep),
         "scores": {str(s): v for s, v in scores.items()}, "selected_step": best, "selected": str(chosen)}, indent=2) + "\n")
    common.say("eval", f"checkpoint selection on {len(held_out)} held-out training prompts: "
               + ", ".join(f"step {s}: {v:.4f}" for s, v in scores.items()) + f" -> {chosen.name}")
    return chosen / "policy"


def record_eval_lineage(cfg, rd, folder: Path, out_dir: Path, sets) -> None:
    """``eval/<policy>/lineage.json``: which policy (path relative to the run folder, weights digest) and which
    prompts (digest) these numbers are of, and the sampling settings."""
    from disa.artifacts import Lineage, prompts_digest, relative
    from disa.io import atomic_write_json
    from disa.run_dir import model_fingerprint

    policy = model_fingerprint(folder)
    policy["path"] = relative(folder, rd.root)
    fields = {"policy": policy, "eval": cfg.eval.to_dict()}
    for records, _, _, where in sets:
        fields[f"prompts {relative(where, rd.root)}"] = prompts_digest(records)
    atomic_write_json(out_dir / "lineage.json", Lineage(fields).to_dict())


@stage("eval")
def run(cfg, checkpoint: Optional[str] = None) -> dict:
    """``disa eval``: ``eval.k`` samples per eval prompt -> Mean@k, pass@k (bootstrap intervals), distinct correct ->
    ``eval.json``/``.md`` and ``eval_samples.parquet`` in ``eval/<policy name>/`` (evaluating another checkpoint keeps
    this one), copied to ``output_dir`` as the latest evaluation. ``eval.benchmarks`` adds one sub-folder per
    benchmark and ``benchmarks.json``/``.md`` with the average; ``eval.select_holdout`` picks the checkpoint first."""
    from disa.benchmarks import BENCHMARKS, load_benchmark

    rd = common.run_dir(cfg)
    e = cfg.eval
    specs = benchmark_specs(cfg)
    rd.ensure_writable()
    if checkpoint is None and e.select_holdout:
        folder = select_policy(cfg)
    else:
        folder = policy_folder(cfg, checkpoint)
    out_dir = rd.eval / eval_name(cfg, folder)
    main_set = not specs or cfg.data.eval_prompts is not None
    sets = []
    if main_set:
        common.verifier(cfg)
        sets.append((common.prompts(cfg, "eval_prompts"), cfg.data.verifier,
                     common.verifier_kwargs(cfg, cfg.data.verifier), out_dir))
    for name, path, limit in specs:
        sets.append((load_benchmark(name, path, limit), BENCHMARKS[name].verifier,
                     common.verifier_kwargs(cfg, BENCHMARKS[name].verifier), out_dir / name))
    summaries = evaluate_sets(cfg, folder, sets)
    record_eval_lineage(cfg, rd, folder, out_dir, sets)
    result = {"eval_dir": str(out_dir)}
    if specs:
        table = benchmark_table({name: s for (name, _, _), s in zip(specs, summaries[int(main_set):])})
        atomic_write_text(out_dir / BENCHMARKS_JSON, json.dumps(table, indent=2) + "\n")
        atomic_write_text(out_dir / BENCHMARKS_MD, format_benchmarks(table))
        common.say("eval", f"{len(specs)} benchmarks, average Mean@{e.k} {table['average']['mean_at_k']:.4f} -> "
                   f"{out_dir / BENCHMARKS_MD}")
        result["benchmarks"] = table
    if not main_set:
        return result
    summary = summaries[0]
    for name in (EVAL_SAMPLES, EVAL_JSON, EVAL_MD):  # the latest evaluation, also at the top of the run
        atomic_copy(out_dir / name, rd.root / name)
    passes = ", ".join(f"pass@{kk} {v:.4f}" for kk, v in summary["pass_at"].items())
    common.say("eval", f"{summary['prompts']} prompts x k={e.k} from {folder}: Mean@{e.k} {summary['mean_at_k']:.4f}, "
               f"{passes}, distinct correct {summary['distinct_correct']:.3f} per prompt -> {out_dir / EVAL_JSON}, "
               f"{out_dir / EVAL_MD} (latest also in {rd.root / EVAL_JSON})")
    return {**summary, **result}
