"""The bubblewrap backend: the command line that builds a sandbox, and the harness run inside it.

The mount view is read-only except a size-capped tmpfs at ``/tmp`` (also the working directory):
``/usr`` (with the ``/bin``, ``/lib*`` links), the interpreter (its executable and links, ``pyvenv.cfg``,
standard library, ``libpython``), the files of the allowed packages only (every other site directory
inside a bound tree is covered by an empty read-only tmpfs), a minimal ``/dev`` and the pid namespace's
own ``/proc``. Nothing else of the host is visible. The seccomp filter (:mod:`sandbox_seccomp`) is
passed to bwrap as ``--seccomp FD``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass

from disa.verifiers.sandbox_child import CHILD_HEAD, RUN_PROGRAM

BWRAP_INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)"
# Distributions a sandboxed program may import besides the standard library (SandboxLimits.allowed_packages).
DEFAULT_ALLOWED_PACKAGES = ("numpy",)

# Runs inside bwrap before the program. Source text: it runs under `python -I -c`.
_HARNESS = CHILD_HEAD + r'''

try:
    source = read_program(config["program_fd"])
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, config["cpu_s"])
    limit(resource.RLIMIT_FSIZE, config["max_file_bytes"])
    if config["memory_bytes"] is not None:
        limit(resource.RLIMIT_AS, config["memory_bytes"])
    limit(resource.RLIMIT_NPROC, config["nproc"])
    limit(resource.RLIMIT_NOFILE, config["nofile"])
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


# ---------------------------------------------------------------------------------- the interpreter's view

# Run by the sandbox's interpreter (``-I`` as in the sandbox: no PYTHONPATH, no user site) to say what it
# needs: the directories of its standard library, its site directories (to hide), and the top-level
# entries each allowed distribution installed (from its RECORD). Paths that .pth files add are ignored.
_VIEW_PROBE = r"""
import json, os, site, sys, sysconfig
from importlib import metadata
prefixes = sorted({sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, "/usr", "/usr/local"})
active = site.getsitepackages()
site_dirs = set(site.getsitepackages(prefixes)) | set(active)
site_dirs |= {os.path.join(lib, n, d) for lib in ("/usr/lib", "/usr/local/lib") if os.path.isdir(lib)
              for n in os.listdir(lib) if n.startswith("python") for d in ("site-packages", "dist-packages")}
# platstdlib is a venv's own lib dir (holding only its site-packages) unless it has modules of its own
stdlib = {sysconfig.get_path("stdlib")} | {p for p in sys.path if p.rstrip("/").endswith("lib-dynload")}
platstdlib = sysconfig.get_path("platstdlib")
if os.path.isfile(os.path.join(platstdlib, "os.py")) or os.path.isdir(os.path.join(platstdlib, "lib-dynload")):
    stdlib.add(platstdlib)
libdir = sysconfig.get_config_var("LIBDIR") or ""
shared = [os.path.join(libdir, n) for n in (os.listdir(libdir) if os.path.isdir(libdir) else [])
          if n.startswith("libpython") and ".so" in n]
packages, missing = {}, []
for name in json.loads(sys.argv[1]):
    dist = next(iter(metadata.Distribution.discover(name=name, path=active)), None)
    if dist is None:
        missing.append(name)
        continue
    roots = {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".."}
    packages[name] = sorted(str(dist.locate_file(r)) for r in roots)
venv_cfg = os.path.join(sys.prefix, "pyvenv.cfg")
print(json.dumps({"stdlib": sorted(p for p in stdlib if p and os.path.isdir(p)), "shared": shared,
                  "venv_cfg": venv_cfg if os.path.isfile(venv_cfg) else None,
                  "site_dirs": sorted(d for d in site_dirs if os.path.isdir(d)),
                  "packages": packages, "missing": missing}))
