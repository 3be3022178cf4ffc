"""Fallback sandbox, used only where bubblewrap cannot run: Python-level and per-process layers.

These are the layers the code verifier used before OS isolation (see ``docs/sandbox.md``): a
throw-away working directory under a private per-process parent, ``python -I``, rlimits set before
user code, an unprivileged uid from a flock'ed pool when running as root, a network namespace when
the kernel allows, and a Python audit hook. The program's source (and the judge's, tests included)
arrives on an inherited descriptor of an unlinked file, never as a file in the work dir or in argv.

The audit hook confines writes to the work dir, refuses sockets and (unless allowed) new processes,
and refuses signals to anything outside the sandbox's own session (``kill(-1, 9)``, the trainer) and
opening another process's ``/proc/<pid>`` files. It can be switched off from plain Python (the
garbage collector reaches its function), so results from this backend carry
``isolation_level == "fallback"``; ``require_os_isolation=True`` refuses it, and the pipeline stages
refuse it unless ``verifier.allow_fallback: true`` (:func:`check_code_isolation`).

The uid pool is shared with the bubblewrap backend, which drops to a pool uid inside its
namespaces so that ``RLIMIT_NPROC`` counts only the processes of one sandbox.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import signal
import stat
import sys
import sysconfig
import tempfile
import threading
import time

from disa.verifiers.sandbox_child import CHILD_HEAD, RUN_PROGRAM

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


_BOOTSTRAP = CHILD_HEAD + r'''
os.set_inheritable(status_fd, False)

isolation = {"netns": False, "uid": None, "audit_hook": False}
source = read_program(config["program_fd"])

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
    import signal as signal_module
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

    _own_pid = os.getpid()
    _own_session = os.getsid(0) if os.getsid(0) == _own_pid else None  # started as its own session
    _getsid, _getpgrp, _normpath = os.getsid, os.getpgrp, posixpath.normpath
    # Modules loaded by now; a fresh load of one (after `del sys.modules[...]`) would bring back what
    # the bootstrap removed from it below.
    _reload_refused = frozenset(["posix", "os", "_signal", "signal", "_posixsubprocess"])

    def _ours(pid):
        """A process of this sandbox: itself, or one in the session it was started as."""
        if pid == _own_pid:
            return True
        if _own_session is None:
            return False
        try:
            return _getsid(pid) == _own_session
        except OSError:
            return False

    def _may_signal(pid, group):
        """Itself, a process of its session, or its own process group (only when that group is inside
        the session it was started as, i.e. holds none of the trainer's processes)."""
        if group:  # killpg(pgid)
            return _own_session is not None and pid in (0, _getpgrp())
        if pid <= 0:  # kill(0): its group; kill(-1): everything it may signal; kill(-pgid): a group
            return _own_session is not None and pid != -1 and -pid in (0, _getpgrp())
        return _ours(pid)

    def _foreign_proc(path):
        """``/proc/<pid>/...`` of a process that is not this sandbox's."""
        if not path.startswith("/proc/"):
            return False
        head = path[6:].split("/", 1)[0]
        return head.isdigit() and not _ours(int(head))

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
            if not isinstance(path, int):
                try:
                    absolute = _join(_getcwd(), _fsdecode(path))
                except (TypeError, ValueError, OSError):
                    _refuse(event, repr(path))
                if _foreign_proc(_normpath(absolute)) or _foreign_proc(_realpath(absolute)):
                    _refuse(event, repr(path))
        elif event in ("os.kill", "os.killpg"):
            pid = args[0]
            if not isinstance(pid, int) or not _may_signal(pid, event == "os.killpg"):
                _refuse(event, repr(args)[:200])
        elif event == "resource.prlimit":  # another process's limits (the trainer's open files...)
            if not isinstance(args[0], int) or not (args[0] == 0 or _ours(args[0])):
                _refuse(event, repr(args)[:200])
        elif event == "import":
            if args[0] in _reload_refused:
                _refuse(event, repr(args[0]))
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

    # No audit event covers pidfds: pidfd_open(ppid) + pidfd_send_signal would bypass the kill guard.
    import _signal, posix
    for _module, _name in ((os, "pidfd_open"), (posix, "pidfd_open"), (signal_module, "pidfd_send_signal"),
                           (_signal, "pidfd_send_signal")):
        if hasattr(_module, _name):
            delattr(_module, _name)
    # The "open" event does not carry dir_fd, so a path relative to a directory descriptor would be
    # checked against the cwd instead; resolve it against the directory the descriptor names.
    _raw_open, _readlink = os.open, os.readlink

    def _open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and not isinstance(path, int):
            try:
                full = _join(_readlink("/proc/self/fd/%d" % dir_fd), _fsdecode(path))
            except (OSError, TypeError, ValueError):
                _refuse("os.open", "dir_fd %r" % (dir_fd,))
            if (_foreign_proc(_normpath(full)) or _foreign_proc(_realpath(full))
                    or (flags & _write_flags and not _inside_workdir(full))):
                _refuse("os.open", repr(full))
        return _raw_open(path, flags, mode, dir_fd=dir_fd)

    os.open = posix.open = _open
    sys.addaudithook(_guard)
    isolation["audit_hook"] = True

report({"isolation": isolation})
''' + RUN_PROGRAM


# ----------------------------------------------------------------------------------------------
# Unprivileged uid pool (root only)
# ----------------------------------------------------------------------------------------------

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


class SandboxUid:
    """Reserve a uid nobody else (thread or process) is using; release on exit."""

    def __init__(self, lock_dir: str, sweep: bool = True):
        self.lock_dir = lock_dir
        self.sweep = sweep  # a pid namespace makes the /proc sweep unnecessary
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
            if self.sweep:
                kill_processes_of_uid(uid)  # leftovers of a run whose parent died before its sweep
            return uid
        raise RuntimeError(f"all {_SANDBOX_UID_POOL} sandbox uids from {_SANDBOX_UID_BASE} are in use")

    def __exit__(self, *exc) -> None:
        if self.uid is None:
            return
        if self.sweep:
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


def minimal_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def fallback_command(program_fd: int, workdir: str, uid: int | None, status_fd: int, *, cpu_s: int,
                     memory_mb: int | None, max_file_bytes: int, max_processes: int,
                     allow_subprocess: bool, audit_hook: bool, network_namespace: bool,
                     python_executable: str | None) -> list[str]:
    """The bootstrap's command line; it reads the program from the inherited ``program_fd`` (an
    unlinked file: nothing in the work dir or argv holds the source, or a judge's tests)."""
    if uid is not None:
        os.chown(workdir, uid, uid)
    config = {
        "status_fd": status_fd, "program_fd": program_fd, "workdir": workdir,
        "uid": uid, "gid": uid, "cpu_s": cpu_s, "max_file_bytes": int(max_file_bytes),
        "memory_bytes": None if memory_mb is None else int(memory_mb) * 1024 * 1024,
        "nproc": _nproc_limit(uid, max_processes), "netns": network_namespace,
        "audit_hook": audit_hook, "allow_subprocess": allow_subprocess, "preimport": _PREIMPORT,
    }
    python = python_executable or default_sandbox_python()
    return [python, "-I", "-c", _BOOTSTRAP, json.dumps(config)]


# ---------------------------------------------------------------------------------- work dirs

_run_parents: dict[int, str] = {}


def make_workdir() -> str:
    """A fresh work dir inside this process's private parent (``disa-sandbox-run-*``), made on first use
    and removed at exit. The parent is 0700; as root 0711, so that a pool uid can enter its own (0700)
    work dir by name, but no sandbox can list the parent to find another's."""
    pid = os.getpid()
    with _uid_lock:
        parent = _run_parents.get(pid)
        if parent is None or not os.path.isdir(parent):
            parent = tempfile.mkdtemp(prefix="disa-sandbox-run-")
            os.chmod(parent, 0o711 if os.geteuid() == 0 else 0o700)
            _run_parents[pid] = parent
            atexit.register(_remove_run_parent, pid, parent)
    return tempfile.mkdtemp(prefix="disa-sandbox-", dir=parent)


def _remove_run_parent(pid: int, parent: str) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the handler
        shutil.rmtree(parent, ignore_errors=True)


# ---------------------------------------------------------------------------------- the stages' check


def check_code_isolation(allow_fallback: bool, python: str | None = None) -> tuple[str, str | None]:
    """``(level, problem)`` for a run that executes completions: level "bwrap" where bubblewrap can run
    ``python`` here, else "fallback"; ``problem`` says why such a run must not start (the fallback without
    ``allow_fallback``) and how to fix it, None when it may."""
    from disa.verifiers.sandbox_bwrap import BWRAP_INSTALL_HINT, bwrap_problem

    why = bwrap_problem(python)
    if why is None:
        return "bwrap", None
    if allow_fallback:
        return "fallback", None
    fix = "" if BWRAP_INSTALL_HINT in why else "; bubblewrap needs root or unprivileged user namespaces here"
    return "fallback", (f"programs would run without OS isolation here ({why}{fix}). Either make bubblewrap "
                        "work, or accept the weaker fallback sandbox, whose guards a program can switch off, with "
                        "verifier.allow_fallback: true (docs/sandbox.md)")


ISOLATION_SUMMARY = {
    "bwrap": "bubblewrap (mount, pid, network and ipc namespaces; rlimits; pool uid when root)",
    "fallback": ("FALLBACK, no OS isolation (Python audit hook, rlimits, private work dir; a program can switch "
                 "the hook off); allowed by verifier.allow_fallback"),
}
