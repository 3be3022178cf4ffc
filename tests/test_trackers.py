"""train.report_to beyond TensorBoard: the Tracker interface, W&B in offline mode (read back from its run file)
and MLflow on a SQLite store (read back with its client; slow). Each tracker test is skipped when its package is
absent; `pip install -e '.[dev]'` installs wandb (not mlflow, a much heavier install), so the README's test command
runs the W&B one."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from disa.config import SFTConfig, TrainConfig
from disa.training import logger as logger_module
from disa.training.logger import (
    TRACKERS, MetricsLogger, Tracker, TrackerRun, TrackerSpec, chosen_trackers, report_to_problem,
)

ROWS = [{"step": 1, "loss": 0.5, "reward_mean": 0.25, "note": "text", "flag": True},
        {"step": 2, "loss": 0.125, "reward_mean": 0.75, "eval_score": 0.5},
        {"step": 3, "loss": 0.0625, "reward_mean": 1.0}]


class ListTracker:
    """A tracker kept in memory: what MetricsLogger hands to any Tracker."""

    opened: list["ListTracker"] = []

    def __init__(self, run: TrackerRun):
        self.run, self.logged, self.closed = run, [], 0
        ListTracker.opened.append(self)

    def log(self, step, scalars):
        self.logged.append((step, dict(scalars)))

    def close(self):
        self.closed += 1


def test_every_tracker_gets_the_numeric_scalars_of_every_step(tmp_path, monkeypatch):
    ListTracker.opened = []
    spec = TrackerSpec("tensorboard", "csv", "x", ListTracker)  # "csv": a module that always imports
    monkeypatch.setitem(TRACKERS, "tensorboard", spec)
    tracker_type: type[Tracker] = ListTracker  # declared interface: a static check, not hasattr
    log = MetricsLogger(tmp_path, ["csv", "tensorboard"], hparams={"lr": 1e-3})
    for row in ROWS:
        log.log(row)
    log.close()
    (tracker,) = ListTracker.opened
    assert isinstance(tracker, tracker_type) and tracker.run.hparams == {"lr": 1e-3} and tracker.closed == 1
    assert tracker.logged == [(1, {"train/loss": 0.5, "train/reward_mean": 0.25}),
                              (2, {"train/loss": 0.125, "train/reward_mean": 0.75, "eval/score": 0.5}),
                              (3, {"train/loss": 0.0625, "train/reward_mean": 1.0})]
    assert [r["loss"] for r in csv.DictReader((tmp_path / "metrics.csv").open())] == ["0.5", "0.125", "0.0625"]


def test_report_to_takes_a_name_or_a_list_and_names_a_missing_package(monkeypatch):
    assert TrainConfig(report_to=["csv", "wandb"]).report_to == ["csv", "wandb"]
    assert SFTConfig(report_to="mlflow").report_to == "mlflow"
    with pytest.raises(ValueError, match=r"report_to: 'comet' is not one of"):
        TrainConfig(report_to=["csv", "comet"])
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to=[])
    monkeypatch.setattr(TrackerSpec, "installed", lambda self: self.name != "wandb")
    assert report_to_problem(["csv", "tensorboard"]) is None and report_to_problem("none") is None
    assert report_to_problem(["csv", "wandb"], "train.sft.report_to") == (
        "train.sft.report_to: 'wandb' needs the wandb package: pip install wandb (or 'disa[wandb]')")
    with pytest.raises(ImportError, match="pip install wandb"):
        chosen_trackers(["wandb"])
    assert [s.name for s in chosen_trackers(["csv", "auto", "tensorboard"])] == ["tensorboard"]  # once
    monkeypatch.setattr(TrackerSpec, "installed", lambda self: False)
    assert chosen_trackers("auto") == [] and chosen_trackers(["csv"]) == []


def test_wandb_offline_logs_every_step_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "disa-test")
    out = tmp_path / "run"
    log = MetricsLogger(out, ["csv", "wandb"], hparams={"train": {"lr": 0.001}})
    for row in ROWS[:2]:
        log.log(row)
    log.close()
    log.close()  # twice is fine
    resumed = MetricsLogger(out, "wandb", resume_step=2)
    resumed.log(ROWS[2])
    resumed.close()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    for run in runs:  # wandb's service process writes the run file; finish() may return before the last bytes land
        deadline = time.monotonic() + 30
        while "exit" not in _types(run) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert len(runs) == 2 and all(r.name.endswith(logger_module.folder_run_id(out)) for r in runs)
    history = [h for run in runs for h in wandb_history(run)]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 0.5), (2, 0.125), (3, 0.0625)]
    assert history[1]["eval/score"] == 0.5


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB's log format
    (32 KiB blocks; each fragment a crc32, a little-endian length, a type: 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    data, block, pos, records, partial = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # preallocated zeros: no more records in this block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            records.append(partial)
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline run (``run.log`` calls), decoded with wandb's own protobuf classes."""
    import json

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    rows = []
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.mark.slow  # MLflow's SQLite store runs its schema migrations first: about 20 s
def test_mlflow_sqlite_store_logs_every_step_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")  # mlflow-skinny has no SQL store; `disa[mlflow]` installs mlflow itself
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    log = MetricsLogger(out, ["mlflow"], hparams={"train": {"lr": 0.001}})
    for row in ROWS[:2]:
        log.log(row)
    log.close()
    resumed = MetricsLogger(out, "mlflow", resume_step=2)
    resumed.log(ROWS[2])
    resumed.close()
    run_id = (out / logger_module.MLFLOW_RUN_ID_FILE).read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / logger_module.MLFLOW_DB).resolve()}")
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.125), (3, 0.0625)]
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.info.status == "FINISHED"


def _types(run_dir: Path) -> list[str]:
    from wandb.proto import wandb_internal_pb2

    out = []
    for data in wandb_records(next(run_dir.glob("*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        out.append(record.WhichOneof("record_type"))
    return out
