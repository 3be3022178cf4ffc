"""Small file helpers every stage shares: atomic writes (a crash never leaves half a file that a resume would
trust) and JSON that survives NaN/inf and numpy scalars."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` through a temporary file beside ``dst``, so a reader never sees half a copy."""
    import shutil

    dst = Path(dst)
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None and numpy scalars as Python numbers (valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())
    return value


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(json_safe(value), indent=indent) + "\n")


def atomic_write_parquet(table, path: str | os.PathLike) -> None:
    """A Parquet file written whole or not at all (fsync before the rename publishes it)."""
    import pyarrow.parquet as pq

    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
