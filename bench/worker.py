"""What the interleaved benchmarks share: each measurement runs in a fresh subprocess of the script itself
(``--worker ...``), one torch thread unless the caller set another, and reports one ``RESULT <json>`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_worker(script: str, args: list[str], label: str) -> dict:
    """Run ``python script *args`` and return the JSON of its last ``RESULT`` line; exit with its stderr tail
    when it fails or prints none."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{label} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])
