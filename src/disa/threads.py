"""How many torch threads CPU work gets: chosen from the cores this process may use and the load other jobs
put on them, because contended intra-op threads wait on each other (a tiny model's step measured 20-30x slower
on 2 threads under load 4-6 than on 1) while an idle machine gains from them."""

from __future__ import annotations

import os


def machine_load() -> tuple[int, float | None]:
    """(CPU cores this process may use, 1-minute load average or None where the OS has none)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return cores, load


def free_cores(cores: int, load: float | None) -> float:
    """Cores that other work leaves idle (all of them when the load is unknown)."""
    return float(cores) if load is None else max(0.0, cores - load)


def choose_threads(wanted: int, cores: int, load: float | None) -> int:
    """``wanted`` threads when that many cores are free (half a core of slack), else the free cores rounded,
    at least 1 and never more than ``wanted``."""
    free = free_cores(cores, load)
    if wanted <= free + 0.5:
        return wanted
    return max(1, min(wanted, int(free + 0.5)))


def describe(threads: int, cores: int, load: float | None) -> str:
    """One line for the output: the count and what it was chosen from."""
    load_text = "load unknown" if load is None else f"load average {load:.1f}"
    return f"{threads} torch thread(s) on {cores} core(s), {load_text}"
