"""The run folder's artefacts, each declared once: where it lives, which verb writes it, the columns it must hold,
what it records about itself, and a content digest that later stages record and compare.

    artefact        file(s) under the run folder               written by   records
    samples         meta.json, samples/shard-*.parquet         disa sample  settings, model digests, prompt digests
    labels          labels.parquet (Parquet metadata "disa")   disa label   target, N, digest of the samples
    log Z table     log_z/table.parquet                        disa fit-z   target, digest of the labels
    regressor       log_z/{model.safetensors, config.json}     disa fit-z   (same metadata as the table)
    checkpoint      checkpoints/checkpoint-<step>/             disa train   lineage.json: digests of every input
    eval result     eval/<policy>/eval.json                    disa eval    the summary and per-prompt rows

``STAGE_IO`` says, per verb, which config inputs and artefacts it reads and which it writes; ``disa <verb>
--help`` and :func:`disa.stages.validate.check_inputs` are both derived from it. Every read of an artefact goes
through :func:`reading`, which turns whatever a damaged file raises (``ArrowInvalid``, ``JSONDecodeError``,
``KeyError``, ``SafetensorError``, a truncated file...) into one :class:`ArtifactError` naming the path and the
verb that rewrites it. Paths in recorded metadata are relative to the run folder, so a run folder can be moved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from disa.config import ConfigError

DIGEST_CHUNK = 1 << 20
LINEAGE_FILE = "lineage.json"


class ArtifactError(ConfigError):
    """An artefact that is missing, damaged or does not match what a later stage was made with (exit code 2)."""


def read_failure(path: str | os.PathLike, verb: str, err: BaseException) -> ArtifactError:
    """One line naming ``path``, what went wrong and the verb that writes the file again."""
    detail = (str(err).strip().splitlines() or [""])[0][:200]
    detail = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    return ArtifactError(f"{path}: cannot be read ({detail}); the file is damaged or was written by another "
                         f"version: re-run `disa {verb}` (it writes this file again)")


@contextlib.contextmanager
def reading(path: str | os.PathLike, verb: str) -> Iterator[None]:
    """Run the body; any failure that is not already a ``ConfigError`` becomes :func:`read_failure`."""
    try:
        yield
    except ConfigError:
        raise
    except (KeyboardInterrupt, MemoryError, PermissionError):  # not the file's fault: the environment's (exit 1)
        raise
    except FileNotFoundError as err:
        raise ArtifactError(f"{path}: not found; run `disa {verb}` first (it writes this file)") from err
    except Exception as err:  # a damaged file raises any type, from any library
        raise read_failure(path, verb, err) from err


def read_json(path: str | os.PathLike, verb: str) -> Any:
    """A JSON artefact, or an ``ArtifactError`` naming it and ``verb``."""
    with reading(path, verb):
        return json.loads(Path(path).read_text(encoding="utf-8"))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of a file's bytes; of a folder, of its files' relative names and digests."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and ".tmp-" not in p.name):
            h.update(f"{f.relative_to(path).as_posix()}\0{file_digest(f)}\n".encode())
        return h.hexdigest()[:16]
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(DIGEST_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def text_digest(texts) -> str:
    """sha256 of a sequence of strings (each length-prefixed, so no two sequences collide by joining)."""
    h = hashlib.sha256()
    for t in texts:
        b = str(t).encode("utf-8")
        h.update(f"{len(b)}:".encode() + b)
    return h.hexdigest()[:16]


def prompts_digest(records) -> str:
    """A digest of what each prompt *says* (id, text or messages, verifier columns), not only of its id: the same
    ids with other texts are another experiment."""
    return text_digest(json.dumps({"id": r.id, "prompt": r.prompt, "messages": r.messages,
                                   "columns": r.verifier_columns()}, sort_keys=True, default=str) for r in records)


def relative(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to the run folder ``root`` (what metadata records, so the folder can be moved)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root))


# ----------------------------------------------------------------------------------------------- the artefacts
@dataclass(frozen=True)
class Artifact:
    """One artefact of a run folder. ``relpath`` may end in a glob (the sample shards)."""

    key: str
    relpath: str
    written_by: str
    what: str
    columns: tuple[str, ...] = ()
    shown: str = ""  # how --help names it, when not by relpath

    @property
    def display(self) -> str:
        return self.shown or self.relpath

    def path(self, root: str | os.PathLike) -> Path:
        return Path(root).expanduser() / self.relpath

    def exists(self, root: str | os.PathLike) -> bool:
        p = self.path(root)
        return any(p.parent.glob(p.name)) if "*" in p.name else p.exists()

    def missing_message(self, root: str | os.PathLike, hint: str = "") -> str:
        hint = f"; {hint}" if hint else ""
        return (f"{self.path(root)}: not found ({self.what}); run `disa {self.written_by}` first (it writes this "
                f"file){hint}")

    def require(self, root: str | os.PathLike) -> Path:
        if not self.exists(root):
            raise ArtifactError(self.missing_message(root))
        return self.path(root)

    def digest(self, root: str | os.PathLike) -> str:
        return file_digest(self.require(root))

    def reading(self, root: str | os.PathLike):
        return reading(self.path(root), self.written_by)

    def read_parquet(self, root: str | os.PathLike, columns: Optional[list[str]] = None):
        """The table (``columns`` of it), checked to hold the declared columns, or an ``ArtifactError``."""
        import pyarrow.parquet as pq

        path = self.require(root)
        with reading(path, self.written_by):
            names = pq.read_schema(str(path)).names
            missing = [c for c in (columns or self.columns) if c not in names]
            if missing:
                raise ArtifactError(f"{path}: no column(s) {missing} ({self.what}); re-run `disa {self.written_by}`")
            return pq.read_table(str(path), columns=columns)

    def read_metadata(self, root: str | os.PathLike, key: bytes = b"disa") -> dict:
        """The JSON a Parquet artefact records about itself (``{}`` when it records none)."""
        import pyarrow.parquet as pq

        path = self.require(root)
        with reading(path, self.written_by):
            raw = (pq.read_schema(str(path)).metadata or {}).get(key)
            return json.loads(raw) if raw is not None else {}


class SamplesArtifact(Artifact):
    """Stage 1 samples: ``meta.json`` and the shards; the digest covers both (one shard rewritten = another)."""

    def meta_path(self, root) -> Path:
        return Path(root).expanduser() / "meta.json"

    def digest(self, root) -> str:
        self.require(root)
        shards = sorted(self.path(root).parent.glob(self.path(root).name))
        parts = [file_digest(self.meta_path(root)) if self.meta_path(root).exists() else ""]
        parts += [f"{p.name}:{file_digest(p)}" for p in shards]
        return text_digest(parts)


class LabelsArtifact(Artifact):
    """``labels.parquet``: one log Z label per prompt, recording its target and the samples' digest."""


