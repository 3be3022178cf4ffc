"""The CLI's manners: the same flags in every verb, help that says what a verb reads and writes, --version,
`disa config` as a loadable commented YAML, and baselines that read Stage 1 files from another run."""

import sys
import shutil
from pathlib import Path

import pytest
import yaml

from disa import __version__, cli

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_VERBS = ["sample", "label", "fit-z", "train", "eval", "run"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"disa {__version__}"


@pytest.mark.parametrize("verb", PIPELINE_VERBS)
def test_every_verb_takes_the_same_flags_and_says_what_it_reads_and_writes(verb, capsys):
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("-c CONFIG", "--set SECTION.FIELD=VALUE", "--debug"):
        assert flag in text, (verb, flag)
    assert "Reads:" in text and "Writes:" in text and "exit code is 2" in text


def test_config_prints_a_commented_yaml_that_loads(tmp_path, capsys):
    from disa.config import config_from_dict, load_config

    assert cli.main(["config"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# disa pipeline config")
    path = tmp_path / "start.yaml"
    path.write_text(text)
    assert load_config(path) == config_from_dict({})
    assert "\nsample:\n" in text and "\ntrain:\n" in text and "\n  sft:\n" in text


def test_a_bad_override_is_blamed_on_the_override_not_the_file(capsys):
    code = cli.main(["train", "-c", str(ROOT / "examples" / "countdown.yaml"), "--set", "train.lr=fast"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("disa train: --set train.lr=fast: train.lr: expected float")


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """Stages 1-2 of examples/countdown.yaml, run once (seconds on the committed tiny models)."""
    run = tmp_path_factory.mktemp("stage1") / "disa"
    config = str(ROOT / "examples" / "countdown.yaml")
    for verb in ("sample", "label", "fit-z"):
        assert cli.main([verb, "-c", config, "--set", f"output_dir={run}", "--set", "sample.n=4"]) == 0, verb
    return run


@pytest.mark.parametrize("objective", ["disa", "flowrl", "grpo", "sft"])
def test_a_baseline_is_one_override_reading_stage1_from_the_disa_run(objective, stage1_run, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's relative paths
    before = sorted(p.relative_to(stage1_run) for p in stage1_run.rglob("*"))
    out = tmp_path / objective
    args = ["train", "-c", "examples/countdown.yaml", "--set", f"output_dir={out}", "--set", f"stage1_dir={stage1_run}",
            "--set", f"train.objective={objective}", "--set", "train.num_steps=2", "--set", "train.sft.num_epochs=1"]
    assert cli.main(args) == 0
    assert list((out / "checkpoints").glob("checkpoint-*")), "the baseline writes into its own output_dir"
    assert sorted(p.relative_to(stage1_run) for p in stage1_run.rglob("*")) == before  # and nothing into the DISA run


def test_stage1_dir_must_exist_and_is_not_for_stage1_verbs(tmp_path, capsys):
    config = str(ROOT / "examples" / "countdown.yaml")
    assert cli.main(["train", "-c", config, "--set", f"stage1_dir={tmp_path / 'missing'}",
                     "--set", f"output_dir={tmp_path / 'b'}"]) == 2
    assert "stage1_dir: " in capsys.readouterr().err
    assert cli.main(["sample", "-c", config, "--set", f"stage1_dir={tmp_path}", "--set", f"output_dir={tmp_path / 'b'}"]) == 2
    assert "run `disa sample` on that run's config" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_the_example_config_runs_on_a_fresh_copy(tmp_path, monkeypatch, capsys):
    """examples/countdown.yaml with nothing but the repository (a short budget: the full one is in the README)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", "-c", "examples/countdown.yaml", "--set", "train.num_steps=2", "--set", "sample.n=2"])
    out = capsys.readouterr().err  # the stages' messages (disa.log); stdout keeps only results
    assert code == 0, out
    assert (tmp_path / "runs" / "countdown" / "eval.json").is_file()
    assert "predicting the training mean" in out


def test_eval_of_a_named_checkpoint_needs_no_training_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = cli.main(["eval", "-c", "examples/countdown.yaml", "--set", f"output_dir={tmp_path / 'e'}", "--set", "eval.k=2",
                     "--set", "eval.pass_at=[1]", "--checkpoint", "examples/countdown/ref"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "e" / "eval" / "ref" / "eval.json").is_file()


def test_run_with_stage1_dir_runs_only_train_and_eval(stage1_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "grpo"
    code = cli.main(["run", "-c", "examples/countdown.yaml", "--set", f"output_dir={out}", "--set",
                     f"stage1_dir={stage1_run}", "--set", "train.objective=grpo", "--set", "train.num_steps=2",
                     "--set", "eval.k=2", "--set", "eval.pass_at=[1]"])
    printed = capsys.readouterr().err
    assert code == 0
    assert "disa sample" not in printed and "disa train: grpo, 2 steps" in printed and "disa eval" in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["checkpoints", "eval", "eval.json",
                                                                                  "eval.md", "eval_samples.parquet"]


def test_library_progress_bars_are_off_without_a_terminal(monkeypatch):
    import io

    from transformers.utils import logging as hf_logging

    from disa.cli import quiet_library_bars

    try:
        hf_logging.enable_progress_bar()
        monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file: no terminal
        quiet_library_bars()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
