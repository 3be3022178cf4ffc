"""Assert-style tests judged in a second sandbox that the program cannot reach.

Appending asserts to the program and reading the exit status lets the program decide its own
reward (``sys.exit(0)``, ``os._exit(0)``, a patched ``AssertionError``, an object whose ``__eq__``
is always true...). Here two sandboxes run side by side, each in its own namespaces and, as root,
under its own uid:

* the *program sandbox* runs the program's code and then serves requests on a pipe: "the value of
  global ``add``", "call handle 3 with these arguments", "attribute ``x`` of handle 5";
* the *judge sandbox* holds the tests (the program never sees them) and writes the verdict on a
  pipe that only it and the parent hold.

The judge trusts nothing the program sends. It binds only the names the tests read and do not
define themselves (found with :mod:`symtable`), never a dunder name or a builtin's name, asking the
program for each one (the program announces nothing; a name it lacks stays unbound), and installs
the real ``builtins`` after binding. Every reply is plain data decoded with strict type checks; a
reply that is not one (a forged or garbled line, a reply not numbered as the request it answers)
fails the run.

Values cross as a flat list of tagged tokens (no nesting in the JSON, so depth costs no recursion;
ints in hex, so size is not capped by ``sys.int_max_str_digits``; homogeneous lists of plain
scalars as one JSON array) and are rebuilt in the judge as plain builtins (int, float, str, bytes,
list, tuple, dict, set, ...): whatever the program returns, the judge's ``==`` is the builtin one.
Anything else stays in the program sandbox and is seen by the judge as an opaque handle that can be
called, iterated or have attributes read, but has no truth value and no comparison. Iterators
returned by a call are consumed into a list; global iterators are handles, consumed only as the
tests consume them.

Call order reveals nothing about expected values: every ``assert`` of the tests is rewritten to
evaluate, record and continue (an exception inside it is a recorded failure), the operands of
``and``/``or`` and the items of ``all(...)``/``any(...)`` in an assert are all evaluated, and an
assert's message is evaluated with calls into the program refused. So the program sees the same
sequence of calls whether its answers are right or wrong, and cannot learn answers across runs.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import json
import os
import signal
import symtable
import sys
import threading

from disa.verifiers.sandbox import SandboxLimits, SandboxResult, start_sandbox

MAX_VERDICT_BYTES = 64 * 1024

# Encoding shared by both sides (source text; each sandbox gets its own copy). A value is a flat
# JSON list of tokens in prefix order: a tag, then the tag's payload; containers give their item
# count and are followed by their items. ``ref`` maps a handle id to an object on the decoding side.
CODEC = r'''
MAX_TOKENS = 16_000_000
_I64 = 1 << 63
_SCALAR_KINDS = {int: "i", float: "f", str: "s", bool: "b"}
_KIND_TYPES = {"i": int, "f": float, "s": str, "b": bool}
_CONTAINERS = ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F"))
_BUILD = {"l": list, "t": tuple, "S": set, "F": frozenset, "it": iter,
          "d": lambda items: dict(zip(items[0::2], items[1::2]))}

def _homogeneous(items):
    """The scalar kind when every item has the same exact plain type (ints within 64 bits)."""
    kinds = set(map(type, items))
    if len(kinds) != 1:
        return None
    kind = _SCALAR_KINDS.get(kinds.pop())
    if kind == "i" and not (-_I64 <= min(items) and max(items) < _I64):
        return None
    return kind

def encode(value, to_handle, consume_iterators=True):
    out, stack = [], [value]
    while stack:
        if len(out) > MAX_TOKENS:
            raise ValueError("value too large to send (cyclic?)")
        value = stack.pop()
        if value is None:
            out.append("n")
        elif isinstance(value, bool):
            out += ["b", bool(value)]
        elif isinstance(value, int):
            out += ["i", format(int(value), "x")]
        elif isinstance(value, float):
            out += ["f", repr(float(value))]
        elif isinstance(value, complex):
            out += ["c", repr(value.real), repr(value.imag)]
        elif isinstance(value, str):
            out += ["s", str.__str__(value)]
        elif isinstance(value, (bytes, bytearray)):
            out += ["Y" if isinstance(value, bytearray) else "y", bytes(value).hex()]
        elif isinstance(value, range):
            out += ["R", format(value.start, "x"), format(value.stop, "x"), format(value.step, "x")]
        elif isinstance(value, (list, tuple, set, frozenset)):
            kind, tag = next((k, t) for k, t in _CONTAINERS if isinstance(value, k))
            items = list(kind.__iter__(value))
            scalar = _homogeneous(items) if items else None
            if scalar:
                out += ["H", tag, scalar, items]
            else:
                out += [tag, len(items)]
                stack.extend(reversed(items))
        elif isinstance(value, dict):
            pairs = list(dict.items(value))
            out += ["d", len(pairs)]
            for key, item in reversed(pairs):
                stack += [item, key]
        elif type(value).__module__.startswith("numpy") and hasattr(type(value), "tolist"):
            stack.append(value.tolist())
        elif consume_iterators and hasattr(type(value), "__next__"):
            items = []
            for item in value:
                if len(items) >= MAX_TOKENS:
                    raise ValueError("iterator too long")
                items.append(item)
            out += ["it", len(items)]
            stack.extend(reversed(items))
        else:
            out += ["r", to_handle(value)]
    return out

def _text(value):
    if type(value) is not str:
        raise ValueError("expected a string token")
    return value

def decode(tokens, ref):
    """Rebuild a value from ``tokens``; ValueError/TypeError on anything malformed."""
    if type(tokens) is not list:
        raise ValueError("a value must be a token list")
    size, pos = len(tokens), 0
    stack = [[None, 1, []]]  # frames: [tag, items still to read, items read]
    while True:
        frame = stack[-1]
        if frame[1] == 0:
            stack.pop()
            if not stack:
                if pos != size:
                    raise ValueError("trailing tokens")
                return frame[2][0]
            stack[-1][2].append(_BUILD[frame[0]](frame[2]))
            stack[-1][1] -= 1
            continue
        if pos >= size:
            raise ValueError("truncated value")
        tag, pos = tokens[pos], pos + 1
        if type(tag) is not str:
            raise ValueError("a tag must be a string")
        width = {"n": 0, "b": 1, "i": 1, "f": 1, "c": 2, "s": 1, "y": 1, "Y": 1, "R": 3, "r": 1,
                 "H": 3, "l": 1, "t": 1, "S": 1, "F": 1, "d": 1, "it": 1}.get(tag)
        if width is None:
            raise ValueError("unknown tag %r" % (tag[:20],))
        if pos + width > size:
            raise ValueError("truncated value")
        args, pos = tokens[pos:pos + width], pos + width
        if tag in _BUILD:
            count = args[0]
            if type(count) is not int or count < 0 or count * (2 if tag == "d" else 1) > size - pos:
                raise ValueError("bad item count")
            stack.append([tag, count * (2 if tag == "d" else 1), []])
            continue
        if tag == "n":
            value = None
        elif tag == "b":
            if type(args[0]) is not bool:
                raise ValueError("bad bool")
            value = args[0]
        elif tag == "i":
            value = int(_text(args[0]), 16)
        elif tag == "f":
            value = float(_text(args[0]))
        elif tag == "c":
            value = complex(float(_text(args[0])), float(_text(args[1])))
        elif tag == "s":
            value = _text(args[0])
        elif tag in ("y", "Y"):
            value = bytes.fromhex(_text(args[0]))
            value = bytearray(value) if tag == "Y" else value
        elif tag == "R":
            value = range(*(int(_text(a), 16) for a in args))
        elif tag == "r":
            if type(args[0]) is not int or args[0] < 0:
                raise ValueError("bad handle")
            value = ref(args[0])
        else:  # "H": a homogeneous container of plain scalars
            container, kind, items = args
            if container not in ("l", "t", "S", "F") or kind not in _KIND_TYPES or type(items) is not list:
                raise ValueError("bad homogeneous container")
            if set(map(type, items)) - {_KIND_TYPES[kind]}:
                raise ValueError("bad item type in homogeneous container")
            value = items if container == "l" else _BUILD[container](items)
        stack[-1][2].append(value)
        stack[-1][1] -= 1
'''

# The program sandbox: run the program, then serve requests until the judge closes the pipe.
_SERVER = CODEC + r'''
handles = []

def to_handle(value):
    handles.append(value)
    return len(handles) - 1

def handle(ref):
    if not 0 <= ref < len(handles):
        raise ValueError("no such handle")
    return handles[ref]

def send(message):
    data = memoryview((json.dumps(message) + "\n").encode())
    while data:
        data = data[os.write(RESPONSES_FD, data):]

def describe(err):
    return [type(err).__name__, str(err)[:500]]

sys.set_int_max_str_digits(0)
user_globals = {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__}
exec(compile(USER_SOURCE, "solution.py", "exec"), user_globals)
for line in os.fdopen(REQUESTS_FD, "rb"):
    request_id = None
    try:
        request = json.loads(line)
        op, request_id = request["op"], request["id"]
        if op == "get":
            if request["name"] not in user_globals:
                send({"id": request_id, "missing": True})
                continue
            value = user_globals[request["name"]]
            try:
                reply = {"ok": encode(value, to_handle, consume_iterators=False)}
            except ValueError:  # too large to copy (or cyclic): the tests get a handle to it
                reply = {"ok": ["r", to_handle(value)]}
        else:
            target = handle(request["ref"])
            if op == "call":
                value = target(*decode(request["args"], handle), **decode(request["kwargs"], handle))
                reply = {"ok": encode(value, to_handle)}
            elif op == "getattr":
                reply = {"ok": encode(getattr(target, request["name"]), to_handle)}
            elif op == "iter":
                reply = {"ok": encode(iter(target), to_handle, consume_iterators=False)}
            else:
                reply = {"ok": encode(next(target), to_handle)}
    except BaseException as err:
        reply = {"error": describe(err)}
    reply["id"] = request_id
    send(reply)
'''

# The judge sandbox: ask for the names the tests read, run the rewritten tests, write the verdict.
_JUDGE = CODEC + r'''
MAX_MESSAGE = 256 << 20
sys.set_int_max_str_digits(0)
sys.setrecursionlimit(20_000)
responses = os.fdopen(RESPONSES_FD, "rb")

class Fatal(BaseException):
    """The conversation with the program broke (a BaseException: `except Exception` cannot hide it)."""

class ProgramError(Exception):
    """An exception raised by the program's code that is not a builtin exception type."""

