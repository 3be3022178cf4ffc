"""Code verifier: run the completion's Python program against the row's tests in a sandbox.

Test format (the row's ``tests`` column), any of:

* a list of stdin/stdout cases ``[{"input": "1 2\\n", "output": "3\\n"}, ...]``: the program runs
  once per case with ``input`` on stdin; the case passes when it exits with status 0 and its
  stdout equals ``output`` after trailing whitespace is stripped from every line and trailing
  blank lines are dropped (the comparison happens in the parent, out of the program's reach); its
  stdout cap is at least twice the expected output plus 64 KiB (:func:`stdout_cap`);
* the APPS/TACO layout ``{"inputs": [...], "outputs": [...]}`` (same cases, column-wise);
* a string of assert-based Python (``"assert add(1, 2) == 3"``): judged in a second sandbox that
  calls into the program (:mod:`disa.verifiers.sandbox_judge`); the program never sees the tests
  and its exit status does not matter, only the judge's verdict;
* a list of such strings: each is one test, run separately (gives partial credit a meaning);
* any of the above JSON-encoded in a string starting with ``[`` or ``{`` (Parquet columns often
  hold JSON).

Call-based (LeetCode-style) problems use assert tests built by :func:`call_test`: the judge calls the
program's function or method with JSON arguments and compares the JSON-rebuilt return value with the expected
JSON value. A row may also carry a ``program_prefix`` column (e.g. ``from typing import *``, which LeetCode's
starter code assumes): the code verifier runs ``program_prefix + program``.

Reward is all-or-nothing by default (1.0 only when every test passes, as in the paper);
``partial_credit=True`` gives the fraction of tests passed. In a batch, bad options and test sets that do
not parse raise before anything runs; after that a completion whose run raises scores 0 with a logged
warning, never failing the batch (only :class:`SandboxUnavailable` still raises). Isolation is in
:mod:`disa.verifiers.sandbox` (bubblewrap; a weaker fallback where it cannot run, refused by
``require_os_isolation=True``). What it guarantees and what it does not: ``docs/sandbox.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Sequence

from disa.verifiers import completion_text, register_verifier
from disa.verifiers.sandbox import (  # noqa: F401  (re-exported: the public API lives here)
    STATUSES,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    run_in_sandbox,
)
from disa.verifiers.sandbox_fallback import default_sandbox_python, kill_processes_of_uid, processes_of_uid  # noqa: F401
from disa.verifiers.sandbox_judge import prepare_tests, run_assert_test

logger = logging.getLogger(__name__)

_LIMIT_KEYS = {f.name for f in fields(SandboxLimits)}
_START_KEYS = {"backend", "require_os_isolation", "python_executable", "allow_subprocess", "audit_hook",
               "network_namespace"}
SANDBOX_KEYS = _LIMIT_KEYS | _START_KEYS


@dataclass
class CodeTestReport:
    """Per-program outcome over all its tests."""

    num_tests: int
    num_passed: int
    results: list[SandboxResult]
    error: str | None = None  # set when running the tests raised (the completion then scores 0)

    @property
    def fraction_passed(self) -> float:
        return self.num_passed / self.num_tests if self.num_tests else 0.0

    @property
    def all_passed(self) -> bool:
        return self.num_tests > 0 and self.num_passed == self.num_tests


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str) -> str:
    """The last fenced ```python block of a completion; the whole text when there is none."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def normalize_output(text: str) -> str:
    """Drop trailing whitespace on each line and trailing blank lines (judge-style comparison)."""
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).rstrip("\n")


def parse_tests(tests: Any) -> list[dict | str]:
    """Normalise a ``tests`` cell to a list of cases: ``{"input", "output"}`` dicts or code strings.

    Raises ``ValueError`` naming the offending case when the format is not one of those documented
    in the module docstring.
    """
    if isinstance(tests, (bytes, bytearray)):
        tests = tests.decode("utf-8")
    if isinstance(tests, str):
        stripped = tests.lstrip()
        if stripped.startswith(("[", "{")):
            try:
                tests = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise ValueError(f"tests looks like JSON but does not parse: {err}") from err
        else:
            return [tests]
    if isinstance(tests, dict):
        if "inputs" in tests and "outputs" in tests:
            inputs, outputs = list(tests["inputs"]), list(tests["outputs"])
            if len(inputs) != len(outputs):
                raise ValueError(f"tests has {len(inputs)} 'inputs' but {len(outputs)} 'outputs'")
            tests = [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
        else:
            tests = [tests]
    if not isinstance(tests, Sequence) or isinstance(tests, str):
        raise ValueError(f"tests must be a list, dict or str, got {type(tests).__name__}")
    cases: list[dict | str] = []
    for index, case in enumerate(tests):
        if isinstance(case, str):
            cases.append(case)
        elif isinstance(case, dict) and "input" in case and "output" in case:
            cases.append({"input": _as_text(case["input"]), "output": _as_text(case["output"])})
        else:
            raise ValueError(
                f"tests[{index}] must be a code string or a dict with 'input' and 'output', got {case!r:.200}"
            )
    if not cases:
        raise ValueError("tests is empty")
    return cases


def call_test(call: str, args_json: Sequence[str], expected_json: str) -> str:
    """Assert code for the judge sandbox: ``call(*args) == expected``, both sides rebuilt through JSON.

    ``call`` is a dotted path the program defines (``Solution().twoSum`` or ``two_sum``); ``args_json`` one JSON
    text per argument, ``expected_json`` the JSON return value. The JSON round trip makes a tuple equal a list
    (as LeetCode's checker does) and makes anything JSON cannot hold (a set, an object) a failure; the values
    are parsed inside the judge, so the program never sees them.
    """
    head, _, attr = call.partition("().")
    names = [head] + ([attr] if attr else [])
    if not all(n.isidentifier() for n in names) or call != (f"{head}().{attr}" if attr else head):
        raise ValueError(f"call must be NAME or NAME().METHOD, got {call!r}")
    return (
        "import json as _json\n"
        f"_args = [_json.loads(_a) for _a in {list(args_json)!r}]\n"
        f"_expected = _json.loads({expected_json!r})\n"
        f"_got = _json.loads(_json.dumps({call}(*_args)))\n"
        "assert _got == _expected, 'returned %.200r, expected %.200r' % (_got, _expected)\n"
    )


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # some datasets store lines as a list
        return "\n".join(str(v) for v in value)
    return str(value)


def check_tests(tests: Any) -> list[dict | str]:
    """:func:`parse_tests`, and every assert case must compile (``ValueError`` otherwise)."""
    cases = parse_tests(tests)
    for index, case in enumerate(cases):
        if isinstance(case, str):
            try:
                prepare_tests(case)
            except ValueError as err:
                raise ValueError(f"tests[{index}]: {err}") from err
    return cases


def stdout_cap(expected_output: str, configured: int) -> int:
    """The stdout cap for one stdin/stdout case: never below what a correct answer needs (twice the
    expected output plus 64 KiB, room for trailing whitespace), nor below the configured cap."""
    return max(configured, 2 * len(expected_output.encode("utf-8")) + 64 * 1024)


def run_tests(program: str, tests: Any, *, stop_on_failure: bool = True, **sandbox_options) -> CodeTestReport:
    """Run ``program`` against every case of ``tests`` (see :func:`parse_tests`).

    ``stop_on_failure`` skips the remaining cases after the first failure (they count as failed):
    all-or-nothing scoring needs no more, and a program that times out once will time out again.
    """
    cases = parse_tests(tests)
    limits, _ = sandbox_config(sandbox_options)
    results: list[SandboxResult] = []
    passed = 0
    for case in cases:
        if isinstance(case, str):
            result = _run_assert_case(program, case, sandbox_options)
        else:
            cap = stdout_cap(case["output"], limits.max_output_bytes)
            result = run_in_sandbox(program, case["input"], **dict(sandbox_options, max_output_bytes=cap))
            if result.status == "ok" and normalize_output(result.stdout) != normalize_output(case["output"]):
                result.status, result.passed = "wrong_answer", False
        results.append(result)
        passed += result.passed
        if stop_on_failure and not result.passed:
            break
    return CodeTestReport(num_tests=len(cases), num_passed=passed, results=results)


def sandbox_config(sandbox_options: dict) -> tuple[SandboxLimits, dict]:
    """Split sandbox options into checked limits and start options; ``TypeError``/``ValueError``
    for unknown keys or bad limits (configuration errors, raised before any program runs)."""
    unknown = set(sandbox_options) - SANDBOX_KEYS
    if unknown:
        raise TypeError(f"unknown sandbox options: {sorted(unknown)}")
    limits = SandboxLimits(**{k: v for k, v in sandbox_options.items() if k in _LIMIT_KEYS})
    limits.check()
    return limits, {k: v for k, v in sandbox_options.items() if k in _START_KEYS}


def _run_assert_case(program: str, tests: str, sandbox_options: dict) -> SandboxResult:
    limits, start = sandbox_config(sandbox_options)
    return run_assert_test(program, tests, limits=limits, **start)


def code_reward(completion: str, tests: Any, *, partial_credit: bool = False, **sandbox_options) -> float:
    """Reward of one completion: 1.0/0.0 (all tests pass), or the fraction passed."""
    report = run_tests(extract_program(completion), tests, stop_on_failure=not partial_credit, **sandbox_options)
    return report.fraction_passed if partial_credit else float(report.all_passed)


def default_max_workers() -> int:
    """Four sandboxed tests per core, at most 32: a test mostly waits (namespace set-up, interpreter start, the
    judge's round trips), so on 2 cores 8 workers ran HumanEval 1.5x faster than 2 (bench/RESULTS.md); the cap
    keeps two sandboxes per test within the 256-uid pool when several trainers share a machine."""
    return max(1, min(32, 4 * (os.cpu_count() or 2)))


def run_tests_batch(
    programs: Sequence[str],
    tests: Sequence[Any],
    *,
    max_workers: int | None = None,
    stop_on_failure: bool = True,
    show_progress: bool | None = None,
    **sandbox_options,
) -> list[CodeTestReport]:
    """Run many programs concurrently on a thread pool of at most ``max_workers`` sandboxes.

    Threads suffice: each worker only waits on its subprocess. Order of the output matches input.
    Bad options and test sets that do not parse raise before anything runs; after that, a program
    whose run raises gets a report with ``error`` set and no test passed (logged as a warning), so
    one completion never costs the batch. Only :class:`SandboxUnavailable` still raises.
    """
    if len(programs) != len(tests):
        raise ValueError(f"got {len(programs)} programs but {len(tests)} test sets")
    workers = max_workers if max_workers is not None else default_max_workers()
    if workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {workers}")
    sandbox_config(sandbox_options)
    num_cases = []
    for index, cell in enumerate(tests):
        try:
            num_cases.append(len(check_tests(cell)))
        except ValueError as err:
            raise ValueError(f"test set {index}: {err}") from err
    from tqdm.auto import tqdm

    def one(index: int) -> CodeTestReport:
        try:
            return run_tests(programs[index], tests[index], stop_on_failure=stop_on_failure, **sandbox_options)
        except SandboxUnavailable:
            raise  # configuration: no program can be judged as asked
        except Exception as err:  # one completion's failure is its own 0, never the batch's
            logger.warning("code tests of program %d raised, scored 0: %r", index, err)
            return CodeTestReport(num_tests=num_cases[index], num_passed=0, results=[], error=repr(err))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        iterator = pool.map(one, range(len(programs)))
        disable = None if show_progress is None else not show_progress
        return list(tqdm(iterator, total=len(programs), desc="code tests", disable=disable))


@register_verifier("code", columns=("tests",), runs_code=True, reward_range=(0.0, 1.0))
def code_verifier(
    prompts: list,
    completions: list,
    *,
    tests: list,
    partial_credit: bool = False,
    max_workers: int | None = None,
    **columns,
) -> list[float]:
    """TRL-signature reward over the ``tests`` column; sandbox options pass through ``columns``
    only when they name a :func:`run_in_sandbox` keyword (``timeout_s``, ``memory_mb``,
    ``max_disk_mb``, ``require_os_isolation``...)."""
    if len(tests) != len(completions):
        raise ValueError(f"column 'tests' has {len(tests)} rows but there are {len(completions)} completions")
    sandbox_options = {k: v for k, v in columns.items() if k in SANDBOX_KEYS}
    prefixes = columns.get("program_prefix") or [None] * len(completions)
    programs = [(prefix or "") + extract_program(completion_text(c)) for c, prefix in zip(completions, prefixes)]
    for row, cell in enumerate(tests):
        try:
            check_tests(cell)
        except ValueError as err:
            raise ValueError(f"column 'tests' row {row}: {err}") from err
    reports = run_tests_batch(programs, tests, max_workers=max_workers,
                              stop_on_failure=not partial_credit, **sandbox_options)
    return [r.fraction_passed if partial_credit else float(r.all_passed) for r in reports]
