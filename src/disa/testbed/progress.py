"""What a long testbed build tells the user: progress lines with an ETA when there is no terminal for a bar,
and the thread count it uses against the machine's cores and load."""

from __future__ import annotations

import os
import sys
import time


class ProgressLines:
    """Progress without a terminal (a log, CI, a pipe): one line per tenth of the work, with elapsed time and
    an ETA from the rate so far, so a long build never looks stuck."""

    def __init__(self, desc: str, total: int, *, every: float = 0.1, clock=time.perf_counter, out=None):
        self.desc, self.total, self.clock, self.out = desc, total, clock, out
        self.started = clock()
        self.marks = sorted({max(1, round(total * every * k)) for k in range(1, int(round(1 / every)) + 1)})

    def update(self, done: int, loss: float | None = None) -> None:
        if done not in self.marks:
            return
        elapsed = self.clock() - self.started
        eta = elapsed / done * (self.total - done)
        loss_text = f", loss {loss:.3f}" if loss is not None else ""
        print(f"[disa testbed] {self.desc}: {done}/{self.total} steps ({100 * done / self.total:.0f}%), "
              f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}{loss_text}",
              file=self.out or sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def machine_load() -> tuple[int, float | None]:
    """(CPU cores this process may use, 1-minute load average or None where the OS has none)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return cores, load


def thread_note(threads: int, cores: int, load: float | None) -> str:
    """What the build says about its threads; warns when other work leaves them fewer free cores than threads."""
    load_text = "load unknown" if load is None else f"load average {load:.1f}"
    note = f"{threads} torch thread(s) on {cores} core(s), {load_text}"
    if threads > 1 and load is not None and cores - load < threads - 0.5:  # fewer free cores than threads
        note += (f"; the machine is busy, and contended threads are several times slower: "
                 f"--build-threads 1 builds faster (a different, equally valid testbed, cached apart)")
    return note
