"""Stage 1a: draw ``N`` proposal responses per prompt, score them, write resumable Parquet shards.

Output layout (``out_dir``)::

    meta.json                      generation settings + a hash of the prompt ids (guards resumes)
    samples/shard-00000.parquet    prompts [0, shard_size), every one with its n samples
    samples/shard-00001.parquet    ...

Columns: ``prompt_id, sample_idx, prompt, response, reward, logp_ref, logp_q, prompt_len, response_len,
finish_reason``. ``prompt`` is the text the proposal was conditioned on (its chat template applied);
``logp_ref = log pi_ref(y|x)`` and ``logp_q = log q(y|x)`` are sequence log-probs (sums over response
tokens, EOS included when the response ended with it); ``prompt_len`` / ``response_len`` count pi_ref's
tokens, the ones the policy will see in Stage 3.

Resuming: a shard covers a fixed slice of the prompt list and is written to a temporary file then moved
into place with ``os.replace`` (atomic on POSIX), so a shard file either holds all its rows or does not
exist. A re-run skips existing shards and redoes the rest; each shard draws with seed ``seed + shard index``,
so a redone shard is the same draw on the same hardware. ``meta.json`` refuses a resume with different
settings or prompts, which would otherwise mix two experiments in one folder.

Different tokenizers: when pi_ref and q share a vocabulary and render the prompt to the same text, pi_ref
scores the proposal's own token ids. Otherwise the text is carried over: the prompt is rendered with
pi_ref's chat template and the response text re-tokenised with pi_ref's tokenizer (plus pi_ref's EOS if
the response ended with EOS), i.e. ``log pi_ref`` is of the same *string*, the only meaning the importance
weight ``pi_ref(y|x) / q(y|x)`` can have across vocabularies.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from typing import Callable, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from disa.data import PromptRecord, render_prompt
from disa.io import atomic_write_parquet, atomic_write_text
from disa.generation import RolloutEngine, Sample, encode_prompt, encode_response
from disa.scoring import pad_token_id, score_responses
from disa.config import ConfigError
from disa.stages import common
from disa.stages.common import stage
from disa.verifiers import VerifierSpec, repeat_columns, resolve_verifier, score

SAMPLES_SUBDIR = "samples"


class ResumeMismatch(ValueError):
    """A resume into a folder whose ``meta.json`` records other settings."""


META_FILE = "meta.json"
FORMAT_VERSION = 1

SAMPLE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("reward", pa.float64()),
        ("logp_ref", pa.float64()),
        ("logp_q", pa.float64()),
        ("prompt_len", pa.int32()),
        ("response_len", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)
# settings that must match between a run and its resume
RESUME_KEYS = (
    "format_version", "n", "shard_size", "max_new_tokens", "temperature", "top_p", "stop", "seed", "verifier",
    "num_prompts", "prompt_ids_sha256",
)


def shard_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, SAMPLES_SUBDIR, f"shard-{index:05d}.parquet")


def list_shards(samples_dir: str) -> list[str]:
    """Finished shard files in ``samples_dir`` (a run's ``out_dir`` or its ``samples/`` folder), sorted."""
    if os.path.isdir(os.path.join(samples_dir, SAMPLES_SUBDIR)):
        samples_dir = os.path.join(samples_dir, SAMPLES_SUBDIR)
    return sorted(glob.glob(os.path.join(samples_dir, "shard-*.parquet")))


def prompt_ids_digest(records: Sequence[PromptRecord]) -> str:
    return hashlib.sha256("\n".join(r.id for r in records).encode("utf-8")).hexdigest()


def _check_or_write_meta(out_dir: str, meta: dict) -> None:
    path = os.path.join(out_dir, META_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        diff = [k for k in RESUME_KEYS if old.get(k) != meta.get(k)]
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in diff)
            raise ResumeMismatch(
                f"{path} was written with different settings ({details}); use a new out_dir or delete it"
            )
        return
    atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True))


