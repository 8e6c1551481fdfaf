"""Which sequences run in the next step: plain Python, no tensors, testable without a model.

Each running sequence owns one KV-cache slot. Per step the scheduler returns
- the decode batch: every sequence whose prompt is fully in the cache (one new token each), and
- at most one prefill chunk (``prefill_chunk`` prompt tokens of one sequence), so a long prompt is spread over
  several steps and never stalls the running streams for longer than one chunk.

Sequences wait in a FIFO queue while no slot is free. A slot keeps the tokens whose K/V it holds after its
sequence ends; a new sequence takes the free slot sharing the longest prefix with its prompt (an editor re-sending
the same file), or the least recently used one, and skips prefilling the shared part. A sequence whose sibling
(same request, ``n > 1``) already holds the prompt copies the sibling's K/V instead of recomputing it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from codegen2.engine.sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    n_cached: int = 0  # tokens of prompt + output whose K/V are in the slot
    reused: int = 0  # prompt tokens found in the cache when the sequence was admitted
    prefill_only: bool = False  # finishes when its prompt is in the cache
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class Prefill:
    seq: Sequence
    start: int  # position of the chunk's first token
    tokens: list[int]
    last: bool  # the chunk ends the prompt: its last logits give the first generated token


@dataclass
class Batch:
    decode: list[Sequence]
    prefill: Prefill | None
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, length), done first


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    def __init__(self, n_slots: int, max_seq_len: int, prefill_chunk: int = 256) -> None:
        if n_slots < 1:
            raise ValueError(f"the KV cache must have at least one slot, got {n_slots}")
        self.n_slots, self.max_seq_len, self.prefill_chunk = n_slots, max_seq_len, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free: set[int] = set(range(n_slots))
        self.slot_tokens: list[list[int]] = [[] for _ in range(n_slots)]  # tokens whose K/V each slot holds
        self.slot_used: list[int] = [0] * n_slots  # last use, for least-recently-used eviction
        self._clock = itertools.count(1)
        self.reused_tokens = 0  # prompt tokens served from the cache instead of prefilled (for metrics)
        self._copies: list[tuple[int, int, int]] = []
        # Siblings (n > 1) wait here until the first sequence of their request has prefilled the prompt.
        self.held: dict[str, list[Sequence]] = {}

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; its prompt was checked to fit the context (engine/prompt.py)."""
        assert len(seq.prompt) < self.max_seq_len, "prompts are checked by prepare_request"
        leader = any(s.request_id == seq.request_id and s.status in (Status.WAITING, Status.PREFILL)
                     for s in [*self.waiting, *self.running])
        if leader:
            self.held.setdefault(seq.request_id, []).append(seq)
        else:
            self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request with reason 'abort'; their slots are freed."""
        hit = [s for s in [*self.waiting, *self.running] if s.request_id == request_id]
        hit += self.held.pop(request_id, [])
        for seq in hit:
            self.finish(seq, "abort")
        return hit

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.finished:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.slot_tokens[seq.slot] = seq.tokens[: seq.n_cached]
            self.slot_used[seq.slot] = next(self._clock)
            self.free.add(seq.slot)
            seq.slot = None

    def _admit(self, seq: Sequence) -> None:
        limit = len(seq.prompt) - 1  # at least the last prompt token is recomputed: its logits are needed
        slot = max(self.free, key=lambda s: (min(common_prefix(self.slot_tokens[s], seq.prompt), limit),
                                             -self.slot_used[s]))
        self.free.remove(slot)
        seq.slot, seq.status = slot, Status.PREFILL
        seq.n_cached = min(common_prefix(self.slot_tokens[slot], seq.prompt), limit)
        # A running sibling with the same prompt already in its cache: copy instead of recomputing.
        sibling = max((s for s in self.running if s.prompt == seq.prompt and s.slot is not None),
                      key=lambda s: min(s.n_cached, limit), default=None)
        if sibling is not None and min(sibling.n_cached, limit) > seq.n_cached:
            seq.n_cached = min(sibling.n_cached, limit)
            self._copies.append((sibling.slot, slot, seq.n_cached))
        self.reused_tokens += seq.n_cached
        seq.reused = seq.n_cached
        self.slot_tokens[slot] = seq.prompt[: seq.n_cached]
        self.running.append(seq)

    def schedule(self) -> Batch:
        while self.waiting and self.free:
            self._admit(self.waiting.popleft())
        decode = [s for s in self.running if s.status is Status.DECODE]
        prefill = None
        for seq in self.running:
            if seq.status is Status.PREFILL:
                end = min(len(seq.prompt), seq.n_cached + self.prefill_chunk)
                prefill = Prefill(seq, seq.n_cached, seq.prompt[seq.n_cached:end], end == len(seq.prompt))
                break
        copies, self._copies = self._copies, []
        return Batch(decode, prefill, copies)

    def prefilled(self, chunk: Prefill) -> None:
        """The chunk's K/V are now in the cache."""
        seq = chunk.seq
        seq.n_cached = chunk.start + len(chunk.tokens)
        if chunk.last:
            seq.status = Status.DECODE
            self.waiting.extendleft(reversed(self.held.pop(seq.request_id, [])))

    def decoded(self, seq: Sequence) -> None:
        """The last output token was fed to the model: every token's K/V is now in the cache."""
        seq.n_cached = len(seq.prompt) + len(seq.output)
