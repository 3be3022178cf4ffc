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

import contextlib
import hashlib
import json
import math
import os
import re
import time
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
        from disa.artifacts import SAMPLES, read_json
        from disa.stages.sample import list_shards

        shards = list_shards(str(self.samples))
        if not shards:
            SAMPLES.require(self.root)
        if self.samples_meta.exists():
            meta = read_json(self.samples_meta, "sample")
            try:
                expected = math.ceil(int(meta["num_prompts"]) / int(meta["shard_size"]))
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                from disa.artifacts import read_failure

                raise read_failure(self.samples_meta, "sample", e) from None
            if len(shards) < expected:
                raise ConfigError(f"{self.samples}: {len(shards)} of {expected} shards; the sampling run did not "
                                  "finish: run `disa sample` again (it resumes)")
        return shards

    def labels_metadata(self) -> dict:
        """What ``disa label`` recorded in ``labels.parquet`` (the target, N, the samples' settings)."""
        from disa.artifacts import LABELS

        meta = LABELS.read_metadata(self.root, LABELS_METADATA_KEY)
        if not isinstance(meta.get("target"), dict):
            raise ConfigError(f"{self.labels}: records no target (made by an older disa); re-run `disa label`")
        return meta

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


FINGERPRINT_SAMPLES, FINGERPRINT_CHUNK = 16, 1 << 16


def _sampled_digest(path: Path) -> str:
    """sha256 of a weight file's size and 16 chunks of 64 KiB spread over it (the whole file when small): another
    fine-tune of the same architecture differs in every chunk, and a 10 GB file costs 1 MB of reading."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= FINGERPRINT_SAMPLES * FINGERPRINT_CHUNK:
            h.update(fh.read())
        else:
            step = (size - FINGERPRINT_CHUNK) // (FINGERPRINT_SAMPLES - 1)
            for i in range(FINGERPRINT_SAMPLES):
                fh.seek(i * step)
                h.update(fh.read(FINGERPRINT_CHUNK))
    return h.hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """An identity of a local model folder that survives a copy or a move: a hash of ``config.json`` and of each
    weight file's name, size and sampled content. ``path`` is recorded for the message only; resume guards compare
    ``digest``."""
    path = Path(path).resolve()
    config = path / "config.json"
    config_sha = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None
    weights = sorted((p.name, _sampled_digest(p)) for p in path.iterdir()
                     if p.suffix in (".safetensors", ".bin") and p.is_file()) if path.is_dir() else []
    digest = hashlib.sha256(json.dumps([config_sha, weights]).encode()).hexdigest()[:16]
    return {"path": str(path), "config_sha256": config_sha, "digest": digest}


# ----------------------------------------------------------------------------------------------- one writer per stage
LOCK_DIR = ".disa-locks"  # one lock file per verb: output_dir/.disa-locks/<verb>
_HELD: dict[str, int] = {}  # lock files this process holds -> depth (``disa run`` nests nothing, a study may)


class RunLocked(ConfigError):
    """Another process is writing this stage's files in the same output_dir."""


@contextlib.contextmanager
def stage_lock(root: str | os.PathLike, verb: str):
    """Hold an exclusive lock on ``root/.disa-locks/<verb>`` for the body (``fcntl.flock``: the kernel drops it when
    the holder dies, so a lock left by a killed run is never in the way). A second process gets a ``RunLocked``
    naming the holder's pid; the file itself is left in place (deleting it would let a third process in)."""
    import fcntl

    root = Path(root).expanduser()
    (root / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    path = root / LOCK_DIR / verb
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"output_dir: {root} is in use by another `disa {verb}` ({holder}); wait for it to finish, "
                        "or give this run another output_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        _HELD[key] = 1
        sweep_stale_temporaries(root)
        yield path
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # releases the flock


TMP_PATTERN = re.compile(r"\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(root: str | os.PathLike, depth: int = 3) -> list[Path]:
    """Delete ``*.tmp-<pid>`` files (half-finished atomic writes) under ``root`` whose writer is dead; returns them."""
    root, removed = Path(root), []
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            m = TMP_PATTERN.search(e.name)
            if m and e.is_file(follow_symlinks=False) and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
            elif e.is_dir(follow_symlinks=False) and level < depth:
                stack.append((Path(e.path), level + 1))
    return removed
