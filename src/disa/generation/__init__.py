"""Sampling responses from a causal LM: one contract (:class:`RolloutEngine`, :mod:`disa.generation.engine`),
engines registered by name (:mod:`disa.generation.registry`: ``hf`` default, ``vllm`` optional, ``server`` an
OpenAI-compatible endpoint), built with :func:`make_engine`.

The ``hf`` engine decodes with a lean cached loop (:mod:`disa.generation.decode_loop`) by default, or with
``model.generate`` (``decoder="generate"``); both draw the same tokens for a fixed seed.

Every engine returns, per prompt, ``n`` :class:`Sample` objects whose ``logprob`` is the sum of the
response tokens' log-probabilities under the model's *unprocessed* distribution (temperature 1, no top-p /
top-k truncation): exactly the number :func:`disa.scoring.score_responses` gives when it re-scores
``(prompt_ids, response_ids)``. Temperature and top-p change which responses are drawn, never how their
log-probability is defined, so Stage 1 can compare ``log q`` with ``log pi_ref`` on the same footing.

Token / text conventions, shared by the engines (:func:`finalize_sample`):

- ``prompt_ids`` = :func:`encode_prompt` of the prompt text (the tokenizer's special tokens, without a
  second BOS when a chat template already wrote one).
- A response that ends with EOS keeps the EOS id as its last token (its probability is part of
  ``log pi(y|x)``: the model chose to stop); ``text`` never contains it.
- Stop strings: the response is cut right *after* the first stop string to complete, and the stop string
  stays in ``text``. When it ends inside a token, the cut text is re-tokenised, so ``response_ids`` are no
  longer the sampled ids; the engine then re-scores them, keeping ``logprob`` = re-scoring's number.
- ``finish_reason`` is ``"eos"``, ``"stop"`` or ``"length"`` (hit ``max_new_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from disa.generation.engine import RolloutEngine, pad_token_id
from disa.generation.registry import engine_names, make_engine, register_engine

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class Sample:
    """One sampled response. ``logprob`` = ``sum_t log pi(y_t | x, y_<t)`` over ``response_ids``."""

    text: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprob: float
    finish_reason: str = "length"


def check_generation_args(prompts, n, max_new_tokens, temperature, top_p, stop) -> list[str]:
    """Validate the arguments shared by every engine; returns ``stop`` as a list."""
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return stop


# --------------------------------------------------------------------------- tokenisation conventions
def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids a model is conditioned on for ``text``.

    The tokenizer's special tokens (e.g. Llama's BOS) are added, except when ``text`` already starts with
    the BOS token: a chat template that writes ``<s>`` itself would otherwise get a second one.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if len(ids) == 0:
        raise ValueError(f"prompt {text[:40]!r} encodes to zero tokens")
    return list(ids)


def encode_response(tokenizer, text: str, *, ends_with_eos: bool = False) -> list[int]:
    """Token ids of a response ``text`` (no special tokens), plus the tokenizer's EOS if the response ended
    with one. Used to carry a response from one tokenizer to another (Stage 1 re-scoring)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ends_with_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the response ended with EOS but the tokenizer has no eos_token_id")
        ids.append(int(tokenizer.eos_token_id))
    return ids


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Response text of ``ids``: special tokens dropped, no whitespace clean-up (so re-encoding is stable)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stop_end(text: str, stop: Sequence[str]) -> Optional[int]:
    """End index (exclusive) of the stop string that completes first in ``text``, or ``None``."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return min(ends) if ends else None


def _shortest_prefix_with_stop(tokenizer, ids: Sequence[int], stop: Sequence[str]) -> Optional[int]:
    """Smallest ``k`` such that the decoded ``ids[:k]`` contains a stop string (binary search: containment
    only grows with ``k``), or ``None``."""
    if stop_end(decode(tokenizer, ids), stop) is None:
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop_end(decode(tokenizer, ids[:mid]), stop) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def rescore_cut_samples(samples: "list[Sample]", score) -> None:
    """Set the log-prob of samples :func:`finalize_sample` cut inside a token (``needs_rescore``) from the
    engine's own ``score(prompt_ids, response_ids) -> list[float]`` on the re-tokenised response."""
    if not samples:
        return
    for sample, logprob in zip(samples, score([s.prompt_ids for s in samples], [s.response_ids for s in samples])):
        sample.logprob = logprob


def finalize_sample(
    tokenizer,
    prompt_ids: list[int],
    generated_ids: Sequence[int],
    token_logprobs: Sequence[float],
    *,
    eos_ids: set[int],
    stop: Sequence[str],
) -> tuple[Sample, bool]:
    """Turn raw generated ids (possibly padded after the end) into a :class:`Sample`.

    ``token_logprobs[t]`` is the log-prob of ``generated_ids[t]``. Returns ``(sample, needs_rescore)``;
    ``needs_rescore`` is True when a stop string ended inside a token and the cut text was re-tokenised, in
    which case ``sample.logprob`` is NaN until the caller re-scores ``sample.response_ids``.
    """
    ids = [int(t) for t in generated_ids]
    if len(token_logprobs) < len(ids):
        raise ValueError(f"got {len(token_logprobs)} token log-probs for {len(ids)} generated tokens")
    finish = "length"
    content = ids
    eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    if eos_at is not None:
        finish, content = "eos", ids[:eos_at]

    k = _shortest_prefix_with_stop(tokenizer, content, stop) if stop else None
    if k is not None:
        text_k = decode(tokenizer, content[:k])
        cut_text = text_k[: stop_end(text_k, stop)]
        if cut_text == text_k:
            response_ids = content[:k]
            return Sample(cut_text, prompt_ids, response_ids, float(sum(token_logprobs[:k])), "stop"), False
        response_ids = encode_response(tokenizer, cut_text)
        return Sample(cut_text, prompt_ids, response_ids, float("nan"), "stop"), True

    response_ids = ids[: eos_at + 1] if eos_at is not None else ids
    logprob = float(sum(float(x) for x in token_logprobs[: len(response_ids)]))
    return Sample(decode(tokenizer, content), prompt_ids, response_ids, logprob, finish), False


__all__ = [
    "Sample", "RolloutEngine", "make_engine", "register_engine", "engine_names", "pad_token_id", "encode_prompt",
    "encode_response", "decode", "finalize_sample", "rescore_cut_samples", "stop_end", "check_generation_args",
    "FINISH_REASONS",
]
