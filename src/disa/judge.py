"""The LLM-judge diversity protocol of App. D.5: for each problem, the judge reads the problem and all of one
policy's responses to it in one request and returns one integer from 1 (the responses share one approach) to 5
(no approach dominates); we report the mean and the empirical standard deviation over problems.

What follows the paper (App. D.5, itself the diversity prompt of FlowRL, Zhu et al. 2025) and what is ours:

* protocol, as in the paper: a system message that sets the task (diversity of solution *approaches*, subtle
  methodological differences count, correctness does not), a user message with the problem, every response and
  the 1-5 rubric; one integer per problem (a reply such as "2.5" is not a score); the rubric's levels are
  those of the paper, defined by how many responses share the most common approach and how many distinct
  strategies appear, written for 16 responses (14+, 11-13, 7-10, 4-6, at most 3 of 16 on the dominant approach);
  the score per problem is averaged over problems, and the spread is the empirical standard deviation of the
  per-problem scores (``ddof=0``);
* ours: the wording (the paper's text is not reproduced); the rubric's counts are phrased "of every 16" so that
  they read the same for any number of responses (the paper sent the 16-response text unchanged with its own
  number of rollouts, a number our copy of the paper does not show);
  each response is cut to ``max_chars`` characters; a reply without a valid score is asked again and then
  recorded as missing, never filled in; temperature 0 by default. Which problems (the paper: AIME 2024 + 2025,
  pooled: :func:`pool_judge`) and how many responses (``eval.k``) are the caller's choice.

The judge is any OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``), called with
the standard library only. Problems are judged ``concurrency`` at a time; a rate limit (HTTP 429), a server error
(5xx) or a dropped connection is retried ``http_retries`` times with exponential backoff (the server's
``Retry-After`` when it gives one). A problem whose calls all fail is recorded as missing, with the error, and
never raises: an evaluation is not lost to its judge (``disa eval`` also writes its files before judging).
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

SYSTEM_PROMPT = ("You judge how DIVERSE a set of attempted solutions to one competition problem is: how many "
                 "different problem-solving strategies they use. Subtle differences of method count (a different "
                 "setup, choice of variables, technique or decomposition); wording, notation, arithmetic slips and "
                 "whether an attempt is correct or finished do not.")

JUDGE_PROMPT = """PROBLEM:
{problem}

{count} ATTEMPTED SOLUTIONS:
{responses}

Score the diversity of the approaches from 1 to 5. The counts below are out of every 16 attempts; scale them to the
number of attempts shown.
1 (minimal): 14 or more of every 16 attempts follow essentially the same approach (same setup, same variables, same
  path); they differ only trivially.
2 (low): 11 to 13 of every 16 follow the main approach; 1 or 2 other approaches appear, rarely; the rest are small
  variations inside the main method.
3 (moderate): 7 to 10 of every 16 follow the most common approach; 2 or 3 clearly different approaches are present.
4 (high): 4 to 6 of every 16 follow the most common approach; 3 or 4 distinct strategies are well represented.
5 (maximal): no approach dominates (at most 3 of every 16 share one method); 4 or more distinct strategies.

Judge the variety of the approaches attempted, not their quality. Reply with the single integer only."""

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d*)?)(?![\d.])", re.IGNORECASE)
_BARE = re.compile(r"^\s*\**(\d+(?:\.\d*)?)\**\s*\.?\s*$")


class JudgeError(RuntimeError):
    """The endpoint could not be reached or answered with something that is not a chat completion."""


# HTTP statuses worth asking again: rate limited, or the server failed (not the request).
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: Optional[str] = None
    temperature: float = 0.0
    max_tokens: int = 16
    timeout_s: float = 60.0
    retries: int = 2  # asks again when a reply has no valid score
    concurrency: int = 8  # problems judged at once
    http_retries: int = 5  # on 429 / 5xx / a dropped connection, with exponential backoff
    backoff_s: float = 1.0  # first wait; doubles each retry, with jitter, up to max_backoff_s
    max_backoff_s: float = 60.0

    def __post_init__(self):
        for name in ("retries", "http_retries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"judge {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"judge concurrency must be an integer >= 1, got {self.concurrency!r}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"judge backoff_s and max_backoff_s must be >= 0, got {self.backoff_s}, {self.max_backoff_s}")


def backoff_delay(config: JudgeConfig, attempt: int, retry_after: Optional[str] = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): the server's ``Retry-After`` seconds when it
    sends them, else ``backoff_s * 2**attempt`` with jitter in [1/2, 1]; never above ``max_backoff_s``."""
    try:
        if retry_after is not None and float(retry_after) >= 0:
            return min(float(retry_after), config.max_backoff_s)
    except ValueError:
        pass  # an HTTP date: fall back to our own schedule
    return min(config.backoff_s * 2 ** attempt, config.max_backoff_s) * random.uniform(0.5, 1.0)


