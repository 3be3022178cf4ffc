"""Assert-style tests judged in a second sandbox that the program cannot reach.

Appending asserts to the program and reading the exit status lets the program decide its own
reward (``sys.exit(0)``, ``os._exit(0)``, a patched ``AssertionError``, an object whose ``__eq__``
is always true...). Here two sandboxes run side by side, each in its own namespaces and, as root,
under its own uid:

* the *program sandbox* runs the program's code and then serves calls on a pipe: "call handle 3
  with these arguments", "get attribute ``x`` of handle 5";
* the *judge sandbox* holds the tests (the program never sees them), binds every name the program
  defined (except the names of builtins) to a proxy, runs the tests, and writes the verdict on a
  pipe that only it and the parent hold.

Values cross the pipe as tagged JSON and are rebuilt in the judge as plain builtins (int, float,
str, bytes, list, tuple, dict, set, ...): whatever the program returns, the judge's ``==`` is the
builtin one. Anything else stays in the program sandbox and is seen by the judge as an opaque
handle that can be called or have attributes read, but has no truth value and no comparison.
"""

from __future__ import annotations

import json
import os
import signal
import threading

from disa.verifiers.sandbox import SandboxLimits, SandboxResult, start_sandbox

# Encoding shared by both sides (source text; each sandbox gets its own copy). A value is a JSON
# list whose first item is a tag. ``ref`` maps a handle id to an object on the decoding side.
_CODEC = r'''
MAX_DEPTH, MAX_ITEMS = 200, 1_000_000

def encode(value, to_handle, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None:
        return ["n"]
    if isinstance(value, bool):
        return ["b", bool(value)]
    if isinstance(value, int):
        return ["i", str(int(value))]
    if isinstance(value, float):
        return ["f", repr(float(value))]
    if isinstance(value, complex):
        return ["c", repr(value.real), repr(value.imag)]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, (bytes, bytearray)):
        return ["y", bytes(value).hex(), isinstance(value, bytearray)]
    if isinstance(value, range):
        return ["R", value.start, value.stop, value.step]
    kinds = ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F"))
    for kind, tag in kinds:
        if isinstance(value, kind):
            return [tag, [encode(item, to_handle, depth + 1) for item in kind.__iter__(value)]]
    if isinstance(value, dict):
        return ["d", [[encode(k, to_handle, depth + 1), encode(v, to_handle, depth + 1)]
                      for k, v in dict.items(value)]]
    if hasattr(type(value), "tolist") and type(value).__module__.startswith("numpy"):
        return encode(value.tolist(), to_handle, depth + 1)
    if hasattr(type(value), "__next__"):
        items = []
        for item in value:
            if len(items) >= MAX_ITEMS:
                raise ValueError("iterator too long")
            items.append(encode(item, to_handle, depth + 1))
        return ["it", items]
    return ["r", to_handle(value)]

def decode(node, ref):
    tag = node[0]
    if tag == "n":
        return None
    if tag == "b":
        if type(node[1]) is not bool:
            raise TypeError("bad bool")
        return node[1]
    if tag == "i":
        return int(node[1])
    if tag == "f":
        return float(node[1])
    if tag == "c":
        return complex(float(node[1]), float(node[2]))
    if tag == "s":
        if type(node[1]) is not str:
            raise TypeError("bad str")
        return node[1]
    if tag == "y":
        data = bytes.fromhex(node[1])
        return bytearray(data) if node[2] is True else data
    if tag == "R":
        return range(int(node[1]), int(node[2]), int(node[3]))
    containers = {"l": list, "t": tuple, "S": set, "F": frozenset}
    if tag in containers:
        return containers[tag](decode(item, ref) for item in node[1])
    if tag == "d":
        return {decode(k, ref): decode(v, ref) for k, v in node[1]}
    if tag == "it":
        return iter([decode(item, ref) for item in node[1]])
    if tag == "r":
        return ref(int(node[1]))
    raise ValueError("unknown tag %r" % (tag,))
'''

