"""Code verifier: run the completion's Python program against the row's tests in a sandbox.

Test format (the row's ``tests`` column), any of:

* a list of stdin/stdout cases ``[{"input": "1 2\\n", "output": "3\\n"}, ...]``: the program runs
  once per case with ``input`` on stdin; the case passes when stdout equals ``output`` after
  trailing whitespace is stripped from every line and trailing blank lines are dropped;
* the APPS/TACO layout ``{"inputs": [...], "outputs": [...]}`` (same cases, column-wise);
* a string of assert-based Python (``"assert add(1, 2) == 3"``): appended to the program and run
  once; passes when the process exits with status 0;
* a list of such strings: each is one test, run separately (gives partial credit a meaning);
* any of the above JSON-encoded in a string starting with ``[`` or ``{`` (Parquet columns often
  hold JSON).

Reward is all-or-nothing by default (1.0 only when every test passes, as in the paper);
``partial_credit=True`` gives the fraction of tests passed.

Sandbox (:func:`run_in_sandbox`), defence in depth, each layer on its own:

1. a throw-away working directory (``mkdtemp``, deleted afterwards), minimal environment,
   ``python -I`` (no user site, no ``PYTHON*`` variables), its own session/process group;
2. resource limits set in the child before user code runs, soft = hard so they cannot be raised:
   ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (file size), ``RLIMIT_NPROC``
   (processes), ``RLIMIT_CORE=0``; a wall-clock deadline in the parent; stdout/stderr are read
   up to a byte cap, and the program is killed when it writes more;
3. running as root (root ignores ``RLIMIT_NPROC`` and file permissions), the child drops to an
   unprivileged uid/gid of its own, chosen from a pool and locked with ``flock`` so that concurrent
   sandboxes, even from other processes, never share one; ``RLIMIT_NPROC`` then counts only this
   sandbox's processes, and after the run every process with that uid is killed, including ones
   that left the process group;
4. a new network namespace (``unshare(CLONE_NEWNET)``, only loopback, and that one down) when the
   kernel permits, as root, or inside a new user namespace otherwise; falling back silently;
5. a Python audit hook installed by a bootstrap before the user code: refuses sockets, process
   creation (fork/exec/spawn/subprocess/system), writes/renames/deletes outside the working dir,
   link creation and ``ctypes`` symbol lookup. A refusal is reported on a private pipe and ends
   the program at once (exit, not an exception the program could catch).

The audit hook is a Python-level guard (C extensions can bypass it); the OS layers (uid, rlimits,
namespace) are what hold when it is bypassed. Files in world-writable directories (``/tmp``) are
only guarded by the hook: the unprivileged uid may create them at the OS level.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from disa.verifiers import completion_text, register_verifier

STATUSES = ("ok", "wrong_answer", "timeout", "memory", "runtime_error", "refused", "output_limit", "sandbox_error")

_EXIT_REFUSED = 86  # the audit hook's exit status when it refuses an action
_EXIT_MEMORY = 87  # the bootstrap's exit status when the program died of MemoryError
_EXIT_BOOTSTRAP_FAILED = 88  # the bootstrap could not set up a layer it was asked for

_SANDBOX_UID_BASE = 61000  # unprivileged uids used when running as root; one per concurrent run
_SANDBOX_UID_POOL = 256

# Modules imported by the bootstrap before it drops privileges: the interpreter's stdlib may sit
# in a directory the unprivileged uid cannot read (a pyenv under /root, mode 0700), and these are
# what competitive-programming solutions import.
_PREIMPORT = (
    "array bisect collections collections.abc copy dataclasses datetime decimal enum fractions "
    "functools heapq io itertools json math operator queue random re socket statistics string "
    "sys textwrap time traceback typing unicodedata"
).split()


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status``: "ok" (exit 0), "wrong_answer" (set by the test runner, never by the sandbox),
    "timeout" (wall or CPU limit), "memory" (``MemoryError`` under ``RLIMIT_AS``), "runtime_error"
    (non-zero exit or signal), "refused" (the audit hook stopped an action), "output_limit" (more
    than ``max_output_bytes`` written), "sandbox_error" (the sandbox itself failed to start).
    """

    status: str
    passed: bool
    returncode: int | None
    stdout: str
    stderr: str
    wall_time_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    refusal: str | None = None  # what the audit hook refused, e.g. "socket.connect"
    isolation: dict[str, Any] = field(default_factory=dict)  # layers that were active