class LogZTableArtifact(Artifact):
    """``log_z/table.parquet``: the frozen regressor's log Z per labelled prompt, recording the labels' digest."""


class RegressorArtifact(Artifact):
    """``log_z/model.safetensors`` + ``config.json``; the digest covers both files."""

    files = ("model.safetensors", "config.json")

    def exists(self, root) -> bool:
        return all((self.path(root) / f).is_file() for f in self.files)

    def missing_message(self, root, hint: str = "") -> str:
        absent = next((f for f in self.files if not (self.path(root) / f).is_file()), self.files[0])
        hint = f"; {hint}" if hint else ""
        return (f"{self.path(root) / absent}: not found ({self.what}); run `disa {self.written_by}` first (it writes "
                f"this file){hint}")

    def require(self, root) -> Path:
        if not self.exists(root):
            raise ArtifactError(self.missing_message(root))
        return self.path(root)

    def digest(self, root) -> str:
        folder = self.require(root)
        return text_digest(file_digest(folder / f) for f in self.files)


class CheckpointArtifact(Artifact):
    """``checkpoints/``: the training checkpoints and ``lineage.json``, the digests of what they were trained on."""

    def lineage_path(self, root) -> Path:
        return self.path(root) / LINEAGE_FILE


class EvalResultArtifact(Artifact):
    """``eval/<policy>/eval.json`` (+ ``eval.md``, ``eval_samples.parquet``)."""


SAMPLES = SamplesArtifact("samples", "samples/shard-*.parquet", "sample", "Stage 1 samples",
                          ("prompt_id", "sample_idx", "reward", "logp_ref", "logp_q"),
                          "meta.json, samples/shard-*.parquet")
LABELS = LabelsArtifact("labels", "labels.parquet", "label", "Stage 1 labels",
                        ("prompt_id", "log_z", "reward_scale", "reward_shift"))
LOG_Z_TABLE = LogZTableArtifact("log_z_table", "log_z/table.parquet", "fit-z",
                                "the frozen log Z of every labelled prompt", ("prompt_id", "log_z"))
REGRESSOR = RegressorArtifact("regressor", "log_z", "fit-z", "the frozen log Z regressor", (),
                              "log_z/{model.safetensors, config.json, report.json}")
