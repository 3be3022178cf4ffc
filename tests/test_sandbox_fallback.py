"""The fallback sandbox (no bubblewrap) and the stages' refusal of it.

The fallback runs a program as the trainer's own uid when we are not root, so only its audit hook stands
between a program and the trainer: these tests run hostile programs with ``backend="fallback"``, once as an
unprivileged uid (via ``setpriv``, when we are root: what a non-root user gets) and once as whoever runs the
tests, and check that the stages refuse the fallback unless ``verifier.allow_fallback`` is set.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from disa import cli
from disa.verifiers import sandbox, sandbox_bwrap
from disa.verifiers.code import run_tests
from disa.verifiers.sandbox import run_in_sandbox

SRC = Path(__file__).resolve().parents[1] / "src"
TEST_UID = 64123  # outside the sandbox uid pool (61000-61255)
# Made at run time: a file that holds this test's source (a checkout under /tmp) must not hold the answer.
MARKER = "kq" + secrets.token_hex(8)
SECRET = MARKER + "-the-answer-only-the-tests-hold"

# The program's function looks for the judge's tests: every readable file under /tmp (where the old
# fallback wrote the judge's script) up to 1 MB (a CI machine's /tmp holds gigabytes of caches and model
# files, and a scan that times out proves nothing), then every other process's open descriptors.
SCAN_FILES = '''
import os
def answer():
    seen = 0
    for root, dirs, files in os.walk("/tmp"):
        for name in files:
            try:
                path = os.path.join(root, name)
                if os.lstat(path).st_size > 1 << 20:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            seen += 1
            at = data.find(b"MARKER")
            if at >= 0:
                return data[at:at + LENGTH].decode()
    print("scanned", seen, "files", flush=True)
    return None
'''.replace("MARKER", MARKER).replace("LENGTH", str(len(SECRET)))
SCAN_PROC_FDS = '''
import os
def answer():
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue  # another uid's process
        for fd in fds:
            with open("/proc/%s/fd/%s" % (pid, fd), "rb") as f:
                data = f.read()
            at = data.find(b"MARKER")
            if at >= 0:
                return data[at:at + LENGTH].decode()
    return None
'''.replace("MARKER", MARKER).replace("LENGTH", str(len(SECRET)))
JUDGE_TESTS = f"assert answer() == {SECRET!r}\n"

KILL_PROGRAMS = {
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\n",
    "kill_everything": "import os\nos.kill(-1, 9)\n",
    "killpg_parent": "import os\nos.killpg(os.getpgid(os.getppid()), 9)\n",
    "pidfd_parent": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\n",
    "parent_memory": "import os\nprint(open('/proc/%d/environ' % os.getppid(), 'rb').read()[:50])\n",
    "parent_via_dir_fd": ("import os\nfd = os.open('/proc', os.O_RDONLY)\n"
                          "print(os.read(os.open('%d/environ' % os.getppid(), os.O_RDONLY, dir_fd=fd), 50))\n"),
    "reimport_signal": "import sys\ndel sys.modules['_signal']\nimport _signal\n",
    "parent_rlimit": "import os, resource\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))\n",
    "kill_self": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
}

# Run by an unprivileged uid: every hostile program, then the judge scans; one JSON line at the end. If a
# kill got through, this process is dead and the line is missing.
HELPER = '''
import json, os, stat, sys
from disa.verifiers.code import run_tests
from disa.verifiers.sandbox import run_in_sandbox
programs, scans, tests = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
out = {"uid": os.getuid()}
for name, program in programs.items():
    result = run_in_sandbox(program, backend="fallback", timeout_s=10)
    out[name] = [result.status, result.returncode, result.refusal]
for name, program in scans.items():
    report = run_tests(program, tests, backend="fallback", timeout_s=60)
    out[name] = [report.all_passed, report.results[0].status, report.results[0].stdout]
workdir = run_in_sandbox("import os\\nprint(os.getcwd())", backend="fallback").stdout.strip()
parent = os.stat(os.path.dirname(workdir))
out["parent"] = [stat.S_IMODE(parent.st_mode), parent.st_uid, os.path.exists(workdir)]
print(json.dumps(out))
'''


def _copy_readable_src(tmp: Path) -> Path:
    """The ``disa`` package copied where any uid can read it (the checkout may sit under /root)."""
    dest = tmp / "src"
    shutil.copytree(SRC / "disa", dest / "disa", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [tmp, *dest.rglob("*"), dest]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the fallback as an unprivileged uid")
def test_fallback_as_an_unprivileged_user_cannot_kill_the_trainer_or_read_the_judges_tests():
    from disa.verifiers.sandbox_fallback import default_sandbox_python

    tmp = Path(tempfile.mkdtemp(prefix="disa-fallback-test-"))
    try:
        src = _copy_readable_src(tmp)
        argv = ["setpriv", f"--reuid={TEST_UID}", f"--regid={TEST_UID}", "--clear-groups",
                default_sandbox_python(), "-I", "-c", f"import sys; sys.path.insert(0, {str(src)!r})\n" + HELPER,
                json.dumps(KILL_PROGRAMS), json.dumps({"scan_files": SCAN_FILES, "scan_proc_fds": SCAN_PROC_FDS}),
                JUDGE_TESTS]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=str(tmp),
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), "LANG": "C.UTF-8"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert done.returncode == 0, f"the trainer stand-in died ({done.returncode}): {done.stderr[-2000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == TEST_UID
    for name in ("kill_parent", "kill_everything", "killpg_parent", "parent_memory", "parent_via_dir_fd",
                 "reimport_signal", "parent_rlimit"):
        assert out[name][0] == "refused", (name, out[name])
    assert out["pidfd_parent"][0] == "runtime_error"  # pidfd_open is gone: AttributeError
    assert out["kill_self"][:2] == ["runtime_error", -15]  # its own process may still be signalled
    passed, status, stdout = out["scan_files"]
    assert not passed and status == "wrong_answer" and stdout.startswith("scanned ")  # read /tmp, found nothing
    passed, status, _ = out["scan_proc_fds"]
    assert not passed and status == "refused"
    assert out["parent"] == [0o700, TEST_UID, False]  # work dirs under a private parent, removed after the run


def test_fallback_guard_refuses_signals_outside_the_sandbox_and_foreign_proc_files():
    # Signal 0 only probes; the audit hook refuses before the kernel is asked (as root the pool uid would get
    # EPERM from the kernel instead: "runtime_error", not "refused").
    programs = {
        "import os\nos.kill(os.getppid(), 0)\n": "refused",
        "import os\nos.kill(-1, 0)\n": "refused",
        "import os\nos.killpg(os.getpgid(os.getppid()), 0)\n": "refused",
        "import os\nopen('/proc/%d/cmdline' % os.getppid()).read()\n": "refused",
        "import os\nos.kill(os.getpid(), 0)\nos.kill(0, 0)\nprint(open('/proc/self/status').read()[:5])\n": "ok",
    }
    for program, expected in programs.items():
        result = run_in_sandbox(program, backend="fallback", timeout_s=10)
        assert result.status == expected, (program, result.status, result.stderr[-500:])
        assert result.isolation_level == "fallback"


def test_fallback_source_is_in_no_file_and_no_argv_while_it_runs():
    # What the judge sandbox runs holds the tests; while it runs, nothing in its work dir, its parent or its
    # command line (readable by any process of the uid) carries them.
    from disa.verifiers.sandbox import SandboxLimits, start_sandbox

    running = start_sandbox(f"import time\nTESTS = {JUDGE_TESTS!r}\nprint('up', flush=True)\ntime.sleep(30)\n",
                            limits=SandboxLimits(timeout_s=20), backend="fallback")
    try:
        assert os.read(running.process.stdout.fileno(), 3) == b"up\n"
        with open(f"/proc/{running.process.pid}/cmdline", "rb") as f:
            assert MARKER.encode() not in f.read()
        workdir = os.readlink(f"/proc/{running.process.pid}/cwd")
        parent = os.path.dirname(workdir)
        assert stat.S_IMODE(os.stat(parent).st_mode) == (0o711 if os.geteuid() == 0 else 0o700)
        for root, _, files in os.walk(parent):
            for name in files:
                assert MARKER.encode() not in Path(root, name).read_bytes(), name
    finally:
        running.kill()
        running.finish()
    assert not os.path.exists(workdir)


def _no_bwrap(monkeypatch):
    why = f"bwrap not found on PATH; {sandbox_bwrap.BWRAP_INSTALL_HINT}"
    monkeypatch.setattr(sandbox_bwrap, "bwrap_problem", lambda python=None: why)
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda python=None: why)
    from disa.stages import common

    monkeypatch.setattr(common, "_isolation_said", set())


def _code_config(tmp_path: Path, reference: str, **verifier) -> str:
    rows = [{"id": f"c{i}", "prompt": f"Write f() returning {i}.", "tests": f"assert f() == {i}\n"} for i in range(2)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"output_dir": str(tmp_path / "run"), "data": {"prompts": str(tmp_path / "prompts.jsonl"), "verifier": "code",
                                                         "verifier_kwargs": {"timeout_s": 5}},
            "models": {"reference": reference, "device": "cpu"},
            "sample": {"n": 2, "max_new_tokens": 6, "batch_size": 4, "shard_size": 4, "seed": 0},
            "train": {"max_new_tokens": 6}, "eval": {"max_new_tokens": 6},
            "verifier": verifier}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_stage_refuses_the_fallback_without_allow_fallback_and_runs_with_it(tmp_path, tiny_gpt2_path, monkeypatch,
                                                                             capsys):
    _no_bwrap(monkeypatch)
    assert cli.main(["sample", "-c", _code_config(tmp_path, tiny_gpt2_path)]) == 2
    err = capsys.readouterr().err
    assert "verifier.allow_fallback: programs would run without OS isolation here" in err
    assert "apt-get install bubblewrap" in err and "verifier.allow_fallback: true" in err
    assert not (tmp_path / "run" / "samples").exists()

    assert cli.main(["sample", "-c", _code_config(tmp_path, tiny_gpt2_path, allow_fallback=True)]) == 0
    err = capsys.readouterr().err
    assert err.count("code sandbox: FALLBACK") == 1
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["code_isolation"] == "fallback"


def test_stage_verifier_kwargs_require_os_isolation_unless_the_fallback_is_allowed():
    from disa.config import PipelineConfig
    from disa.stages import common

    strict = PipelineConfig.from_dict({"data": {"verifier": "code", "verifier_kwargs": {"timeout_s": 3}}})
    assert common.verifier_kwargs(strict, "code") == {"timeout_s": 3, "require_os_isolation": True}
    assert common.verifier_kwargs(strict, "math") == {}
    loose = PipelineConfig.from_dict({"data": {"verifier": "code"}, "verifier": {"allow_fallback": True}})
    assert common.verifier_kwargs(loose, "code") == {}
    forced = PipelineConfig.from_dict({"data": {"verifier": "code", "verifier_kwargs": {"backend": "fallback"}}})
    assert common.isolation_problem(forced, ["code"]) == \
        "data.verifier_kwargs.backend: 'fallback' needs verifier.allow_fallback: true"


def test_trl_bridge_refuses_the_fallback_for_the_code_verifier(monkeypatch):
    pytest.importorskip("trl")
    import functools

    from disa.integrations.trl import code_reward_isolation
    from disa.verifiers import get_verifier

    _no_bwrap(monkeypatch)
    code = functools.partial(get_verifier("code"), timeout_s=2)
    with pytest.raises(RuntimeError, match="allow_sandbox_fallback=True"):
        code_reward_isolation([len, code], allow_fallback=False)
    assert code_reward_isolation([len, code], allow_fallback=True) == "fallback"
    assert code_reward_isolation([len], allow_fallback=False) is None
