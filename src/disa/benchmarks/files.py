"""Reading benchmark files as their public releases ship them: Parquet, JSONL (optionally .gz) or a JSON list."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence


class BenchmarkError(ValueError):
    """A benchmark file is missing or malformed; the message names the file, the row and the field."""


def read_rows(path: os.PathLike | str, benchmark: str) -> list[dict]:
    """Every row of ``path`` as a dict; a folder is read file by file (sorted), as HF snapshots split them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BenchmarkError(f"{benchmark}: {str(path)!r} does not exist (give the benchmark's .parquet/.jsonl file "
                             "in eval.benchmarks[].path)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json", ".gz"))
        if not files:
            raise BenchmarkError(f"{benchmark}: folder {str(path)!r} holds no .parquet/.jsonl/.json file")
        return [row for f in files for row in read_rows(f, benchmark)]
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith((".jsonl", ".jsonl.gz")):
                return list(_jsonl(f, path, benchmark))
            if name.endswith((".json", ".json.gz")):
                data = json.load(f)
                if isinstance(data, dict) and isinstance(data.get("data"), list):
                    data = data["data"]
                if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                    raise BenchmarkError(f"{benchmark}: {path}: expected a JSON list of objects")
                return data
    except BenchmarkError:
        raise
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{benchmark}: cannot read {path}: {err}") from None
    raise BenchmarkError(f"{benchmark}: {path}: unknown file type (expected .parquet, .jsonl[.gz] or .json[.gz])")


def _jsonl(lines: Iterable[str], path: Path, benchmark: str):
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkError(f"{benchmark}: {path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise BenchmarkError(f"{benchmark}: {path}, line {number}: expected a JSON object")
        yield row


def pick(row: dict, names: Sequence[str], *, where: str, required: bool = True) -> Any:
    """The first of ``names`` present (case-insensitive, non-null) in ``row``; an error names every accepted name."""
    lowered = {str(k).lower(): v for k, v in row.items()}
    for name in names:
        value = lowered.get(name.lower())
        if value is not None and value != "":
            return value
    if required:
        raise BenchmarkError(f"{where}: missing field (one of {', '.join(names)}); row has {sorted(row)}")
    return None


def as_text(value: Any, *, where: str, field: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0]  # OlympiadBench: final_answer is a list, the first one is the answer
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: field {field} must be text, got {type(value).__name__}")
    return value


def load_json_cell(value: Any, *, where: str, field: str) -> Any:
    """A cell that public releases store either as JSON text or as the decoded value."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise BenchmarkError(f"{where}: field {field} is not valid JSON ({err.msg})") from None
    return value


def maybe_id(row: dict, index: int, names: Sequence[str] = ("id", "unique_id", "task_id", "question_id", "ID"),
             prefix: Optional[str] = None) -> str:
    value = pick(row, names, where="", required=False)
    return str(value) if value is not None else f"{prefix or 'row'}-{index}"
