"""How many threads the model runs with while the engine runs: the cores other processes leave free, never more
than torch had when the engine started, re-chosen at most twice a second between steps.

Why: torch's intra-op threads (OpenMP) meet at a barrier at the end of every parallel operator, a few hundred
per decoded token. When another process keeps a core busy, one of our threads is off the CPU at most barriers
and the others wait for it a scheduler time slice each time (spinning, which takes CPU from it too), so decode
falls far more than the share of the machine lost (benchmarks/busy.py measures it). One thread fewer per busy
core removes those waits; the kernels split their work by rows, so their results do not depend on the count.

How "busy elsewhere" is measured: the CPU time all processes used over the last interval (/proc/stat) minus
this process's own (os.times), in cores. What this is not: a scheduler; it only calls torch.set_num_threads.
Off Linux (no /proc/stat) it does nothing.
"""

from __future__ import annotations

import os
import time

import torch

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadGovernor:
    """Call ``update()`` between model steps; it sets torch's thread count to the cores not taken by others."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.ceiling = torch.get_num_threads()  # what the user (or torch) chose: never exceeded
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.interval_s = interval_s
        self._last = (time.monotonic(), _machine_busy_seconds(), _own_seconds())
        self.others = 0.0  # cores used by other processes over the last interval

    def update(self) -> int:
        """Re-choose the thread count if an interval has passed; returns the count in use."""
        now, busy, own = time.monotonic(), None, 0.0
        t0, busy0, own0 = self._last
        if now - t0 < self.interval_s or busy0 is None:
            return torch.get_num_threads()
        busy, own = _machine_busy_seconds(), _own_seconds()
        if busy is None:
            return torch.get_num_threads()
        self._last = (now, busy, own)
        self.others = max(0.0, (busy - busy0) - (own - own0)) / (now - t0)
        # A core counts as taken when others used more than half of one over the interval.
        want = max(1, min(self.ceiling, self.cores - round(self.others)))
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
        return want
