"""The bubblewrap backend: the command line that builds a sandbox, and the harness run inside it.

The mount view is read-only except a size-capped tmpfs at ``/tmp`` (also the working directory):
``/usr`` (with the ``/bin``, ``/lib*`` links), the interpreter's prefixes and site-packages, a
minimal ``/dev`` and the pid namespace's own ``/proc``. Nothing else of the host is visible.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import threading

from disa.verifiers.sandbox_child import CHILD_HEAD, RUN_PROGRAM

BWRAP_INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)"

# Runs inside bwrap before the program. Source text: it runs under `python -I -c`.
_HARNESS = CHILD_HEAD + r'''

def limit(kind, value):
    resource.setrlimit(kind, (value, value))

try:
    chunks = []
    while True:
        chunk = os.read(config["program_fd"], 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(config["program_fd"])
    source = b"".join(chunks)
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, config["cpu_s"])
    limit(resource.RLIMIT_FSIZE, config["max_file_bytes"])
    if config["memory_bytes"] is not None:
        limit(resource.RLIMIT_AS, config["memory_bytes"])
    limit(resource.RLIMIT_NPROC, config["nproc"])
    if config["uid"] is not None:
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
        if os.getuid() != config["uid"] or os.geteuid() != config["uid"]:
            raise OSError("privilege drop did not take effect")
except Exception as err:
    report({"bootstrap_error": repr(err)})
    os._exit(88)

sys.dont_write_bytecode = True
report({"ready": True})
''' + RUN_PROGRAM

_SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


# ---------------------------------------------------------------------------------- bwrap command


def _interpreter_paths(python: str) -> list[str]:
    """Directories the interpreter needs: its prefixes, its bin dir, and site-packages.

    Only site-packages-like entries of ``sys.path`` are bound, not the current directory or
    arbitrary ``PYTHONPATH`` entries, which may hold datasets or answer keys.
    """
    candidates = {os.path.dirname(python), os.path.dirname(os.path.realpath(python))}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        candidates |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        candidates |= set(site.getsitepackages())
        candidates |= {p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))}
    else:
        candidates.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    paths = set()
    for path in candidates:
        for variant in (os.path.abspath(path), os.path.realpath(path)):
            if os.path.isdir(variant) and variant != "/":
                paths.add(variant)
    return _drop_nested(paths)


def _drop_nested(paths: set[str]) -> list[str]:
    """Keep only outermost paths (a bind of /a already shows /a/b); /usr is bound separately."""
    roots = ["/usr"]
    for path in sorted(paths, key=len):
        if not any(path == root or path.startswith(root + "/") for root in roots):
            roots.append(path)
    return roots[1:]


def _system_mounts() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args


def _readonly_binds(paths: list[str]) -> list[str]:
    """``--ro-bind`` each path, creating its ancestors as 0755 (bwrap's default, 0700, would hide
    them from the unprivileged uid). Called after the private ``/tmp`` is mounted, so an interpreter that
    lives under ``/tmp`` (a CI clone's venv) is bound read-only on top of it instead of hidden by it."""
    args, made = [], {"/", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/tmp"}
    for path in paths:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if ancestor not in made:
                args += ["--perms", "0755", "--dir", ancestor]
                made.add(ancestor)
        args += ["--ro-bind", path, path]
        made.add(path)
    return args


def bwrap_command(python: str, disk_bytes: int, as_root: bool) -> list[str]:
    """The bwrap command line up to (not including) the program: namespaces, mounts, env."""
    args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid",
            "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if as_root:  # the harness keeps only what it needs to drop to the pool uid
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns"]
    args += _system_mounts()
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(int(disk_bytes)), "--tmpfs", "/tmp"]
    args += _readonly_binds(_interpreter_paths(python))
    args += ["--chdir", "/tmp", "--remount-ro", "/", "--remount-ro", "/dev", "--clearenv"]
    for key, value in _SANDBOX_ENV.items():
        args += ["--setenv", key, value]
    return args + ["--", *_harness_argv(python)]


# ---------------------------------------------------------------------------------- start-up speed


def _harness_argv(python: str) -> list[str]:
    """``python -I -S``, with the site-packages of the running interpreter put on ``sys.path`` by hand: ``site``
    (its ``.pth`` files, e.g. setuptools' distutils hack) is a third of a bare interpreter's start, paid twice per
    assert test. Another interpreter keeps its own ``site``."""
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        return [python, "-I", "-c", _HARNESS]
    site_dirs = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    return [python, "-I", "-S", "-c", f"import sys\nsys.path.extend({site_dirs!r})\n" + _HARNESS]


_probe_lock = threading.Lock()
_probe_results: dict[tuple[str, bool], str | None] = {}


def bwrap_problem(python: str | None = None) -> str | None:
    """``None`` when bwrap can run ``python`` here, else why not (probed once per interpreter)."""
    python = python or sys.executable
    key = (python, os.geteuid() == 0)
    with _probe_lock:
        if key not in _probe_results:
            _probe_results[key] = _probe_bwrap(python)
        return _probe_results[key]


def _probe_bwrap(python: str) -> str | None:
    if shutil.which("bwrap") is None:
        return f"bwrap not found on PATH; {BWRAP_INSTALL_HINT}"
    argv = bwrap_command(python, 1 << 20, os.geteuid() == 0)
    argv = argv[:argv.index("--")] + ["--", python, "-I", "-c", "pass"]
    try:
        probe = subprocess.run(argv, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap failed to start: {err!r}"
    if probe.returncode != 0:
        return f"bwrap cannot create the sandbox here: {probe.stderr.decode(errors='replace').strip()[:300]}"
    return None