"""


@dataclass(frozen=True)
class InterpreterView:
    """What a sandbox sees of the interpreter: read-only ``binds``, ``symlinks`` (dest -> target) for the
    executable's chain of links, and ``masks``: site directories inside a bound tree, covered by an empty
    read-only tmpfs so that only the allowed packages (bound back on top) are visible in them."""

    binds: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]
    masks: tuple[str, ...]

    def destinations(self) -> list[str]:
        return sorted({*self.binds, *(dest for dest, _ in self.symlinks)})


def _executable_chain(python: str) -> tuple[list[tuple[str, str]], str]:
    """The symlinks from ``python`` to the real binary (each recreated in the sandbox, so that the
    interpreter finds its ``pyvenv.cfg`` and its RUNPATH as on the host) and the binary itself."""
    links, path = [], os.path.abspath(python)
    for _ in range(40):
        if not os.path.islink(path) or _visible_as_system(path):
            break
        target = os.readlink(path)
        links.append((path, target))
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return links, path


def _visible_as_system(path: str) -> bool:
    return path == "/usr" or path.startswith("/usr/")


_view_lock = threading.Lock()
_views: dict[tuple[str, tuple[str, ...]], InterpreterView] = {}


def interpreter_view(python: str, packages: tuple[str, ...]) -> InterpreterView:
    """The sandbox's view of ``python`` with only ``packages`` (distribution names) importable besides
    the standard library; probed once per (interpreter, packages). Raises ``ValueError`` naming a
    package that ``python`` does not have."""
    key = (os.path.abspath(python), tuple(sorted(set(packages))))
    with _view_lock:
        if key not in _views:
            _views[key] = _probe_view(*key)
        return _views[key]


def _probe_view(python: str, packages: tuple[str, ...]) -> InterpreterView:
    probe = subprocess.run([python, "-I", "-c", _VIEW_PROBE, json.dumps(list(packages))],
                           capture_output=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})
    if probe.returncode != 0:
        raise RuntimeError(f"cannot list what {python} needs: {probe.stderr.decode(errors='replace')[-500:]}")
    found = json.loads(probe.stdout)
    if found["missing"]:
        raise ValueError(f"allowed_packages: {found['missing']} not installed for {python}")
    links, binary = _executable_chain(python)
    binds = {binary, *found["stdlib"], *found["shared"]}
    if found["venv_cfg"]:
        binds.add(found["venv_cfg"])
    binds = {b for b in binds if not _visible_as_system(b)}
    trees = ["/usr", *binds]
    masks = {d for d in found["site_dirs"]
             if any(d.startswith(tree.rstrip("/") + "/") for tree in trees)}
    binds |= {entry for entries in found["packages"].values() for entry in entries}
    return InterpreterView(tuple(_drop_nested(binds - masks, masks)), tuple(links), tuple(sorted(masks)))


def _interpreter_paths(python: str) -> list[str]:
    """Every path the default view of ``python`` puts in the sandbox (bound files, dirs, links)."""
    return interpreter_view(python, DEFAULT_ALLOWED_PACKAGES).destinations()


def _drop_nested(paths: set[str], masks: set[str]) -> list[str]:
    """Keep only outermost paths (a bind of /a already shows /a/b), except below a mask, which hides
    what is under it; /usr is bound separately."""
    roots: list[str] = []
    for path in sorted(paths, key=len):
        covering = [r for r in ["/usr", *roots] if path == r or path.startswith(r + "/")]
        hidden = any(m.startswith(c + "/") and (path == m or path.startswith(m + "/"))
                     for c in covering for m in masks)
        if not covering or hidden:
            roots.append(path)
    return sorted(roots)


# ---------------------------------------------------------------------------------- bwrap command


def _system_mounts() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args


def _view_mounts(view: InterpreterView) -> list[str]:
    """Mount ``view``, parents before children, creating missing ancestors as 0755 (bwrap's default,
    0700, would hide them from the unprivileged uid). Called after the private ``/tmp`` is mounted, so an
    interpreter that lives under ``/tmp`` (a CI clone's venv) is bound read-only on top of it."""
    made = {"/", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/tmp"}
    operations = [(p, "bind") for p in view.binds] + [(p, "mask") for p in view.masks]
    operations += [(dest, "link") for dest, _ in view.symlinks]
    targets = dict(view.symlinks)
    args: list[str] = []
    for path, kind in sorted(operations, key=lambda op: (op[0].count("/"), op[0])):
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if ancestor not in made and not any(ancestor == b or ancestor.startswith(b + "/")
                                                for b in ["/usr", *view.binds]):
                args += ["--perms", "0755", "--dir", ancestor]
            made.add(ancestor)
        if kind == "bind":
            args += ["--ro-bind", path, path]
        elif kind == "mask":
            args += ["--perms", "0755", "--size", "4096", "--tmpfs", path]
        else:
            args += ["--symlink", targets[path], path]
        made.add(path)
    for mask in view.masks:
        args += ["--remount-ro", mask]
    return args


def bwrap_prefix(python: str, disk_bytes: int, as_root: bool,
                 packages: tuple[str, ...] = (), seccomp_fd: int | None = None) -> list[str]:
    """The bwrap command line up to (not including) ``--`` and the command: namespaces, mounts, env,
    and the seccomp filter read from ``seccomp_fd`` (installed by bwrap right before the exec)."""
    args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid",
            "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if as_root:  # the harness keeps only what it needs to drop to the pool uid
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns"]
    args += _system_mounts()
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(int(disk_bytes)), "--tmpfs", "/tmp"]
    args += _view_mounts(interpreter_view(python, packages))
    args += ["--chdir", "/tmp", "--remount-ro", "/", "--remount-ro", "/dev", "--clearenv"]
    for key, value in _SANDBOX_ENV.items():
        args += ["--setenv", key, value]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args


def bwrap_command(python: str, disk_bytes: int, as_root: bool,
                  packages: tuple[str, ...] = (), seccomp_fd: int | None = None) -> list[str]:
    """The bwrap command line up to (not including) the harness's config argument."""
    return bwrap_prefix(python, disk_bytes, as_root, packages, seccomp_fd) + ["--", python, "-I", "-c", _HARNESS]


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
    try:
        argv = bwrap_prefix(python, 1 << 20, os.geteuid() == 0, ()) + [
            "--", python, "-I", "-c", "pass"]
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as err:
        return f"cannot prepare the interpreter's view: {err}"
    try:
        probe = subprocess.run(argv, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap failed to start: {err!r}"
    if probe.returncode != 0:
        return f"bwrap cannot create the sandbox here: {probe.stderr.decode(errors='replace').strip()[:300]}"
    return None
