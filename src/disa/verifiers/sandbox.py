"""Run an untrusted Python program under operating-system isolation (bubblewrap).

Each run gets, from ``bwrap``: its own mount namespace (a read-only view of ``/usr``, the
interpreter's prefixes and site-packages; a private, size-capped tmpfs as ``/tmp`` and working
directory; a read-only minimal ``/dev``; no host ``/tmp``, ``/dev/shm``, ``/run`` or sockets), a pid
namespace (everything the program starts dies with it), a network namespace (no interface up), and
its own ipc/uts namespaces. A harness run before the program sets rlimits (CPU, address space,
file size, processes, no core files) and, when we are root, drops to an unprivileged uid from a
flock'ed pool, so that ``RLIMIT_NPROC`` counts only this sandbox. The parent enforces the wall
clock by killing bwrap, which takes the whole pid namespace with it, whatever the program does
with its pipes. Every byte the parent reads from a sandbox is capped before it is decoded
(stdout/stderr at ``max_output_bytes``, the status pipe at 64 KiB), and the status pipe is parsed
as untrusted (the program can write to it too): nothing a program writes can raise in the parent.

Without a usable ``bwrap`` the fallback backend (:mod:`disa.verifiers.sandbox_fallback`) runs with
weaker, Python-level layers; results say which one ran (``SandboxResult.isolation_level``) and
``require_os_isolation=True`` refuses the fallback. See ``docs/sandbox.md``.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from disa.verifiers import sandbox_cgroup as cgroups
from disa.verifiers import sandbox_fallback as fallback
from disa.verifiers import sandbox_seccomp as seccomp
from disa.verifiers.sandbox_bwrap import (  # noqa: F401
    BWRAP_INSTALL_HINT,
    DEFAULT_ALLOWED_PACKAGES,
    bwrap_command,
    bwrap_problem,
)

STATUSES = ("ok", "wrong_answer", "timeout", "memory", "runtime_error", "refused", "output_limit", "sandbox_error")


class SandboxUnavailable(RuntimeError):
    """OS isolation was required (``require_os_isolation=True``) but bubblewrap cannot run here."""


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status``: "ok" (exit 0), "wrong_answer" (set by the test runner, never by the sandbox),
    "timeout" (wall or CPU limit), "memory" (``MemoryError`` under ``RLIMIT_AS``), "runtime_error"
    (non-zero exit or signal), "refused" (the fallback's audit hook stopped an action),
    "output_limit" (more than ``max_output_bytes`` written on stdout or stderr, or more than
    ``MAX_STATUS_BYTES`` on the private status pipe, which only a program writing to a descriptor
    it found can fill), "sandbox_error" (the sandbox itself failed to start). ``isolation_level``
    is "bwrap" or "fallback".
    """

    status: str
    passed: bool
    returncode: int | None
    stdout: str
    stderr: str
    wall_time_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    refusal: str | None = None  # what the fallback's audit hook refused, e.g. "socket.connect"
    isolation: dict[str, Any] = field(default_factory=dict)  # layers that were active
    isolation_level: str = ""