# The program sandbox: run the program, then serve calls until the judge closes the pipe.
_SERVER = _CODEC + r'''
handles = []

def to_handle(value):
    handles.append(value)
    return len(handles) - 1

def send(message):
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(RESPONSES_FD, data):]

def describe(err):
    return [type(err).__name__, str(err)[:500]]

user_globals = {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__}
try:
    exec(compile(USER_SOURCE, "solution.py", "exec"), user_globals)
    names = {name: encode(value, to_handle) for name, value in list(user_globals.items())
             if not name.startswith("__")}
except BaseException as err:
    send({"ready": False, "error": describe(err)})
    raise
send({"ready": True, "names": names})
for line in os.fdopen(REQUESTS_FD, "rb"):
    try:
        request = json.loads(line)
        target = handles[request["ref"]]
        if request["op"] == "call":
            value = target(*decode(request["args"], handles.__getitem__),
                           **decode(request["kwargs"], handles.__getitem__))
        else:
            value = getattr(target, request["name"])
        reply = {"ok": encode(value, to_handle)}
    except BaseException as err:
        reply = {"error": describe(err)}
    send(reply)
'''

# The judge sandbox: proxies for the program's names, the tests, and the verdict.
_JUDGE = _CODEC + r'''
MAX_MESSAGE = 64 << 20
responses = os.fdopen(RESPONSES_FD, "rb")

class ProgramDied(BaseException):
    """The program sandbox went away mid-test (a BaseException: `except Exception` cannot hide it)."""

class ProgramError(Exception):
    """An exception raised by the program's code that is not a builtin exception type."""

def receive():
    line = responses.readline(MAX_MESSAGE)
    if not line.endswith(b"\n"):
        raise ProgramDied("the program exited or sent an oversized message")
    return json.loads(line)

def raise_program_error(name, message):
    kind = getattr(builtins, name, None) if isinstance(name, str) else None
    if isinstance(kind, type) and issubclass(kind, Exception):
        raise kind(message)
    raise ProgramError("%s: %s" % (name, message))

def call_program(request):
    data = (json.dumps(request) + "\n").encode()
    while data:
        data = data[os.write(REQUESTS_FD, data):]
    reply = receive()
    if "error" in reply:
        raise_program_error(*reply["error"])
    return decode(reply["ok"], Handle)

def handle_id(value):
    if isinstance(value, Handle):
        return object.__getattribute__(value, "_ref")
    raise TypeError("only plain data and the program's own objects can be passed to its code")

class Handle:
    """An object living in the program sandbox: callable, attributes readable, nothing else."""
    __slots__ = ("_ref",)

    def __init__(self, ref):
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        return call_program({"op": "call", "ref": self._ref, "args": encode(list(args), handle_id),
                              "kwargs": encode(kwargs, handle_id)})

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return call_program({"op": "getattr", "ref": self._ref, "name": name})

    def __bool__(self):
        raise TypeError("an object of the program has no truth value in the judge")

    def __eq__(self, other):
        raise TypeError("objects of the program cannot be compared in the judge")

    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__
    __hash__ = object.__hash__

    def __repr__(self):
        return "<program object %d>" % self._ref

def verdict(passed, kind, detail):
    os.write(VERDICT_FD, json.dumps({"passed": passed, "kind": kind, "detail": detail[:2000]}).encode())
    os._exit(0)

try:
    hello = receive()
except BaseException as err:
    verdict(False, "program_died", repr(err))
if not hello.get("ready"):
    verdict(False, "program_error", "the program raised %r" % (hello.get("error"),))
test_globals = {"__name__": "__main__", "__builtins__": builtins}
for name, node in hello.get("names", {}).items():
    if isinstance(name, str) and name.isidentifier() and not hasattr(builtins, name):
        try:
            test_globals[name] = decode(node, Handle)
        except Exception:
            pass
try:
    exec(compile(TESTS, "tests.py", "exec"), test_globals)
except AssertionError as err:
    verdict(False, "assertion", "AssertionError: %s" % (err,))
except BaseException as err:
    verdict(False, "error", "%s: %s" % (type(err).__name__, err))
verdict(True, "passed", "")
'''


