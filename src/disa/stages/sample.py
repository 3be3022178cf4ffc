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
import logging
import math
import os
from typing import Callable, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from disa.data import PromptRecord, render_prompt
from disa.io import atomic_write_parquet, atomic_write_text
from disa.generation import RolloutEngine, Sample, encode_prompt, encode_response, pad_token_id
from disa.scoring import score_responses, score_sampled_responses
from disa.config import ConfigError
from disa.stages import common
from disa.stages.common import stage
from disa.verifiers import VerifierSpec, repeat_columns, resolve_verifier, score

SAMPLES_SUBDIR = "samples"


class ResumeMismatch(ValueError):
    """A resume into a folder whose ``meta.json`` records other settings."""


META_FILE = "meta.json"
# meta.json records which distribution the logp_q column is of: the one sampled from (temperature, top-k,
# top-p applied), so `disa label` can refuse an older run whose logp_q at temperature != 1 was the model's
LOGP_Q_META_KEY = "logp_q_distribution"
LOGP_Q_SAMPLED = "sampled"
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
# settings that must match between a run and its resume, with the config field each comes from
RESUME_KEYS = {
    "format_version": "format_version", "n": "sample.n", "shard_size": "sample.shard_size",
    "max_new_tokens": "sample.max_new_tokens", "temperature": "sample.temperature", "top_p": "sample.top_p",
    "stop": "sample.stop", "seed": "sample.seed", "verifier": "data.verifier", "num_prompts": "data.prompts (count)",
    "prompt_ids_sha256": "data.prompts (ids)", "proposal_counts": "sample.reference_share",
}
# what the samples were made from; compared when the recorded meta.json has them (older runs may not)
LINEAGE_KEYS = {
    "prompts_sha256": "data.prompts (prompt texts and verifier columns)", "reference_fingerprint": "models.reference",
    "proposal_fingerprint": "models.proposal", "dtype": "models.dtype", "backend": "sample.generation.engine",
}


def shard_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, SAMPLES_SUBDIR, f"shard-{index:05d}.parquet")


def list_shards(samples_dir: str) -> list[str]:
    """Finished shard files in ``samples_dir`` (a run's ``out_dir`` or its ``samples/`` folder), sorted."""
    if os.path.isdir(os.path.join(samples_dir, SAMPLES_SUBDIR)):
        samples_dir = os.path.join(samples_dir, SAMPLES_SUBDIR)
    return sorted(glob.glob(os.path.join(samples_dir, "shard-*.parquet")))


def prompt_ids_digest(records: Sequence[PromptRecord]) -> str:
    return hashlib.sha256("\n".join(r.id for r in records).encode("utf-8")).hexdigest()


def resume_differences(old: dict, new: dict) -> list[str]:
    """``field: recorded -> now`` for every setting or input that differs between ``meta.json`` and this run."""
    from disa.artifacts import _short

    out = [f"{field}: recorded {old.get(k)!r}, now {new.get(k)!r}" for k, field in RESUME_KEYS.items()
           if k in new and old.get(k) != new.get(k)]
    for k, field in LINEAGE_KEYS.items():
        a, b = old.get(k), new.get(k)
        if a is None or b is None:
            continue
        same = a.get("digest") == b.get("digest") if isinstance(a, dict) and isinstance(b, dict) else a == b
        if not same:
            out.append(f"{field}: recorded {_short(a)}, now {_short(b)}")
    return out


def check_meta(out_dir: str, meta: dict) -> Optional[dict]:
    """Refuse a resume into ``out_dir`` whose ``meta.json`` records other settings or inputs (naming each field and
    both values); returns the recorded meta, None when there is none."""
    from disa.artifacts import read_json

    path = os.path.join(out_dir, META_FILE)
    if not os.path.exists(path):
        return None
    old = read_json(path, "sample")
    if not isinstance(old, dict):
        raise ConfigError(f"{path}: not a JSON object; delete it (and samples/) to sample again")
    diff = resume_differences(old, meta)
    if diff:
        raise ResumeMismatch(f"{path} was written with other settings or inputs ({'; '.join(diff)}); resuming would "
                             "mix two experiments: use a new output_dir or delete meta.json and samples/")
    return old