def build_prompt(problem: str, responses: Sequence[str], max_chars: int = 4000) -> str:
    """The user message of App. D.5 (our wording): the problem, every response (each cut to ``max_chars``
    characters so that long ones fit the judge's window) and the 1-5 rubric."""
    if not responses:
        raise ValueError("the judge needs at least one response")
    body = "\n".join(f"--- Attempt {i + 1} ---\n{r[:max_chars]}" for i, r in enumerate(responses))
    return JUDGE_PROMPT.format(problem=problem, count=len(responses), responses=body)


def build_messages(problem: str, responses: Sequence[str], max_chars: int = 4000) -> list[dict]:
    """System + user messages, as App. D.5 sends them."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": build_prompt(problem, responses, max_chars)}]


def parse_score(text: str) -> Optional[int]:
    """The integer 1..5 of a judge reply ("4", "**4**", "Score: 4"); None when there is none, it is out of range,
    or it is not an integer ("2.5": the protocol asks for one integer)."""
    if not isinstance(text, str):
        return None
    m = _SCORE.search(text) or _BARE.match(text)
    if not m or not float(m.group(1)).is_integer():
        return None
    value = int(float(m.group(1)))
    return value if 1 <= value <= 5 else None


def chat(config: JudgeConfig, messages: Sequence[dict]) -> str:
    """One chat-completions call, retried with backoff on 429, 5xx and dropped connections; the reply's text.
    Errors name the endpoint, what came back and how many attempts were made."""
    url = config.base_url.rstrip("/") + "/chat/completions"
    payload = {"model": config.model, "messages": list(messages),
               "temperature": config.temperature, "max_tokens": config.max_tokens}
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    data = json.dumps(payload).encode()
    for attempt in range(config.http_retries + 1):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        tries = f" (after {attempt + 1} attempts)" if attempt else ""
        try:
            with urllib.request.urlopen(request, timeout=config.timeout_s) as resp:
                raw = resp.read()
            break
        except urllib.error.HTTPError as err:
            with err:  # the error is also the response: close its connection
                body, retry_after = err.read()[:200], err.headers.get("Retry-After")
            if err.code not in RETRYABLE_STATUS or attempt == config.http_retries:
                raise JudgeError(f"{url}: HTTP {err.code}{tries}: {body!r}") from None
            time.sleep(backoff_delay(config, attempt, retry_after))
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            if attempt == config.http_retries:
                raise JudgeError(f"{url}: cannot reach the judge{tries} ({err})") from None
            time.sleep(backoff_delay(config, attempt))
    try:
        return json.loads(raw)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"{url}: not a chat completion: {raw[:200]!r}") from None


def judge_problem(config: JudgeConfig, problem: str, responses: Sequence[str], sleep_s: float = 0.0) -> Optional[int]:
    """The score of one problem, asking again (up to ``config.retries`` times) when a reply has no valid score."""
    messages = build_messages(problem, responses)
    for attempt in range(config.retries + 1):
        score = parse_score(chat(config, messages))
        if score is not None:
            return score
        if sleep_s:
            time.sleep(sleep_s)
    return None


def score_summary(scores: Sequence[Optional[float]]) -> dict:
    """Mean and empirical standard deviation (``ddof=0``, App. D.5) over the problems with a score."""
    valid = np.array([s for s in scores if s is not None], dtype=np.float64)
    return {"mean": float(valid.mean()) if valid.size else float("nan"),
            "std": float(valid.std(ddof=0)) if valid.size else float("nan"),
            "judged": int(valid.size), "missing": len(scores) - int(valid.size)}


def judge_diversity(config: JudgeConfig, problems: Sequence[str], responses: Sequence[Sequence[str]]) -> dict:
    """Scores per problem (``config.concurrency`` problems at a time) and their mean and std over the problems
    with a valid score. A problem the judge could not answer is missing (``None``); ``errors`` counts them and
    ``first_error`` says why. Never raises :class:`JudgeError`."""
    if len(problems) != len(responses):
        raise ValueError(f"problems and responses must align, got {len(problems)} and {len(responses)}")
    errors: list[str] = []

    def one(item: tuple[str, Sequence[str]]) -> Optional[int]:
        try:
            return judge_problem(config, *item)
        except JudgeError as err:
            errors.append(str(err))
            return None

    with ThreadPoolExecutor(max_workers=min(config.concurrency, max(1, len(problems)))) as pool:
        scores = list(pool.map(one, zip(problems, responses)))
    result = {"scores": scores, **score_summary(scores), "judge_model": config.model, "errors": len(errors)}
    if errors:
        result["first_error"] = errors[0]
    return result


def pool_judge(summaries: Mapping[str, dict]) -> dict:
    """One mean and std over the problems of several judged sets (the paper pools AIME 2024 and 2025), not the
    average of their means: a set with more problems weighs more."""
    if not summaries:
        raise ValueError("no judged set to pool")
    scores = [s for summary in summaries.values() for s in summary["scores"]]
    models = sorted({summary.get("judge_model", "") for summary in summaries.values()})
    return {"sets": list(summaries), "scores": scores, **score_summary(scores), "judge_model": ", ".join(models)}
