"""The run directory: where each stage's artefact lives, what it records about itself, and the guards that
refuse to mix two experiments.

    output_dir/
      meta.json, samples/shard-*.parquet   disa sample   settings, prompt-id digest, model fingerprints
      labels.parquet                       disa label    per-prompt label + diagnostics; its Parquet metadata
                                                         records the target (beta, r~), N and the models
      log_z/{model.safetensors, config.json, report.json, embeddings.safetensors, table.parquet}
                                           disa fit-z    the frozen regressor and, in table.parquet, its
                                                         prediction for every labelled prompt
      checkpoints/checkpoint-<step>/       disa train    + train_config.json, target.json; metrics.csv and
                                                         tensorboard/ (train.report_to) beside them
      eval/<policy>/, eval.json, eval.md   disa eval     one folder per evaluated policy; top level: the latest

A later stage reads what an earlier one recorded (``recorded_target``, ``check_target``) and refuses a config
that disagrees, naming both values, instead of re-deriving it from the config it is given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from disa.config import ConfigError, TargetConfig

LABELS_METADATA_KEY = b"disa"


class RunDir:
    """Paths of one run and the checks every verb makes on them."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    samples = property(lambda self: self.root / "samples")
    samples_meta = property(lambda self: self.root / "meta.json")
    labels = property(lambda self: self.root / "labels.parquet")
    log_z = property(lambda self: self.root / "log_z")
    log_z_table = property(lambda self: self.root / "log_z" / "table.parquet")
    embeddings_cache = property(lambda self: self.root / "log_z" / "embeddings.safetensors")
    checkpoints = property(lambda self: self.root / "checkpoints")
    eval = property(lambda self: self.root / "eval")

    def require(self, path: Path, verb: str, what: str = "") -> Path:
        """``path``, or a ConfigError naming it and the verb that writes it."""
        if not Path(path).exists():
            what = f" ({what})" if what else ""
            raise ConfigError(f"{path}: not found{what}; run `disa {verb}` first (it writes this file)")
        return Path(path)

    def ensure_writable(self) -> None:
        """Create the run directory, or a ConfigError naming it and ``output_dir`` (before any model loads)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"output_dir: cannot write to {str(self.root)!r} ({e.strerror or e})") from None

    def complete_shards(self) -> list[str]:
        """Every Stage 1 shard, or a ConfigError when there are none or the sampling run did not finish."""
        from disa.stages.sample import list_shards

        shards = list_shards(str(self.samples))
        if not shards:
            self.require(self.samples / "shard-*.parquet", "sample", "Stage 1 samples")
        if self.samples_meta.exists():
            meta = json.loads(self.samples_meta.read_text())
            expected = math.ceil(meta["num_prompts"] / meta["shard_size"])
            if len(shards) < expected:
                raise ConfigError(f"{self.samples}: {len(shards)} of {expected} shards; the sampling run did not "
                                  "finish: run `disa sample` again (it resumes)")
        return shards

    def labels_metadata(self) -> dict:
        """What ``disa label`` recorded in ``labels.parquet`` (the target, N, the samples' settings)."""
        import pyarrow.parquet as pq

        self.require(self.labels, "label", "Stage 1 labels")
        raw = (pq.read_schema(str(self.labels)).metadata or {}).get(LABELS_METADATA_KEY)
        if raw is None:
            raise ConfigError(f"{self.labels}: records no target (made by an older disa); re-run `disa label`")
        return json.loads(raw)

    def recorded_target(self) -> TargetConfig:
        return TargetConfig.from_dict(self.labels_metadata()["target"])


def check_target(config: TargetConfig, recorded: Mapping | TargetConfig, source: Path | str) -> None:
    """Refuse a config whose target differs from the one an artefact was made with, naming both values."""
    recorded = recorded if isinstance(recorded, dict) else recorded.to_dict()
    for name in ("beta", "reward_transform"):
        mine, theirs = getattr(config, name), recorded.get(name)
        if mine != theirs:
            raise ConfigError(
                f"target.{name}: the config says {mine!r} but {source} was made with {name} = {theirs!r}; Stage 3 "
                f"must train towards the target its log Z labels estimate: set target.{name}={theirs!r} or re-run "
                "`disa label` (and `disa fit-z`) with the new value")


def model_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """A cheap identity of a local model folder: its resolved path, a hash of ``config.json`` and the names and
    sizes of its weight files (hashing the weights themselves would read gigabytes)."""
    path = Path(path).resolve()
    config = path / "config.json"
    config_sha = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None
    weights = sorted((p.name, p.stat().st_size) for p in path.iterdir()
                     if p.suffix in (".safetensors", ".bin") and p.is_file()) if path.is_dir() else []
    digest = hashlib.sha256(json.dumps([config_sha, weights]).encode()).hexdigest()[:16]
    return {"path": str(path), "config_sha256": config_sha, "digest": digest}

