"""The training objective: span corruption invariants, the causal/corrupted mixture, packing, and exact resume.

Real code comes from the Python standard library; the edge cases (empty, unicode, CRLF, control strings in
the text) are written by hand. Every sequence is parsed back from its token ids alone and must give the original
text byte for byte.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import pathlib
import random
import sysconfig

import numpy as np
import pytest
import torch

from codegen2.tokenizer import load_tokenizer
from codegen2.train.objective import (
    ObjectiveConfig,
    RowStream,
    corrupt,
    document_sequences,
    split_document,
)

EDGE_CASES = [
    "", "x", "ab", "abc", "\n", "\n\n\n\n",
    "a\r\nb\r\n\r\n    return x\r\n",
    "# emoji 🎉👩‍👩‍👧‍👦 and CJK 漢字かな한국어 ✓ π\ns = '🎉' * 3  # 中文注释\n",
    "s = '<|endoftext|>'\n# <eom> <sep> <mask_1> <mask_2> <|endoftext|>\nt = \"<mask_899>\"\n",
    "\t\t  \n    \n\t\n        \n",
    "def f():\n    return 1" + "\n" * 40,
    "x = [" + ", ".join(str(i) for i in range(3000)) + "]\n",  # one line far longer than a row
    "🎉漢" * 700,  # multi-byte characters, no line break
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, kind="codegen2")


@functools.cache
def stdlib_files(n: int = 40) -> tuple[str, ...]:
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return tuple(f.read_text(encoding="utf-8", errors="replace") for f in files)


@functools.cache
def snippets(count: int, seed: int = 0, min_chars: int = 0) -> tuple[str, ...]:
    """Windows of 3..40 consecutive lines from stdlib files: many small, real-looking documents."""
    rng, out = random.Random(seed), []
    lines = [f.splitlines(keepends=True) for f in stdlib_files()]
    while len(out) < count:
        ls = rng.choice(lines)
        start = rng.randrange(len(ls))
        text = "".join(ls[start:start + rng.randint(3, 40)])
        if len(text) >= min_chars:
            out.append(text)
    return tuple(out)


def control_ids(tok) -> set[int]:
    return set(tok.special_ids().values())


def parse(tok, seq: list[int]) -> tuple[str, int]:
    """The text a training sequence stands for, from its ids alone, and its number of spans (0 = causal).

    Asserts the format: ``piece_0 <mask_1> ... <mask_k> piece_k <|endoftext|> <sep> (<mask_i> span_i <eom>)*k``
    with masks numbered 1..k in order on both sides, then the separating ``<|endoftext|>``."""
    assert seq[-1] == tok.eos_id
    body, controls = seq[:-1], control_ids(tok)
    if tok.sep_id not in body:
        assert not controls & set(body)
        return tok.decode(body), 0
    i = next(j for j in range(len(body) - 1) if body[j] == tok.eos_id and body[j + 1] == tok.sep_id)
    file, tail = body[:i], body[i + 2:]
    mask_number = {i: int(name[6:-1]) for name, i in tok.special_ids().items() if name.startswith("<mask_")}
    pieces: list[list[int]] = [[]]
    for t in file:
        if t in mask_number:
            assert mask_number[t] == len(pieces), "masks must be numbered 1..k in document order"
            pieces.append([])
        else:
            assert t not in controls
            pieces[-1].append(t)
    k, spans, pos = len(pieces) - 1, [], 0
    assert k >= 1
    for n in range(1, k + 1):
        assert tail[pos] == tok.mask_id(n)
        end = tail.index(tok.eom_id, pos)
        spans.append(tail[pos + 1:end])
        assert not controls & set(spans[-1])
        pos = end + 1
    assert pos == len(tail), "every span is closed by <eom> and nothing follows the last"
    text = tok.decode(pieces[0]) + "".join(tok.decode(s) + tok.decode(p) for s, p in zip(spans, pieces[1:]))
    return text, k


def interleave(pieces: list[str], middles: list[str]) -> str:
    return pieces[0] + "".join(m + p for m, p in zip(middles, pieces[1:]))


# --- span corruption ---------------------------------------------------------------------------------------


def test_corrupt_reassembles_and_follows_the_defaults():
    cfg = ObjectiveConfig()
    texts = list(snippets(300)) + EDGE_CASES
    for i, text in enumerate(texts):
        for seed in range(4):
            pieces, middles = corrupt(text, random.Random(f"{i}:{seed}"), cfg)
            assert len(pieces) == len(middles) + 1 and len(middles) <= cfg.max_spans
            assert interleave(pieces, middles).encode() == text.encode()
            if not middles:  # only when the text is too short for one span at the drawn ratio
                assert len(text) * cfg.min_ratio <= 0.5
                continue
            # Spans are non-empty and apart (an empty inner piece would merge two spans into one).
            assert all(middles) and all(pieces[1:-1])
            masked = sum(map(len, middles))
            assert cfg.min_ratio * len(text) - 0.5 <= masked <= cfg.max_ratio * len(text) + 0.5
    assert corrupt(texts[0], random.Random(7), cfg) == corrupt(texts[0], random.Random(7), cfg)
    assert corrupt("", random.Random(0), cfg) == ([""], [])


def test_span_count_and_ratio_distributions():
    """k = min(1 + Poisson(mean), max_spans) and r ~ U(min, max), checked against their exact means."""
    texts = snippets(2000, seed=1, min_chars=400)  # long enough that k is never reduced
    for mean, max_spans in [(1.0, 16), (3.0, 4)]:
        cfg = ObjectiveConfig(mean_extra_spans=mean, max_spans=max_spans)
        ks, ratios = [], []
        for i, text in enumerate(texts):
            _, middles = corrupt(text, random.Random(i), cfg)
            ks.append(len(middles))
            ratios.append(sum(map(len, middles)) / len(text))
        pmf = [math.exp(-mean) * mean**j / math.factorial(j) for j in range(max_spans - 1)]
        expected_k = sum((1 + j) * p for j, p in enumerate(pmf)) + max_spans * (1 - sum(pmf))
        assert max(ks) <= max_spans and min(ks) >= 1
        # Standard error of the mean of 2,000 draws is < 0.05 for both; 0.15 is a ~3-sigma band.
        assert abs(np.mean(ks) - expected_k) < 0.15, (np.mean(ks), expected_k)
        assert abs(np.mean(ratios) - 0.275) < 0.01  # U(0.05, 0.5): sd 0.13, s.e. 0.003


# --- documents -> sequences --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,max_tokens", [("codegen2", 128), ("codegen2", 2049), ("codegen25", 512)])
def test_sequences_decode_back_to_the_document(kind, max_tokens):
    """From the ids alone each sequence gives its chunk back, and the chunks give the document back."""
    tok = load_tokenizer(None, kind=kind)
    cfg = ObjectiveConfig(max_spans=8) if max_tokens == 128 else ObjectiveConfig()
    docs = list(stdlib_files(8)) + list(snippets(150, seed=2)) + EDGE_CASES
    kinds = collections.Counter()
    for i, text in enumerate(docs):
        chunks = split_document(text, tok, max_tokens, cfg)
        assert "".join(chunks) == text and all(chunks)
        seqs = document_sequences(text, tok, random.Random(i), cfg, max_tokens)
        assert len(seqs) == len(chunks)
        for seq, chunk in zip(seqs, chunks):
            assert len(seq) <= max_tokens
            got, k = parse(tok, seq)
            assert got.encode() == chunk.encode()
            assert k <= cfg.max_spans
            kinds[k > 0] += 1
    assert kinds[True] > 30 and kinds[False] > 30  # both formats were exercised


def test_split_document_cuts_at_lines_and_splits_giant_lines(tok):
    cfg = ObjectiveConfig()
    budget = 512 - cfg.reserve()
    for text in [t for t in stdlib_files(12) if len(t) > 5000]:
        chunks = split_document(text, tok, 512, cfg)
        assert "".join(chunks) == text and len(chunks) > 1
        assert all(len(tok.encode(c)) <= budget for c in chunks)
        assert all(c.endswith("\n") for c in chunks[:-1])  # these files have no line longer than a chunk
        assert sum(len(tok.encode(c)) for c in chunks) > 0.8 * budget * (len(chunks) - 1)  # chunks are full
    for giant in EDGE_CASES[-2:]:
        chunks = split_document(giant, tok, 512, cfg)
        assert "".join(chunks) == giant and len(chunks) > 1
        assert all(len(tok.encode(c)) <= budget for c in chunks)
    assert split_document("", tok, 512, cfg) == []
    assert split_document("tiny\n", tok, 512, cfg) == ["tiny\n"]


@pytest.mark.parametrize("causal_prob", [0.5, 0.2])
def test_mixture_ratio(tok, causal_prob):
    """The causal fraction over 2,000 one-chunk files is within 4 binomial standard deviations of causal_prob."""
    cfg = ObjectiveConfig(causal_prob=causal_prob)
    texts = snippets(2000, seed=3, min_chars=100)  # >= 5 masked characters, so corruption never falls back
    causal = 0
    for i, text in enumerate(texts):
        (seq,) = document_sequences(text, tok, random.Random(i), cfg, 2049)
        causal += tok.sep_id not in seq
    n = len(texts)
    assert abs(causal / n - causal_prob) <= 4 * math.sqrt(causal_prob * (1 - causal_prob) / n)
    only_causal = ObjectiveConfig(causal_prob=1.0)
    assert all(tok.sep_id not in document_sequences(t, tok, random.Random(0), only_causal, 2049)[0]
               for t in texts[:50])


# --- packing -----------------------------------------------------------------------------------------------


class Corpus:
    """The interface the stream reads: __len__ and tokens(i) (token ids, as a built corpus stores them)."""

    def __init__(self, texts: list[str], tok) -> None:
        self.ids = [np.array(tok.encode(t), dtype=np.uint16) for t in texts]

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, i: int) -> np.ndarray:
        return self.ids[i]


def row_sequences(tok, tokens, valid) -> list[list[list[int]]]:
    """Each row's valid tokens cut into sequences. A sequence ends at an <|endoftext|> that is not followed by
    <sep> (the one inside a corrupted sequence always is, and no sequence starts with <sep>)."""
    rows = []
    for row, ok in zip(tokens.tolist(), valid.tolist()):
        used = sum(ok)
        assert ok == [True] * used + [False] * (len(ok) - used), "padding only at the tail"
        assert all(t == tok.eos_id for t in row[used:])
        seqs, start = [], 0
        for j in range(used):
            if row[j] == tok.eos_id and (j + 1 == used or row[j + 1] != tok.sep_id):
                seqs.append(row[start:j + 1])
                start = j + 1
        assert start == used, "a row ends with a whole sequence"
        rows.append(seqs)
    return rows


def visited(texts, tok, cfg, seq_len, seed, epochs):
    """Independently recomputed: per visited document in order, (epoch, doc, its sequences)."""
    out = []
    for epoch in range(epochs):
        for doc in np.random.default_rng([seed, epoch]).permutation(len(texts)):
            rng = random.Random(f"{seed}:{epoch}:{doc}")
            out.append((epoch, int(doc), document_sequences(texts[doc], tok, rng, cfg, seq_len + 1)))
    return out


def test_rows_pack_whole_sequences_of_every_document(tok):
    texts = list(snippets(40, seed=4)) + [stdlib_files()[4][:12000]] + EDGE_CASES
    cfg, seq_len, seed = ObjectiveConfig(), 255, 11
    stream = RowStream(Corpus(texts, tok), tok, cfg, seq_len, seed)
    tokens, valid = stream.next_rows(150)
    assert tokens.shape == valid.shape == (150, seq_len + 1)
    rows = row_sequences(tok, tokens, valid)

    plan = visited(texts, tok, cfg, seq_len, seed, epochs=stream.epoch + 1)
    expected = [(epoch, doc, s) for epoch, doc, seqs in plan for s in seqs]
    arrivals = collections.defaultdict(collections.deque)  # sequence -> its arrival indices, oldest first
    for idx, (_, _, s) in enumerate(expected):
        arrivals[tuple(s)].append(idx)
    done: set[int] = set()
    for seqs in rows:
        idxs = [arrivals[tuple(s)].popleft() for s in seqs]  # KeyError/IndexError: a sequence nobody made
        assert idxs == sorted(idxs), "a row takes pending sequences in arrival order"
        assert idxs[0] == min(set(range(len(expected))) - done), "the oldest pending sequence is never skipped"
        done.update(idxs)
    # Everything made but not yet packed is exactly what the stream holds.
    pulled = stream.stats["documents"]
    made = [tuple(s) for _, _, seqs in plan[:pulled] for s in seqs]
    packed = [tuple(s) for seqs in rows for s in seqs]
    assert collections.Counter(made) == collections.Counter(packed) + collections.Counter(map(tuple, stream.pending))

    # Epoch 0 visited each document once, and all of it reached the rows: its text comes back from the ids.
    assert stream.epoch >= 1
    epoch0 = [(doc, seqs) for epoch, doc, seqs in plan if epoch == 0]
    assert sorted(doc for doc, _ in epoch0) == list(range(len(texts)))
    first = {idx for idx, (epoch, _, _) in enumerate(expected) if epoch == 0}
    assert first <= done
    for doc, seqs in epoch0:
        assert "".join(parse(tok, s)[0] for s in seqs) == texts[doc]
    assert len(tok.encode(texts[-2])) > 2 * seq_len  # the giant line was split over rows, not dropped

    s = stream.stats
    assert s["rows"] == 150 and s["sequences"] == len(packed) == s["causal"] + s["corrupted"]
    assert s["padding"] == int((~valid).sum())
    assert s["corrupted"] == sum(parse(tok, list(q))[1] > 0 for q in packed)


def test_lookahead_keeps_padding_low(tok):
    # At 1,024 tokens most rows hold several sequences; first-fit over 32 pending ones fills the gaps. (At 256
    # tokens a full chunk leaves no room for another, so a third of such rows is padding whatever the packer.)
    texts = list(snippets(200, seed=8)) + list(stdlib_files(10))
    stream = RowStream(texts, tok, ObjectiveConfig(), 1023, 0)
    _, valid = stream.next_rows(60)
    assert stream.stats["padding"] == int((~valid).sum()) < 0.06 * valid.numel()
    assert stream.stats["causal"] > 20 and stream.stats["corrupted"] > 20


def test_stream_accepts_a_plain_list(tok):
    texts = list(snippets(10, seed=5))
    a = RowStream(texts, tok, ObjectiveConfig(), 255, 0).next_rows(4)
    b = RowStream(Corpus(texts, tok), tok, ObjectiveConfig(), 255, 0).next_rows(4)
    assert all((x == y).all() for x, y in zip(a, b))


# --- determinism and resume --------------------------------------------------------------------------------


def test_resume_reproduces_the_following_rows_across_epochs(tok):
    texts = list(snippets(6, seed=6)) + ["x = 1\n", "", "🎉\r\n"]  # a small corpus: several epochs in 40 rows
    cfg, seq_len = ObjectiveConfig(), 127
    reference = RowStream(texts, tok, cfg, seq_len, seed=3)
    rows = [reference.next_rows(1) for _ in range(40)]
    assert reference.epoch >= 3
    epochs_seen = set()
    for n in [0, 1, 2, 5, 9, 17, 30]:
        stream = RowStream(texts, tok, cfg, seq_len, seed=3)
        for _ in range(n):
            stream.next_rows(1)
        state = json.loads(json.dumps(stream.state_dict()))
        epochs_seen.add(state["epoch"])
        resumed = RowStream(texts, tok, cfg, seq_len, seed=3)
        resumed.load_state_dict(state)
        tokens, valid = resumed.next_rows(40 - n)
        assert (tokens == np.concatenate([r[0] for r in rows[n:]])).all()
        assert (valid == np.concatenate([r[1] for r in rows[n:]])).all()
        assert resumed.stats == reference.stats
    assert len(epochs_seen) >= 3  # states were taken in several epochs


@pytest.mark.slow
def test_worker_processes_give_the_in_process_rows_and_resume_mid_prefetch(tok, tmp_path):
    # A corpus on disk (TokenCorpus travels to the workers as its path) small enough for several epochs.
    from codegen2.train.corpus import TokenCorpus
    from codegen2.train.data import build_corpus

    src = tmp_path / "src"
    src.mkdir()
    (src / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, to any person "
                                 "obtaining a copy of this software")
    for i, text in enumerate(snippets(12, seed=8)):
        (src / f"f{i}.py").write_text(text)
    build_corpus([src], tmp_path / "corpus", workers=1, progress=False, val_fraction=0.0)
    corpus, cfg = TokenCorpus(tmp_path / "corpus", "train"), ObjectiveConfig()
    assert len(corpus) >= 10
    reference = RowStream(corpus, tok, cfg, 127, seed=5)
    expected = reference.next_rows(60)
    assert reference.epoch >= 2
    with RowStream(corpus, tok, cfg, 127, seed=5, workers=2) as stream:
        first = stream.next_rows(25)
        state = json.loads(json.dumps(stream.state_dict()))
        assert len(stream._ahead) > 0  # documents were made ahead of the packer when the state was taken
        rest = stream.next_rows(35)
        assert stream.stats == reference.stats
    assert (torch.cat([first[0], rest[0]]) == expected[0]).all()
    assert (torch.cat([first[1], rest[1]]) == expected[1]).all()
    # Resuming discards what was made ahead for the old position.
    with RowStream(corpus, tok, cfg, 127, seed=5, workers=2) as resumed:
        resumed.next_rows(40)
        resumed.load_state_dict(state)
        assert (resumed.next_rows(35)[0] == expected[0][25:]).all()
    with pytest.raises(ValueError, match="workers"):
        RowStream(corpus, tok, cfg, 127, seed=5, workers=-1)


def test_same_seed_same_rows_different_seed_different_rows(tok):
    texts = list(snippets(30, seed=7))
    a, b, c = (RowStream(texts, tok, ObjectiveConfig(), 255, seed).next_rows(6)[0] for seed in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()
    with pytest.raises(ValueError, match="seed"):
        RowStream(texts, tok, ObjectiveConfig(), 255, 2).load_state_dict(
            RowStream(texts, tok, ObjectiveConfig(), 255, 1).state_dict())


# --- configuration errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,match", [
    ({"causal_prob": 1.5}, "causal_prob"), ({"causal_prob": -0.1}, "causal_prob"),
    ({"causal_prob": float("nan")}, "causal_prob"),
    ({"min_ratio": 0.0}, "min_ratio"), ({"min_ratio": 0.6, "max_ratio": 0.5}, "min_ratio"),
    ({"max_ratio": 1.0}, "max_ratio"), ({"mean_extra_spans": -1.0}, "mean_extra_spans"),
    ({"mean_extra_spans": float("inf")}, "mean_extra_spans"), ({"max_spans": 0}, "max_spans"),
    ({"max_spans": 2.5}, "max_spans"),
])
def test_bad_config_raises(fields, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**fields)


def test_bad_stream_arguments_raise(tok):
    with pytest.raises(ValueError, match="mask tokens"):
        document_sequences("x = 1\n", tok, random.Random(0), ObjectiveConfig(max_spans=900), 100000)
    with pytest.raises(ValueError, match="mask tokens"):
        RowStream(["x = 1\n"], tok, ObjectiveConfig(max_spans=900), 100000, 0)
    with pytest.raises(ValueError, match="max_tokens"):
        RowStream(["x = 1\n"], tok, ObjectiveConfig(), 64, 0)  # 16 spans reserve more than 65 tokens
    with pytest.raises(ValueError, match="empty"):
        RowStream([], tok, ObjectiveConfig(), 255, 0)
    with pytest.raises(ValueError, match="seed"):
        RowStream(["x = 1\n"], tok, ObjectiveConfig(), 255, -1)
    with pytest.raises(ValueError, match="training sequence"):
        RowStream(["", ""], tok, ObjectiveConfig(), 255, 0).next_rows(1)
