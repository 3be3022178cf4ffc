"""Code verifier: every guard of the sandbox is shown to stop a real bad program, quickly.

The network test only ever talks to a server this test starts on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from disa.verifiers import get_verifier
from disa.verifiers.code import (
    call_test,
    code_reward,
    extract_program,
    normalize_output,
    parse_tests,
    processes_of_uid,
    run_in_sandbox,
    run_tests,
    run_tests_batch,
    stdout_cap,
)

AS_ROOT = os.geteuid() == 0
ADD_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]


@pytest.fixture
def loopback_server():
    """A listening TCP socket on 127.0.0.1 (ephemeral port); yields (port, saw_connection())."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)

    def saw_connection() -> bool:
        try:
            connection, _ = server.accept()
        except BlockingIOError:
            return False
        connection.close()
        return True

    yield server.getsockname()[1], saw_connection
    server.close()


def _connect_program(port: int) -> str:
    return (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'hello')\nprint('connected')\n"
    )


# ---------------------------------------------------------------- good and wrong programs


def test_correct_program_passes_and_wrong_one_fails():
    good = run_tests(ADD_PROGRAM, ADD_TESTS)
    assert (good.num_tests, good.num_passed, good.all_passed) == (2, 2, True)
    assert [r.status for r in good.results] == ["ok", "ok"]
    assert good.results[0].stdout == "3\n"

    wrong = run_tests("a, b = map(int, input().split())\nprint(a - b)\n", ADD_TESTS)
    assert not wrong.all_passed and wrong.results[0].status == "wrong_answer"
    assert len(wrong.results) == 1  # stopped at the first failure

    crash = run_in_sandbox("raise ValueError('boom')")
    assert crash.status == "runtime_error" and crash.returncode == 1 and "ValueError: boom" in crash.stderr


def test_assert_tests_and_partial_credit():
    program = "def add(a, b):\n    return a + b\n"
    assert code_reward(f"```python\n{program}```", "assert add(1, 2) == 3\nassert add(0, 0) == 0") == 1.0
    assert code_reward(program, "assert add(1, 2) == 4") == 0.0
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(-1, 1) == 0"]
    assert code_reward(program, tests) == 0.0  # all-or-nothing by default
    assert code_reward(program, tests, partial_credit=True) == pytest.approx(2 / 3)


def test_call_tests_compare_json_rebuilt_values_and_program_prefix_column():
    tests = [call_test("Solution().pair", ["1", "[2, 3]"], "[1, [2, 3]]"), call_test("pair", ["1", "2"], "[1, 2]")]
    assert "_json.loads('[1, [2, 3]]')" in tests[0] and "pair(*_args)" in tests[1]
    method = "class Solution:\n    def pair(self, a, b):\n        return (a, b)\n"  # tuple == JSON list
    assert code_reward(method, tests[0]) == 1.0 and code_reward(method, call_test("Solution().pair", ["1", "2"], "[2, 1]")) == 0.0
    assert code_reward("def pair(a, b):\n    return {a, b}\n", tests[1]) == 0.0  # a set is not JSON
    for bad in ("Solution.pair", "Solution().pair()", "x; import os", "Solution().a.b"):
        with pytest.raises(ValueError, match="NAME or NAME"):
            call_test(bad, [], "1")
    needs_prefix = "def pair(a, b):\n    return [PREFIXED, b]\n"
    rewards = get_verifier("code")(["p"] * 2, [needs_prefix] * 2, tests=[tests[1]] * 2,
                                   program_prefix=["PREFIXED = 1\n", None])
    assert list(rewards) == [1.0, 0.0]


def test_stdio_formats_apps_and_json():
    apps = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
    assert code_reward(ADD_PROGRAM, apps) == 1.0
    assert code_reward(ADD_PROGRAM, json.dumps(ADD_TESTS)) == 1.0
    assert code_reward(ADD_PROGRAM, [{"input": "1 2", "output": "4"}]) == 0.0


def test_parse_tests_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"tests\[1\] must be"):
        parse_tests([{"input": "1", "output": "1"}, {"stdin": "x"}])
    with pytest.raises(ValueError, match="2 'inputs' but 1 'outputs'"):
        parse_tests({"inputs": ["1", "2"], "outputs": ["1"]})
    with pytest.raises(ValueError, match="tests is empty"):
        parse_tests([])
    with pytest.raises(ValueError, match="does not parse"):
        parse_tests("[{'input': 1}")
    with pytest.raises(TypeError, match="program must be a str"):
        run_in_sandbox(None)


def test_extract_program_and_output_normalisation():
    text = "draft:\n```python\nprint(1)\n```\nfinal:\n```python\nprint(2)\n```\n"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("print(3)") == "print(3)"
    assert normalize_output("1 \r\n2\n\n") == normalize_output("1\n2") == "1\n2"


ENV_PROGRAM = "import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(os.getuid())\nprint(sys.flags.isolated)\n"


def test_bwrap_sandbox_environment_is_minimal():
    # bwrap: the working directory is the private tmpfs mounted at /tmp (gone with the namespace).
    result = run_in_sandbox(ENV_PROGRAM, require_os_isolation=True)
    assert result.status == "ok" and result.isolation_level == "bwrap", result.stderr
    workdir, env_keys, uid, isolated = result.stdout.splitlines()
    assert workdir == "/tmp"
    assert eval(env_keys) == ["HOME", "LANG", "LC_ALL", "PATH", "PWD", "TMPDIR"]  # bwrap sets PWD
    assert isolated == "1"
    if AS_ROOT:
        assert int(uid) != 0 and result.isolation["uid"] == int(uid)