state = {"fatal": None, "quiet": False, "failures": 0, "first_failure": None, "requests": 0}
MISSING = object()

def fatal(reason):
    state["fatal"] = state["fatal"] or reason
    raise Fatal(state["fatal"])

def send(request):
    data = memoryview((json.dumps(request) + "\n").encode())
    try:
        while data:
            data = data[os.write(REQUESTS_FD, data):]
    except BaseException as err:
        fatal("sending a request failed: %s" % (type(err).__name__,))

def receive():
    try:
        line = responses.readline(MAX_MESSAGE)
    except BaseException as err:
        fatal("reading a reply failed: %s" % (type(err).__name__,))
    if not line.endswith(b"\n"):
        fatal("the program exited or sent an oversized message")
    try:
        return json.loads(line)
    except (ValueError, RecursionError, MemoryError) as err:
        fatal("unreadable reply: %s" % (type(err).__name__,))

def raise_program_error(error):
    if type(error) is not list or len(error) != 2 or not all(type(part) is str for part in error):
        fatal("malformed error reply")
    name, message = error
    kind = getattr(builtins, name, None) if name.isidentifier() else None
    if isinstance(kind, type) and issubclass(kind, Exception):
        raise kind(message)
    raise ProgramError("%s: %s" % (name, message))

def ask(request):
    if state["fatal"]:
        raise Fatal(state["fatal"])
    if state["quiet"]:
        raise ProgramError("the program is not called while a failure message is built")
    state["requests"] += 1
    request["id"] = state["requests"]
    send(request)
    reply = receive()
    if type(reply) is not dict or len(reply) != 2 or reply.get("id") != request["id"]:
        fatal("malformed reply, or a reply to another request")
    if "error" in reply:
        raise_program_error(reply["error"])
    if reply.get("missing") is True and request["op"] == "get":
        return MISSING
    if "ok" not in reply:
        fatal("malformed reply")
    try:
        return decode(reply["ok"], Handle)
    except (ValueError, TypeError, RecursionError, MemoryError) as err:
        fatal("undecodable value: %s: %.200s" % (type(err).__name__, err))

