"""The LLM-judge diversity protocol (App. D.5): for each problem, the judge reads the problem and a policy's
responses and scores how different their solution approaches are, 1 (all the same) to 5 (all different); we
report the mean and standard deviation over problems.

The judge is any OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``), called with
the standard library only. A reply without a score in 1..5 is retried, then recorded as missing (never as a
made-up number); the summary says how many were missing.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

JUDGE_PROMPT = """You are judging the DIVERSITY of solutions, not their correctness.

Problem:
{problem}

Below are {count} responses written for this problem.
{responses}

Rate how different the solution APPROACHES are (method, key idea, structure), ignoring wording and formatting:
1 = all responses use essentially the same approach
2 = minor variations of one approach
3 = two clearly different approaches
4 = several different approaches
5 = almost every response uses a different approach

Answer with the score only, as: Score: N"""

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([1-5](?:\.\d+)?)\b", re.IGNORECASE)
_BARE = re.compile(r"^\s*\**([1-5](?:\.\d+)?)\**\s*\.?\s*$")


class JudgeError(RuntimeError):
    """The endpoint could not be reached or answered with something that is not a chat completion."""


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: Optional[str] = None
    temperature: float = 0.0
    max_tokens: int = 16
    timeout_s: float = 60.0
    retries: int = 2


def build_prompt(problem: str, responses: Sequence[str], max_chars: int = 4000) -> str:
    """The App. D.5-style prompt; each response is cut to ``max_chars`` so that long ones fit the judge's window."""
    if not responses:
        raise ValueError("the judge needs at least one response")
    body = "\n".join(f"--- Response {i + 1} ---\n{r[:max_chars]}" for i, r in enumerate(responses))
    return JUDGE_PROMPT.format(problem=problem, count=len(responses), responses=body)


def parse_score(text: str) -> Optional[float]:
    """The 1..5 score in a judge reply ("Score: 4", "**4**", "4"); None when there is none or it is out of range."""
    if not isinstance(text, str):
        return None
    m = _SCORE.search(text) or _BARE.match(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 1.0 <= value <= 5.0 else None


def chat(config: JudgeConfig, prompt: str) -> str:
    """One chat-completions call; the reply's text. Errors name the endpoint and what came back."""
    url = config.base_url.rstrip("/") + "/chat/completions"
    payload = {"model": config.model, "messages": [{"role": "user", "content": prompt}],
               "temperature": config.temperature, "max_tokens": config.max_tokens}
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        raise JudgeError(f"{url}: HTTP {err.code}: {err.read()[:200]!r}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise JudgeError(f"{url}: cannot reach the judge ({err})") from None
    try:
        return json.loads(raw)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"{url}: not a chat completion: {raw[:200]!r}") from None


def judge_problem(config: JudgeConfig, problem: str, responses: Sequence[str], sleep_s: float = 0.0) -> Optional[float]:
    """The score of one problem, asking again (up to ``config.retries`` times) when a reply has no valid score."""
    prompt = build_prompt(problem, responses)
    for attempt in range(config.retries + 1):
        score = parse_score(chat(config, prompt))
        if score is not None:
            return score
        if sleep_s:
            time.sleep(sleep_s)
    return None


def judge_diversity(config: JudgeConfig, problems: Sequence[str], responses: Sequence[Sequence[str]]) -> dict:
    """Scores per problem and their mean and std (over problems with a valid score)."""
    if len(problems) != len(responses):
        raise ValueError(f"problems and responses must align, got {len(problems)} and {len(responses)}")
    scores = [judge_problem(config, p, r) for p, r in zip(problems, responses)]
    valid = np.array([s for s in scores if s is not None], dtype=np.float64)
    return {"scores": scores, "mean": float(valid.mean()) if valid.size else float("nan"),
            "std": float(valid.std(ddof=1)) if valid.size > 1 else float("nan"),
            "judged": int(valid.size), "missing": len(scores) - int(valid.size), "judge_model": config.model}
