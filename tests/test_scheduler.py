"""The scheduler alone: plain Python, no model."""

from __future__ import annotations

from codegen2.engine.sampling import SamplingParams
from codegen2.engine.scheduler import Scheduler, Sequence, Status, common_prefix

P = SamplingParams()


def seq(rid: str, prompt: list[int], index: int = 0) -> Sequence:
    return Sequence(rid, index, prompt, P)


def run_prefill(s: Scheduler) -> None:
    """Drive every admitted sequence through its prefill chunks (as the engine would after forward passes)."""
    while (batch := s.schedule()).prefill is not None:
        s.prefilled(batch.prefill)


def test_chunks_cover_the_prompt_once_in_order():
    s = Scheduler(n_slots=2, max_seq_len=100, prefill_chunk=4)
    a = seq("a", list(range(10)))
    s.add(a)
    chunks = []
    while (batch := s.schedule()).prefill is not None:
        chunks.append((batch.prefill.start, batch.prefill.tokens, batch.prefill.last))
        s.prefilled(batch.prefill)
    assert chunks == [(0, [0, 1, 2, 3], False), (4, [4, 5, 6, 7], False), (8, [8, 9], True)]
    assert a.status is Status.DECODE and a.n_cached == 10


def test_full_cache_queues_fifo_and_finishing_frees_the_slot():
    s = Scheduler(n_slots=1, max_seq_len=100)
    a, b, c = seq("a", [1, 2]), seq("b", [3, 4]), seq("c", [5, 6])
    for x in (a, b, c):
        s.add(x)
    s.schedule()
    assert s.running == [a] and list(s.waiting) == [b, c]
    s.finish(a, "length")
    s.schedule()
    assert s.running == [b] and list(s.waiting) == [c] and a.slot is None


def test_new_prompt_takes_the_slot_with_the_longest_shared_prefix():
    s = Scheduler(n_slots=3, max_seq_len=100, prefill_chunk=100)
    olds = [seq("x", [1, 2, 3, 4]), seq("y", [1, 2, 9, 9]), seq("z", [7, 7, 7])]
    for o in olds:
        s.add(o)
    run_prefill(s)
    for o in olds:
        o.output = [50]
        s.decoded(o)  # all of prompt + output are cached
        s.finish(o, "length")
    new = seq("w", [1, 2, 3, 4, 50, 8])
    s.add(new)
    s.schedule()
    assert new.slot == 0 and new.n_cached == 5  # "x" held [1, 2, 3, 4, 50]
    assert s.reused_tokens == 5
    # The whole prompt cached: the last token is still recomputed, its logits are needed.
    again = seq("v", [7, 7, 7])
    s.add(again)
    s.schedule()
    assert again.slot == 2 and again.n_cached == 2


def test_least_recently_used_slot_without_a_shared_prefix():
    s = Scheduler(n_slots=2, max_seq_len=100)
    a, b = seq("a", [1]), seq("b", [2])
    s.add(a), s.add(b)
    s.schedule()
    slot_a, slot_b = a.slot, b.slot
    s.finish(b, "stop")
    s.finish(a, "stop")  # a finished last: b's slot is the least recently used
    c = seq("c", [9, 9])
    s.add(c)
    s.schedule()
    assert c.slot == slot_b != slot_a


def test_siblings_wait_for_the_prompt_then_copy_it():
    s = Scheduler(n_slots=3, max_seq_len=100, prefill_chunk=3)
    first, second = seq("r", [1, 2, 3, 4, 5]), seq("r", [1, 2, 3, 4, 5], index=1)
    s.add(first), s.add(second)
    assert s.held == {"r": [second]}
    batch = s.schedule()
    assert s.running == [first] and batch.prefill.seq is first
    s.prefilled(batch.prefill)
    batch = s.schedule()
    s.prefilled(batch.prefill)  # the last chunk: the sibling is released
    batch = s.schedule()
    assert second.slot is not None and batch.copies == [(first.slot, second.slot, 4)]
    assert batch.prefill.seq is second and batch.prefill.tokens == [5]


def test_abort_reaches_waiting_running_and_held():
    s = Scheduler(n_slots=1, max_seq_len=100)
    a, a2, b = seq("a", [1, 2]), seq("a", [1, 2], index=1), seq("b", [3])
    s.add(a), s.add(a2), s.add(b)
    s.schedule()
    hit = s.abort("a")
    assert set(hit) == {a, a2} and all(x.finish_reason == "abort" for x in hit)
    s.schedule()
    assert s.running == [b] and not s.held


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