def handle_id(value):
    if isinstance(value, Handle):
        return object.__getattribute__(value, "_ref")
    raise TypeError("only plain data and the program's own objects can be passed to its code")

class Handle:
    """An object living in the program sandbox: callable, iterable, attributes readable, nothing else."""
    __slots__ = ("_ref",)

    def __init__(self, ref):
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        return ask({"op": "call", "ref": self._ref, "args": encode(list(args), handle_id),
                    "kwargs": encode(kwargs, handle_id)})

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return ask({"op": "getattr", "ref": self._ref, "name": name})

    def __iter__(self):
        return ask({"op": "iter", "ref": self._ref})

    def __next__(self):
        return ask({"op": "next", "ref": self._ref})

    def __bool__(self):
        raise TypeError("an object of the program has no truth value in the judge")

    def __eq__(self, other):
        raise TypeError("objects of the program cannot be compared in the judge")

    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__
    __hash__ = object.__hash__

    def __repr__(self):
        return "<program object %d>" % self._ref

def outcome(thunk):
    try:
        return True, thunk()
    except Fatal:
        raise
    except BaseException as err:
        return False, err

def judge_boolop(is_and, *thunks):
    """``a and b`` / ``a or b`` with every operand evaluated, then the short-circuit result."""
    outcomes = [outcome(thunk) for thunk in thunks]
    for ok, value in outcomes:
        if not ok:
            raise value
        if bool(value) != is_and:
            return value
    return value