# ---------------------------------------------------------------------------------- running


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_mb: int | None = 512
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_disk_mb: int = 64
    max_processes: int = 16
    # bwrap only: the cgroup's cap on all the run holds (processes, tmpfs, kernel memory); default
    # memory_mb + max_disk_mb, None when memory_mb is None
    total_memory_mb: int | None = None
    max_open_files: int = 64  # RLIMIT_NOFILE; also bounds socket buffers where no cgroup counts them
    allowed_packages: tuple[str, ...] = DEFAULT_ALLOWED_PACKAGES  # distributions importable (bwrap)

    def check(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if min(self.max_output_bytes, self.max_file_bytes, self.max_processes, self.max_disk_mb) < 1:
            raise ValueError("max_output_bytes, max_file_bytes, max_disk_mb and max_processes must be >= 1")
        if self.max_open_files < 16:
            raise ValueError(f"max_open_files must be >= 16 (the interpreter needs some), got {self.max_open_files!r}")
        if self.total_memory_mb is not None and self.total_memory_mb < 16:
            raise ValueError(f"total_memory_mb must be >= 16 or None, got {self.total_memory_mb!r}")
        if isinstance(self.allowed_packages, str) or not all(
                isinstance(p, str) and p for p in self.allowed_packages):
            raise ValueError(f"allowed_packages must be a sequence of distribution names, "
                             f"got {self.allowed_packages!r}")

    @property
    def cgroup_memory_bytes(self) -> int | None:
        if self.total_memory_mb is not None:
            return int(self.total_memory_mb) << 20
        return None if self.memory_mb is None else (int(self.memory_mb) + int(self.max_disk_mb)) << 20

    @property
    def cpu_seconds(self) -> int:
        return int(self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1)


class RunningSandbox:
    """A started sandbox; :meth:`finish` drains its output until exit or the deadline."""

    def __init__(self, process, status_read_fd, deadline, limits, started, level, isolation, cleanup):
        self.process, self.status_read_fd, self.deadline = process, status_read_fd, deadline
        self.limits, self.started, self.level, self.isolation = limits, started, level, isolation
        self._cleanup: Callable[[RunningSandbox], None] = cleanup
        self.killed = False

    def kill(self) -> None:
        """Stop the sandbox now (its uid is swept before it is reused)."""
        self.killed = True
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL bwrap's process group; bwrap's death takes the pid namespace with it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self) -> SandboxResult:
        """Drain, reap and clean up; every descriptor is closed and the uid released on every path."""
        try:
            out, err, status_raw, timed_out, overflowed = _read_capped(
                self.process, self.status_read_fd, self.deadline, self.limits.max_output_bytes)
            if not (timed_out or overflowed):
                timed_out = not _wait_until(self.process, self.deadline)
            if self.process.poll() is None:
                self.killed = True  # the namespace dies asynchronously: sweep its uid before reuse
            self._kill_group()
            returncode = self.process.wait()
        finally:
            _each(self._kill_group, self.process.stdout.close, self.process.stderr.close,
                  lambda: os.close(self.status_read_fd), lambda: self._cleanup(self))
        return self._result(out, err, status_raw, returncode, timed_out, overflowed)

    def _result(self, out, err, status_raw, returncode, timed_out, overflowed) -> SandboxResult:
        cap = self.limits.max_output_bytes
        messages = _parse_status_messages(bytes(status_raw))
        if self.level == "bwrap":
            returncode = _bwrap_returncode(returncode)
        isolation = dict(self.isolation)
        isolation.update(_first_field(messages, "isolation", dict) or {})
        refusal = _first_field(messages, "refused", str)
        bootstrap_error = _first_field(messages, "bootstrap_error", str)
        stderr_text = err[:cap].decode("utf-8", "replace")
        if self.level == "bwrap" and not any("ready" in m for m in messages) and not timed_out:
            bootstrap_error = bootstrap_error or stderr_text.strip()[:300] or "harness did not start"
        status = _classify(returncode, timed_out, overflowed, refusal, bootstrap_error)
        if status in ("timeout", "runtime_error") and self.isolation.get("oom_kills"):
            status = "memory"  # the cgroup's OOM killer ended it (counted by the parent, not reported by the program)
        if bootstrap_error:
            stderr_text = f"sandbox bootstrap failed: {bootstrap_error}\n" + stderr_text
        return SandboxResult(
            status=status, passed=status == "ok", returncode=returncode,
            stdout=out[:cap].decode("utf-8", "replace"), stderr=stderr_text,
            wall_time_s=time.monotonic() - self.started, stdout_truncated=len(out) > cap,
            stderr_truncated=len(err) > cap, refusal=refusal, isolation=isolation,
            isolation_level=self.level,
        )


def _wait_until(process: subprocess.Popen, deadline: float) -> bool:
    """Wait for exit until ``deadline``; False when it is still running then (pipes closed early)."""
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        return False