def test_sandbox_environment_is_minimal_and_workdir_is_removed():
    # The fallback backend (no bwrap) keeps the old layers: mkdtemp workdir and audit hook.
    result = run_in_sandbox(ENV_PROGRAM, backend="fallback")
    assert result.status == "ok", result.stderr
    workdir, env_keys, uid, isolated = result.stdout.splitlines()
    assert os.path.basename(workdir).startswith("disa-sandbox-")
    assert not os.path.exists(workdir)
    assert eval(env_keys) == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]
    assert isolated == "1"
    if AS_ROOT:
        assert int(uid) != 0 and result.isolation["uid"] == int(uid)
    assert result.isolation["audit_hook"] is True


# ---------------------------------------------------------------- bad programs are stopped


def test_infinite_loop_times_out():
    result = run_in_sandbox("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert result.wall_time_s < 3.0


def test_huge_allocation_hits_memory_limit():
    result = run_in_sandbox("data = bytearray(10**10)\nprint('allocated')\n", memory_mb=256)
    assert result.status == "memory"
    assert "allocated" not in result.stdout
    assert result.wall_time_s < 5.0


def test_fork_bomb_is_refused_by_the_audit_hook():
    result = run_in_sandbox("import os\nwhile True:\n    os.fork()\n", timeout_s=3.0, backend="fallback")
    assert result.status == "refused" and result.refusal == "os.fork"
    assert result.wall_time_s < 3.0


def test_fork_bomb_is_contained_by_rlimits_alone():
    # bwrap (no audit hook): only RLIMIT_NPROC under the per-sandbox uid and the pid namespace
    # hold the bomb. The program swallows fork errors and keeps going.
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_in_sandbox(bomb, timeout_s=1.5, allow_subprocess=True, max_processes=8)
    assert result.status == "timeout"
    assert result.wall_time_s < 5.0
    if AS_ROOT:
        uid = result.isolation["uid"]
        assert uid is not None and processes_of_uid(uid) == []
    # The machine is fine: we can still start processes, and a fresh sandbox works.
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, timeout=30).stdout == b"1\n"
    assert run_in_sandbox("print('alive')").stdout == "alive\n"


def test_write_outside_workdir_is_refused():
    target = f"/tmp/outside_{uuid.uuid4().hex}"
    for program in (
        f"open({target!r}, 'w').write('escaped')\n",
        f"import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('escaped')\n",
    ):
        result = run_in_sandbox(program, backend="fallback")  # the audit hook's refusal
        assert result.status == "refused", (program, result.stderr)
        assert not os.path.exists(target)
    inside = run_in_sandbox("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n")
    assert inside.status == "ok" and inside.stdout == "ok\n"


def test_network_connection_is_refused(loopback_server):
    port, saw_connection = loopback_server
    result = run_in_sandbox(_connect_program(port), timeout_s=5.0, backend="fallback")
    assert result.status == "refused" and result.refusal.startswith("socket.")
    assert "connected" not in result.stdout
    assert not saw_connection()


def test_network_namespace_alone_blocks_loopback(loopback_server):
    port, saw_connection = loopback_server
    # bwrap's network namespace has its own loopback: nothing listens there.
    result = run_in_sandbox(_connect_program(port), timeout_s=5.0, require_os_isolation=True)
    assert result.status == "runtime_error" and "connected" not in result.stdout
    assert "connection refused" in result.stderr.lower()
    assert not saw_connection()


def test_huge_output_is_truncated_and_stopped():
    result = run_in_sandbox("while True:\n    print('x' * 1000)\n", max_output_bytes=10_000, timeout_s=5.0)
    assert result.status == "output_limit"
    assert result.stdout_truncated and len(result.stdout) == 10_000
    assert result.wall_time_s < 3.0


# ---------------------------------------------------------------- batch and registry


def test_batch_runs_in_bounded_thread_pool_and_keeps_order():
    programs = [ADD_PROGRAM, "print(0)", ADD_PROGRAM, "import time\ntime.sleep(0.3)\n" + ADD_PROGRAM]
    start = time.monotonic()
    reports = run_tests_batch(programs, [ADD_TESTS] * 4, max_workers=2)
    assert [r.all_passed for r in reports] == [True, False, True, True]
    assert time.monotonic() - start < 20.0
    with pytest.raises(ValueError, match="max_workers"):
        run_tests_batch(programs, [ADD_TESTS] * 4, max_workers=0)
    with pytest.raises(ValueError, match="4 programs but 1 test sets"):
        run_tests_batch(programs, [ADD_TESTS])


def test_registered_code_verifier():
    verifier = get_verifier("code")
    completions = [f"```python\n{ADD_PROGRAM}```", "```python\nprint(3)\n```"]
    assert verifier(["p", "p"], completions, tests=[ADD_TESTS, ADD_TESTS], max_workers=2) == [1.0, 0.0]
    assert verifier(["p", "p"], completions, tests=[ADD_TESTS, ADD_TESTS], partial_credit=True) == [1.0, 0.5]
    with pytest.raises(ValueError, match="column 'tests' row 1"):
        verifier(["p", "p"], completions, tests=[ADD_TESTS, [{"bad": 1}]])
    with pytest.raises(ValueError, match=r"column 'tests' row 0: tests\[1\]: assert tests do not compile"):
        verifier(["p", "p"], completions, tests=[["assert f(1) == 1", "assert f("], ADD_TESTS])


def test_stdout_cap_fits_the_expected_output():
    assert stdout_cap("3\n", 64 * 1024) == 64 * 1024 + 4
    assert stdout_cap("é" * 100_000, 10) == 2 * 200_000 + 64 * 1024  # bytes, not characters
    assert stdout_cap("", 1 << 20) == 1 << 20