CHECKPOINTS = CheckpointArtifact("checkpoints", "checkpoints", "train", "training checkpoints", (),
                                 "checkpoints/{checkpoint-<step>/, metrics.csv, lineage.json}")
EVAL_RESULT = EvalResultArtifact("eval", "eval", "eval", "evaluation results", (),
                                 "eval/<policy>/{eval.json, eval.md, eval_samples.parquet} (copies in output_dir)")
ARTIFACTS = {a.key: a for a in (SAMPLES, LABELS, LOG_Z_TABLE, REGRESSOR, CHECKPOINTS, EVAL_RESULT)}


# ----------------------------------------------------------------------------------------------- what each verb reads
def _always(cfg) -> bool:
    return True


@dataclass(frozen=True)
class Input:
    """A config input a verb reads (``data.prompts``, ``models.reference``), ``when`` the config needs it."""

    field: str
    when: Callable[[Any], bool] = _always
    why: str = ""

    @property
    def display(self) -> str:
        return self.field + (f" ({self.why})" if self.why else "")


@dataclass(frozen=True)
class Reads:
    """An artefact a verb reads, ``when`` the config needs it (``why`` says when, for ``--help``)."""

    artifact: Artifact
    when: Callable[[Any], bool] = _always
    why: str = ""


@dataclass(frozen=True)
class StageIO:
    """What one verb reads (config inputs and artefacts of earlier stages) and writes."""

    verb: str
    inputs: tuple[Input, ...]
    reads: tuple[Reads, ...] = ()
    writes: tuple[Artifact, ...] = ()
    note: str = ""

    def reads_text(self) -> str:
        arts = [r.artifact.display + (f" ({r.why})" if r.why else "") for r in self.reads]
        return ", ".join([i.display for i in self.inputs] + arts) + (f"; {self.note}" if self.note else "")

    def config_inputs(self, cfg, prefix: str) -> list[str]:
        """The names after ``prefix`` (``models.``, ``data.``) of the config inputs this run of the verb reads."""
        return [i.field[len(prefix):] for i in self.inputs if i.field.startswith(prefix) and i.when(cfg)]

    def writes_text(self) -> str:
        return ", ".join(a.display for a in self.writes)

    def missing(self, cfg, checkpoint: Optional[str] = None) -> list[str]:
        """One line per artefact this run of the verb needs and does not find (each names the verb that writes it)."""
        root = cfg.stage1_dir or cfg.output_dir
        out = []
        for r in self.reads:
            try:
                needed = r.when(cfg) if r.artifact is not CHECKPOINTS else checkpoint is None
            except ValueError as e:  # an impossible combination of settings, reported by the predicate
                return [str(e)]
            if not needed:
                continue
            where = cfg.output_dir if r.artifact in (CHECKPOINTS, EVAL_RESULT) else root
            if not r.artifact.exists(where):
                hint = "or pass --checkpoint FOLDER" if r.artifact is CHECKPOINTS else ""
                out.append(r.artifact.missing_message(where, hint))
        return out


def _spec(cfg):
    from disa.objectives import get_spec

    return get_spec(cfg.train.objective)


def _log_z_requires(cfg) -> tuple:
    """The artefacts the registered log Z source ``train.log_z`` declares (none for a learned or batch one)."""
    from disa.log_z import resolve_log_z_source

    entry = resolve_log_z_source(cfg.train.log_z, _spec(cfg))
    return tuple(entry.requires) if entry is not None else ()


def trains_on_samples(cfg) -> bool:
    return _spec(cfg).family == "supervised"


def reads_labels(cfg) -> bool:
    """Trajectory balance reads the labels for a log Z source that declares them, or for the frozen affine r~."""
    if _spec(cfg).family != "trajectory_balance":
        return False
    return "labels" in _log_z_requires(cfg) or cfg.target.reward_transform == "affine"


def reads_log_z_table(cfg) -> bool:
    return reads_labels(cfg) and "log_z_table" in _log_z_requires(cfg)


def reads_regressor(cfg) -> bool:
    return reads_labels(cfg) and "log_z_regressor" in _log_z_requires(cfg)


def embeds_with_reference(cfg) -> bool:
    return cfg.fit_z.embedder == "reference"


