"""Start-up: help and a missing config answer without loading torch (issue 25: under 2 s; 4 s here on a loaded
machine), measured in a fresh interpreter as a user's shell would start it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = r"""
import contextlib, io, json, sys
from disa import cli
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        rc = cli.main(sys.argv[1:])
    except SystemExit as e:  # argparse's --help
        rc = e.code
print(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                  "heavy": sorted(m for m in ("torch", "transformers", "numpy", "pyarrow") if m in sys.modules)}))
"""


def _probe(*argv: str) -> tuple[dict, float]:
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), elapsed


@pytest.mark.parametrize("argv, rc, needle", [
    (["--help"], 0, "usage: disa"),
    (["config", "--help"], 0, "usage: disa config"),
    (["label", "--help"], 0, "usage: disa label"),
    (["config", "-c", "/nonexistent/run.yaml"], 2, "config file not found"),
    (["train", "-c", "/nonexistent/run.yaml"], 2, "config file not found"),
])
def test_help_and_missing_config_do_not_load_torch(argv, rc, needle):
    result, elapsed = _probe(*argv)
    assert result["rc"] == rc
    assert needle in result["stdout"] + result["stderr"]
    assert result["heavy"] == [], f"{' '.join(argv)} imported {result['heavy']}"
    assert elapsed < 4.0, f"disa {' '.join(argv)} took {elapsed:.2f} s"
