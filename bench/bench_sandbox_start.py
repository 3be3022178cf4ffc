"""Start cost of the bwrap sandbox's kernel layers: wall time of ``run_in_sandbox("pass")``, interleaved.

Variants, each a fresh worker subprocess per round, rounds interleaved so machine noise hits all alike:
``before`` (the sources at ``--before-commit``, exported with ``git archive``), and this tree with all
layers, without the cgroup, without the seccomp filter, without both
(the mount view alone). Prints a markdown table (median ms per start and
the ratio to ``before``).

    python bench/bench_sandbox_start.py --before-commit 4be7c06 --rounds 6 --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def worker(runs: int, layers: str) -> None:
    from disa.verifiers import sandbox

    if layers in ("no-cgroup", "none"):
        sandbox.cgroups.create_cgroup = lambda *a, **k: None
    if layers in ("no-seccomp", "none"):
        sandbox.seccomp.seccomp_program = lambda: None
    first = sandbox.run_in_sandbox("pass", require_os_isolation=True)  # probes and caches outside the timing
    assert first.status == "ok", first.stderr
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = sandbox.run_in_sandbox("pass", require_os_isolation=True)
        times.append(time.perf_counter() - started)
        assert result.status == "ok", result.stderr
    print("RESULT " + json.dumps({"times": times, "isolation": {k: first.isolation.get(k) for k in ("seccomp", "cgroup")}}))


def _run(src: str, runs: int, layers: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(runs), layers], capture_output=True,
                          text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker {src} {layers} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before-commit", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    before = tempfile.mkdtemp(prefix="disa-bench-before-")
    archive = subprocess.run(["git", "-C", os.path.dirname(HERE), "archive", args.before_commit, "src"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
    variants = {"before": (os.path.join(before, "src"), "all"), "all layers": (SRC, "all"),
                "no cgroup": (SRC, "no-cgroup"), "no seccomp": (SRC, "no-seccomp"),
                "view only (no cgroup, no seccomp)": (SRC, "none")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (src, layers) in variants.items():
            times[name] += _run(src, args.runs, layers)["times"]
    base = statistics.median(times["before"])
    print(f"| variant | median ms per start | ratio to before |  ({args.rounds} rounds x {args.runs} runs)")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3])
    else:
        main()
