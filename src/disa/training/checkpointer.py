"""The checkpointer: a learner's state (policy, optimiser, schedule, scaler, a trained log Z module) plus the
loop's state and the run's configs, through ``disa.training.checkpoints`` (atomic writes, exact resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from disa.training.checkpoints import CHECKPOINT_PREFIX, load_training_checkpoint, save_training_checkpoint
from disa.training.learner import Learner


class Checkpointer:
    """``output_dir/checkpoint-<step>/`` for one run; ``config_files`` (``{"train_config.json": {...}}``) are
    written into every checkpoint; ``keep > 0`` keeps only the newest ``keep``."""

    def __init__(self, output_dir: str | Path, tokenizer, *, config_files: dict[str, dict], keep: int = 0,
                 log_z_module: Optional[nn.Module] = None):
        self.output_dir = Path(output_dir)
        self.tokenizer, self.config_files, self.keep = tokenizer, config_files, keep
        self.log_z_module = log_z_module

    def exists(self, step: int) -> bool:
        return (self.output_dir / f"{CHECKPOINT_PREFIX}{step}" / "trainer_state.json").exists()

    def save(self, step: int, learner: Learner, trainer_state: dict) -> Path:
        return save_training_checkpoint(
            self.output_dir, step, policy=learner.policy, tokenizer=self.tokenizer, optimizer=learner.optimizer,
            scheduler=learner.scheduler, scaler=learner.scaler, trainer_state=trainer_state,
            config_files=self.config_files, keep=self.keep, logz_head=self.log_z_module,
        )

    def load(self, ckpt: Path, learner: Learner) -> dict:
        """Restore ``learner`` (and the log Z module) from ``ckpt``; returns the saved trainer state."""
        return load_training_checkpoint(ckpt, policy=learner.policy, optimizer=learner.optimizer,
                                        scheduler=learner.scheduler, scaler=learner.scaler,
                                        logz_head=self.log_z_module)