def judge_assert(test, message, line):
    """An assert that records its failure and lets the tests go on."""
    ok, value = outcome(test)
    try:
        passed = ok and bool(value)
    except Exception as err:
        ok, value, passed = False, err, False
    if passed:
        return
    if ok:
        state["quiet"] = True
        try:
            detail = "AssertionError: %.1000s" % (message() if message is not None else "",)
        except Exception as err:
            detail = "AssertionError (message failed: %s)" % (type(err).__name__,)
        finally:
            state["quiet"] = False
    else:
        detail = "%s: %.1000s" % (type(value).__name__, value)
    state["failures"] += 1
    if state["first_failure"] is None:
        state["first_failure"] = "tests line %d: %s" % (line, detail)

def verdict(passed, kind, detail):
    os.write(VERDICT_FD, json.dumps({"passed": passed, "kind": kind, "detail": detail[:2000]}).encode())
    os._exit(0)

test_globals = {"__name__": "__main__"}
try:
    for name in NAMES:
        if name.isidentifier() and not name.startswith("__") and not hasattr(builtins, name):
            value = ask({"op": "get", "name": name})
            if value is not MISSING:
                test_globals[name] = value
except BaseException as err:
    verdict(False, "program_error", "binding the tests' names: %s: %s" % (type(err).__name__, err))
test_globals.update(__judge_assert__=judge_assert, __judge_boolop__=judge_boolop, __builtins__=builtins)
try:
    exec(compile(TESTS, "tests.py", "exec"), test_globals)
except BaseException as err:
    verdict(False, "error", state["fatal"] or "%s: %s" % (type(err).__name__, err))
if state["fatal"]:
    verdict(False, "error", state["fatal"])
