"""The CodeGen2 training objective: causal LM mixed with file-level span corruption, packed into rows.

What this is:
- ``corrupt``: one file -> pieces and middles, cut at character positions. The paper draws a dynamic corruption
  ratio first, then span lengths and positions to match it, but gives no distributions; our documented defaults
  follow it and InCoder: ratio r ~ U(0.05, 0.5) of the characters, k = min(1 + Poisson(1), 16) spans, random
  lengths and positions.
- ``chunk_ids`` / ``split_document``: a long file -> chunks of its stored token ids cut at line ends (a giant line
  at a character boundary), each small enough that its longest training sequence fits one row. Files are split
  before corruption ("file-level": spans are chosen within one file, and one corrupted chunk fits one row).
- ``document_sequences``: per chunk, causal (``tokens <|endoftext|>``) with probability ``causal_prob``, else
  ``infill.training_sequence(...) <|endoftext|>``. The infill format itself lives only in ``infill.py``.
- ``RowStream``: visits documents in a seeded per-epoch permutation and packs whole sequences into rows of
  ``seq_len + 1`` tokens, with an exactly resumable ``state_dict``.

What this is not: no file reading, filtering or deduplication (``data.py``, ``corpus.py``), no loss or masking
policy beyond the ``valid`` flags (loss on every valid token is the loop's business).
Documents are read as the token ids the corpus stores; only the pieces of a corrupted chunk are tokenized (on
their own, as inference tokenizes a prefix and a suffix apart).
Everything here is a pure function of (ids, seed, epoch, document index): no global random state is used. That
is what lets ``RowStream(workers=N)`` make documents' sequences in N processes ahead of time and still give
exactly the rows of the in-process stream: only the cheap packing is sequential.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import multiprocessing
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from codegen2.infill import training_sequence
from codegen2.tokenizer import Tokenizer

LOOKAHEAD = 32  # pending sequences the packer may choose from when filling the rest of a row


@dataclass
class ObjectiveConfig:
    causal_prob: float = 0.5  # per chunk: causal LM with this probability, else span corruption
    min_ratio: float = 0.05  # corruption ratio r ~ Uniform(min_ratio, max_ratio) of the chunk's characters
    max_ratio: float = 0.5
    mean_extra_spans: float = 1.0  # k = min(1 + Poisson(mean_extra_spans), max_spans)
    max_spans: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.causal_prob <= 1.0:
            raise ValueError(f"causal_prob must be in [0, 1], got {self.causal_prob}")
        if not 0.0 < self.min_ratio <= self.max_ratio < 1.0:
            raise ValueError(f"need 0 < min_ratio <= max_ratio < 1, got {self.min_ratio}, {self.max_ratio}")
        if not 0.0 <= self.mean_extra_spans < math.inf:
            raise ValueError(f"mean_extra_spans must be finite and >= 0, got {self.mean_extra_spans}")
        if isinstance(self.max_spans, bool) or not isinstance(self.max_spans, int) or self.max_spans < 1:
            raise ValueError(f"max_spans must be an integer >= 1, got {self.max_spans!r}")

    def reserve(self) -> int:
        """Tokens a chunk's own tokenization must leave free in a sequence of ``max_tokens``.

        The corrupted format adds 3k + 2 control ids (k masks in the file, <|endoftext|> <sep>, then
        <mask_i> ... <eom> per span) and the separating <|endoftext|>; the 2k cuts each tend to add about one
        token because the pieces are tokenized apart. Rarer worse cases are caught in ``document_sequences``."""
        return 3 * self.max_spans + 3 + 2 * self.max_spans


def _check_tokenizer(tokenizer: Tokenizer, cfg: ObjectiveConfig) -> None:
    try:
        tokenizer.mask_id(cfg.max_spans)
    except ValueError as e:
        raise ValueError(f"max_spans={cfg.max_spans} needs more mask tokens than the tokenizer has: {e}") from None


def _poisson(rng: random.Random, mean: float, cap: int) -> int:
    # Knuth's method, stopped at cap: k is clipped at max_spans anyway, so a large mean cannot loop for long.
    threshold, k, p = math.exp(-mean), 0, rng.random()
    while p > threshold and k < cap:
        k, p = k + 1, p * rng.random()
    return k


def corrupt(text: str, rng: random.Random, cfg: ObjectiveConfig) -> tuple[list[str], list[str]]:
    """Cut ``text`` into k + 1 pieces and k middles: ``pieces[0] + middles[0] + pieces[1] + ... == text``.

    round(r * len(text)) characters are masked, r ~ U(min_ratio, max_ratio). Every span has >= 1 character and
    consecutive spans keep >= 1 character between them (else they would be one span), so k is reduced for
    short texts. When round(r * len(text)) == 0 (only texts of at most 0.5 / min_ratio characters, 10 by
    default) there is no span: ``([text], [])``, and ``document_sequences`` uses the causal format."""
    n = len(text)
    ratio = rng.uniform(cfg.min_ratio, cfg.max_ratio)
    k = 1 + _poisson(rng, cfg.mean_extra_spans, cfg.max_spans - 1)
    masked = round(ratio * n)
    k = min(k, masked, n - masked + 1)
    if k < 1:
        return [text], []
    # Span lengths: k - 1 distinct cut points split `masked` into k positive parts, uniformly.
    cuts = [0, *sorted(rng.sample(range(1, masked), k - 1)), masked]
    lengths = [b - a for a, b in itertools.pairwise(cuts)]
    # Positions: how many kept characters precede each span; distinct values keep the spans apart, and every
    # placement of the k spans among the n - masked kept characters is equally likely.
    kept_before = sorted(rng.sample(range(n - masked + 1), k))
    pieces, middles, pos, kept = [], [], 0, 0
    for before, length in zip(kept_before, lengths):
        start = pos + before - kept
        pieces.append(text[pos:start])
        middles.append(text[start:start + length])
        pos, kept = start + length, before
    pieces.append(text[pos:])
    return pieces, middles


def _budget(max_tokens: int, cfg: ObjectiveConfig) -> int:
    budget = max_tokens - cfg.reserve()
    if budget < 4:  # one character can take 4 byte tokens
        raise ValueError(f"max_tokens={max_tokens} leaves {budget} tokens per chunk after the {cfg.reserve()} "
                         f"reserved for max_spans={cfg.max_spans}; need at least 4")
    return budget


@functools.cache
def _token_flags(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per token id: whether its bytes end a line, and whether it starts a character (its first byte is not a
    UTF-8 continuation byte). A cut before a token of the second kind never splits a character."""
    table = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    ends_line = np.array([b.endswith(b"\n") for b in table])
    starts_char = np.array([not b or (b[0] & 0xC0) != 0x80 for b in table])
    return ends_line, starts_char


