"""Speculative decoding: proposers of draft tokens, which one forward pass of the model then verifies.

Batch-1 decode reads every weight once per token, and a pass over k + 1 tokens costs about as much as over one
while it stays bandwidth-bound; a draft the model agrees with is a token for free. The engine verifies each
sequence's drafts in its decode pass (rows padded to the longest) and keeps them by the rejection rule
(sampling.verify_row), which keeps greedy output identical and the sampling distribution exact.

- ``NgramProposer``: prompt lookup. The longest n-gram (n_max down to n_min) that ends the sequence and occurred
  before, in the prompt (an infill's suffix included) or the text generated so far; the k tokens that followed
  its latest earlier occurrence are the draft. An index of every n-gram's last end is kept per sequence and
  updated as tokens arrive, so a proposal is a few dictionary lookups.
- ``DraftProposer``: a smaller model with the same tokenizer, run autoregressively for k tokens with its own KV
  cache (one slot per engine slot, written by position like the engine's, so rejected drafts cost nothing to
  discard), drawing by the request's own sampling stages; its distributions are the rejection rule's q.

What this is not: the verification (engine.py, sampling.py) or scheduling; a proposer only proposes.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch import nn

from codegen2.engine.runner import ModelRunner
from codegen2.engine.sampling import Draft, InfillVocab, draft_distribution
from codegen2.engine.scheduler import Sequence

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "ngram" or "draft"
    num_tokens: int = 5  # drafts proposed per sequence and step, at most
    ngram_max: int = 4  # prompt lookup: longest n-gram matched first
    ngram_min: int = 2
    draft: nn.Module | None = None  # the draft model (method "draft"), prepared for inference like the target

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got {self.num_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max <= 16, got {self.ngram_min}, {self.ngram_max}")
        if (self.draft is None) != (self.method == "ngram"):
            raise ValueError("the draft method needs a draft model, and only it takes one")


class _Index:
    """Every n-gram's latest end position in one sequence, for n in [n_min, n_max]."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.ns = range(n_max, n_min - 1, -1)
        self.last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.ns}
        self.upto = 0  # ends < upto are indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        # Index the ends the sequence gained, but never its current end: it would match itself.
        for end in range(self.upto, len(tokens)):
            for n in self.ns:
                if end >= n:
                    self.last[n][tuple(tokens[end - n:end])] = end
        self.upto = len(tokens)
        for n in self.ns:
            end = self.last[n].get(tuple(tokens[-n:])) if len(tokens) > n else None
            if end is not None:
                return tokens[end:end + k]
        return []


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg, self.index = cfg, {}

    def propose(self, seqs: Seq[Sequence], ks: Seq[int]) -> list[tuple[list[int], list[Draft] | None]]:
        out = []
        for seq, k in zip(seqs, ks):
            index = self.index.get(seq)
            if index is None:
                index = self.index[seq] = _Index(self.cfg.ngram_min, self.cfg.ngram_max)
            out.append((index.propose(seq.tokens, k) if k > 0 else [], None))
        return out

    def verified(self, seq: Sequence, length: int, accepted: int) -> None:
        pass

    def forget(self, seq: Sequence) -> None:
        self.index.pop(seq, None)


class DraftProposer:
    def __init__(self, cfg: SpeculativeConfig, n_slots: int, max_seq_len: int, vocab: InfillVocab | None,
                 prefill_chunk: int) -> None:
        self.runner = ModelRunner(cfg.draft, n_slots, max_seq_len)
        self.vocab, self.prefill_chunk = vocab, prefill_chunk
        self.cached: dict[Sequence, int] = {}  # tokens of each sequence whose K/V are in the draft's cache

    def propose(self, seqs: Seq[Sequence], ks: Seq[int], generators: Seq[torch.Generator | None]
                ) -> list[tuple[list[int], list[Draft] | None]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[Draft]] = [[] for _ in seqs]
        active = [i for i, k in enumerate(ks) if k > 0]
        for i in active:  # catch up with all but the last token (the draft ignores the engine's prefix cache)
            seq = seqs[i]
            start = self.cached.get(seq, 0)
            for a in range(start, len(seq.tokens) - 1, self.prefill_chunk):
                chunk = seq.tokens[a:min(a + self.prefill_chunk, len(seq.tokens) - 1)]
                self.runner.prefill(seq.slot, chunk, a)
            self.cached[seq] = len(seq.tokens) - 1
        step = 0
        while active:
            feed = [seqs[i].tokens[-1] if step == 0 else drafts[i][-1] for i in active]
            pos = [len(seqs[i].tokens) - 1 + step for i in active]
            logits = self.runner.decode([seqs[i].slot for i in active], feed, pos)  # (B, V)
            for row, i in enumerate(active):
                seq = seqs[i]
                self.cached[seq] = pos[row] + 1
                token, q = draft_distribution(logits[row], seq.params, (seq.prompt, seq.output + drafts[i]),
                                              self.vocab, generators[i])
                drafts[i].append(token)
                qs[i].append(q)
            step += 1
            active = [i for i in active if len(drafts[i]) < ks[i]]
        return [(d, q) for d, q in zip(drafts, qs)]

    def verified(self, seq: Sequence, length: int, accepted: int) -> None:
        """Positions past what the sequence kept hold rejected drafts: the next step writes over them."""
        self.cached[seq] = min(self.cached.get(seq, 0), length + accepted)

    def forget(self, seq: Sequence) -> None:
        self.cached.pop(seq, None)
