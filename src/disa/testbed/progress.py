"""What a long testbed build tells the user: progress lines with an ETA when there is no terminal for a bar,
and the thread count it uses against the machine's cores and load."""

from __future__ import annotations

import logging
import time

from disa.threads import choose_threads, describe

log = logging.getLogger(__name__)


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
        text = (f"{self.desc}: {done}/{self.total} steps ({100 * done / self.total:.0f}%), "
                f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}{loss_text}")
        if self.out is not None:
            print(text, file=self.out, flush=True)
        else:
            log.info(text)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def thread_note(threads: int, documented: int, cores: int, load: float | None) -> str:
    """What the build says about its threads: the count and the load, what a count other than the
    ``documented`` one means, and a warning when the count is more than the free cores."""
    note = describe(threads, cores, load)
    if threads != documented:
        note += (f"; the documented testbed is built on {documented}: this is an equally valid variant, cached "
                 f"apart, whose numbers differ slightly from docs/results/demo.md")
    if choose_threads(threads, cores, load) < threads:
        note += (f"; the machine is busy and contended threads are several times slower: "
                 f"--build-threads {choose_threads(threads, cores, load)} builds faster")
    return note
