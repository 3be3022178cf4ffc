"""Metrics of both training loops: one row per step to ``metrics.csv``, and to TensorBoard when asked or installed.

``metrics.csv`` is always written (``disa report`` and the studies read it). ``report_to`` adds TensorBoard, as
``TrainingArguments.report_to`` does in transformers/TRL:

* ``auto``: TensorBoard when the ``tensorboard`` package imports, silently nothing otherwise;
* ``tensorboard``: TensorBoard, and an error naming the missing package when it is not installed (the CLI
  checks this before any model loads: :func:`report_to_problem`);
* ``none``: only ``metrics.csv``.

Scalars go to ``<output_dir>/tensorboard/`` under transformers' tag names: ``train/<metric>``, and
``eval/<metric>`` for the ``eval_*`` columns. Every row is flushed at once, so a crash loses nothing that was
logged; a resumed run purges the steps after its checkpoint, as ``metrics.csv`` drops them.
"""

from __future__ import annotations

import csv
import importlib.util
import numbers
from pathlib import Path
from typing import Any, Mapping, Optional

REPORT_TO = ("auto", "tensorboard", "none")
TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "'tensorboard' needs the tensorboard package: pip install tensorboard (or 'disa[tensorboard]')"


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def report_to_problem(report_to: str, field: str = "train.report_to") -> Optional[str]:
    """One line saying why ``report_to`` cannot be honoured here, or None."""
    if report_to not in REPORT_TO:
        return f"{field}: {report_to!r} is not one of {list(REPORT_TO)}"
    if report_to == "tensorboard" and not tensorboard_installed():
        return f"{field}: {INSTALL_HINT}"
    return None


def tensorboard_tag(key: str) -> str:
    """transformers' tag names: ``eval_accuracy`` -> ``eval/accuracy``, ``loss`` -> ``train/loss``."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def scalar_items(metrics: Mapping[str, Any]):
    """The (tag, float) pairs of one row that TensorBoard can plot: real numbers, not the step, not flags."""
    for key, value in metrics.items():
        if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            yield tensorboard_tag(key), float(value)


def open_tensorboard(log_dir: Path, report_to: str, purge_step: Optional[int]):
    """A ``SummaryWriter`` on ``log_dir``, or None (``none``, or ``auto`` without tensorboard)."""
    problem = report_to_problem(report_to)
    if problem:
        raise ImportError(problem) if report_to == "tensorboard" else ValueError(problem)
    if report_to == "none" or (report_to == "auto" and not tensorboard_installed()):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # installed but broken (e.g. a protobuf it cannot use)
        if report_to == "auto":
            return None
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    # purge_step: TensorBoard hides events of an earlier session at or after this step (a resume logs them again)
    return SummaryWriter(str(log_dir), purge_step=purge_step)


class MetricsLogger:
    """One row per step to ``output_dir/metrics.csv`` (header grows when a new metric appears), and the same row
    as TensorBoard scalars under ``output_dir/tensorboard/`` (see the module docstring for ``report_to``).

    ``resume_step``: rows after it are dropped (they belong to a run that crashed before its next checkpoint).
    ``history``: the resumed checkpoint's rows, the source of truth: ``metrics.csv`` is rebuilt from them (a
    truncated or garbled file loses nothing) instead of from itself. Every rewrite is atomic.
    ``close()`` may be called more than once; a row logged after it reopens the TensorBoard writer.
    """

    def __init__(self, output_dir: str | Path, report_to: str = "auto", resume_step: Optional[int] = None,
                 history: Optional[list] = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.writer = open_tensorboard(self.output_dir / TENSORBOARD_DIR, report_to,
                                       purge_step=(resume_step or 0) + 1)
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
        if self.writer is not None:
            for tag, value in scalar_items(metrics):
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def _rewrite(self) -> None:
        import io

        from disa.io import atomic_write_text

        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())  # a crash mid-rewrite leaves the old file, never half

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