if state["failures"]:
    verdict(False, "assertion", "%d assert(s) failed; first at %s" % (state["failures"], state["first_failure"]))
verdict(True, "passed", "")
'''


# ---------------------------------------------------------------------------------- test rewriting


def program_names(tests: str) -> list[str]:
    """Names the tests read from their globals without defining them at module level: the only
    names the judge asks the program for. Never a dunder name or a builtin's name."""
    top = symtable.symtable(tests, "tests.py", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    wanted: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for symbol in table.get_symbols():
            if symbol.is_referenced() and (symbol.is_global() or table is top):
                wanted.add(symbol.get_name())
    return sorted(n for n in wanted - defined
                  if n.isidentifier() and not n.startswith("__") and not hasattr(builtins, n))


class _AssertRewriter(ast.NodeTransformer):
    """``assert T, M`` -> ``__judge_assert__(lambda: T', lambda: M, line)``, where in ``T'`` every
    ``and``/``or`` evaluates all its operands and ``all``/``any`` of a generator all its items.

    Asserts that a lambda cannot hold (``await``, ``yield``, ``:=``, a bare ``super()``) or that sit
    directly in a class body (a lambda there cannot see the class's names) are left as they are."""

    def __init__(self):
        self._in_class_body = False

    def visit_ClassDef(self, node):
        outer, self._in_class_body = self._in_class_body, True
        self.generic_visit(node)
        self._in_class_body = outer
        return node

    def _visit_function(self, node):
        outer, self._in_class_body = self._in_class_body, False
        self.generic_visit(node)
        self._in_class_body = outer
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_Assert(self, node):
        unsafe = (ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr)
        if self._in_class_body or any(isinstance(n, unsafe) or (isinstance(n, ast.Name) and n.id == "super")
                                      for n in ast.walk(node)):
            return node
        message = _thunk(node.msg) if node.msg is not None else ast.Constant(None)
        call = ast.Call(ast.Name("__judge_assert__", ast.Load()),
                        [_thunk(_evaluate_all(node.test)), message, ast.Constant(node.lineno)], [])
        return ast.copy_location(ast.Expr(call), node)


def _thunk(expr: ast.expr) -> ast.Lambda:
    no_args = ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                            kwarg=None, defaults=[])
    return ast.Lambda(no_args, expr)


def _evaluate_all(expr: ast.expr) -> ast.expr:
    if isinstance(expr, ast.BoolOp):
        operands = [_thunk(_evaluate_all(v)) for v in expr.values]
        return ast.Call(ast.Name("__judge_boolop__", ast.Load()),
                        [ast.Constant(isinstance(expr.op, ast.And)), *operands], [])
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
        return ast.UnaryOp(ast.Not(), _evaluate_all(expr.operand))
    if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in ("all", "any")
            and len(expr.args) == 1 and not expr.keywords and isinstance(expr.args[0], ast.GeneratorExp)):
        items = expr.args[0]
        return ast.Call(expr.func, [ast.ListComp(items.elt, items.generators)], [])
    return expr


_int_digits_lock = threading.Lock()


@contextlib.contextmanager
def _any_int_literal():
    """Parse and unparse int literals of any size, as the judge compiles them (it sets no limit)."""
    with _int_digits_lock:
        previous = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(0)
        try:
            yield
        finally:
            sys.set_int_max_str_digits(previous)


@functools.lru_cache(maxsize=256)
def prepare_tests(tests: str) -> tuple[str, tuple[str, ...]]:
    """The tests as the judge runs them (asserts rewritten) and the names to ask the program for.

    Raises ``ValueError`` when the tests are not valid Python."""
    if not isinstance(tests, str):
        raise TypeError(f"tests must be a str, got {type(tests).__name__}")
    with _any_int_literal():
        try:
            tree = ast.parse(tests, "tests.py")
            names = tuple(program_names(tests))
        except (SyntaxError, ValueError) as err:
            raise ValueError(f"assert tests do not compile: {err}") from err
        source = ast.unparse(ast.fix_missing_locations(_AssertRewriter().visit(tree)))
        try:
            compile(source, "tests.py", "exec")
        except SyntaxError:  # a construct the rewrite does not foresee: run them as written
            return tests, names
    return source, names


# ---------------------------------------------------------------------------------- running


def server_script(program: str, requests_fd: int, responses_fd: int) -> str:
    head = f"import json, os, sys\nUSER_SOURCE, REQUESTS_FD, RESPONSES_FD = {program!r}, {requests_fd}, {responses_fd}\n"
    return head + _SERVER


def judge_script(tests: str, names: tuple[str, ...], requests_fd: int, responses_fd: int, verdict_fd: int) -> str:
    head = (f"import builtins, json, os, sys\nTESTS, NAMES, REQUESTS_FD, RESPONSES_FD, VERDICT_FD = "
            f"{tests!r}, {list(names)!r}, {requests_fd}, {responses_fd}, {verdict_fd}\n")
    return head + _JUDGE


def run_assert_test(program: str, tests: str, *, limits: SandboxLimits, **start_options) -> SandboxResult:
    """Run ``tests`` (assert code) against ``program``; pass only on the judge's verdict.

    Returns the program sandbox's result (its stdout/stderr) with ``status`` "ok" when the judge
    saw every test pass, else "wrong_answer" (an assert failed), the program's own failure status
    (timeout, memory...), or "runtime_error"; the judge's reason is appended to ``stderr``.
    Raises ``ValueError`` when ``tests`` is not valid Python.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    source, names = prepare_tests(tests)
    requests_r, requests_w = os.pipe()
    responses_r, responses_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    program_fds, judge_fds = (requests_r, responses_w), (requests_w, responses_r, verdict_w)
    program_box = judge_box = None
    try:
        try:
            program_box = start_sandbox(server_script(program, *program_fds), limits=limits,
                                        pass_fds=program_fds, **start_options)
            judge_box = start_sandbox(judge_script(source, names, requests_w, responses_r, verdict_w),
                                      limits=limits, pass_fds=judge_fds,
                                      started=program_box.started, **start_options)
        finally:
            for fd in (*program_fds, *judge_fds):
                os.close(fd)
            if judge_box is None and program_box is not None:
                program_box.kill()
                program_box.finish()
        program_result, judge_result = _finish_both(program_box, judge_box)
    finally:
        verdict = _read_verdict(verdict_r)  # closes it on every path
    return _combine(program_result, judge_result, verdict)


def _finish_both(program_box, judge_box) -> tuple[SandboxResult, SandboxResult]:
    """Drain both sandboxes; the program is killed as soon as the judge ends (nothing it does after
    counts). Exceptions of either side are re-raised here, after both are reaped."""
    outcome: dict[str, object] = {}

    def drain_program():
        try:
            outcome["program"] = program_box.finish()
        except BaseException as err:  # re-raised below, in the caller's thread
            outcome["program"] = err

    drain = threading.Thread(target=drain_program, daemon=True)
    drain.start()
    try:
        judge_result = judge_box.finish()
    finally:
        program_box.kill()
        drain.join()
    if isinstance(outcome["program"], BaseException):
        raise outcome["program"]
    return outcome["program"], judge_result


def _read_verdict(fd: int) -> dict:
    """The judge's one message (at most ``MAX_VERDICT_BYTES``); the write end closed when the judge
    sandbox ended. Anything unreadable is no verdict."""
    chunks, size = [], 0
    try:
        while size <= MAX_VERDICT_BYTES and (chunk := os.read(fd, 65536)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return {}
    finally:
        os.close(fd)
    if size > MAX_VERDICT_BYTES:
        return {}
    try:
        message = json.loads(b"".join(chunks) or b"{}")
    except (ValueError, RecursionError):
        return {}
    if not isinstance(message, dict):
        return {}
    return {k: v for k, v in message.items() if k in ("passed", "kind", "detail") and isinstance(v, (bool, str))}


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