@dataclass
class CodeTestReport:
    """Per-program outcome over all its tests."""

    num_tests: int
    num_passed: int
    results: list[SandboxResult]

    @property
    def fraction_passed(self) -> float:
        return self.num_passed / self.num_tests if self.num_tests else 0.0

    @property
    def all_passed(self) -> bool:
        return self.num_tests > 0 and self.num_passed == self.num_tests


# ----------------------------------------------------------------------------------------------
# Bootstrap run in the child before the user code. Kept as source text: it runs under `python -I`.
# ----------------------------------------------------------------------------------------------

_BOOTSTRAP = r'''
import json, os, resource, sys
config = json.loads(sys.argv[1])
status_fd = config["status_fd"]
os.set_inheritable(status_fd, False)

def report(message):
    try:
        os.write(status_fd, (json.dumps(message) + "\n").encode())
    except OSError:
        pass

isolation = {"netns": False, "uid": None, "audit_hook": False}
with open(config["program_path"], "rb") as f:
    source = f.read()

if config["netns"]:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
        flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWNET | CLONE_NEWUSER
        isolation["netns"] = libc.unshare(flags) == 0
    except Exception:
        pass

for module in config["preimport"]:
    try:
        __import__(module)
    except Exception:
        pass

def limit(kind, value):
    resource.setrlimit(kind, (value, value))

try:
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, config["cpu_s"])
    limit(resource.RLIMIT_FSIZE, config["max_file_bytes"])
    if config["memory_bytes"] is not None:
        limit(resource.RLIMIT_AS, config["memory_bytes"])
    if config["nproc"] is not None:
        limit(resource.RLIMIT_NPROC, config["nproc"])
    os.chdir(config["workdir"])
    if config["uid"] is not None:
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
        if os.getuid() != config["uid"] or os.geteuid() != config["uid"]:
            raise OSError("privilege drop did not take effect")
        isolation["uid"] = config["uid"]
except Exception as err:
    report({"bootstrap_error": repr(err)})
    os._exit(88)

sys.dont_write_bytecode = True  # .pyc writes into the stdlib would trip the write guard

if config["audit_hook"]:
    import posixpath
    _workdir = posixpath.realpath(config["workdir"])
    _allow_processes = config["allow_subprocess"]
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    _realpath, _fsdecode, _join, _getcwd, _exit = posixpath.realpath, os.fsdecode, posixpath.join, os.getcwd, os._exit
    _process_events = frozenset(["os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
                                 "os.system", "subprocess.Popen", "pty.spawn"])
    _path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                    "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1),
                    "shutil.rmtree": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,),
                    "os.mknod": (0,)}

    def _refuse(event, detail):
        report({"refused": event, "detail": detail[:200]})
        _exit(86)

    def _inside_workdir(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            path = _fsdecode(path)
        except TypeError:
            return False
        if path == "/dev/null":
            return True
        resolved = _realpath(_join(_getcwd(), path))
        return resolved == _workdir or resolved.startswith(_workdir + "/")

    def _guard(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags > 0 and flags & _write_flags)
            if writing and not _inside_workdir(path):
                _refuse(event, repr(path))
        elif event.startswith("socket."):
            _refuse(event, repr(args)[:200])
        elif event in _process_events:
            if not _allow_processes:
                _refuse(event, repr(args)[:200])
        elif event in _path_events:
            for index in _path_events[event]:
                if not _inside_workdir(args[index]):
                    _refuse(event, repr(args[index]))
        elif event in ("os.symlink", "os.link", "ctypes.dlsym"):
            _refuse(event, repr(args)[:200])

    sys.addaudithook(_guard)
    isolation["audit_hook"] = True

report({"isolation": isolation})
sys.argv = ["solution.py"]
main_globals = {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__}
try:
    code = compile(source, "solution.py", "exec")
    exec(code, main_globals)
except MemoryError:
    sys.stderr.write("MemoryError\n")
    sys.stderr.flush()
    os._exit(87)
except SystemExit:
    raise
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)
'''


