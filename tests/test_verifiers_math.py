"""Math verifier: answer extraction, math-verify equivalence, and a timeout that works off the main
thread (thread pools) and in multiprocessing workers."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("math_verify")

from disa.verifiers import get_verifier  # noqa: E402
from disa.verifiers.math import (  # noqa: E402
    MathVerifyTimeout,
    call_with_timeout,
    extract_answer,
    extract_boxed,
    math_reward,
)

# Towers of exponents: sympy tries to evaluate them and takes far longer than any timeout below.
SLOW_COMPLETION = r"The answer is \boxed{2^{2^{2^{2^{2^{10}}}}}}"
SLOW_GOLD = r"3^{3^{3^{3^{3}}}}"


def _busy_forever():
    while True:
        pass


def _timed_reward(args):
    completion, gold, timeout_s = args
    start = time.monotonic()
    reward = math_reward(completion, gold, timeout_s=timeout_s)
    return reward, time.monotonic() - start, threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{a^{b^{c}} + {d}}", r"a^{b^{c}} + {d}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5 done", "5"),
        ("no answer here", None),
        (r"truncated \boxed{\frac{1}{2", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_rejects_non_string():
    with pytest.raises(TypeError, match="text must be a str"):
        extract_boxed(None)


def test_extract_answer_with_regex_uses_last_match():
    text = "Answer: 3\nwait, recheck.\nAnswer: 4"
    assert extract_answer(text, r"Answer:\s*(.*)") == "4"
    assert extract_answer(text, r"Answer:\s*\d") == "Answer: 4"
    assert extract_answer("nothing", r"Answer:\s*(.*)") is None
    with pytest.raises(ValueError, match="not a valid regular expression"):
        extract_answer(text, "Answer: (")


# ---------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (r"\boxed{42}", "42", 1.0),
        (r"\boxed{41}", "42", 0.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{\frac{2}{4}}", "1/2", 1.0),
        (r"\boxed{\sqrt{2}}", r"2^{1/2}", 1.0),
        (r"\boxed{1+x^2}", r"x^2+1", 1.0),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        (r"I think it is \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
        ("The answer is 42", "42", 0.0),  # no boxed answer
        (r"\boxed{}", "42", 0.0),
    ],
)
def test_math_reward(completion, gold, expected):
    assert math_reward(completion, gold) == expected


def test_math_reward_with_pattern():
    assert math_reward("work...\nAnswer: 1/2", "0.5", pattern=r"Answer:\s*(.*)") == 1.0
    assert math_reward("work...\nAnswer: 1/3", "0.5", pattern=r"Answer:\s*(.*)") == 0.0


def test_registered_verifier_scores_rows_and_validates_columns():
    verifier = get_verifier("math")
    completions = [r"\boxed{2}", r"\boxed{3}", [{"role": "assistant", "content": r"\boxed{0.25}"}]]
    assert verifier(["p"] * 3, completions, answer=["2", "2", r"\frac14"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="column 'answer' has 1 rows"):
        verifier(["p"] * 3, completions, answer=["2"])
    with pytest.raises(ValueError, match="row 1"):
        verifier(["p"] * 2, completions[:2], answer=["2", None])


# ---------------------------------------------------------------- timeouts


def test_call_with_timeout_stops_a_busy_loop_on_main_thread():
    start = time.monotonic()
    with pytest.raises(MathVerifyTimeout):
        call_with_timeout(_busy_forever, 0.2)
    assert time.monotonic() - start < 2.0
    assert call_with_timeout(lambda: 7, 1.0) == 7
    with pytest.raises(ValueError, match="timeout_s"):
        call_with_timeout(lambda: 7, 0)


def test_call_with_timeout_stops_busy_loops_in_thread_pool():
    def worker(_):
        start = time.monotonic()
        try:
            call_with_timeout(_busy_forever, 0.2)
        except MathVerifyTimeout:
            return time.monotonic() - start
        return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        elapsed = list(pool.map(worker, range(4)))
    assert all(e is not None and e < 2.0 for e in elapsed), elapsed
    # The watchdog left nothing pending: later work in those threads is not interrupted.
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(lambda v: call_with_timeout(lambda: time.sleep(0.3) or v, 0.2 + 1.0), range(2))) == [0, 1]


def test_math_reward_times_out_in_thread_pool():
    # One slow job beside a fast one at a time: the watchdog interrupts bytecode only, and on SLOW_* sympy
    # spends up to ~1 s of CPU in single C calls; two slow jobs sharing the GIL doubled that in wall time
    # and crossed the bound below in 5 of 20 runs (measured), which tested the GIL, not the deadline.
    jobs = [(SLOW_COMPLETION, SLOW_GOLD, 0.5), (r"\boxed{0.5}", r"\frac{1}{2}", 5.0)]
    results = []
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=2) as pool:
            results += list(pool.map(_timed_reward, jobs))
    slow, fast = results[0::2], results[1::2]
    for reward, elapsed, on_main in slow:
        assert reward == 0.0 and elapsed < 3.0 and not on_main
    assert all(reward == 1.0 for reward, _, _ in fast)


def test_math_reward_times_out_in_process_pool():
    jobs = [(SLOW_COMPLETION, SLOW_GOLD, 0.5), (r"\boxed{\frac{1}{2}}", "0.5", 5.0)]
    with multiprocessing.get_context("fork").Pool(processes=2) as pool:
        results = pool.map(_timed_reward, jobs)
    (slow_reward, slow_elapsed, slow_main), (fast_reward, _, _) = results
    assert slow_reward == 0.0 and slow_elapsed < 3.0
    assert slow_main  # multiprocessing runs tasks on the worker's main thread: the signal path
    assert fast_reward == 1.0


def test_slow_input_is_really_slow_and_the_deadline_is_what_stops_it():
    # Guards the two pool tests above: if math-verify ever became fast on SLOW_*, they would pass
    # without exercising the timeout. Here the call must run until (about) its deadline.
    start = time.monotonic()
    assert math_reward(SLOW_COMPLETION, SLOW_GOLD, timeout_s=1.0) == 0.0
    assert 0.9 < time.monotonic() - start < 3.0
