"""The seccomp filter bwrap installs before the harness (``bwrap --seccomp FD``), built with libseccomp.

A deny-list: the sandboxed program keeps every syscall Python, numpy, threads, pipes and ``/proc/self``
need, and loses those that reach kernel state outliving the run or shared across sandboxes (keyrings),
that make new namespaces (a nested user namespace would give it its own mounts and a tmpfs outside the
disk cap), that inspect other processes, that hold memory outside the cgroup's view (memfd, SysV ipc),
and the large, rarely needed kernel surfaces (bpf, perf, io_uring, userfaultfd, kexec, modules).
Syscalls of a foreign ABI (i386 ``int 0x80``, x32) kill the process: the filter only names native ones.

libseccomp (Debian: ``libseccomp2``) is called through ctypes; only the BPF export is used, bwrap
loads the program. :func:`seccomp_program` returns the compiled filter (built once per process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
import threading

SECCOMP_INSTALL_HINT = "install libseccomp (Debian/Ubuntu: apt-get install libseccomp2)"

_ACT_ALLOW = 0x7FFF0000
_ACT_KILL_PROCESS = 0x80000000
_ATTR_ACT_BADARCH = 2  # enum scmp_filter_attr: ACT_DEFAULT = 1, ACT_BADARCH = 2
_CMP_MASKED_EQ = 7


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


# Syscalls refused with EPERM whatever their arguments. Names unknown to this libseccomp/arch are skipped.
DENIED = (
    # kernel keyrings: per-uid state that outlives the run and is shared by parallel runs of one uid
    "add_key", "keyctl", "request_key",
    # namespaces and mounts (the sandbox's own were made by bwrap before the filter)
    "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount",
    "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    # other processes' memory and file descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # memory that no per-process limit sees
    "memfd_create", "memfd_secret", "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd",
    "msgrcv", "msgctl", "semget", "semop", "semtimedop", "semctl", "mq_open", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr", "mq_unlink",
    # large kernel surfaces a test program has no use for
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "acct",
    "swapon", "swapoff", "reboot", "syslog", "quotactl", "quotactl_fd", "open_by_handle_at",
    "name_to_handle_at", "lookup_dcookie", "fanotify_init", "uselib", "vhangup", "nfsservctl",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm", "personality",
)
# Refused with ENOSYS, so that libc falls back to a call the filter can inspect (clone3 passes its
# flags in memory, which seccomp cannot read; glibc then uses clone).
UNSUPPORTED = ("clone3",)

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x80
# clone's low byte is the exit signal, so CLONE_NEWTIME (0x80) is a namespace flag for unshare only.
_CLONE_NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER,
                          CLONE_NEWPID, CLONE_NEWNET)
_UNSHARE_NAMESPACE_FLAGS = _CLONE_NAMESPACE_FLAGS + (CLONE_NEWTIME,)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class SeccompUnavailable(RuntimeError):
    """libseccomp cannot be loaded or cannot build the filter here."""


def _load_libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as err:
        raise SeccompUnavailable(f"libseccomp not loadable ({err}); {SECCOMP_INSTALL_HINT}") from err
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _add_rule(lib, ctx, action: int, name: str, masked_arg0: int | None = None) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:
        return  # not a syscall of this architecture (e.g. the i386-only multiplexers)
    if masked_arg0 is None:
        rc = lib.seccomp_rule_add_array(ctx, action, number, 0, None)
    else:
        cmp = (_ArgCmp * 1)(_ArgCmp(0, _CMP_MASKED_EQ, masked_arg0, masked_arg0))
        rc = lib.seccomp_rule_add_array(ctx, action, number, 1, cmp)
    if rc < 0:
        raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")


def build_program() -> bytes:
    """Compile the filter to a classic BPF program (the bytes bwrap's ``--seccomp`` reads)."""
    lib = _load_libseccomp()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        if lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS) < 0:
            raise SeccompUnavailable("seccomp_attr_set(ACT_BADARCH) failed")
        for name in DENIED:
            _add_rule(lib, ctx, _act_errno(errno.EPERM), name)
        for name in UNSUPPORTED:
            _add_rule(lib, ctx, _act_errno(errno.ENOSYS), name)
        for flag in _CLONE_NAMESPACE_FLAGS:
            _add_rule(lib, ctx, _act_errno(errno.EPERM), "clone", flag)
        for flag in _UNSHARE_NAMESPACE_FLAGS:
            _add_rule(lib, ctx, _act_errno(errno.EPERM), "unshare", flag)
        with tempfile.TemporaryFile() as out:
            rc = lib.seccomp_export_bpf(ctx, out.fileno())
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            out.seek(0)
            program = out.read()
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % 8:
        raise SeccompUnavailable(f"seccomp_export_bpf wrote {len(program)} bytes, not whole BPF instructions")
    return program


_lock = threading.Lock()
_cached: list = []  # [bytes | SeccompUnavailable]


def _build_once() -> bytes | SeccompUnavailable:
    with _lock:
        if not _cached:
            try:
                _cached.append(build_program())
            except SeccompUnavailable as err:
                _cached.append(err)
        return _cached[0]


def seccomp_program() -> bytes | None:
    """The filter, built once per process; ``None`` when libseccomp is unavailable here."""
    value = _build_once()
    return None if isinstance(value, Exception) else value


def seccomp_problem() -> str | None:
    """Why no filter can be built here, or ``None``."""
    value = _build_once()
    return str(value) if isinstance(value, Exception) else None


def program_fd(program: bytes) -> int:
    """A pipe's read end holding ``program`` (bwrap reads it to EOF); the caller closes it after the start."""
    read_fd, write_fd = os.pipe()
    try:
        if len(program) > 65536:
            raise SeccompUnavailable("seccomp program larger than a pipe buffer")
        os.write(write_fd, program)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd
