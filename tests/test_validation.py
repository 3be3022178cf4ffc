"""Bad input stopped at the door: every verb checks its inputs before loading a model, lists every problem at
once naming the file, line or setting, exits with code 2 and leaves nothing a re-run could mistake for work.

The models are the testbed's committed in examples/countdown/ (40-token context, character tokenizer)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from disa import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "countdown"
LONG = "1 2 3 4 -> 10 = " + "9" * 40  # 56 characters: more than the 40-token context alone


def write(tmp_path, rows, **overrides) -> str:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {"prompts": str(prompts), "verifier": "countdown"},
        "models": {"reference": str(EXAMPLE / "ref"), "proposal": str(EXAMPLE / "proposal"), "device": "cpu",
                   "cpu_threads": 1},
        "target": {"beta": 3.0, "reward_transform": "raw"},
        "sample": {"n": 2, "max_new_tokens": 12},
        "train": {"max_new_tokens": 12, "num_steps": 1, "group_size": 2, "prompts_per_step": 2},
        "eval": {"max_new_tokens": 12, "k": 2, "pass_at": [1]},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        config.setdefault(section, {})[name] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


ROWS = [{"id": "a", "prompt": "3 6 7 1 -> 60 =", "numbers": [3, 6, 7, 1], "target": 60},
        {"id": "b", "prompt": "4 2 7 2 -> 7 =", "numbers": [4, 2, 7, 2], "target": 7}]


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_a_prompt_longer_than_the_context_is_refused_with_its_id_and_line(tmp_path, capsys):
    config = write(tmp_path, [*ROWS, {"id": "too-long", "prompt": LONG}])
    code, err = run(capsys, "sample", "-c", config)
    assert code == 2
    assert "prompts.jsonl, line 3 (id 'too-long')" in err and "models.reference (40)" in err
    assert "data.long_prompts: skip" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_long_prompts_can_be_skipped_and_the_ids_are_recorded(tmp_path, capsys):
    import pyarrow.parquet as pq

    config = write(tmp_path, [*ROWS, {"id": "too-long", "prompt": LONG}], data__long_prompts="skip")
    code = cli.main(["sample", "-c", config])
    out = capsys.readouterr().err
    assert code == 0
    assert "skipping 1 of 3 prompts" in out and "too-long" in out
    record = json.loads((tmp_path / "run" / "skipped_prompts.json").read_text())
    assert [s["id"] for s in record["data.prompts"]["skipped"]] == ["too-long"]
    assert record["data.prompts"]["skipped"][0]["context"] == 40
    ids = set()
    for shard in (tmp_path / "run" / "samples").glob("shard-*.parquet"):
        ids |= set(pq.read_table(shard, columns=["prompt_id"]).column("prompt_id").to_pylist())
    assert ids == {"a", "b"}


def test_a_row_without_the_verifiers_column_is_named_before_sampling(tmp_path, capsys):
    rows = [{"id": "ok", "prompt": "2+3?", "answer": "5"}, {"id": "no-answer", "prompt": "7*6?"}]
    config = write(tmp_path, rows, data__verifier="math")
    code, err = run(capsys, "sample", "-c", config)
    assert code == 2
    assert "prompts.jsonl, line 2 (id 'no-answer'): no 'answer', which verifier 'math' needs" in err
    assert not (tmp_path / "run").exists()


def test_an_output_dir_that_cannot_be_created_is_refused_up_front(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    config = write(tmp_path, ROWS)
    code, err = run(capsys, "sample", "-c", config, "--set", f"output_dir={tmp_path / 'a-file' / 'run'}")
    assert code == 2 and "output_dir: cannot create" in err and "is a file, not a folder" in err


def test_an_unwritable_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, err = run(capsys, "sample", "-c", write(tmp_path, ROWS))
    assert code == 2 and "output_dir: cannot write to" in err and "Read-only file system" in err


def test_a_model_folder_without_a_tokenizer_names_the_setting(tmp_path, capsys):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(EXAMPLE / "proposal", broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    code, err = run(capsys, "sample", "-c", write(tmp_path, ROWS), "--set", f"models.proposal={broken}")
    assert code == 2 and f"models.proposal: '{broken}' has no usable tokenizer" in err


def test_every_problem_is_listed_at_once(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    rows = [*ROWS, {"id": "too-long", "prompt": LONG}]
    code, err = run(capsys, "run", "-c", write(tmp_path, rows), "--set", f"output_dir={tmp_path / 'a-file' / 'x'}",
                    "--set", f"models.proposal={tmp_path / 'nowhere'}")
    assert code == 2
    assert err.startswith("disa run: 3 problems with the inputs:")
    assert "models.proposal" in err and "too-long" in err and "output_dir" in err


def test_debug_shows_the_traceback(tmp_path):
    from disa.config import ConfigError

    with pytest.raises(ConfigError, match="too-long"):
        cli.main(["sample", "-c", write(tmp_path, [*ROWS, {"id": "too-long", "prompt": LONG}]), "--debug"])


def test_a_math_verifier_that_cannot_load_is_refused(tmp_path, capsys, monkeypatch):
    import disa.verifiers as verifiers

    def missing(name):
        raise ModuleNotFoundError("No module named 'math_verify'")

    monkeypatch.setattr(verifiers, "get_verifier", missing)
    rows = [{"id": "ok", "prompt": "2+3?", "answer": "5"}]
    code, err = run(capsys, "sample", "-c", write(tmp_path, rows, data__verifier="math"))
    assert code == 2 and "No module named 'math_verify'" in err and "pip install 'disa[math]'" in err


def test_an_unexpected_error_is_one_line_without_debug(tmp_path, capsys, monkeypatch):
    import disa.stages.sample as sample

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sample, "run_sampling", boom)
    code, err = run(capsys, "sample", "-c", write(tmp_path, ROWS))
    assert code == 1 and "RuntimeError: disk on fire (run again with --debug" in err and "Traceback" not in err


def test_a_model_folder_without_weights_names_the_setting(tmp_path, capsys):
    broken = tmp_path / "no-weights"
    shutil.copytree(EXAMPLE / "ref", broken)
    (broken / "model.safetensors").unlink()
    code, err = run(capsys, "sample", "-c", write(tmp_path, ROWS), "--set", f"models.reference={broken}")
    assert code == 2 and f"models.reference: '{broken}' has no weights" in err


# ------------------------------------------------------------------------------- declared once: disa.artifacts.STAGE_IO
@pytest.mark.parametrize("verb", ["sample", "label", "fit-z", "train", "eval"])
def test_help_is_derived_from_the_stage_declaration(verb, capsys):
    from disa.artifacts import STAGE_IO

    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    io = STAGE_IO[verb]
    assert f"Reads: {' '.join(io.reads_text().split())}." in text
    assert f"Writes: {' '.join(io.writes_text().split())}." in text


def test_what_train_reads_follows_its_log_z_source(tmp_path, capsys):
    """The regressor is read only with train.log_z: regressor, the table only with auto/table, nothing with grpo;
    each missing file is named with the verb that writes it."""
    from disa.artifacts import missing_inputs
    from disa.config import load_config

    config = write(tmp_path, ROWS)
    run_dir = tmp_path / "run"
    (run_dir / "log_z").mkdir(parents=True)
    (run_dir / "labels.parquet").write_bytes(b"")  # present; its contents are read later
    say = lambda *sets: missing_inputs(load_config(config, list(sets)), "train")  # noqa: E731
    assert say() == [f"{run_dir / 'log_z' / 'table.parquet'}: not found (the frozen log Z of every labelled prompt); "
                     "run `disa fit-z` first (it writes this file)"]
    assert say("train.log_z=regressor") == [f"{run_dir / 'log_z' / 'model.safetensors'}: not found (the frozen log Z "
                                            "regressor); run `disa fit-z` first (it writes this file)"]
    assert say("train.log_z=labels") == [] and say("train.objective=grpo") == []
    assert say("train.objective=sft")[0].startswith(f"{run_dir / 'samples' / 'shard-*.parquet'}: not found")
    code, err = run(capsys, "train", "-c", config, "--set", "train.log_z=regressor")
    assert code == 2 and "model.safetensors: not found" in err


def test_the_context_error_names_the_stage_whose_max_new_tokens_is_the_budget(tmp_path, capsys):
    config = write(tmp_path, [*ROWS, {"id": "too-long", "prompt": LONG}])
    code, err = run(capsys, "sample", "-c", config, "--set", "train.max_new_tokens=20")
    assert code == 2
    assert "+ 20 new tokens (train.max_new_tokens, the longest of any stage)" in err
    assert "lower train.max_new_tokens" in err and "sample.max_new_tokens" not in err
