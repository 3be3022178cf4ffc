import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from disa.data import DataError, PromptRecord, load_prompts, render_prompt


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_jsonl_round_trip_keeps_fields_and_extra(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "2+2?", "answer": "4", "metadata": {"src": "x"}, "numbers": [1, 2]},
        "",  # blank lines are skipped
        {"id": 7, "messages": [{"role": "user", "content": "hi"}], "tests": [{"in": "1", "out": "1"}]},
    ])
    recs = load_prompts(path)
    assert [r.id for r in recs] == ["a", "7"]
    assert recs[0].prompt == "2+2?" and recs[0].answer == "4" and recs[0].metadata == {"src": "x"}
    assert recs[0].extra == {"numbers": [1, 2]}
    assert recs[0].verifier_columns()["numbers"] == [1, 2]
    assert recs[1].messages == [{"role": "user", "content": "hi"}] and recs[1].prompt is None
    assert recs[1].tests == [{"in": "1", "out": "1"}]


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({"prompt": "x"}, "'id'"),
        ({"id": "b", "answer": "1"}, "'prompt' or 'messages'"),
        ({"id": "b", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "not both"),
        ({"id": "b", "prompt": 3}, "'prompt'"),
        ({"id": "b", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"id": "b", "messages": []}, "'messages'"),
        ({"id": "b", "prompt": "x", "metadata": [1]}, "'metadata'"),
        ({"id": 1.5, "prompt": "x"}, "'id'"),
        ("{not json", "invalid JSON"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path, bad_row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "ok"}, "", bad_row])
    with pytest.raises(DataError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert "bad.jsonl" in msg and "line 3" in msg and field in msg


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"}, {"id": "a", "prompt": "3"}])
    with pytest.raises(DataError, match=r"duplicate id 'a' at lines 1 and 3"):
        load_prompts(path)


def test_parquet_and_row_numbers(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"id": ["x", "y"], "prompt": ["p1", "p2"], "answer": ["1", None]}), path)
    recs = load_prompts(path)
    assert [(r.id, r.prompt, r.answer) for r in recs] == [("x", "p1", "1"), ("y", "p2", None)]
    pq.write_table(pa.table({"id": ["x", "y"], "prompt": ["p1", None]}), path)
    with pytest.raises(DataError, match=r"p\.parquet, row 2: one of the fields 'prompt' or 'messages'"):
        load_prompts(path)


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = str(tmp_path / "ds")
    datasets.Dataset.from_dict({"id": ["q1", "q2"], "prompt": ["a", "b"], "target": [3, 4]}).save_to_disk(folder)
    recs = load_prompts(folder)
    assert [r.id for r in recs] == ["q1", "q2"] and recs[1].extra == {"target": 4}


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "x.csv").write_text("id,prompt\n")
    with pytest.raises(DataError, match="unsupported"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "nope.jsonl")
    empty = write_jsonl(tmp_path / "e.jsonl", [""])
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(empty)


def test_render_prompt_with_and_without_chat_template(tiny_llama_path, tiny_gpt2_path):
    from transformers import AutoTokenizer

    chat_tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    base_tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    plain = PromptRecord(id="1", prompt="What is 2?")
    convo = PromptRecord(id="2", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert render_prompt(plain, chat_tok) == "<s><|user|>What is 2?\n<|assistant|>"
    assert render_prompt(convo, chat_tok) == "<s><|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    assert render_prompt(plain, base_tok) == "What is 2?"
    assert render_prompt(plain, None) == "What is 2?"
    assert render_prompt(PromptRecord(id="3", messages=[{"role": "user", "content": "Q"}]), base_tok) == "Q"
    with pytest.raises(DataError, match="no chat template"):
        render_prompt(convo, base_tok)
