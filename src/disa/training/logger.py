"""Metrics of both training loops: one row per step to ``metrics.csv``, and the same row to the trackers that
``report_to`` names (TensorBoard, Weights & Biases, MLflow), as ``TrainingArguments.report_to`` does in
transformers/TRL.

``metrics.csv`` is always written (``disa report`` and the studies read it). ``report_to`` is one name or a list:

* ``auto``: TensorBoard when the ``tensorboard`` package imports, silently nothing otherwise;
* ``none`` or ``csv``: only ``metrics.csv``;
* ``tensorboard``, ``wandb``, ``mlflow`` (or a list: ``[csv, wandb]``): each of them, and an error naming the missing
  package when one is not installed (the CLI checks this before any model loads: :func:`report_to_problem`).

Every tracker gets the same scalars under transformers' tag names: ``train/<metric>``, and ``eval/<metric>`` for
the ``eval_*`` columns, at the row's ``step``. A tracker is anything with the :class:`Tracker` methods; each is
declared once in :data:`TRACKERS` (its package, and how to open it on a run folder):

* TensorBoard: ``<output_dir>/tensorboard/``; every row is flushed, and a resumed run purges the steps after its
  checkpoint, as ``metrics.csv`` drops them.
* W&B: project ``$WANDB_PROJECT`` (default ``disa``), files under ``<output_dir>/wandb/``, one run per output folder
  (its id is derived from the folder, so a resume continues it; W&B keeps the first value it saw of a step that a
  resume logs again). ``WANDB_MODE=offline`` logs without an account; ``wandb sync`` uploads later.
* MLflow: ``$MLFLOW_TRACKING_URI`` when set, else the SQLite store ``<output_dir>/mlflow.db``; experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (default ``disa``); one run per output folder (its id kept in
  ``<output_dir>/mlflow_run_id``, so a resume continues it).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union

from disa.names import REPORT_TO

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
MLFLOW_DB = "mlflow.db"  # the default store: a SQLite file beside metrics.csv (MLflow 3 refuses a new file store)


class Tracker(Protocol):
    """Where one training run's step scalars go besides ``metrics.csv``."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars of one step (tag -> value); written through at once, so that a crash loses nothing logged."""

    def close(self) -> None:
        """Finish the run; may be called more than once."""


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker is opened with: the run folder, the step a resume restarts after, a name and the settings."""

    output_dir: Path
    resume_step: Optional[int] = None
    name: Optional[str] = None
    hparams: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackerSpec:
    """A ``report_to`` name: the package it needs (checked before any model loads) and how to open it."""

    name: str
    package: str
    extra: str
    open: Callable[[TrackerRun], Tracker]

    @property
    def install_hint(self) -> str:
        return (f"{self.name!r} needs the {self.package} package: pip install {self.package} "
                f"(or 'disa[{self.extra}]')")

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def tensorboard_installed() -> bool:
    return TRACKERS["tensorboard"].installed()


def tensorboard_tag(key: str) -> str:
    """transformers' tag names: ``eval_accuracy`` -> ``eval/accuracy``, ``loss`` -> ``train/loss``."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def scalar_items(metrics: Mapping[str, Any]):
    """The (tag, float) pairs of one row that a tracker can plot: real numbers, not the step, not flags."""
    for key, value in metrics.items():
        if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            yield tensorboard_tag(key), float(value)


# ------------------------------------------------------------------------------------------------- trackers
class TensorBoardTracker:
    def __init__(self, run: TrackerRun):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # installed but broken (e.g. a protobuf it cannot use)
            raise ImportError(f"{TRACKERS['tensorboard'].install_hint} ({err})") from err
        # purge_step: TensorBoard hides events of an earlier session at or after this step (a resume logs them again)
        self.writer = SummaryWriter(str(run.output_dir / TENSORBOARD_DIR), purge_step=(run.resume_step or 0) + 1)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def folder_run_id(output_dir: Path) -> str:
    """One id per run folder (its absolute path hashed): a resumed run continues the same tracker run."""
    return hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


class WandbTracker:
    def __init__(self, run: TrackerRun):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "disa"), dir=str(run.output_dir),
                              id=folder_run_id(run.output_dir), name=run.name or run.output_dir.name,
                              config=dict(run.hparams), resume="allow", reinit="create_new")
        self.closed = False

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.run.finish()


