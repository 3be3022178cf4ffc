"""A cgroup per sandbox: one memory cap for everything the run holds, and a process cap.

``RLIMIT_AS`` bounds one process's address space; the memory controller bounds the sum the kernel
charges to the group: every process's pages, tmpfs/shmem pages (the sandbox's ``/tmp``), and kernel
memory the kernel accounts (inodes and dentries of millions of empty files, pipe buffers, page tables).
Past the cap the kernel reclaims, then OOM-kills inside the group only.

cgroup v2 (``memory.max``, ``memory.swap.max``, ``pids.max``) is used where the memory and pids
controllers can be enabled below our own cgroup; otherwise cgroup v1 (``memory.limit_in_bytes``,
``memory.memsw.limit_in_bytes`` where present, ``pids.max``). The sandbox enters the group before it
can fork: bwrap is started as ``sh -c 'echo 0 > .../tasks; exec bwrap ...'`` (:func:`enter_command`).
In v1 the shell moves its one thread through ``tasks``: moving a whole process through ``cgroup.procs``
takes the kernel's global threadgroup lock, an RCU grace period (~10 ms per hierarchy here), which a
single thread moving itself skips.
:func:`create_cgroup` returns ``None`` (and :func:`cgroup_problem` says why) where neither works, e.g.
without write access to ``/sys/fs/cgroup``.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass

_PREFIX = "disa-sbx-"


@dataclass(frozen=True)
class _Layout:
    """Where this process's groups are: ``version`` and the parent directory per controller."""

    version: str
    parents: tuple[str, ...]  # v2: (unified parent,); v1: (memory parent[, pids parent])


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every cgroup mount, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 2 and tail[0] in ("cgroup", "cgroup2"):
                found.append((fields[4], tail[0], set(tail[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _v2_layout(mounts, own) -> _Layout | None:
    for point, kind, _ in mounts:
        if kind != "cgroup2" or "" not in own:
            continue
        parent = os.path.join(point, own[""].lstrip("/"))
        try:
            with open(os.path.join(parent, "cgroup.controllers")) as f:
                available = set(f.read().split())
            if not {"memory", "pids"} <= available:
                continue
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
            if not {"memory", "pids"} <= enabled:  # refused when our own group holds processes
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory +pids")
        except OSError:
            continue
        if os.access(parent, os.W_OK):
            return _Layout("v2", (parent,))
    return None


def _v1_layout(mounts, own) -> _Layout | None:
    """The memory hierarchy (required) and the pids one (used when writable too)."""
    parents = []
    for controller in ("memory", "pids"):
        point = next((p for p, kind, opts in mounts if kind == "cgroup" and controller in opts), None)
        parent = os.path.join(point, own[controller].lstrip("/")) if point and controller in own else None
        if parent is None or not os.access(parent, os.W_OK):
            if controller == "memory":
                return None
            continue
        parents.append(parent)
    return _Layout("v1", tuple(parents))


_layout_lock = threading.Lock()
_layout: list = []  # [ _Layout | str (why none) ]
_counter = itertools.count()


def _detect() -> _Layout | str:
    with _layout_lock:
        if not _layout:
            try:
                mounts, own = _mounts(), _own_paths()
                layout = _v2_layout(mounts, own) or _v1_layout(mounts, own)
                if layout:
                    _sweep_stale(layout)
                _layout.append(layout or "no writable cgroup v2 (memory+pids) or v1 memory hierarchy")
            except OSError as err:
                _layout.append(f"cgroups unreadable: {err!r}")
        return _layout[0]


def _sweep_stale(layout: _Layout) -> None:
    """Remove the groups of sandbox parents that died before removing them (named after their pid)."""
    for parent in layout.parents:
        for name in os.listdir(parent):
            if not name.startswith(_PREFIX):
                continue
            owner = name[len(_PREFIX):].split("-", 1)[0]
            if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                _remove(os.path.join(parent, name), layout.version, patience_s=0.5)


def cgroup_problem() -> str | None:
    """Why sandboxes get no cgroup here, or ``None``."""
    layout = _detect()
    return layout if isinstance(layout, str) else None


def cgroup_version() -> str | None:
    """"v2" or "v1" where sandboxes get a cgroup here, else ``None``."""
    layout = _detect()
    return None if isinstance(layout, str) else layout.version


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: str, key: str | None = None) -> int | None:
    """The integer in ``path`` (or on its line ``key N``); ``None`` when absent or unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    if key is None:
        return int(text) if text.strip().isdigit() else None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


class SandboxCgroup:
    """The group(s) of one sandbox run; :meth:`close` kills what is left and removes them."""

    def __init__(self, version: str, directories: list[str], memory_bytes: int | None, max_pids: int | None):
        self.version, self.directories = version, directories
        self.memory_bytes, self.max_pids = memory_bytes, max_pids

    @property
    def entry_files(self) -> list[str]:
        """Where the entering shell writes "0" (itself): v1 ``tasks`` (one thread), v2 ``cgroup.procs``."""
        name = "cgroup.procs" if self.version == "v2" else "tasks"
        return [os.path.join(d, name) for d in self.directories]

    def report(self) -> dict:
        """What the run used: peak memory and OOM kills inside the group (the kernel's counts)."""
        memory_dir = self.directories[0]
        if self.version == "v2":
            peak = _read_int(os.path.join(memory_dir, "memory.peak"))
            oom = _read_int(os.path.join(memory_dir, "memory.events"), "oom_kill")
        else:
            peak = _read_int(os.path.join(memory_dir, "memory.max_usage_in_bytes"))
            oom = _read_int(os.path.join(memory_dir, "memory.oom_control"), "oom_kill")
        return {"memory_peak_bytes": peak, "oom_kills": oom}

    def close(self) -> dict:
        """Kill any process left in the group, remove it, and return :meth:`report` (read before removal)."""
        usage = self.report()
        for directory in self.directories:
            _remove(directory, self.version)
        return usage


def _remove(directory: str, version: str, patience_s: float = 2.0) -> None:
    deadline = time.monotonic() + patience_s
    kill_file = os.path.join(directory, "cgroup.kill")
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return  # left for the kernel to report; a later sweep of the prefix can remove it
        if version == "v2" and os.path.exists(kill_file):
            try:
                _write(kill_file, "1")
            except OSError:
                pass
        else:
            try:
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.005)


def create_cgroup(memory_bytes: int | None, max_pids: int) -> SandboxCgroup | None:
    """A fresh group capped at ``memory_bytes`` (``None``: uncapped, still counted) and ``max_pids``."""
    layout = _detect()
    if isinstance(layout, str):
        return None
    name = f"{_PREFIX}{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"
    directories: list[str] = []
    try:
        for parent in layout.parents:
            directory = os.path.join(parent, name)
            os.mkdir(directory)
            directories.append(directory)
        if layout.version == "v2":
            (group,) = directories
            if memory_bytes is not None:
                _write(os.path.join(group, "memory.max"), str(memory_bytes))
                if os.path.exists(os.path.join(group, "memory.swap.max")):
                    _write(os.path.join(group, "memory.swap.max"), "0")
            _write(os.path.join(group, "pids.max"), str(max_pids))
        else:
            memory, pids = directories[0], directories[1:]
            if memory_bytes is not None:
                _write(os.path.join(memory, "memory.limit_in_bytes"), str(memory_bytes))
                if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):
                    _write(os.path.join(memory, "memory.memsw.limit_in_bytes"), str(memory_bytes))
            for group in pids:
                _write(os.path.join(group, "pids.max"), str(max_pids))
    except OSError:
        for directory in directories:
            _remove(directory, layout.version, patience_s=0.1)
        return None
    has_pids = layout.version == "v2" or len(directories) > 1
    return SandboxCgroup(layout.version, directories, memory_bytes, max_pids if has_pids else None)


def enter_command(cgroup: SandboxCgroup, argv: list[str]) -> list[str]:
    """``argv`` run by a shell that first moves itself into ``cgroup`` (so every descendant is in it)."""
    files = cgroup.entry_files
    script = 'for f in "$@"; do [ "$f" = -- ] && break; echo 0 > "$f" || exit 125; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *files, "--", *argv]