def _check_or_write_meta(out_dir: str, meta: dict) -> None:
    if check_meta(out_dir, meta) is None:
        atomic_write_text(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=2, sort_keys=True))


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
    logprobs_are_sampled: bool = False,
) -> pa.Table:
    """Generate, verify and score one shard's prompts; returns its rows as a table (``SAMPLE_SCHEMA``).

    ``logprobs_are_sampled``: the generator's ``Sample.logprob`` is already the log-prob of the distribution
    it sampled from (vLLM with ``logprobs_mode="processed_logprobs"``); see :func:`proposal_logprobs`."""
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

    logp_q = proposal_logprobs(flat, gen_kwargs=gen_kwargs, proposal_model=proposal_model,
                               proposal_tokenizer=proposal_tokenizer, logprobs_are_sampled=logprobs_are_sampled,
                               batch_size=score_batch_size)

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


def is_warped(gen_kwargs: dict) -> bool:
    """Whether these sampling settings draw from something other than the model at temperature 1."""
    return float(gen_kwargs.get("temperature", 1.0)) != 1.0 or float(gen_kwargs.get("top_p", 1.0)) < 1.0 \
        or int(gen_kwargs.get("top_k", 0) or 0) > 0


def proposal_logprobs(flat: Sequence[Sample], *, gen_kwargs: dict, proposal_model=None, proposal_tokenizer=None,
                      logprobs_are_sampled: bool = False, batch_size: int = 8) -> list[float]:
    """``log q(y|x)`` of each sample under the distribution it was drawn from: the importance weight's ``q``.

    At temperature 1 without truncation that is the model's own log-prob (the generator's ``Sample.logprob``,
    or ``proposal_model``'s re-scoring). Otherwise the model's log-prob is another distribution's, so it comes
    from ``proposal_model`` re-scored through the same warpers (:func:`disa.scoring.score_sampled_responses`)
    or, with ``logprobs_are_sampled``, from the generator itself; anything else is refused."""
    if proposal_model is not None:
        return score_sampled_responses(
            proposal_model, [s.prompt_ids for s in flat], [s.response_ids for s in flat],
            pad_id=pad_token_id(proposal_tokenizer), temperature=float(gen_kwargs.get("temperature", 1.0)),
            top_p=float(gen_kwargs.get("top_p", 1.0)), top_k=int(gen_kwargs.get("top_k", 0) or 0),
            batch_size=batch_size,
        )
    if is_warped(gen_kwargs) and not logprobs_are_sampled:
        raise ValueError(
            f"sampling at temperature={gen_kwargs.get('temperature')}, top_p={gen_kwargs.get('top_p')}: the "
            "generator's log-probs are the untempered model's, not those of the distribution sampled from; pass "
            "proposal_model (re-scored with the same warpers) or a generator returning the sampled distribution's "
            "log-probs (vLLM logprobs_mode='processed_logprobs', logprobs_are_sampled=True)")
    return [float(s.logprob) for s in flat]


# --------------------------------------------------------------------------- mixture sampling: a pi_ref share
REFERENCE_SHARE_META_KEY = "proposal_counts"  # meta.json: [n from q, n from pi_ref] per prompt
REFERENCE_SEED_OFFSET = 1_000_003  # pi_ref's draws of shard k use another seed than q's
PROPOSAL_COLUMN = "proposal"  # "q" or "reference": which distribution drew the row (read by disa label)


def mixture_counts(n: int, reference_share: float) -> tuple[int, int]:
    """``(n from q, n from pi_ref)`` per prompt for a ``reference_share`` in ``[0, 1)`` (largest remainder);
    a share that leaves either side empty is refused rather than silently dropped."""
    if not (isinstance(reference_share, (int, float)) and 0 <= reference_share < 1):
        raise ValueError(f"reference_share must be in [0, 1), got {reference_share!r}")
    if reference_share == 0:
        return n, 0
    from disa.label_estimators import split_budget

    n_q, n_ref = split_budget(n, [1 - reference_share, reference_share])
    if n_q == 0 or n_ref == 0:
        raise ValueError(f"reference_share={reference_share} of n={n} samples rounds to {n_ref} from pi_ref and {n_q} "
                         "from q; choose a share that leaves at least one sample on each side")
    return n_q, n_ref