def server_script(program: str, requests_fd: int, responses_fd: int) -> str:
    head = f"import json, os, sys\nUSER_SOURCE, REQUESTS_FD, RESPONSES_FD = {program!r}, {requests_fd}, {responses_fd}\n"
    return head + _SERVER


def judge_script(tests: str, requests_fd: int, responses_fd: int, verdict_fd: int) -> str:
    head = (f"import builtins, json, os, sys\nTESTS, REQUESTS_FD, RESPONSES_FD, VERDICT_FD = "
            f"{tests!r}, {requests_fd}, {responses_fd}, {verdict_fd}\n")
    return head + _JUDGE


def run_assert_test(program: str, tests: str, *, limits: SandboxLimits, **start_options) -> SandboxResult:
    """Run ``tests`` (assert code) against ``program``; pass only on the judge's verdict.

    Returns the program sandbox's result (its stdout/stderr) with ``status`` "ok" when the judge
    saw every test pass, else "wrong_answer" (an assert failed), the program's own failure status
    (timeout, memory...), or "runtime_error"; the judge's reason is appended to ``stderr``.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    requests_r, requests_w = os.pipe()
    responses_r, responses_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    program_fds, judge_fds = (requests_r, responses_w), (requests_w, responses_r, verdict_w)
    program_box = judge_box = None
    try:
        program_box = start_sandbox(server_script(program, *program_fds), limits=limits,
                                    pass_fds=program_fds, **start_options)
        judge_box = start_sandbox(judge_script(tests, requests_w, responses_r, verdict_w),
                                  limits=limits, pass_fds=judge_fds,
                                  started=program_box.started, **start_options)
    finally:
        for fd in (*program_fds, *judge_fds):
            os.close(fd)
        if judge_box is None:
            os.close(verdict_r)
            if program_box is not None:
                program_box.kill()
                program_box.finish()
    program_result: list[SandboxResult] = []
    drain = threading.Thread(target=lambda: program_result.append(program_box.finish()), daemon=True)
    drain.start()
    judge_result = judge_box.finish()
    program_box.kill()  # the judge is done: nothing the program does from now on counts
    drain.join()
    return _combine(program_result[0], judge_result, _read_verdict(verdict_r))


def _read_verdict(fd: int) -> dict:
    """The judge's one message; the write end closed when the judge sandbox ended."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        message = json.loads(b"".join(chunks) or b"{}")
    except json.JSONDecodeError:
        return {}
    return message if isinstance(message, dict) else {}


def _combine(program: SandboxResult, judge: SandboxResult, verdict: dict) -> SandboxResult:
    """The program sandbox was killed once the judge ended, so its own "timeout" only counts when
    it hit its CPU limit; everything else about pass/fail comes from the judge."""
    passed = judge.status == "ok" and verdict.get("passed") is True
    if passed:
        status = "ok"
    elif judge.status in ("timeout", "sandbox_error"):
        status = judge.status
    elif program.returncode == -signal.SIGXCPU:
        status = "timeout"
    elif program.status in ("memory", "output_limit", "sandbox_error", "refused"):
        status = program.status
    elif verdict.get("kind") == "assertion":
        status = "wrong_answer"
    else:
        status = "runtime_error"
    program.status, program.passed = status, passed
    if not passed:
        detail = verdict.get("detail") or judge.stderr.strip()[-2000:] or "no verdict from the judge"
        program.stderr += f"\n[judge] {detail}\n"
    program.isolation = dict(program.isolation, judge=judge.isolation_level)
    return program