def _same_tokenization(tok_a, tok_b) -> bool:
    return tok_a is tok_b or (
        type(tok_a) is type(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()
        and getattr(tok_a, "chat_template", None) == getattr(tok_b, "chat_template", None)
        and tok_a.bos_token == tok_b.bos_token and tok_a.eos_token_id == tok_b.eos_token_id
    )


def sample_shard(
    records: Sequence[PromptRecord],
    *,
    generator: RolloutEngine,
    n: int,
    verifier: VerifierSpec,
    ref_model,
    ref_tokenizer,
    proposal_model=None,
    proposal_tokenizer=None,
    gen_kwargs: dict,
    seed: int,
    score_batch_size: int = 8,
    verifier_kwargs: Optional[dict] = None,
) -> pa.Table:
    """Generate, verify and score one shard's prompts; returns its rows as a table (``SAMPLE_SCHEMA``)."""
    proposal_tokenizer = proposal_tokenizer or generator.tokenizer
    prompts_q = [render_prompt(r, proposal_tokenizer) for r in records]
    groups = generator.generate(prompts_q, n, seed=seed, **gen_kwargs)
    flat: list[Sample] = [s for g in groups for s in g]
    if any(len(g) != n for g in groups):
        raise RuntimeError(f"generator returned {[len(g) for g in groups]} samples per prompt, expected {n}")
    prompts_flat = [p for p in prompts_q for _ in range(n)]
    texts = [s.text for s in flat]

    rewards = score(verifier, prompts_flat, texts, repeat_columns(records, n),
                    ids=[r.id for r in records for _ in range(n)], verifier_kwargs=verifier_kwargs)

    if proposal_model is not None:
        logp_q = score_responses(
            proposal_model, [s.prompt_ids for s in flat], [s.response_ids for s in flat],
            pad_id=pad_token_id(proposal_tokenizer), batch_size=score_batch_size,
        )
    else:
        logp_q = [float(s.logprob) for s in flat]

    if _same_tokenization(ref_tokenizer, proposal_tokenizer):
        ref_prompt_ids = [s.prompt_ids for s in flat]
        ref_response_ids = [s.response_ids for s in flat]
    else:
        rendered = [encode_prompt(ref_tokenizer, render_prompt(r, ref_tokenizer)) for r in records]
        ref_prompt_ids = [rendered[i // n] for i in range(len(flat))]
        ref_response_ids = [
            encode_response(ref_tokenizer, s.text, ends_with_eos=s.finish_reason == "eos") for s in flat
        ]
    logp_ref = score_responses(
        ref_model, ref_prompt_ids, ref_response_ids, pad_id=pad_token_id(ref_tokenizer), batch_size=score_batch_size
    )

    columns = {
        "prompt_id": [r.id for r in records for _ in range(n)],
        "sample_idx": [j for _ in records for j in range(n)],
        "prompt": prompts_flat,
        "response": texts,
        "reward": rewards,
        "logp_ref": logp_ref,
        "logp_q": logp_q,
        "prompt_len": [len(p) for p in ref_prompt_ids],
        "response_len": [len(r) for r in ref_response_ids],
        "finish_reason": [s.finish_reason for s in flat],
    }
    return pa.table(columns, schema=SAMPLE_SCHEMA)


def check_prompt_list(prompts: Sequence[PromptRecord], shard_size: int, n: int) -> None:
    """Refuse an empty prompt list, a bad shard size or n, and duplicate prompt ids (naming the positions)."""
    if not prompts:
        raise ValueError("prompts is empty")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    seen: dict[str, int] = {}
    for i, r in enumerate(prompts):
        if r.id in seen:
            raise ValueError(f"duplicate prompt id {r.id!r} at positions {seen[r.id]} and {i}")
        seen[r.id] = i


def prepare_out_dir(out_dir: str, meta: dict) -> None:
    """Create ``samples/``, write or check ``meta.json`` (the resume guard) and drop half-written shards."""
    os.makedirs(os.path.join(out_dir, SAMPLES_SUBDIR), exist_ok=True)
    _check_or_write_meta(out_dir, meta)
    for stale in glob.glob(os.path.join(out_dir, SAMPLES_SUBDIR, "*.tmp*")):
        os.remove(stale)  # a shard that a killed run left half-written


def plan_sampling(prompts: Sequence[PromptRecord], *, out_dir: str, n: int, shard_size: int, seed: int,
                  verifier_name: str, max_new_tokens: int, temperature: float, top_p: float,
                  stop: Optional[Sequence[str]], extra_meta: dict) -> tuple[dict, int, list, int, int]:
    """What every Stage 1 driver (in-process or Ray) does before it samples, once ``check_prompt_list`` passed:
    write or check ``meta.json`` (the resume guard) and find the shards still to do.

    Returns ``(gen_kwargs, num_shards, pending [(k, records)], skipped, rows already written)``."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    gen_kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop)
    meta = {
        "format_version": FORMAT_VERSION, "n": n, "shard_size": shard_size, "seed": seed, "verifier": verifier_name,
        "num_prompts": len(prompts), "prompt_ids_sha256": prompt_ids_digest(prompts), **gen_kwargs, **extra_meta,
    }
    prepare_out_dir(out_dir, meta)
    num_shards = math.ceil(len(prompts) / shard_size)
    pending, skipped, rows = [], 0, 0
    for k in range(num_shards):
        records = list(prompts[k * shard_size : (k + 1) * shard_size])
        existing = finished_rows(shard_path(out_dir, k), len(records) * n)
        if existing is None:
            pending.append((k, records))
        else:
            skipped += 1
            rows += existing
    return gen_kwargs, num_shards, pending, skipped, rows


def finished_rows(path: str, expected: int) -> Optional[int]:
    """Rows of a finished shard file, None when it does not exist; a wrong row count is an error."""
    if not os.path.exists(path):
        return None
    existing = pq.read_metadata(path).num_rows
    if existing != expected:
        raise ValueError(f"{path} holds {existing} rows, expected {expected}; delete it to redo")
    return existing


def _load_if_path(model, tokenizer):
    if isinstance(model, str):
        from disa.generation.hf import load_model_and_tokenizer

        loaded, loaded_tok = load_model_and_tokenizer(model)
        return loaded, tokenizer or loaded_tok
    return model, tokenizer


def run_sampling(
    prompts: Sequence[PromptRecord],
    *,
    generator: RolloutEngine,
    n: int,
    out_dir: str,
    verifier: Union[str, Callable],
    ref_model,
    ref_tokenizer=None,
    proposal_model=None,
    proposal_tokenizer=None,
    shard_size: int = 64,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Optional[Sequence[str]] = None,
    seed: int = 0,
    score_batch_size: int = 8,
    verifier_kwargs: Optional[dict] = None,
    progress: bool = True,
    extra_meta: Optional[dict] = None,
) -> dict:
    """Stage 1 sampling job (see the module docstring for the files and the resume rules).

    ``generator`` draws from the proposal q. ``proposal_model`` (optional) re-scores ``log q`` with
    transformers; without it ``log q`` is the generator's own ``Sample.logprob`` (the same number for the
    ``hf`` back-end). ``ref_model`` / ``proposal_model`` may be local paths. ``verifier`` is a registry name
    or a reward function with TRL's signature. Returns ``{"shards", "written", "skipped", "rows"}``.
    """
    check_prompt_list(prompts, shard_size, n)
    ref_model, ref_tokenizer = _load_if_path(ref_model, ref_tokenizer)
    if ref_tokenizer is None:
        raise ValueError("ref_tokenizer is required when ref_model is a model object")
    proposal_model, proposal_tokenizer = _load_if_path(proposal_model, proposal_tokenizer)
    verifier_spec = resolve_verifier(verifier)
    verifier_name = verifier_spec.name
    model_names = {
        "generator": type(generator).__name__,
        "ref_model": getattr(getattr(ref_model, "config", None), "_name_or_path", None),
        "proposal_model": getattr(getattr(proposal_model, "config", None), "_name_or_path", None),
    }
    gen_kwargs, num_shards, pending, skipped, rows = plan_sampling(
        prompts, out_dir=out_dir, n=n, shard_size=shard_size, seed=seed, verifier_name=verifier_name,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop,
        extra_meta={**model_names, **(extra_meta or {})},
    )
    written = 0
    for k, records in tqdm(pending, desc="sample shards", unit="shard", disable=None if progress else True):
        table = sample_shard(
            records, generator=generator, n=n, verifier=verifier_spec,
            ref_model=ref_model, ref_tokenizer=ref_tokenizer, proposal_model=proposal_model,
            proposal_tokenizer=proposal_tokenizer, gen_kwargs=gen_kwargs, seed=seed + k,
            score_batch_size=score_batch_size, verifier_kwargs=verifier_kwargs,
        )
        atomic_write_parquet(table, shard_path(out_dir, k))
        written += 1
        rows += table.num_rows
    return {"shards": num_shards, "written": written, "skipped": skipped, "rows": rows}


def proposal_warnings(temperature: float, top_p: float) -> list[str]:
    """What the proposal settings do to the Stage 1 estimator (eq. 7), for ``disa sample`` to print."""
    out = []
    if top_p < 1:
        out.append(f"top_p={top_p} < 1: the proposal cannot produce responses outside each step's nucleus, so "
                   "q(y|x) = 0 where pi_ref(y|x) > 0 and eq. 7's absolute-continuity condition fails: the label "
                   "misses that part of Z(x) (biased low). top_p is recorded in meta.json.")
    if temperature != 1 or top_p < 1:
        out.append("logp_q is the model's untempered, untruncated log-prob (the generation contract), not the "
                   "log-prob of the distribution sampled with these settings: the importance weights assume "
                   "q = the model at temperature 1. Keep temperature=1, top_p=1 for exact labels.")
    return out


# ----------------------------------------------------------------------------------------------- the verb
@stage("sample")
def run(cfg) -> dict:
    """``disa sample``: N proposal samples per prompt, verified and re-scored -> ``samples/shard-*.parquet``."""
    from disa.generation.hf import HFGenerator
    from disa.run_dir import model_fingerprint

    rd = common.run_dir(cfg)
    records = common.prompts(cfg)
    common.verifier(cfg)  # an unknown name fails here, before any model is loaded
    ref_path, proposal_path = common.model_path(cfg, "reference"), common.model_path(cfg, "proposal")
    rd.ensure_writable()
    s = cfg.sample
    for line in proposal_warnings(s.temperature, s.top_p):
        common.say("sample", "warning: " + line)
    if s.executor == "ray":
        from disa.stages.sample_ray import run_with_config

        return run_with_config(cfg, rd, records, ref_path, proposal_path)
    generator = common.generator(cfg, proposal_path, s.batch_size, consumer="sample", seed=s.seed)
    if proposal_path == ref_path and isinstance(generator, HFGenerator):
        ref_model, ref_tokenizer = generator.model, generator.tokenizer  # plain Monte Carlo: one copy
    else:
        ref_model, ref_tokenizer = common.load_model(cfg, ref_path)
    fingerprints = {"reference_fingerprint": model_fingerprint(ref_path),
                    "proposal_fingerprint": model_fingerprint(proposal_path)}
    try:
        result = run_sampling(
            records, generator=generator, n=s.n, out_dir=str(rd.root), verifier=cfg.data.verifier,
            ref_model=ref_model, ref_tokenizer=ref_tokenizer, shard_size=s.shard_size, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=s.top_p, stop=s.stop, seed=s.seed, score_batch_size=s.batch_size,
            verifier_kwargs=cfg.data.verifier_kwargs, extra_meta=fingerprints,
        )
    except ResumeMismatch as e:  # a resume with other settings: a config problem, not a crash
        raise ConfigError(str(e)) from None
    finally:
        del generator, ref_model
        common.free()
    rewards = [v for f in list_shards(str(rd.samples)) for v in pq.read_table(f, columns=["reward"]).column(0).to_pylist()]
    result["mean_reward"] = sum(rewards) / len(rewards)
    common.say("sample", f"{result['rows']} rows ({len(records)} prompts x n={s.n}) in {result['shards']} shard(s) "
               f"({result['written']} written, {result['skipped']} already there) -> {rd.samples}; "
               f"mean reward {result['mean_reward']:.4f}")
    return result
