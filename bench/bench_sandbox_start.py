"""Start cost of the bwrap sandbox's kernel layers: wall time of ``run_in_sandbox("pass")``, interleaved.

``before`` is the sources at ``--before-commit`` (exported with ``git archive``), run in its own worker;
this tree's variants (all layers, no cgroup, no seccomp filter, neither: the mount view alone) run in
another worker, interleaved run by run, layers switched off by patching. Rounds alternate the two
workers so machine noise hits both alike. Prints a markdown table (median ms per start, ratios).

    python bench/bench_sandbox_start.py --before-commit 4be7c06 --rounds 10 --runs 5
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


LAYERS = ("all", "no-cgroup", "no-seccomp", "none")


def worker(runs: int, variants: list[str]) -> None:
    """Time ``runs`` starts of each variant, interleaved run by run (layers switched off by patching)."""
    from disa.verifiers import sandbox

    if variants != ["all"]:  # the 'before' sources have no layers to switch
        real_cgroup, real_filter = sandbox.cgroups.create_cgroup, sandbox.seccomp.seccomp_program
    first = sandbox.run_in_sandbox("pass", require_os_isolation=True)  # probes and caches outside the timing
    assert first.status == "ok", first.stderr
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(runs):
        for layers in variants:
            if variants != ["all"]:
                no_cgroup, no_filter = layers in ("no-cgroup", "none"), layers in ("no-seccomp", "none")
                sandbox.cgroups.create_cgroup = (lambda *a, **k: None) if no_cgroup else real_cgroup
                sandbox.seccomp.seccomp_program = (lambda: None) if no_filter else real_filter
            started = time.perf_counter()
            result = sandbox.run_in_sandbox("pass", require_os_isolation=True)
            times[layers].append(time.perf_counter() - started)
            assert result.status == "ok", result.stderr
    isolation = {k: first.isolation.get(k) for k in ("seccomp", "cgroup")}
    print("RESULT " + json.dumps({"times": times, "isolation": isolation}))


def _run(src: str, runs: int, variants: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(runs), ",".join(variants)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker {src} {variants} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before-commit", required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="disa-bench-before-") as before:
        _measure(before, args)


def _measure(before: str, args: argparse.Namespace) -> None:
    archive = subprocess.run(["git", "-C", os.path.dirname(HERE), "archive", args.before_commit, "src"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
    times: dict[str, list[float]] = {"before": [], **{layers: [] for layers in LAYERS}}
    isolation = {}
    for _ in range(args.rounds):
        times["before"] += _run(os.path.join(before, "src"), args.runs * len(LAYERS), ["all"])["times"]["all"]
        now = _run(SRC, args.runs, list(LAYERS))
        isolation = now["isolation"]
        for layers in LAYERS:
            times[layers] += now["times"][layers]
    base = statistics.median(times["before"])
    print(f"{args.rounds} rounds; per round {args.runs * len(LAYERS)} starts of 'before' in one worker, then "
          f"{args.runs} of each variant interleaved in another; layers here: {isolation}")
    print("| variant | starts | median ms per start | ratio to before | ratio to 'none' |")
    print("|---|---|---|---|---|")
    none = statistics.median(times["none"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {len(values)} | {1000 * median:.1f} | {median / base:.2f} | {median / none:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3].split(","))
    else:
        main()