def chunk_ids(ids: np.ndarray | list[int], tokenizer: Tokenizer, budget: int) -> list[tuple[int, int]]:
    """(start, end) slices covering a document's ids, each at most ``budget`` tokens: a slice ends after the last
    line-ending token that fits, or, in a line longer than the budget, at the last character boundary that fits.

    Chunking reads the ids the corpus stores; nothing is re-tokenized (a budget >= 4 always holds a character)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    if n == 0:
        return []
    ends_line, starts_char = _token_flags(tokenizer)
    line_cut = np.flatnonzero(ends_line[ids]) + 1  # positions just after a line end, ascending
    char_cut = np.flatnonzero(starts_char[ids])  # positions before a character's first token, ascending
    out, start = [], 0
    while n - start > budget:
        limit = start + budget
        k = np.searchsorted(line_cut, limit, side="right") - 1  # the last line end at or before the limit
        if k >= 0 and line_cut[k] > start:
            end = int(line_cut[k])
        else:
            end = int(char_cut[np.searchsorted(char_cut, limit, side="right") - 1])
            assert end > start, "a character takes at most 4 byte tokens"
        out.append((start, end))
        start = end
    out.append((start, n))
    return out


def _as_ids(doc: str | np.ndarray | Sequence[int], tokenizer: Tokenizer) -> np.ndarray:
    return np.asarray(tokenizer.encode(doc) if isinstance(doc, str) else doc, dtype=np.int64)


def split_document(doc: str | np.ndarray | Sequence[int], tokenizer: Tokenizer, max_tokens: int,
                   cfg: ObjectiveConfig | None = None) -> list[str]:
    """The texts of ``chunk_ids``' chunks (none for ""), whose concatenation is the document, each at most
    ``max_tokens - cfg.reserve()`` of its tokens, so that its causal or corrupted sequence fits ``max_tokens``
    (``document_sequences`` checks the corrupted length anyway)."""
    ids = _as_ids(doc, tokenizer)
    budget = _budget(max_tokens, cfg or ObjectiveConfig())
    return [tokenizer.decode(ids[a:b].tolist()) for a, b in chunk_ids(ids, tokenizer, budget)]


def document_sequences(doc: str | np.ndarray | Sequence[int], tokenizer: Tokenizer, rng: random.Random,
                       cfg: ObjectiveConfig, max_tokens: int) -> list[list[int]]:
    """Training sequences of one document (its token ids, or text to encode), each ending in <|endoftext|> and
    at most ``max_tokens`` long.

    Per chunk: causal (the chunk's own ids + [eos]) with probability ``causal_prob``, else span corruption of
    the chunk's text, whose pieces and spans are tokenized on their own, as prefix and suffix are at inference.
    That is the one tokenization left per epoch, and only of corrupted chunks. A chunk too short to corrupt, or
    whose corrupted sequence came out too long (re-tokenized pieces can add tokens), is causal."""
    _check_tokenizer(tokenizer, cfg)
    ids = _as_ids(doc, tokenizer)
    seqs = []
    for a, b in chunk_ids(ids, tokenizer, _budget(max_tokens, cfg)):
        chunk = ids[a:b].tolist()
        if rng.random() >= cfg.causal_prob:
            pieces, middles = corrupt(tokenizer.decode(chunk), rng, cfg)
            if middles:
                seq = training_sequence(tokenizer, pieces, middles) + [tokenizer.eos_id]
                if len(seq) <= max_tokens:
                    seqs.append(seq)
                    continue
        seqs.append(chunk + [tokenizer.eos_id])
    return seqs


class Corpus(Protocol):
    """What the stream reads: a number of documents and each one's token ids (e.g. ``corpus.TokenCorpus``)."""
    def __len__(self) -> int: ...
    def tokens(self, i: int) -> np.ndarray: ...


class TextList:
    """A list of texts as a Corpus: each text is encoded once, when first read."""

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer) -> None:
        self.texts, self.tokenizer, self._ids = list(texts), tokenizer, {}

    def __len__(self) -> int:
        return len(self.texts)

    def tokens(self, i: int) -> np.ndarray:
        if i not in self._ids:
            self._ids[i] = _as_ids(self.texts[i], self.tokenizer)
        return self._ids[i]