def _bwrap_returncode(code: int | None) -> int | None:
    """bwrap exits with 128+N when the program died of signal N; report it as Popen does (-N)."""
    if code is not None and 128 < code < 128 + 65:
        return -(code - 128)
    return code


def _each(*actions: Callable[[], object]) -> None:
    """Run every action even when one raises; then re-raise the first error."""
    first: BaseException | None = None
    for action in actions:
        try:
            action()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the rest ran
            first = first or err
    if first is not None:
        raise first


MAX_STATUS_BYTES = 64 * 1024  # the harness writes a few short lines; more is a program writing to it
MAX_STATUS_MESSAGES = 64


def _read_capped(process: subprocess.Popen, status_read_fd: int, deadline: float, cap: int,
                 status_cap: int = MAX_STATUS_BYTES):
    """Drain stdout, stderr and the status pipe until EOF, the deadline, or a cap.

    Returns (stdout, stderr, status, timed_out, overflowed). Reading stops as soon as stdout or
    stderr passes ``cap``, or the status pipe passes ``status_cap`` (only a program writing to a
    descriptor it found can fill it): holding a runaway writer's output in memory is what the caps
    prevent. No more than a cap plus one read (64 KiB) is ever held per stream.
    """
    buffers = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    caps = {"stdout": cap, "stderr": cap, "status": status_cap}
    selector = selectors.DefaultSelector()
    open_streams, timed_out, overflowed = 3, False, False
    try:
        selector.register(process.stdout, selectors.EVENT_READ, "stdout")
        selector.register(process.stderr, selectors.EVENT_READ, "stderr")
        selector.register(status_read_fd, selectors.EVENT_READ, "status")
        while open_streams and not overflowed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(timeout=remaining):
                fd = key.fd if isinstance(key.fileobj, int) else key.fileobj.fileno()
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                buffers[key.data] += chunk
                if len(buffers[key.data]) > caps[key.data]:
                    overflowed = True
    finally:
        selector.close()
    return buffers["stdout"], buffers["stderr"], buffers["status"][:status_cap], timed_out, overflowed


def _parse_status_messages(raw: bytes) -> list[dict]:
    """The JSON objects among the first lines of the status pipe. The program can write to it too,
    so nothing here may raise: what does not parse (bad UTF-8, bad JSON, nesting deep enough for a
    RecursionError) is skipped, and each field's type is checked where it is read."""
    messages = []
    for line in raw[:MAX_STATUS_BYTES].split(b"\n")[:MAX_STATUS_MESSAGES]:
        try:
            message = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError, MemoryError):
            continue
        if isinstance(message, dict):
            messages.append(message)
    return messages


def _first_field(messages: list[dict], name: str, kind: type):
    """The first message's ``name`` field of type ``kind``; wrong types are ignored (a program
    may write to the pipe), and of a dict only the entries with short plain values are kept."""
    for message in messages:
        value = message.get(name)
        if type(value) is not kind:
            continue
        if kind is str:
            return value[:1000]
        if kind is dict:
            return {k: v for k, v in value.items() if isinstance(k, str) and _short_plain(v)}
    return None


def _short_plain(value) -> bool:
    """A scalar, or a short list of scalars: what the harness reports about its layers."""
    scalars = (str, int, float, bool, type(None))
    if isinstance(value, list):
        return len(value) <= 64 and all(isinstance(v, scalars) for v in value)
    return isinstance(value, scalars) and not (isinstance(value, str) and len(value) > 1000)


def _classify(returncode, timed_out, overflowed, refusal, bootstrap_error) -> str:
    if bootstrap_error or returncode == fallback._EXIT_BOOTSTRAP_FAILED:
        return "sandbox_error"
    if refusal is not None or returncode == fallback._EXIT_REFUSED:
        return "refused"
    if overflowed:
        return "output_limit"
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if returncode == fallback._EXIT_MEMORY:
        return "memory"
    return "ok" if returncode == 0 else "runtime_error"


def _closer(fd: int) -> Callable[[], None]:
    return lambda: os.close(fd)