def add_reference_rows(q_table: pa.Table, records: Sequence[PromptRecord], *, reference_generator: RolloutEngine,
                       n_ref: int, verifier: VerifierSpec, ref_model, ref_tokenizer, proposal_model,
                       proposal_tokenizer, gen_kwargs: dict, seed: int, score_batch_size: int = 8,
                       verifier_kwargs: Optional[dict] = None) -> pa.Table:
    """``q_table`` plus ``n_ref`` rows per prompt drawn from ``pi_ref`` at temperature 1 without truncation, both
    tagged in a ``proposal`` column (``q`` / ``reference``); the new rows' ``sample_idx`` follow q's.

    Every row needs both log-probs for the mixture weight ``pi_ref / (s_q q + s_ref pi_ref)``: the reference
    rows' ``logp_q`` is the proposal's sampled distribution (``gen_kwargs``' warpers) on the same string,
    re-encoded with the proposal's tokenizer."""
    exact = {**gen_kwargs, "temperature": 1.0, "top_p": 1.0}
    ref_rows = sample_shard(
        records, generator=reference_generator, n=n_ref, verifier=verifier,
        ref_model=ref_model, ref_tokenizer=ref_tokenizer, proposal_tokenizer=ref_tokenizer, gen_kwargs=exact,
        seed=seed, score_batch_size=score_batch_size, verifier_kwargs=verifier_kwargs,
    ).to_pydict()
    by_id = {r.id: r for r in records}
    prompts_q = {r.id: encode_prompt(proposal_tokenizer, render_prompt(r, proposal_tokenizer)) for r in records}
    ref_rows["logp_q"] = score_sampled_responses(
        proposal_model, [prompts_q[pid] for pid in ref_rows["prompt_id"]],
        [encode_response(proposal_tokenizer, text, ends_with_eos=fin == "eos")
         for text, fin in zip(ref_rows["response"], ref_rows["finish_reason"])],
        pad_id=pad_token_id(proposal_tokenizer), temperature=float(gen_kwargs.get("temperature", 1.0)),
        top_p=float(gen_kwargs.get("top_p", 1.0)), top_k=int(gen_kwargs.get("top_k", 0) or 0),
        batch_size=score_batch_size,
    )
    n_q = q_table.num_rows // max(len(by_id), 1)
    ref_rows["sample_idx"] = [n_q + j for j in ref_rows["sample_idx"]]
    ref_rows[PROPOSAL_COLUMN] = ["reference"] * len(ref_rows["prompt_id"])
    q_rows = q_table.to_pydict()
    q_rows[PROPOSAL_COLUMN] = ["q"] * q_table.num_rows
    schema = SAMPLE_SCHEMA.append(pa.field(PROPOSAL_COLUMN, pa.string()))
    return pa.concat_tables([pa.table(q_rows, schema=schema), pa.table(ref_rows, schema=schema)])


# --------------------------------------------------------------------------- adaptive budget (sample.target_se)
ADAPTIVE_SEED_OFFSET = 2_000_003


def adaptive_shard_path(out_dir: str, round_index: int, part: int) -> str:
    return os.path.join(out_dir, SAMPLES_SUBDIR, f"shard-a{round_index:02d}-{part:05d}.parquet")


def _written_rounds(out_dir: str) -> int:
    names = glob.glob(os.path.join(out_dir, SAMPLES_SUBDIR, "shard-a*-*.parquet"))
    return max((int(os.path.basename(p)[7:9]) for p in names), default=0)


def label_state(out_dir: str, *, beta: float, reward_transform: str, estimator: str) -> dict[str, tuple]:
    """Per prompt id: ``(N so far, se of its label, samples rewarded above the lowest reward)`` from the shards
    written so far, with the very label math ``disa label`` uses."""
    import tempfile

    from disa.stages.label import collect_groups, run_labelling

    with tempfile.TemporaryDirectory() as tmp:
        table = run_labelling(os.path.join(out_dir, SAMPLES_SUBDIR), beta=beta, reward_transform=reward_transform,
                              estimator=estimator, out_path=os.path.join(tmp, "labels.parquet")).to_pydict()
    _, groups = collect_groups(os.path.join(out_dir, SAMPLES_SUBDIR))
    lowest = min(0.0, min(min(g["reward"]) for g in groups.values()))
    return {pid: (n, se, sum(r > lowest for r in groups[pid]["reward"]))
            for pid, n, se in zip(table["prompt_id"], table["n"], table["log_z_se"])}