PROMPTS, EVAL_PROMPTS = Input("data.prompts"), Input("data.eval_prompts", why="else data.prompts")
STAGE_IO: dict[str, StageIO] = {io.verb: io for io in (
    StageIO("sample", (PROMPTS, Input("models.reference"), Input("models.proposal")), (), (SAMPLES,),
            "resumes from the shards already written"),
    StageIO("label", (), (Reads(SAMPLES),), (LABELS,)),
    StageIO("fit-z", (PROMPTS, Input("models.reference", embeds_with_reference, "the prompt embedder")),
            (Reads(LABELS),), (REGRESSOR, LOG_Z_TABLE)),
    StageIO("train", (PROMPTS, Input("models.policy"), Input("models.reference")),
            (Reads(SAMPLES, trains_on_samples, "sft"),
             Reads(LABELS, reads_labels, "a frozen log Z or affine r~"),
             Reads(LOG_Z_TABLE, reads_log_z_table, "train.log_z auto/table"),
             Reads(REGRESSOR, reads_regressor, "train.log_z regressor")),
            (CHECKPOINTS,), "Stage 1-2 files from stage1_dir when set; resumes from the newest checkpoint"),
    StageIO("eval", (EVAL_PROMPTS, Input("models.policy", why="the base of a LoRA checkpoint")),
            (Reads(CHECKPOINTS, why="or --checkpoint"),), (EVAL_RESULT,)),
)}


def run_verbs(cfg) -> tuple[str, ...]:
    """The stages ``disa run`` runs: all, or only train and eval when Stage 1-2 files come from ``stage1_dir``."""
    return ("train", "eval") if cfg is not None and cfg.stage1_dir else tuple(STAGE_IO)


def run_io(cfg=None) -> StageIO:
    """``disa run``: the stages it runs, in order; only the artefacts none of them writes are read."""
    ios = [STAGE_IO[v] for v in run_verbs(cfg)]
    first: dict[str, Input] = {}
    for i in (i for io in ios for i in io.inputs):
        first.setdefault(i.field, Input(i.field, why=i.why))  # every stage's condition joined: read when any stage reads it
    inputs = tuple(first.values())
    writes = tuple(dict.fromkeys(a for io in ios for a in io.writes))
    return StageIO("run", inputs, (), writes, "sample, label and fit-z are skipped when stage1_dir is set")


def stage_io(cfg, verb: str) -> StageIO:
    return run_io(cfg) if verb == "run" else STAGE_IO[verb]


def missing_inputs(cfg, verb: str, checkpoint: Optional[str] = None) -> list[str]:
    """The artefacts ``verb`` reads and does not find; ``run`` with ``stage1_dir`` reads what ``train`` does."""
    if verb == "run":
        return STAGE_IO["train"].missing(cfg) if cfg.stage1_dir else []
    return STAGE_IO[verb].missing(cfg, checkpoint) if verb in STAGE_IO else []


# ----------------------------------------------------------------------------------------------- lineage
@dataclass
class Lineage:
    """What an output was made from: named input digests plus settings that must not change on a resume.

    ``fields`` maps a user-facing name (``models.reference``, ``log_z/table.parquet``) to a JSON value; comparing
    two lineages names every field that differs with both values."""

    fields: dict[str, Any] = field(default_factory=dict)

    def differences(self, other: "Lineage") -> list[tuple[str, Any, Any]]:
        """``(name, recorded, now)`` for every field both record with different values."""
        return [(k, self.fields[k], other.fields[k]) for k in self.fields
                if k in other.fields and self.fields[k] != other.fields[k]]

    def to_dict(self) -> dict:
        return {"format_version": 1, "fields": self.fields}

    @classmethod
    def from_dict(cls, data: dict) -> "Lineage":
        return cls(dict(data.get("fields", {})))


def refuse_differences(recorded: Lineage, now: Lineage, source: str | os.PathLike, advice: str) -> None:
    """An ``ArtifactError`` naming every changed field with both values, or nothing."""
    diff = recorded.differences(now)
    if diff:
        details = "; ".join(f"{k}: recorded {_short(a)}, now {_short(b)}" for k, a, b in diff)
        raise ArtifactError(f"{source} was made from other inputs ({details}); {advice}")


def _short(value: Any) -> str:
    if isinstance(value, dict) and "digest" in value:
        path = value.get("path")
        return f"{path} (digest {value['digest']})" if path else f"digest {value['digest']}"
    return repr(value)


# ----------------------------------------------------------------------------------------------- numbers
def non_finite_or_huge(values: dict, limit: float = 1e6) -> list[str]:
    """The keys whose value is NaN, infinite or larger than ``limit`` in magnitude (a value that would wreck a
    loss: log Z of 1e30 makes every step's loss inf)."""
    out = []
    for k, v in values.items():
        vs = v if isinstance(v, (tuple, list)) else (v,)
        if any(x is None or not math.isfinite(float(x)) or abs(float(x)) > limit for x in vs):
            out.append(k)
    return out