def _temp_fd(data: bytes) -> int:
    """An unlinked temporary file holding ``data``, rewound; the fd is the only way to it."""
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        fd = os.dup(handle.fileno())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def choose_backend(backend: str | None, require_os_isolation: bool, python: str) -> str:
    """"bwrap" when it can run here, else "fallback" (or an error when OS isolation is required)."""
    if backend not in (None, "bwrap", "fallback"):
        raise ValueError(f"backend must be None, 'bwrap' or 'fallback', got {backend!r}")
    if backend == "fallback":
        if require_os_isolation:
            raise SandboxUnavailable("require_os_isolation=True contradicts backend='fallback'")
        return "fallback"
    problem = bwrap_problem(python)
    if problem is None:
        return "bwrap"
    if require_os_isolation or backend == "bwrap":
        raise SandboxUnavailable(f"OS isolation is required but unavailable: {problem}")
    return "fallback"


def start_sandbox(program: str, stdin: str = "", *, limits: SandboxLimits, backend: str | None = None,
                  require_os_isolation: bool = False, pass_fds: tuple[int, ...] = (),
                  python_executable: str | None = None, allow_subprocess: bool = False,
                  audit_hook: bool = True, network_namespace: bool = True,
                  started: float | None = None) -> RunningSandbox:
    """Start ``program`` in a sandbox and return at once; ``pass_fds`` are inherited by it."""
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not isinstance(stdin, str):
        raise TypeError(f"stdin must be a str, got {type(stdin).__name__}")
    limits.check()
    started = time.monotonic() if started is None else started
    python = python_executable or sys.executable
    level = choose_backend(backend, require_os_isolation, python)
    as_root = os.geteuid() == 0
    lock_dir = os.path.join(tempfile.gettempdir(), "disa-sandbox-locks")
    reservation = fallback.SandboxUid(lock_dir, sweep=level == "fallback") if as_root else None
    uid = reservation.__enter__() if reservation else None
    workdir = fallback.make_workdir() if level == "fallback" else None
    group = cgroups.create_cgroup(limits.cgroup_memory_bytes, limits.max_processes + 4) if level == "bwrap" else None

    def cleanup(running: RunningSandbox | None = None) -> None:
        if group:  # first: kills whatever is left in the group before its uid is released
            usage = group.close()
            if running is not None:
                running.isolation.update(usage)
        if reservation:
            reservation.sweep = reservation.sweep or bool(running and running.killed)
            reservation.__exit__(None, None, None)
        if workdir:
            _remove_tree(workdir)

    status_read_fd = status_write_fd = program_fd = stdin_fd = filter_fd = None
    try:
        status_read_fd, status_write_fd = os.pipe()
        program_fd = _temp_fd(program.encode("utf-8"))
        stdin_fd = _temp_fd(stdin.encode("utf-8"))
        if level == "bwrap":
            filter_program = seccomp.seccomp_program()
            filter_fd = seccomp.program_fd(filter_program) if filter_program else None
            config = {"status_fd": status_write_fd, "program_fd": program_fd, "uid": uid,
                      "cpu_s": limits.cpu_seconds, "max_file_bytes": int(limits.max_file_bytes),
                      "memory_bytes": None if limits.memory_mb is None else int(limits.memory_mb) << 20,
                      "nproc": fallback._nproc_limit(uid, limits.max_processes),
                      "nofile": int(limits.max_open_files)}
            argv = bwrap_command(python, int(limits.max_disk_mb) << 20, as_root, tuple(limits.allowed_packages),
                                 filter_fd) + [json.dumps(config)]
            if group:
                argv = cgroups.enter_command(group, argv)
            env, cwd = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, "/"
            fds = (program_fd,) if filter_fd is None else (program_fd, filter_fd)
            isolation = {"level": "bwrap", "uid": uid, "mountns": True, "pidns": True, "netns": True,
                         "disk_mb": limits.max_disk_mb, "seccomp": filter_fd is not None,
                         "seccomp_problem": seccomp.seccomp_problem(),
                         "cgroup": group.version if group else None,
                         "cgroup_problem": None if group else cgroups.cgroup_problem() or "cgroup creation failed",
                         "cgroup_memory_bytes": group.memory_bytes if group else None,
                         "cgroup_pids_max": group.max_pids if group else None,
                         "packages": list(limits.allowed_packages)}
        else:
            argv = fallback.fallback_command(
                program_fd, workdir, uid, status_write_fd, cpu_s=limits.cpu_seconds,
                memory_mb=limits.memory_mb, max_file_bytes=limits.max_file_bytes,
                max_processes=limits.max_processes, allow_subprocess=allow_subprocess,
                audit_hook=audit_hook, network_namespace=network_namespace,
                python_executable=python_executable)
            env, cwd, fds, isolation = fallback.minimal_env(workdir), workdir, (program_fd,), {"level": "fallback"}
        process = subprocess.Popen(argv, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=cwd, env=env, pass_fds=(status_write_fd, *fds, *pass_fds),
                                   start_new_session=True, close_fds=True)
    except BaseException:
        _each(*(_closer(fd) for fd in (status_read_fd,) if fd is not None), cleanup)
        raise
    finally:
        _each(*(_closer(fd) for fd in (status_write_fd, program_fd, stdin_fd, filter_fd) if fd is not None))
    return RunningSandbox(process, status_read_fd, started + limits.timeout_s, limits, started,
                          level, isolation, cleanup)


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
    max_disk_mb: int = 64,
    max_processes: int = 16,
    total_memory_mb: int | None = None,
    max_open_files: int = 64,
    allowed_packages: tuple[str, ...] = DEFAULT_ALLOWED_PACKAGES,
    backend: str | None = None,
    require_os_isolation: bool = False,
    allow_subprocess: bool = False,
    audit_hook: bool = True,
    network_namespace: bool = True,
    python_executable: str | None = None,
) -> SandboxResult:
    """Run a Python ``program`` with ``stdin`` in a sandbox; see the module docstring.

    Args:
        timeout_s: wall-clock limit, counted from the call; the whole sandbox is killed then.
        cpu_s: ``RLIMIT_CPU`` seconds; default ``ceil(timeout_s) + 1``.
        memory_mb: ``RLIMIT_AS`` in MiB (the interpreter's own ~30 MiB counts); ``None``: unlimited.
        max_output_bytes: stdout and stderr are each kept up to this many bytes; writing more
            stops the program with status "output_limit".
        max_file_bytes: ``RLIMIT_FSIZE``; max_disk_mb: size of the tmpfs that is the program's
            whole writable disk (bwrap only).
        max_processes: ``RLIMIT_NPROC`` (threads count too); per sandbox when root (own uid).
        total_memory_mb: the cgroup's memory cap over the whole run (bwrap, where cgroups can be
            made); default ``memory_mb + max_disk_mb``.
        max_open_files: ``RLIMIT_NOFILE``.
        allowed_packages: distributions the program may import besides the standard library (bwrap:
            nothing else of site-packages is visible).
        backend: "bwrap", "fallback" or ``None`` (bwrap when it works here).
        require_os_isolation: raise :class:`SandboxUnavailable` instead of using the fallback.
        allow_subprocess / audit_hook / network_namespace: fallback-only switches (bwrap always
            isolates; processes there are bounded by ``max_processes`` and the pid namespace).
        python_executable: interpreter to run; default ``sys.executable`` (bound read-only).
    """
    limits = SandboxLimits(timeout_s, cpu_s, memory_mb, max_output_bytes, max_file_bytes,
                           max_disk_mb, max_processes, total_memory_mb, max_open_files, tuple(allowed_packages))
    started = time.monotonic()
    try:
        running = start_sandbox(program, stdin, limits=limits, backend=backend,
                                require_os_isolation=require_os_isolation,
                                python_executable=python_executable, allow_subprocess=allow_subprocess,
                                audit_hook=audit_hook, network_namespace=network_namespace, started=started)
    except OSError as err:
        return SandboxResult("sandbox_error", False, None, "", f"sandbox failed to start: {err!r}",
                             time.monotonic() - started)
    return running.finish()
