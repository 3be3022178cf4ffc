"""Math answer verifier: the last ``\\boxed{...}`` of a completion against the row's gold ``answer``.

Reward is binary (1.0 when math-verify judges the two answers equal, else 0.0), as in the paper.

Why a timeout of our own: math-verify guards ``parse``/``verify`` with ``signal.alarm``, which raises
``ValueError`` off the main thread (thread pools, the trainer's reward workers) and cannot be
nested. We call math-verify with its timeouts disabled (``None``) and enforce a deadline ourselves:

* on the main thread of the process (a plain call, or a ``multiprocessing`` worker, whose tasks run
  on its main thread) with ``signal.setitimer`` (sub-second resolution, previous handler and timer
  restored), unless the caller already has an interval timer running;
* everywhere else with a watchdog timer thread that raises an exception asynchronously in the
  checking thread (``PyThreadState_SetAsyncExc``).

Both interrupt Python bytecode only, as math-verify's own alarm does; sympy is almost all Python,
so a runaway simplification is stopped at its next bytecode. The deadline exception derives from
``BaseException`` so the ``except Exception`` blocks inside math-verify and sympy cannot swallow it.
"""

from __future__ import annotations

import ctypes
import logging
import re
import signal
import threading
from typing import Callable, TypeVar

from disa.verifiers import completion_text, register_verifier

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 5.0
_BOXED_COMMANDS = ("\\boxed", "\\fbox")


class MathVerifyTimeout(BaseException):
    """Raised inside the checking thread when the deadline passes.

    A ``BaseException`` on purpose: math-verify wraps parsing in ``except Exception`` and would
    otherwise turn our deadline into an ordinary "could not parse" and keep going.
    """


# ----------------------------------------------------------------------------------------------
# Answer extraction (pure)
# ----------------------------------------------------------------------------------------------


def extract_boxed(text: str) -> str | None:
    """Return the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are matched by depth so nested groups survive (``\\boxed{\\frac{1}{2}}`` gives
    ``\\frac{1}{2}``). Also accepts the brace-less form ``\\boxed 5`` (one token). Returns ``None``
    when there is no boxed answer or the last one is unbalanced (a truncated generation).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    start = max(text.rfind(cmd) for cmd in _BOXED_COMMANDS)
    if start < 0:
        return None
    command = next(cmd for cmd in _BOXED_COMMANDS if text.startswith(cmd, start))
    i = start + len(command)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # "\boxed 5": the argument is the next whitespace/dollar-delimited token.
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    depth = 0
    for j in range(i, len(text)):
        char = text[j]
        if char == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
            continue  # an escaped brace "\{" is content, not structure
        if char == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif char == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """Pull the candidate answer out of a completion.

    With ``pattern=None`` this is :func:`extract_boxed`. With a regex (e.g. ``r"Answer:\\s*(.*)"``)
    the LAST match is used: its first capture group when the pattern has one, else the whole match.
    """
    if pattern is None:
        return extract_boxed(text)
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {err}") from err
    matches = list(compiled.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    answer = last.group(1) if compiled.groups else last.group(0)
    return answer.strip() if answer is not None else None


def _as_latex(answer: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify's LaTeX extractor reads it as math."""
    if "$" in answer or "\\boxed" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


# ----------------------------------------------------------------------------------------------
# Deadline that works on any thread
# ----------------------------------------------------------------------------------------------


def _raise_deadline(signum, frame):  # signal handler signature
    raise MathVerifyTimeout("math verification timed out")


def _call_with_signal_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    previous_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)


def _set_async_exception(thread_id: int, exc_type: type[BaseException] | None) -> int:
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type) if exc_type is not None else None
    )


def _call_with_watchdog_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn`` in this thread; a timer thread injects ``MathVerifyTimeout`` if it overruns.

    The lock makes "finished" and "fired" mutually exclusive: either the watchdog fires while the
    call is still running (and any not-yet-delivered exception is cleared on the way out), or the
    call finished first and the watchdog does nothing.
    """
    thread_id = threading.get_ident()
    lock = threading.Lock()
    state = {"finished": False, "fired": False}

    def fire() -> None:
        with lock:
            if not state["finished"]:
                state["fired"] = True
                _set_async_exception(thread_id, MathVerifyTimeout)

    watchdog = threading.Timer(timeout_s, fire)
    watchdog.daemon = True
    watchdog.start()
    try:
        return fn()
    finally:
        watchdog.cancel()
        with lock:
            state["finished"] = True
            if state["fired"]:
                _set_async_exception(thread_id, None)  # clear it if it has not been raised yet
        if state["fired"]:
            raise MathVerifyTimeout("math verification timed out")


def call_with_timeout(fn: Callable[[], T], timeout_s: float | None) -> T:
    """Call ``fn()`` and raise :class:`MathVerifyTimeout` if it runs longer than ``timeout_s``.

    Safe on the main thread, in ``ThreadPoolExecutor`` workers and in ``multiprocessing`` workers.
    ``timeout_s=None`` runs without a deadline.
    """
    if timeout_s is None:
        return fn()
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0):
        return _call_with_signal_deadline(fn, timeout_s)
    return _call_with_watchdog_deadline(fn, timeout_s)


# ----------------------------------------------------------------------------------------------
# math-verify calls
# ----------------------------------------------------------------------------------------------


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; ours is on, so the warning misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def _answers_match(predicted: str, gold: str) -> bool:
    from math_verify import parse, verify  # optional dependency: disa[math]

    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    predicted_parsed = parse(_as_latex(predicted), parsing_timeout=None)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=None))


def math_reward(
    completion: str,
    answer: str,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    pattern: str | None = None,
) -> float:
    """1.0 if the completion's final answer equals ``answer`` (math-verify equivalence), else 0.0.

    ``pattern=None`` reads the last ``\\boxed{}``; otherwise the last match of the regex. A missing
    answer, an unparsable one, or a check that exceeds ``timeout_s`` seconds all score 0.0.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if answer is None:
        raise ValueError("answer (the gold answer) is None")
    predicted = extract_answer(completion, pattern)
    if predicted is None or predicted == "":
        return 0.0
    gold = str(answer).strip()
    try:
        return 1.0 if call_with_timeout(lambda: _answers_match(predicted, gold), timeout_s) else 0.0
    except MathVerifyTimeout:
        return 0.0


@register_verifier("math", columns=("answer",), reward_range=(0.0, 1.0))
def math_verifier(
    prompts: list,
    completions: list,
    *,
    answer: list,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    pattern: str | None = None,
    **columns,
) -> list[float]:
    """TRL-signature reward: one 0/1 score per completion, compared with the ``answer`` column."""
    if len(answer) != len(completions):
        raise ValueError(
            f"column 'answer' has {len(answer)} rows but there are {len(completions)} completions"
        )
    rewards = []
    for row, (completion, gold) in enumerate(zip(completions, answer)):
        if gold is None:
            raise ValueError(f"column 'answer' is empty (None) at row {row}")
        rewards.append(math_reward(completion_text(completion), gold, timeout_s=timeout_s, pattern=pattern))
    return rewards
