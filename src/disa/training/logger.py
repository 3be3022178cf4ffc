"""Metrics of both training loops: one row per step to ``metrics.csv`` or TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Optional

LOG_BACKENDS = ("csv", "tensorboard")


class MetricsLogger:
    """One row per step to ``output_dir/metrics.csv`` (header grows when a new metric appears) or TensorBoard.

    ``resume_step``: rows after it are dropped (they belong to a run that crashed before its next checkpoint).
    """

    def __init__(self, output_dir: str | Path, log_with: str = "csv", resume_step: Optional[int] = None):
        if log_with not in LOG_BACKENDS:
            raise ValueError(f"log_with must be one of {list(LOG_BACKENDS)}, got {log_with!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_with = log_with
        self.writer = None
        self.path = self.output_dir / "metrics.csv"
        self.rows: list[dict] = []
        self.columns: list[str] = []
        if log_with == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log_with='tensorboard' needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=resume_step)
            return
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
        self._rewrite()

    def log(self, metrics: Mapping[str, Any]) -> None:
        step = int(metrics["step"])
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
            return
        row = {k: v for k, v in metrics.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
