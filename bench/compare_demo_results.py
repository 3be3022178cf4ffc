"""Compare two ``disa demo`` results.json files number for number, leaving out what legitimately differs between
runs (wall times and where the testbed lives). Exit status 0 when equal, 1 otherwise (every difference listed).

    python bench/compare_demo_results.py /tmp/decode_quick/results.json /tmp/decode_quick_main/results.json
"""

from __future__ import annotations

import json
import sys

IGNORED_KEYS = {"wall_s", "stage1_seconds"}
IGNORED_PATHS = {"testbed.root"}


def differences(a, b, path: str = "") -> list[str]:
    """Every path where ``a`` and ``b`` differ (values compared exactly, floats included)."""
    if path in IGNORED_PATHS:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in IGNORED_KEYS:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{sub}: only in {'second' if key not in a else 'first'}")
            else:
                out.extend(differences(a[key], b[key], sub))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def relative_difference(line: str):
    """``(|a - b| / max(|a|, |b|), path)`` of a ``path: a vs b`` line of two numbers, else None."""
    path, _, values = line.partition(": ")
    try:
        a, b = (float(v) for v in values.split(" vs "))
    except ValueError:
        return None
    scale = max(abs(a), abs(b))
    return (abs(a - b) / scale if scale else 0.0), path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    first, second = (json.load(open(p)) for p in argv)
    diffs = differences(first, second)
    for d in diffs:
        print(d)
    print(f"{len(diffs)} differences (ignoring keys {sorted(IGNORED_KEYS)} and paths {sorted(IGNORED_PATHS)})")
    numeric = [largest for d in diffs if (largest := relative_difference(d)) is not None]
    if numeric:
        rel, path = max(numeric)
        print(f"largest relative difference {rel:.2e} at {path} (|a - b| / max(|a|, |b|))")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
