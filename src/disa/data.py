"""Prompt sets: one schema, three file formats, errors that point at the offending line.

Schema (one record per row)
---------------------------
``id``        str, required, unique within the file. Integers are accepted and turned into strings
              (many public datasets number their rows); anything else is an error.
``prompt``    str: the prompt as plain text, OR
``messages``  list of ``{"role": str, "content": str}``: a conversation (system/user/...). Exactly one of
              ``prompt`` / ``messages`` must be given.
``answer``    optional: the gold answer (math verifier).
``tests``     optional: test cases (code verifier), any JSON value.
``metadata``  optional dict: carried along, never interpreted.
Any other column is kept in ``PromptRecord.extra`` and handed to verifiers as a keyword column
(TRL's reward-function convention), e.g. ``numbers`` / ``target`` for countdown.

Formats: ``.jsonl`` (one UTF-8 JSON object per line, at most ``MAX_LINE_BYTES``: a longer line is refused
before it is read whole; blank lines are skipped but still counted, so line numbers match an editor's), ``.parquet``, or a folder written by ``datasets.Dataset.save_to_disk``. A missing
value (JSON ``null``, Parquet null) counts as absent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

REQUIRED_FIELDS = ("id",)
MAX_LINE_BYTES = 16 << 20  # one JSONL row; read in bounded pieces, so a huge line costs this much, not the line
KNOWN_FIELDS = ("id", "prompt", "messages", "answer", "tests", "metadata")


class DataError(ValueError):
    """A prompt file is malformed; the message names the file, the line/row and the field."""


@dataclass
class PromptRecord:
    """One prompt of a prompt set (see the module docstring for the schema)."""

    id: str
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    answer: Any = None
    tests: Any = None
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def verifier_columns(self) -> dict[str, Any]:
        """Per-row columns handed to a verifier: ``answer``, ``tests``, ``metadata`` and every extra column."""
        return {"answer": self.answer, "tests": self.tests, "metadata": self.metadata, **self.extra}


# --------------------------------------------------------------------------- row validation
def _where(path: str, line: int, unit: str) -> str:
    return f"{path}, {unit} {line}"


def record_from_row(row: Any, *, path: str, line: int, unit: str = "line") -> PromptRecord:
    """Validate one raw row (a dict) and build a ``PromptRecord``; raise ``DataError`` naming path/line/field."""
    where = _where(path, line, unit)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = {k: v for k, v in row.items() if v is not None}

    if "id" not in row:
        raise DataError(f"{where}: field 'id' is required")
    rid = row["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DataError(f"{where}: field 'id' must be a string, got {type(rid).__name__}")
    rid = str(rid)
    if not rid.strip():
        raise DataError(f"{where}: field 'id' is empty")

    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is None and messages is None:
        raise DataError(f"{where}: one of the fields 'prompt' or 'messages' is required")
    if prompt is not None and messages is not None:
        raise DataError(f"{where}: give either field 'prompt' or field 'messages', not both")
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if prompt is not None and not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is empty; a model conditioned on nothing learns nothing from it")
    if messages is not None:
        messages = _validate_messages(messages, where)
        if not any(m["content"].strip() for m in messages):
            raise DataError(f"{where}: field 'messages' has no message with any content")

    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DataError(f"{where}: field 'metadata' must be an object/dict, got {type(metadata).__name__}")

    extra = {k: v for k, v in row.items() if k not in KNOWN_FIELDS}
    return PromptRecord(
        id=rid, prompt=prompt, messages=messages, answer=row.get("answer"), tests=row.get("tests"),
        metadata=metadata, extra=extra,
    )


def _validate_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field 'messages[{j}]' must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise DataError(f"{where}: field 'messages[{j}].{key}' must be a string, got {m.get(key)!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def records_from_rows(rows: Iterable[tuple[int, Any]], *, path: str, unit: str = "line") -> list[PromptRecord]:
    """Validate ``(line_number, row)`` pairs and check that ids are unique (error names both lines)."""
    records: list[PromptRecord] = []
    first_seen: dict[str, int] = {}
    for line, row in rows:
        rec = record_from_row(row, path=path, line=line, unit=unit)
        if rec.id in first_seen:
            raise DataError(
                f"{path}: duplicate id {rec.id!r} at {unit}s {first_seen[rec.id]} and {line} (field 'id')"
            )
        first_seen[rec.id] = line
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no prompts found")
    return records


# --------------------------------------------------------------------------- readers
def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as fh:
        line_no = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)  # bounded: a 4 GB file without a newline reads 16 MiB, not 4 GB
            if not raw:
                return
            line_no += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}, line {line_no}: longer than {MAX_LINE_BYTES} bytes (one prompt row); "
                                "is it a JSONL file, one object per line?")
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}, line {line_no}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                                f"{exc.start + 1} of the line); save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet file ({exc})") from exc
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row


def _iter_datasets_folder(path: str, split: Optional[str]) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{path} looks like a `datasets` folder; reading it needs the `datasets` package "
            "(pip install 'disa[data]')"
        ) from exc
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise DataError(f"{path}: a DatasetDict with splits {sorted(ds)}; pass split=... to choose one")
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; available: {sorted(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield i, row


def load_prompts(path: str | os.PathLike, split: Optional[str] = None) -> list[PromptRecord]:
    """Read a prompt set from ``.jsonl``, ``.parquet`` or a ``datasets.save_to_disk`` folder.

    ``split`` picks a split when the folder holds a ``DatasetDict`` with several. Raises ``DataError``
    naming the file, the 1-based line (JSONL) or row (Parquet / datasets) and the field at fault.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if os.path.isdir(path):
        return records_from_rows(_iter_datasets_folder(path, split), path=path, unit="row")
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return records_from_rows(_iter_jsonl(path), path=path, unit="line")
    if lower.endswith(".parquet"):
        return records_from_rows(_iter_parquet(path), path=path, unit="row")
    raise DataError(f"{path}: unsupported prompt file type; use .jsonl, .parquet or a `datasets` folder")


# --------------------------------------------------------------------------- prompt rendering
def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(record: PromptRecord, tokenizer=None) -> str:
    """The exact text a model is conditioned on for ``record``.

    With a tokenizer that has a chat template: the template applied to ``messages`` (a plain ``prompt`` is
    wrapped as one user message) with ``add_generation_prompt=True``, so generation starts the assistant turn.
    Without one (a base model): the raw ``prompt``; a record holding only a single user message renders as its
    content, and a longer conversation is an error, since there is no faithful way to flatten it.
    """
    if has_chat_template(tokenizer):
        messages = record.messages or [{"role": "user", "content": record.prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if record.prompt is not None:
        return record.prompt
    if len(record.messages) == 1 and record.messages[0]["role"] == "user":
        return record.messages[0]["content"]
    raise DataError(
        f"prompt {record.id!r}: field 'messages' holds a {len(record.messages)}-turn conversation but the "
        "tokenizer has no chat template; give a 'prompt' string or use a tokenizer with a chat template"
    )
