"""train.report_to: step metrics in TensorBoard (read back with tensorboard's EventAccumulator), next to
metrics.csv; none writes no event file; a missing package is an up-front error for ``tensorboard`` and silent
for ``auto``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from disa import cli
from disa.config import SFTConfig, TrainConfig
from disa.training import logger as logger_module
from disa.training.logger import MetricsLogger, report_to_problem, tensorboard_tag

pytest.importorskip("tensorboard")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "countdown"


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tags_follow_transformers_names():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("time_rollout_s") == "train/time_rollout_s"
    assert tensorboard_tag("eval_accuracy") == "eval/accuracy"


def test_every_numeric_metric_of_every_step_is_a_scalar(tmp_path):
    log = MetricsLogger(tmp_path, "tensorboard")
    log.log({"step": 1, "loss": 0.5, "lr": 1e-3, "grad_norm": 2.0, "note": "text", "flag": True})
    log.log({"step": 2, "loss": 0.25, "lr": 1e-3, "grad_norm": 1.5, "eval_score": 0.75})
    got = scalars(tmp_path / "tensorboard")  # read before close: every row is flushed
    log.close()
    assert set(got) == {"train/loss", "train/lr", "train/grad_norm", "eval/score"}
    assert got["train/loss"] == [(1, 0.5), (2, 0.25)]
    assert got["train/grad_norm"] == [(1, 2.0), (2, 1.5)]
    assert got["eval/score"] == [(2, 0.75)]
    assert got["train/lr"][0][1] == pytest.approx(1e-3)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["loss"] for r in rows] == ["0.5", "0.25"]  # metrics.csv is written as well


def test_a_resume_purges_the_steps_after_its_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, "tensorboard")
    for step, loss in ((1, 1.0), (2, 2.0), (3, 3.0)):
        first.log({"step": step, "loss": loss})
    first.close()
    resumed = MetricsLogger(tmp_path, "tensorboard", resume_step=2)
    resumed.log({"step": 3, "loss": 30.0})
    resumed.close()
    assert scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_none_writes_only_metrics_csv(tmp_path):
    log = MetricsLogger(tmp_path, "none")
    log.log({"step": 1, "loss": 0.5})
    log.close()
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "metrics.csv").exists()


def test_without_tensorboard_auto_skips_and_tensorboard_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(logger_module.TrackerSpec, "installed", lambda self: self.name != "tensorboard")
    log = MetricsLogger(tmp_path / "auto", "auto")
    log.log({"step": 1, "loss": 0.5})
    log.close()
    assert not (tmp_path / "auto" / "tensorboard").exists()
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path / "tb", "tensorboard")
    assert report_to_problem("auto") is None and report_to_problem("none") is None
    assert report_to_problem("tensorboard").startswith("train.report_to: ")


def test_report_to_is_validated_by_the_config():
    assert TrainConfig().report_to == "auto" and SFTConfig().report_to == "auto"
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to="comet")


def test_the_cli_refuses_report_to_tensorboard_without_the_package_before_any_model_loads(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setattr(logger_module.TrackerSpec, "installed", lambda self: self.name != "tensorboard")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "3 6 7 1 -> 60 =", "numbers": [3, 6, 7, 1], "target": 60}) + "\n")
    config = {"output_dir": str(tmp_path / "run"), "data": {"prompts": str(prompts), "verifier": "countdown"},
              "models": {"reference": str(EXAMPLE / "ref"), "device": "cpu", "cpu_threads": 1},
              "target": {"beta": 3.0, "reward_transform": "group"},
              "train": {"objective": "grpo", "max_new_tokens": 12, "num_steps": 1, "group_size": 2,
                        "prompts_per_step": 1, "report_to": "tensorboard"},
              "sample": {"max_new_tokens": 12}, "eval": {"max_new_tokens": 12}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"disa train: train.report_to: {logger_module.INSTALL_HINT}"  # the only problem
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sft_writes_its_steps_to_tensorboard_and_closes_the_writer_on_a_crash(tiny_gpt2_path, tmp_path,
                                                                               monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from disa.training import train_sft

    examples = [("Q: 1+1?", " 2"), ("Q: 2+2?", " 4"), ("Q: 3+3?", " 6"), ("Q: 4+4?", " 8")]
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    cfg = SFTConfig(num_epochs=1, micro_batch_size=2, lora=None, lr=1e-3, report_to="tensorboard")
    _, history = train_sft(AutoModelForCausalLM.from_pretrained(tiny_gpt2_path), tok, examples, cfg,
                           output_dir=tmp_path / "ok")
    got = scalars(tmp_path / "ok" / "tensorboard")
    for key in ("loss", "grad_norm", "lr", "tokens", "time_step_s", "epoch"):
        assert [s for s, _ in got[f"train/{key}"]] == [1, 2], key
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([h[key] for h in history], rel=1e-6), key

    closed = []
    monkeypatch.setattr(MetricsLogger, "close", lambda self: closed.append(self.output_dir))
    import disa.training.checkpointer as checkpointer_module  # SFT saves through the RL loop's Checkpointer

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpointer_module, "save_training_checkpoint", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        train_sft(AutoModelForCausalLM.from_pretrained(tiny_gpt2_path), tok, examples, cfg, output_dir=tmp_path / "crash")
    assert closed == [tmp_path / "crash"]
    assert [s for s, _ in scalars(tmp_path / "crash" / "tensorboard")["train/loss"]] == [1, 2]


def test_rl_writes_every_logged_metric_of_every_step(tiny_gpt2_path, tmp_path):
    from test_trainer import make_config, make_trainer

    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "disa", num_steps=2, report_to="tensorboard"))
    history = trainer.train()
    got = scalars(tmp_path / "run" / "tensorboard")
    numeric = [k for k, v in history[0].items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert {"loss", "reward_mean", "lr", "grad_norm", "time_rollout_s"} <= set(numeric)
    assert "log_z_mean" in numeric, numeric
    for key in numeric:
        assert [s for s, _ in got[f"train/{key}"]] == [1, 2], key
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([h[key] for h in history], rel=1e-5, nan_ok=True), key