# ----------------------------------------------------------------------------------------------
# Unprivileged uid pool (root only)
# ----------------------------------------------------------------------------------------------

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


class _SandboxUid:
    """Reserve a uid nobody else (thread or process) is using; release on exit."""

    def __init__(self, lock_dir: str):
        self.lock_dir = lock_dir
        self.uid: int | None = None
        self._lock_file = None

    def __enter__(self) -> int:
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        for uid in range(_SANDBOX_UID_BASE, _SANDBOX_UID_BASE + _SANDBOX_UID_POOL):
            with _uid_lock:
                if uid in _uids_in_use:
                    continue
                handle = open(os.path.join(self.lock_dir, f"uid-{uid}.lock"), "w")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                _uids_in_use.add(uid)
                self.uid, self._lock_file = uid, handle
            kill_processes_of_uid(uid)  # leftovers of a run whose parent died before its sweep
            return uid
        raise RuntimeError(f"all {_SANDBOX_UID_POOL} sandbox uids from {_SANDBOX_UID_BASE} are in use")

    def __exit__(self, *exc) -> None:
        if self.uid is None:
            return
        kill_processes_of_uid(self.uid)
        with _uid_lock:
            _uids_in_use.discard(self.uid)
        self._lock_file.close()  # releases the flock


def processes_of_uid(uid: int) -> list[int]:
    """PIDs of live (non-zombie) processes whose real uid is ``uid``, read from ``/proc``.

    Zombies are skipped: they hold no resources, cannot be killed, and vanish once reaped.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid and not fields.get("State", "").strip().startswith(("Z", "X")):
            pids.append(int(entry))
    return pids


def kill_processes_of_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILL every process of a sandbox uid, repeating while a fork race leaves survivors."""
    if uid == 0:
        raise ValueError("refusing to kill processes of uid 0")
    for _ in range(rounds):
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# The sandbox
# ----------------------------------------------------------------------------------------------


def _minimal_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(process: subprocess.Popen, status_read_fd: int, deadline: float, cap: int):
    """Drain stdout, stderr and the status pipe until EOF, the deadline, or ``cap`` bytes.

    Returns (stdout bytes, stderr bytes, status bytes, timed_out, overflowed). Reading stops (and
    the caller kills the program) as soon as stdout or stderr passes ``cap``: holding a runaway
    writer's output in memory is what the cap is there to prevent.
    """
    buffers = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, "stdout")
    selector.register(process.stderr, selectors.EVENT_READ, "stderr")
    selector.register(status_read_fd, selectors.EVENT_READ, "status")
    open_streams, timed_out, overflowed = 3, False, False
    try:
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(timeout=remaining):
                name = key.data
                fd = key.fd if isinstance(key.fileobj, int) else key.fileobj.fileno()
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                buffers[name] += chunk
                if name != "status" and len(buffers[name]) > cap:
                    overflowed = True
            if overflowed:
                break
    finally:
        selector.close()
    return buffers["stdout"], buffers["stderr"], buffers["status"], timed_out, overflowed


def _parse_status_messages(raw: bytes) -> list[dict]:
    messages = []
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            messages.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the program may have scribbled on the pipe; ignore what is not ours
    return messages


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(function, failed_path, _exc):
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


