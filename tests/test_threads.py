"""ThreadGovernor: the thread count follows the cores other processes leave free (fed made-up CPU times, so the
test does not depend on how busy this machine is)."""

from __future__ import annotations

import pytest
import torch

from codegen2.engine import threads


@pytest.fixture
def clock(monkeypatch):
    """A fake machine: advance(seconds, others=cores used by other processes, ours=cores used by us)."""
    state = {"t": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: state["t"])
    monkeypatch.setattr(threads, "_machine_busy_seconds", lambda: state["busy"])
    monkeypatch.setattr(threads, "_own_seconds", lambda: state["own"])

    def advance(seconds: float, others: float, ours: float) -> None:
        state["t"] += seconds
        state["busy"] += seconds * (others + ours)
        state["own"] += seconds * ours
    saved = torch.get_num_threads()
    yield advance
    torch.set_num_threads(saved)


def test_threads_follow_the_free_cores(clock):
    torch.set_num_threads(4)
    gov = threads.ThreadGovernor(interval_s=0.5)
    gov.cores = 4
    assert gov.ceiling == 4
    clock(1.0, others=0.0, ours=4.0)
    assert gov.update() == 4
    clock(1.0, others=1.0, ours=3.0)  # one core taken
    assert gov.update() == 3 and torch.get_num_threads() == 3
    clock(1.0, others=2.6, ours=1.4)  # a little over 2.5 cores: 3 taken
    assert gov.update() == 1 and abs(gov.others - 2.6) < 1e-9
    clock(1.0, others=9.0, ours=0.5)  # more busy processes than cores: never below 1
    assert gov.update() == 1
    clock(0.1, others=0.0, ours=1.0)  # within the interval: unchanged
    assert gov.update() == 1
    clock(1.0, others=0.0, ours=1.0)  # quiet again: back to the ceiling, never above it
    assert gov.update() == 4


def test_no_proc_stat_means_no_change(clock, monkeypatch):
    monkeypatch.setattr(threads, "_machine_busy_seconds", lambda: None)
    torch.set_num_threads(2)
    gov = threads.ThreadGovernor()
    clock(5.0, others=2.0, ours=0.0)
    assert gov.update() == 2
