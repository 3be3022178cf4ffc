"""Source text that both sandbox back-ends run in the child (under ``python -I -c``): the head reads the
run's config, reports on the private status pipe, reads the program from its fd and sets rlimits; the tail runs the program as ``__main__`` and turns how it
ended into the exit status the parent classifies (87 MemoryError, 1 any other exception; ``SystemExit``
propagates with the program's own status)."""

CHILD_HEAD = r'''
import json, os, resource, sys
config = json.loads(sys.argv[1])
status_fd = config["status_fd"]

def report(message):
    try:
        os.write(status_fd, (json.dumps(message) + "\n").encode())
    except OSError:
        pass

def read_program(fd):
    """The program's source from the unlinked temporary file the parent passed as ``fd`` (then closed)."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)

def limit(kind, value):
    resource.setrlimit(kind, (value, value))
'''

RUN_PROGRAM = r'''
sys.argv = ["solution.py"]
main_globals = {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__}
try:
    exec(compile(source, "solution.py", "exec"), main_globals)
except MemoryError:
    os.write(2, b"MemoryError\n")
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