def run_in_sandbox(
    program: str,
    stdin: str = "",
    *,
    timeout_s: float = 10.0,
    cpu_s: int | None = None,
    memory_mb: int | None = 512,
    max_output_bytes: int = 64 * 1024,
    max_file_bytes: int = 16 * 1024 * 1024,
    max_processes: int = 16,
    allow_subprocess: bool = False,
    audit_hook: bool = True,
    network_namespace: bool = True,
    python_executable: str | None = None,
) -> SandboxResult:
    """Run a Python ``program`` with ``stdin`` in a sandboxed subprocess; see the module docstring.

    Args:
        timeout_s: wall-clock limit; the process group (and, as root, every process of the
            sandbox uid) is killed when it passes.
        cpu_s: ``RLIMIT_CPU`` seconds; default ``ceil(timeout_s) + 1``.
        memory_mb: ``RLIMIT_AS`` in MiB (address space, so the interpreter's own ~30 MiB counts);
            ``None`` leaves it unlimited.
        max_output_bytes: stdout and stderr are each kept up to this many bytes; writing more
            stops the program with status "output_limit".
        max_processes: ``RLIMIT_NPROC`` (threads count too). Enforced per sandbox when root (own
            uid); otherwise added to the caller's current process count, since the limit is per uid.
        allow_subprocess: let the audit hook pass fork/exec (the rlimits still apply).
        audit_hook / network_namespace: switch those layers off (tests use this to check that the
            OS layers hold on their own).
        python_executable: interpreter to run; default :func:`default_sandbox_python`.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not isinstance(stdin, str):
        raise TypeError(f"stdin must be a str, got {type(stdin).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if max_output_bytes < 1 or max_file_bytes < 1 or max_processes < 1:
        raise ValueError("max_output_bytes, max_file_bytes and max_processes must be >= 1")
    cpu_s = int(cpu_s if cpu_s is not None else math.ceil(timeout_s) + 1)
    as_root = os.geteuid() == 0
    lock_dir = os.path.join(tempfile.gettempdir(), "disa-sandbox-locks")
    uid_reservation = _SandboxUid(lock_dir) if as_root else None
    workdir = tempfile.mkdtemp(prefix="disa-sandbox-")
    started = time.monotonic()
    try:
        uid = uid_reservation.__enter__() if uid_reservation else None
        try:
            return _run_prepared(
                program, stdin, workdir, uid, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                max_output_bytes=max_output_bytes, max_file_bytes=max_file_bytes,
                max_processes=max_processes, allow_subprocess=allow_subprocess, audit_hook=audit_hook,
                network_namespace=network_namespace,
                python_executable=python_executable or default_sandbox_python(), started=started,
            )
        finally:
            if uid_reservation:
                uid_reservation.__exit__(None, None, None)
    except OSError as err:
        return SandboxResult("sandbox_error", False, None, "", f"sandbox failed to start: {err!r}",
                             time.monotonic() - started)
    finally:
        _remove_tree(workdir)


def _readable_by_others(path: str) -> bool:
    """True when a uid with no special rights can reach ``path`` (o+x on every ancestor, o+r on it)."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def default_sandbox_python() -> str:
    """The interpreter sandboxes run: ``sys.executable``, unless we are root and its standard
    library is unreadable to the unprivileged sandbox uid (a pyenv under ``/root``, mode 0700), in
    which case a world-readable system ``pythonX.Y`` of the same version when there is one."""
    if os.geteuid() != 0:
        return sys.executable
    stdlib = sysconfig.get_paths()["stdlib"]
    if _readable_by_others(sys.executable) and _readable_by_others(stdlib):
        return sys.executable
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for directory in ("/usr/bin", "/usr/local/bin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK) and _readable_by_others(candidate):
            return candidate
    return sys.executable  # the bootstrap's pre-imports are then all the program can import


def _nproc_limit(uid: int | None, max_processes: int) -> int:
    if uid is not None:
        return max_processes
    return len(processes_of_uid(os.getuid())) + max_processes


def _run_prepared(program, stdin, workdir, uid, *, timeout_s, cpu_s, memory_mb, max_output_bytes,
                  max_file_bytes, max_processes, allow_subprocess, audit_hook, network_namespace,
                  python_executable, started) -> SandboxResult:
    program_path = os.path.join(workdir, "solution.py")
    with open(program_path, "w", encoding="utf-8") as f:
        f.write(program)
    os.chmod(program_path, 0o600)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(program_path, uid, uid)
    stdin_file = tempfile.TemporaryFile()
    stdin_file.write(stdin.encode("utf-8"))
    stdin_file.seek(0)
    status_read_fd, status_write_fd = os.pipe()
    config = {
        "status_fd": status_write_fd, "program_path": program_path, "workdir": workdir,
        "uid": uid, "gid": uid, "cpu_s": cpu_s, "max_file_bytes": int(max_file_bytes),
        "memory_bytes": None if memory_mb is None else int(memory_mb) * 1024 * 1024,
        "nproc": _nproc_limit(uid, max_processes), "netns": network_namespace,
        "audit_hook": audit_hook, "allow_subprocess": allow_subprocess, "preimport": _PREIMPORT,
    }
    try:
        process = subprocess.Popen(
            [python_executable, "-I", "-c", _BOOTSTRAP, json.dumps(config)],
            stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
            env=_minimal_env(workdir), pass_fds=(status_write_fd,), start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        os.close(status_read_fd)
        raise
    finally:
        os.close(status_write_fd)
        stdin_file.close()
    try:
        out, err, status_raw, timed_out, overflowed = _read_capped(
            process, status_read_fd, started + timeout_s, max_output_bytes)
        if timed_out or overflowed:
            _kill_group(process)
            if uid is not None:
                kill_processes_of_uid(uid)
        try:
            returncode = process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:  # stdout closed early but the process lingers
            _kill_group(process)
            returncode = process.wait()
            timed_out = True
    finally:
        _kill_group(process)  # daemonised children of a finished program
        process.stdout.close()
        process.stderr.close()
        os.close(status_read_fd)
    wall = time.monotonic() - started
    messages = _parse_status_messages(bytes(status_raw))
    isolation = next((m["isolation"] for m in messages if "isolation" in m), {})
    refusal = next((m["refused"] for m in messages if "refused" in m), None)
    bootstrap_error = next((m["bootstrap_error"] for m in messages if "bootstrap_error" in m), None)
    status = _classify(returncode, timed_out, overflowed, refusal, bootstrap_error)
    stderr_text = err[:max_output_bytes].decode("utf-8", "replace")
    if bootstrap_error:
        stderr_text = f"sandbox bootstrap failed: {bootstrap_error}\n" + stderr_text
    return SandboxResult(
        status=status, passed=status == "ok", returncode=returncode,
        stdout=out[:max_output_bytes].decode("utf-8", "replace"), stderr=stderr_text,
        wall_time_s=wall, stdout_truncated=len(out) > max_output_bytes,
        stderr_truncated=len(err) > max_output_bytes, refusal=refusal, isolation=isolation,
    )


def _classify(returncode, timed_out, overflowed, refusal, bootstrap_error) -> str:
    if bootstrap_error or returncode == _EXIT_BOOTSTRAP_FAILED:
        return "sandbox_error"
    if refusal is not None or returncode == _EXIT_REFUSED:
        return "refused"
    if overflowed:
        return "output_limit"
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if returncode == _EXIT_MEMORY:
        return "memory"
    return "ok" if returncode == 0 else "runtime_error"


# ----------------------------------------------------------------------------------------------
# Tests and rewards
# ----------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str) -> str:
    """The last fenced ```python block of a completion; the whole text when there is none."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def normalize_output(text: str) -> str:
    """Drop trailing whitespace on each line and trailing blank lines (judge-style comparison)."""
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).rstrip("\n")


def parse_tests(tests: Any) -> list[dict | str]:
    """Normalise a ``tests`` cell to a list of cases: ``{"input", "output"}`` dicts or code strings.

    Raises ``ValueError`` naming the offending case when the format is not one of those documented
    in the module docstring.
    """
    if isinstance(tests, (bytes, bytearray)):
        tests = tests.decode("utf-8")
    if isinstance(tests, str):
        stripped = tests.lstrip()
        if stripped.startswith(("[", "{")):
            try:
                tests = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise ValueError(f"tests looks like JSON but does not parse: {err}") from err
        else:
            return [tests]
    if isinstance(tests, dict):
        if "inputs" in tests and "outputs" in tests:
            inputs, outputs = list(tests["inputs"]), list(tests["outputs"])
            if len(inputs) != len(outputs):
                raise ValueError(f"tests has {len(inputs)} 'inputs' but {len(outputs)} 'outputs'")
            tests = [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
        else:
            tests = [tests]
    if not isinstance(tests, Sequence) or isinstance(tests, str):
        raise ValueError(f"tests must be a list, dict or str, got {type(tests).__name__}")
    cases: list[dict | str] = []
    for index, case in enumerate(tests):
        if isinstance(case, str):
            cases.append(case)
        elif isinstance(case, dict) and "input" in case and "output" in case:
            cases.append({"input": _as_text(case["input"]), "output": _as_text(case["output"])})
        else:
            raise ValueError(
                f"tests[{index}] must be a code string or a dict with 'input' and 'output', got {case!r:.200}"
            )
    if not cases:
        raise ValueError("tests is empty")
    return cases


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # some datasets store lines as a list
        return "\n".join(str(v) for v in value)
    return str(value)


def run_tests(program: str, tests: Any, *, stop_on_failure: bool = True, **sandbox_options) -> CodeTestReport:
    """Run ``program`` against every case of ``tests`` (see :func:`parse_tests`).

    ``stop_on_failure`` skips the remaining cases after the first failure (they count as failed):
    all-or-nothing scoring needs no more, and a program that times out once will time out again.
    """
    cases = parse_tests(tests)
    results: list[SandboxResult] = []
    passed = 0
    for case in cases:
        if isinstance(case, str):
            result = run_in_sandbox(program + "\n\n" + case + "\n", **sandbox_options)
        else:
            result = run_in_sandbox(program, case["input"], **sandbox_options)
            if result.status == "ok" and normalize_output(result.stdout) != normalize_output(case["output"]):
                result.status, result.passed = "wrong_answer", False
        results.append(result)
        passed += result.passed
        if stop_on_failure and not result.passed:
            break
    return CodeTestReport(num_tests=len(cases), num_passed=passed, results=results)


def code_reward(completion: str, tests: Any, *, partial_credit: bool = False, **sandbox_options) -> float:
    """Reward of one completion: 1.0/0.0 (all tests pass), or the fraction passed."""
    report = run_tests(extract_program(completion), tests, stop_on_failure=not partial_credit, **sandbox_options)
    return report.fraction_passed if partial_credit else float(report.all_passed)


def default_max_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


def run_tests_batch(
    programs: Sequence[str],
    tests: Sequence[Any],
    *,
    max_workers: int | None = None,
    stop_on_failure: bool = True,
    show_progress: bool | None = None,
    **sandbox_options,
) -> list[CodeTestReport]:
    """Run many programs concurrently on a thread pool of at most ``max_workers`` sandboxes.

    Threads suffice: each worker only waits on its subprocess. Order of the output matches input.
    """
    if len(programs) != len(tests):
        raise ValueError(f"got {len(programs)} programs but {len(tests)} test sets")
    workers = max_workers if max_workers is not None else default_max_workers()
    if workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {workers}")
    from tqdm.auto import tqdm

    def one(index: int) -> CodeTestReport:
        return run_tests(programs[index], tests[index], stop_on_failure=stop_on_failure, **sandbox_options)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        iterator = pool.map(one, range(len(programs)))
        disable = None if show_progress is None else not show_progress
        return list(tqdm(iterator, total=len(programs), desc="code tests", disable=disable))


@register_verifier("code")
def code_verifier(
    prompts: list,
    completions: list,
    *,
    tests: list,
    partial_credit: bool = False,
    max_workers: int | None = None,
    **columns,
) -> list[float]:
    """TRL-signature reward over the ``tests`` column; sandbox options pass through ``columns``
    only when they name a :func:`run_in_sandbox` keyword (``timeout_s``, ``memory_mb``...)."""
    if len(tests) != len(completions):
        raise ValueError(f"column 'tests' has {len(tests)} rows but there are {len(completions)} completions")
    sandbox_keys = {"timeout_s", "cpu_s", "memory_mb", "max_output_bytes", "max_file_bytes",
                    "max_processes", "python_executable"}
    sandbox_options = {k: v for k, v in columns.items() if k in sandbox_keys}
    programs = [extract_program(completion_text(c)) for c in completions]
    for row, cell in enumerate(tests):
        try:
            parse_tests(cell)
        except ValueError as err:
            raise ValueError(f"column 'tests' row {row}: {err}") from err
    reports = run_tests_batch(programs, tests, max_workers=max_workers,
                              stop_on_failure=not partial_credit, **sandbox_options)
    return [r.fraction_passed if partial_credit else float(r.all_passed) for r in reports]