def _sequences(corpus: Corpus, tokenizer: Tokenizer, cfg: ObjectiveConfig, max_tokens: int, seed: int, epoch: int,
               doc: int) -> list[list[int]]:
    """Document ``doc``'s sequences in ``epoch``: the one place its randomness is seeded."""
    return document_sequences(corpus.tokens(doc), tokenizer, random.Random(f"{seed}:{epoch}:{doc}"), cfg,
                              max_tokens)


_WORKER: tuple | None = None  # (corpus, tokenizer, cfg, max_tokens, seed) in a RowStream worker process


def _worker_init(*args) -> None:
    global _WORKER
    _WORKER = args


def _worker_sequences(epoch: int, doc: int) -> list[list[int]]:
    return _sequences(*_WORKER, epoch, doc)


class RowStream:
    """Endless rows of ``seq_len + 1`` tokens (inputs ``row[:-1]``, targets ``row[1:]``) for one seed.

    Packing: rows hold whole sequences only. Sequences wait in arrival order in ``pending`` (refilled to
    LOOKAHEAD); each row takes, first-fit in that order, every pending sequence that fits the space left. The
    oldest always fits an empty row, so nothing waits forever. The rest of the row is padding (eos, not valid).
    Documents: epoch e visits ``default_rng([seed, e]).permutation(len(corpus))``; document i's randomness is
    ``random.Random(f"{seed}:{e}:{i}")``, so a run is reproducible across processes and from ``state_dict``.

    workers > 0: that many spawned processes make the next documents' sequences ahead of the packer (a GPU eats
    rows faster than one CPU core makes them: ~180k tokens/s here). The rows are identical for any worker
    count; call ``close()`` (or use ``with``) to stop the processes."""

    def __init__(self, corpus: Corpus | list[str], tokenizer: Tokenizer, cfg: ObjectiveConfig, seq_len: int,
                 seed: int, workers: int = 0) -> None:
        if isinstance(corpus, (list, tuple)):
            corpus = TextList(corpus, tokenizer)
        if len(corpus) == 0:
            raise ValueError("the corpus is empty")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        _check_tokenizer(tokenizer, cfg)
        _budget(seq_len + 1, cfg)
        self.corpus, self.tokenizer, self.cfg, self.seq_len, self.seed = corpus, tokenizer, cfg, seq_len, seed
        self.epoch, self.cursor = 0, 0  # the next document is permutation(epoch)[cursor]
        self.pending: list[list[int]] = []
        self.stats = {"rows": 0, "sequences": 0, "causal": 0, "corrupted": 0, "padding": 0, "documents": 0}
        self._perms: dict[int, np.ndarray] = {}
        self.workers, self._pool = workers, None
        # Documents handed to the workers, oldest first: ((epoch, cursor), AsyncResult of their sequences).
        self._ahead: collections.deque = collections.deque()

    def _doc(self, epoch: int, cursor: int) -> int:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= self.epoch}  # forget finished epochs
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.corpus))
        return int(self._perms[epoch][cursor])

    def _next_position(self, epoch: int, cursor: int) -> tuple[int, int]:
        return (epoch, cursor + 1) if cursor + 1 < len(self.corpus) else (epoch + 1, 0)

    def _fetch(self) -> list[list[int]]:
        """The sequences of the document at (epoch, cursor), from the workers when there are any."""
        if not self.workers:
            return _sequences(self.corpus, self.tokenizer, self.cfg, self.seq_len + 1, self.seed, self.epoch,
                              self._doc(self.epoch, self.cursor))
        if self._pool is None:  # spawn, not fork: the parent may hold CUDA state and threads
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.workers, _worker_init, (self.corpus, self.tokenizer, self.cfg, self.seq_len + 1, self.seed))
        position = self._ahead[-1][0] if self._ahead else None
        while len(self._ahead) < 8 * self.workers:  # keep every worker busy with several documents
            position = self._next_position(*position) if position else (self.epoch, self.cursor)
            job = self._pool.apply_async(_worker_sequences, (position[0], self._doc(*position)))
            self._ahead.append((position, job))
        position, job = self._ahead.popleft()
        assert position == (self.epoch, self.cursor), (position, self.epoch, self.cursor)
        return job.get()

    def _pull(self) -> None:
        """Visit the next document and queue its sequences."""
        self.pending += self._fetch()
        self.stats["documents"] += 1
        self.epoch, self.cursor = self._next_position(self.epoch, self.cursor)

    def close(self) -> None:
        """Stop the worker processes (a later call starts them again)."""
        self._ahead.clear()
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> RowStream:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def next_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, valid), both (n, seq_len + 1): int64 ids, and False on the padding at each row's tail."""
        width, eos, eom = self.seq_len + 1, self.tokenizer.eos_id, self.tokenizer.eom_id
        tokens = np.full((n, width), eos, dtype=np.int64)
        valid = np.zeros((n, width), dtype=bool)
        for r in range(n):
            pulled = 0
            while len(self.pending) < LOOKAHEAD:
                if pulled > len(self.corpus) and not self.pending:
                    raise ValueError("no document in the corpus produced a training sequence (all empty?)")
                self._pull()
                pulled += 1
            used, waiting = 0, []
            for seq in self.pending:
                if used + len(seq) > width:
                    waiting.append(seq)
                    continue
                tokens[r, used:used + len(seq)] = seq
                valid[r, used:used + len(seq)] = True
                used += len(seq)
                # Only a corrupted sequence ends "<eom> <|endoftext|>": encode never yields control ids.
                self.stats["corrupted" if len(seq) > 1 and seq[-2] == eom else "causal"] += 1
                self.stats["sequences"] += 1
            self.pending = waiting
            self.stats["rows"] += 1
            self.stats["padding"] += width - used
        return torch.from_numpy(tokens), torch.from_numpy(valid)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: where the stream is (epoch, cursor), the sequences already made but not yet packed, stats."""
        return {"seed": self.seed, "seq_len": self.seq_len, "epoch": self.epoch, "cursor": self.cursor,
                "pending": [list(s) for s in self.pending], "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["seq_len"]) != (self.seed, self.seq_len):
            raise ValueError(f"state is for seed={state['seed']}, seq_len={state['seq_len']}; this stream has "
                             f"seed={self.seed}, seq_len={self.seq_len}")
        if not 0 <= state["cursor"] < len(self.corpus):
            raise ValueError(f"state cursor {state['cursor']} is outside a corpus of {len(self.corpus)} documents")
        self._ahead.clear()  # documents made ahead for the old position are not the ones needed now
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.pending = [list(s) for s in state["pending"]]
        self.stats = dict(state["stats"])