def run_adaptive_rounds(prompts: Sequence[PromptRecord], *, out_dir: str, target_se: float, max_total: int,
                        rounds: int, beta: float, reward_transform: str, estimator: str, cap: int,
                        **shard_kwargs) -> dict:
    """``disa sample``'s adaptive budget, after the first pass: up to ``rounds`` rounds, each reading every
    prompt's label and standard error from the shards so far and drawing the next samples where
    :func:`disa.label_estimators.allocate_samples` says (largest drop of the label variance, prompts with a
    predicted SE at most ``target_se`` left alone), an equal part of what is left of ``max_total`` per round.

    Round ``r`` writes ``samples/shard-aRR-PPPPP.parquet`` (one file per group of prompts that get the same
    number of samples; ``sample_idx`` continue each prompt's). Resumable: a re-run continues after the last
    round on disk, from the data on disk, so nothing is drawn twice and ``max_total`` holds.
    ``shard_kwargs``: :func:`sample_shard`'s generation and scoring arguments. Returns ``{"rounds", "added",
    "total"}``."""
    import torch

    from disa.label_estimators import allocate_samples

    by_id = {r.id: r for r in prompts}
    seed = shard_kwargs.pop("seed")
    added, done = 0, 0
    for r in range(_written_rounds(out_dir) + 1, rounds + 1):
        state = label_state(out_dir, beta=beta, reward_transform=reward_transform, estimator=estimator)
        ids = [p.id for p in prompts]
        n = torch.tensor([state[i][0] for i in ids])
        total = int(n.sum())
        extra = (max_total - total) // (rounds - r + 1)
        if extra <= 0:
            break
        add = allocate_samples(torch.tensor([state[i][1] for i in ids], dtype=torch.float64), n,
                               torch.tensor([state[i][2] for i in ids]), extra, target_se=target_se,
                               cap=torch.full((len(ids),), cap))
        if int(add.sum()) == 0:
            break
        for part, k in enumerate(sorted({int(a) for a in add.tolist() if a > 0})):
            chosen = [i for i, a in zip(ids, add.tolist()) if a == k]
            table = sample_shard([by_id[i] for i in chosen], n=k, seed=seed + ADAPTIVE_SEED_OFFSET + 1000 * r + part,
                                 **shard_kwargs).to_pydict()
            offset = {i: state[i][0] for i in chosen}
            table["sample_idx"] = [offset[pid] + j for pid, j in zip(table["prompt_id"], table["sample_idx"])]
            atomic_write_parquet(pa.table(table, schema=SAMPLE_SCHEMA), adaptive_shard_path(out_dir, r, part))
        added += int(add.sum())
        done = r
    return {"rounds": done, "added": added}


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
    from disa.artifacts import prompts_digest

    meta = {
        "format_version": FORMAT_VERSION, "n": n, "shard_size": shard_size, "seed": seed, "verifier": verifier_name,
        "num_prompts": len(prompts), "prompt_ids_sha256": prompt_ids_digest(prompts),
        "prompts_sha256": prompts_digest(prompts), **gen_kwargs, **extra_meta,
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
    from disa.artifacts import reading

    if not os.path.exists(path):
        return None
    with reading(path, "sample"):
        existing = pq.read_metadata(path).num_rows
    if existing != expected:
        raise ConfigError(f"{path} holds {existing} rows, expected {expected}; delete it and run `disa sample` again "
                          "(it redoes that shard)")
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
    logprobs_are_sampled: bool = False,
    reference_share: float = 0.0,
    reference_generator: Optional[RolloutEngine] = None,
) -> dict:
    """Stage 1 sampling job (see the module docstring for the files and the resume rules).

    ``generator`` draws from the proposal q. ``proposal_model`` (optional) re-scores ``log q`` with
    transformers, through the same temperature / top-p warpers the sampler used; without it ``log q`` is the
    generator's own ``Sample.logprob`` (the same number for the ``hf`` back-end at temperature 1; at other
    settings a generator must declare ``logprobs_are_sampled``, see :func:`proposal_logprobs`).
    ``ref_model`` / ``proposal_model`` may be local paths. ``verifier`` is a registry name or a reward
    function with TRL's signature. ``reference_share`` > 0 draws that share of each prompt's ``n`` from
    ``reference_generator`` (``pi_ref``, temperature 1) instead (:func:`add_reference_rows`; needs
    ``proposal_model``). Returns ``{"shards", "written", "skipped", "rows"}``.
    """
    check_prompt_list(prompts, shard_size, n)
    n_q, n_ref = mixture_counts(n, reference_share)
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
        extra_meta={**model_names, LOGP_Q_META_KEY: LOGP_Q_SAMPLED, **(extra_meta or {}),
                    **({REFERENCE_SHARE_META_KEY: [n_q, n_ref]} if n_ref else {})},
    )
    if n_ref and (reference_generator is None or proposal_model is None):
        raise ValueError("reference_share > 0 needs reference_generator (draws from pi_ref) and proposal_model (scores "
                         "those draws under q)")
    written = 0
    for k, records in tqdm(pending, desc="sample shards", unit="shard", disable=None if progress else True):
        table = sample_shard(
            records, generator=generator, n=n_q, verifier=verifier_spec,
            ref_model=ref_model, ref_tokenizer=ref_tokenizer, proposal_model=proposal_model,
            proposal_tokenizer=proposal_tokenizer, gen_kwargs=gen_kwargs, seed=seed + k,
            score_batch_size=score_batch_size, verifier_kwargs=verifier_kwargs,
            logprobs_are_sampled=logprobs_are_sampled,
        )
        if n_ref:
            table = add_reference_rows(
                table, records, reference_generator=reference_generator, n_ref=n_ref, verifier=verifier_spec,
                ref_model=ref_model, ref_tokenizer=ref_tokenizer,
                proposal_model=proposal_model, proposal_tokenizer=proposal_tokenizer or generator.tokenizer,
                gen_kwargs=gen_kwargs, seed=seed + k + REFERENCE_SEED_OFFSET, score_batch_size=score_batch_size,
                verifier_kwargs=verifier_kwargs,
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
                   "misses the target mass outside it (eq. 8: all of it, biased low by log pi*(nucleus); cv: only the "
                   "rewarded excess there). logp_q is the truncated distribution's, top_p is recorded in meta.json; "
                   "keep top_p=1 for an exact label (docs/label-estimators.md).")
    return out