class MlflowTracker:
    def __init__(self, run: TrackerRun):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run.output_dir / MLFLOW_DB).resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "disa")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        id_file = run.output_dir / MLFLOW_RUN_ID_FILE
        self.run_id = id_file.read_text().strip() if run.resume_step is not None and id_file.is_file() else None
        if self.run_id is None:
            created = self.client.create_run(experiment_id, run_name=run.name or run.output_dir.name)
            self.run_id = created.info.run_id
            id_file.write_text(self.run_id + "\n")
            params = {k: str(v)[:500] for k, v in _flat(run.hparams).items()}
            if params:
                from mlflow.entities import Param

                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        self.closed = False

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.set_terminated(self.run_id)


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard", "tensorboard", "tensorboard", TensorBoardTracker),
    "wandb": TrackerSpec("wandb", "wandb", "wandb", WandbTracker),
    "mlflow": TrackerSpec("mlflow", "mlflow", "mlflow", MlflowTracker),
}
assert set(TRACKERS) | {"auto", "none", "csv"} == set(REPORT_TO)
INSTALL_HINT = TRACKERS["tensorboard"].install_hint  # kept: the message of a missing tensorboard


def report_to_names(report_to: Union[str, Sequence[str]]) -> list[str]:
    """The ``report_to`` setting as a list of names (a string is one name)."""
    return [report_to] if isinstance(report_to, str) else list(report_to)


def report_to_problem(report_to: Union[str, Sequence[str]], field: str = "train.report_to") -> Optional[str]:
    """One line saying why ``report_to`` cannot be honoured here, or None."""
    names = report_to_names(report_to)
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown or not names:
        return f"{field}: {unknown[0] if unknown else report_to!r} is not one of {list(REPORT_TO)} (or a list of them)"
    missing = [TRACKERS[n].install_hint for n in dict.fromkeys(names) if n in TRACKERS and not TRACKERS[n].installed()]
    return f"{field}: {'; '.join(missing)}" if missing else None


def chosen_trackers(report_to: Union[str, Sequence[str]]) -> list[TrackerSpec]:
    """The trackers to open: ``auto`` is TensorBoard when installed; ``none`` and ``csv`` add nothing."""
    problem = report_to_problem(report_to)
    names = report_to_names(report_to)
    if problem:
        if any(n not in REPORT_TO for n in names) or not names:
            raise ValueError(problem)
        raise ImportError(problem)
    chosen = []
    for name in dict.fromkeys(names):
        if name == "auto" and tensorboard_installed():
            name = "tensorboard"
        if name in TRACKERS and TRACKERS[name] not in chosen:
            chosen.append(TRACKERS[name])
    return chosen


def open_trackers(run: TrackerRun, report_to: Union[str, Sequence[str]]) -> list[Tracker]:
    trackers: list[Tracker] = []
    for spec in chosen_trackers(report_to):
        try:
            trackers.append(spec.open(run))
        except ImportError:
            if report_to_names(report_to) == ["auto"]:  # auto: a broken optional install is not an error
                continue
            for t in trackers:
                t.close()
            raise
    return trackers


class MetricsLogger:
    """One row per step to ``output_dir/metrics.csv`` (header grows when a new metric appears), and the same row
    as scalars to every tracker of ``report_to`` (see the module docstring).

    ``resume_step``: rows after it are dropped (they belong to a run that crashed before its next checkpoint).
    ``history``: the resumed checkpoint's rows, the source of truth: ``metrics.csv`` is rebuilt from them (a
    truncated or garbled file loses nothing) instead of from itself. Every rewrite is atomic.
    ``close()`` may be called more than once.
    """

    def __init__(self, output_dir: str | Path, report_to: Union[str, Sequence[str]] = "auto",
                 resume_step: Optional[int] = None, history: Optional[list] = None, run_name: Optional[str] = None,
                 hparams: Optional[Mapping[str, Any]] = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = open_trackers(TrackerRun(self.output_dir, resume_step, run_name, dict(hparams or {})),
                                      report_to)
        self.path = self.output_dir / "metrics.csv"
        self.rows: list[dict] = []
        self.columns: list[str] = []
        if history is not None:
            self.rows = [dict(r) for r in history if resume_step is None or int(r["step"]) <= resume_step]
            for row in self.rows:
                self.columns += [k for k in row if k not in self.columns]
        elif resume_step is not None and self.path.exists():
            with self.path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
        self._rewrite()

    def log(self, metrics: Mapping[str, Any]) -> None:
        step = int(metrics["step"])
        row = dict(metrics)
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns, restval="").writerow(row)
        scalars = dict(scalar_items(metrics))
        for tracker in self.trackers:
            tracker.log(step, scalars)

    def _rewrite(self) -> None:
        import io

        from disa.io import atomic_write_text

        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())  # a crash mid-rewrite leaves the old file, never half

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