# ----------------------------------------------------------------------------------------------- the verb
def sample_lineage(cfg, ref_path: str, proposal_path: str) -> dict:
    """What ``meta.json`` records about the models and how they run (compared on every resume)."""
    from disa.run_dir import model_fingerprint

    return {"reference_fingerprint": model_fingerprint(ref_path), "proposal_fingerprint": model_fingerprint(proposal_path),
            "dtype": cfg.models.dtype, "backend": cfg.sample.generation.engine}


def check_adaptive_settings(s, num_prompts: int) -> None:
    """``sample.target_se`` needs a total budget above the first pass, and (for now) one proposal."""
    if not s.target_se:
        return
    if s.max_total <= s.n * num_prompts:
        raise ConfigError(f"sample.target_se needs sample.max_total (total samples) above the first pass's "
                          f"n x prompts = {s.n * num_prompts}, got {s.max_total}")
    if s.reference_share:
        raise ConfigError("sample.target_se with sample.reference_share is not supported yet: the extra rounds "
                          "would change each prompt's mixture proportions")


def adaptive_budget(cfg, records, out_dir: str, generator, ref_model, ref_tokenizer, log_q_source: dict) -> dict:
    """``disa sample``'s adaptive rounds (:func:`run_adaptive_rounds`) with the config's label settings; no
    prompt gets more than 4 times the mean budget per prompt."""
    s = cfg.sample
    verifier = resolve_verifier(cfg.data.verifier)
    gen_kwargs = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, stop=list(s.stop))
    return run_adaptive_rounds(
        records, out_dir=out_dir, target_se=s.target_se, max_total=s.max_total, rounds=s.adaptive_rounds,
        beta=cfg.target.beta, reward_transform=cfg.target.reward_transform, estimator=cfg.label.estimator,
        cap=max(4 * s.max_total // len(records), s.n), generator=generator, verifier=verifier,
        ref_model=ref_model, ref_tokenizer=ref_tokenizer, gen_kwargs=gen_kwargs,
        seed=s.seed, score_batch_size=s.batch_size, verifier_kwargs=cfg.data.verifier_kwargs, **log_q_source)


def reference_draws(cfg, generator, ref_model, ref_tokenizer, log_q_source: dict) -> dict:
    """``run_sampling`` kwargs for ``sample.reference_share``: a transformers generator over the loaded
    ``pi_ref`` (it is loaded for scoring anyway) and the proposal model that scores its draws under ``q``."""
    s = cfg.sample
    if not s.reference_share:
        return {}
    if s.generation.engine != "hf":
        raise ConfigError("sample.reference_share needs sample.generation.engine: hf: the pi_ref draws are scored under the "
                          "proposal's sampled distribution by the proposal's transformers model")
    return {"reference_share": s.reference_share,
            "reference_generator": common.generator(cfg, ref_model, s.batch_size, consumer="sample",
                                                    tokenizer=ref_tokenizer, seed=s.seed),
            "proposal_model": log_q_source.get("proposal_model", generator.model),
            "proposal_tokenizer": generator.tokenizer}


def proposal_generator(cfg, proposal_path: str, progress: bool = True) -> tuple:
    """``(generator, run_sampling kwargs saying where log q comes from)`` for ``disa sample``.

    At temperature 1 without truncation: the generator's own log-probs. Otherwise the distribution sampled
    from is not the model's: vLLM reports it itself (``logprobs_mode="processed_logprobs"``); the ``hf``
    back-end's log-probs are the model's, so its own model re-scores the samples through the same warpers."""
    s = cfg.sample
    warped = is_warped({"temperature": s.temperature, "top_p": s.top_p})
    if warped and s.generation.engine == "vllm":
        from disa.generation import make_engine

        generator = make_engine(s.generation, proposal_path, batch_size=s.batch_size, dtype=cfg.models.dtype,
                                seed=s.seed, progress=progress, logprobs_mode="processed_logprobs")
        return generator, {"logprobs_are_sampled": True}
    generator = common.generator(cfg, proposal_path, s.batch_size, consumer="sample", seed=s.seed, progress=progress)
    if warped:
        return generator, {"proposal_model": generator.model, "proposal_tokenizer": generator.tokenizer}
    return generator, {}


@stage("sample")
def run(cfg) -> dict:
    """``disa sample``: N proposal samples per prompt, verified and re-scored -> ``samples/shard-*.parquet``."""
    from disa.artifacts import prompts_digest
    from disa.generation.hf import HFGenerator

    rd = common.run_dir(cfg)
    records = common.prompts(cfg)
    common.verifier(cfg)  # an unknown name fails here, before any model is loaded
    isolation = common.code_isolation(cfg, [cfg.data.verifier], "sample")
    ref_path, proposal_path = common.model_path(cfg, "reference"), common.model_path(cfg, "proposal")
    rd.ensure_writable()
    lineage = sample_lineage(cfg, ref_path, proposal_path)
    try:  # a resume with other models, dtype or prompt texts is refused before any model loads
        check_meta(str(rd.root), {**lineage, "prompts_sha256": prompts_digest(records)})
    except ResumeMismatch as e:
        raise ConfigError(str(e)) from None
    s = cfg.sample
    for line in proposal_warnings(s.temperature, s.top_p):
        common.say("sample", line, logging.WARNING)
    if s.executor == "ray" and (s.reference_share or s.target_se):
        raise ConfigError("sample.reference_share and sample.target_se are not wired into sample.executor=ray yet; "
                          "use executor=local")
    check_adaptive_settings(s, len(records))
    if s.executor == "ray":
        from disa.stages.sample_ray import run_with_config

        return run_with_config(cfg, rd, records, ref_path, proposal_path)
    generator, log_q_source = proposal_generator(cfg, proposal_path)
    if proposal_path == ref_path and isinstance(generator, HFGenerator):
        ref_model, ref_tokenizer = generator.model, generator.tokenizer  # plain Monte Carlo: one copy
    else:
        ref_model, ref_tokenizer = common.load_model(cfg, ref_path)
    try:
        result = run_sampling(
            records, generator=generator, n=s.n, out_dir=str(rd.root), verifier=cfg.data.verifier,
            ref_model=ref_model, ref_tokenizer=ref_tokenizer, shard_size=s.shard_size, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=s.top_p, stop=s.stop, seed=s.seed, score_batch_size=s.batch_size,
            verifier_kwargs=common.verifier_kwargs(cfg, cfg.data.verifier),
            extra_meta={**lineage, **({"code_isolation": isolation} if isolation else {})},
            **{**log_q_source, **reference_draws(cfg, generator, ref_model, ref_tokenizer, log_q_source)},
        )
        if s.target_se:
            result["adaptive"] = adaptive_budget(cfg, records, str(rd.root), generator, ref_model, ref_tokenizer,
                                                 log_q_source)
            result["rows"] += result["adaptive"]["added"]
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
    if not any(r > min(rewards) for r in rewards):  # every sample got the same (lowest) reward
        common.say("sample", no_signal_advice(s.n), logging.WARNING)
    return result


def no_signal_advice(n: int) -> str:
    """What to do when no sample of Stage 1 was rewarded above the others."""
    return (f"no sample was rewarded above the others: no learning signal about correct answers. Check data.verifier "
            f"on a few responses (samples/*.parquet), raise sample.n (now {n}), or use a stronger models.proposal")
