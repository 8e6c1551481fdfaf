"""Tokenizers for CodeGen2 and CodeGen2.5 behind one interface.

What this is:
- ``CodeGen2Tokenizer``: the published ``tokenizer.json`` run by the ``tokenizers`` library. Its ids are the
  reference fast tokenizer's ids (the slow GPT2Tokenizer of transformers 4.31 is broken for code: it strips
  whitespace next to the added whitespace and mask tokens, dropping newlines and whole indents).
- ``CodeGen25Tokenizer``: the CodeGen2.5 tiktoken encoding rebuilt without transformers or remote code: GPT-2
  ranks, whitespace runs appended as BPE ranks, StarCoder/infill control tokens as tiktoken special tokens.
- ``IncrementalDecoder``: streaming decode that never emits half a UTF-8 character.
- ``load_tokenizer``: picks the right one for a model directory.

What this is not: no padding, truncation, attention masks or chat templates, and no BOS/EOS is added.
``encode`` treats user text as plain text: a control string such as ``"<eom>"`` in a source file becomes
ordinary BPE pieces, so user input can never forge an infill or end-of-text marker. Prompt builders that need
control ids use ``mask_id``/``sep_id``/... or ``encode_with_control_tokens``.
"""

from __future__ import annotations

import abc
import codecs
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tiktoken
import tokenizers
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "codegen2-tokenizer"
VOCAB_SIZE = 51200
N_GPT2_RANKS = 50256  # mergeable GPT-2 ranks; <|endoftext|> = 50256 comes after them
ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenizer regex in tiktoken's current (possessive) form. It gives the same ids as the tiktoken 0.4
# pattern CodeGen2.5 was published with (checked on whitespace edge cases, trailing indentation included), and
# possessive matching avoids backtracking on long runs.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
STARCODER_TOKENS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
                    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
                    "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
                    "<commit_after>", "<reponame>"]
# The files tiktoken.get_encoding("gpt2") downloads (to $TIKTOKEN_CACHE_DIR, named sha1(url)), with the sha256
# it verifies.
_GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class IncrementalDecoder:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character.

    A byte-level token can end in the middle of a character (an emoji is often 2-4 tokens); the bytes are held
    back until the character completes. ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # Python's incremental UTF-8 decoder replaces invalid bytes exactly as bytes.decode(errors="replace") does.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        """Add one token; return the text it completed (possibly "")."""
        return self._utf8.decode(self._tokenizer.token_bytes(id))

    def flush(self) -> str:
        """End of stream: return what is held back, with U+FFFD for an incomplete character."""
        return self._utf8.decode(b"", final=True)


class Tokenizer(abc.ABC):
    """Common interface. Subclasses fill ``_table`` (id -> bytes), ``_special`` (control name -> id) and
    ``_n_masks``, and implement the two encoders."""

    kind: str
    vocab_size: int
    max_token_bytes: int
    eos_id: int
    sep_id: int
    eom_id: int
    _table: list[bytes]
    _special: dict[str, int]
    _n_masks: int

    def _set_control_ids(self) -> None:
        self.vocab_size = len(self._table)
        # No token is longer than this (128 bytes for both families): a text of more than n * this many bytes
        # surely encodes to more than n tokens, which callers can tell without encoding it.
        self.max_token_bytes = max(map(len, self._table))
        self.eos_id = self._special[ENDOFTEXT]
        self.sep_id = self._special["<sep>"]
        self.eom_id = self._special["<eom>"]
        self._n_masks = sum(name.startswith("<mask_") for name in self._special)

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Encode user text; control-token strings in it are plain text, whitespace runs still merge."""

    @abc.abstractmethod
    def encode_with_control_tokens(self, text: str) -> list[int]:
        """Encode like the official tokenizer: control strings in ``text`` become their ids. For prompt
        building and tests only: never pass untrusted text through this."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel where the backend can."""
        return [self.encode(t) for t in texts]

    def mask_id(self, n: int) -> int:
        """Id of ``<mask_n>`` (= 51200 - n for both families)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self._n_masks:
            raise ValueError(f"{self.kind} has mask tokens <mask_1> .. <mask_{self._n_masks}>, got n={n!r}")
        return self._special[f"<mask_{n}>"]

    def special_ids(self) -> dict[str, int]:
        """Every control token name -> id (not the whitespace-run tokens)."""
        return dict(self._special)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token; control tokens give their UTF-8 text."""
        if not 0 <= id < len(self._table):
            raise ValueError(f"token id {id} is outside the vocabulary [0, {len(self._table)})")
        return self._table[id]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Control tokens appear as their text; invalid UTF-8 becomes U+FFFD."""
        ids = list(ids)
        if ids and not (0 <= min(ids) and max(ids) < len(self._table)):
            bad = next(i for i in ids if not 0 <= i < len(self._table))
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {len(self._table)})")
        table = self._table
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character map used in vocab.json / tokenizer.json.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) were shifted to
    U+0100 onwards in byte order so that every token string is printable."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return {c: b for b, c in chars.items()}


def _is_whitespace_run(content: str) -> bool:
    return content != "" and set(content) <= {" ", "\t"}


class CodeGen2Tokenizer(Tokenizer):
    """CodeGen2 (all sizes): GPT-2 byte-level BPE plus 943 added tokens, from ``tokenizer.json``."""

    kind = "codegen2"

    def __init__(self, path: str | Path | None = None) -> None:
        path = Path(path) if path is not None else BUNDLED_DIR / "tokenizer.json"
        spec = json.loads(path.read_text(encoding="utf-8"))
        # The reference: every added token (whitespace runs and control strings) is split out before BPE.
        self._full = tokenizers.Tokenizer.from_str(json.dumps(spec))
        # For user text keep only the whitespace-run added tokens: control strings then fall through to
        # byte-level BPE, and text without control strings gets exactly the reference ids, because removing
        # patterns that never match cannot change the leftmost-longest matches of the others.
        added = spec["added_tokens"]
        spec["added_tokens"] = [t for t in added if _is_whitespace_run(t["content"])]
        self._plain = tokenizers.Tokenizer.from_str(json.dumps(spec))

        byte_of = _byte_decoder()
        pieces = {i: bytes(byte_of[c] for c in s) for s, i in spec["model"]["vocab"].items()}
        pieces.update({t["id"]: t["content"].encode("utf-8") for t in added})  # added tokens are literal text
        if sorted(pieces) != list(range(len(pieces))):
            raise ValueError(f"{path}: token ids are not contiguous from 0")
        self._table = [pieces[i] for i in range(len(pieces))]
        self._special = {t["content"]: t["id"] for t in added if not _is_whitespace_run(t["content"])}
        self._set_control_ids()

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_control_tokens(self, text: str) -> list[int]:
        return self._full.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]


def _tiktoken_gpt2_cached() -> bool:
    """True when tiktoken's cache already holds both verified gpt2 files, so get_encoding("gpt2") will not
    touch the network (offline it can otherwise hang on DNS/connect timeouts). Mirrors tiktoken.load."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":  # caching disabled: tiktoken would always download
        return False
    for url, sha256 in _GPT2_FILES.items():
        cached = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
        if not cached.is_file() or hashlib.sha256(cached.read_bytes()).hexdigest() != sha256:
            return False
    return True


def _gpt2_ranks_from_files(vocab_json: Path, merges_txt: Path) -> dict[bytes, int]:
    """GPT-2's 50,256 mergeable ranks from a Hugging Face vocab.json + merges.txt pair, offline.

    The HF files may carry more than GPT-2 (CodeGen2's whitespace tokens, for example), and tiktoken's loader
    asserts that vocab and merges agree exactly, so only the first 50,000 merges and the ids below 50,256 are
    handed to it, through temporary files (it reads only paths or URLs)."""
    vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
    lines = merges_txt.read_text(encoding="utf-8").split("\n")
    # Drop the "#version" header (merges themselves may start with "#", e.g. "# #") and blank lines.
    lines = [ln for ln in lines[1 if lines[0].startswith("#version") else 0:] if ln]
    with tempfile.TemporaryDirectory() as tmp:
        v, m = Path(tmp) / "encoder.json", Path(tmp) / "vocab.bpe"
        v.write_text(json.dumps({s: i for s, i in vocab.items() if i < N_GPT2_RANKS}), encoding="utf-8")
        # The loader skips the first line (the "#version" header) and the last (empty after the final "\n").
        m.write_text("\n".join(["#version: 0.2", *lines[: N_GPT2_RANKS - 256], ""]), encoding="utf-8")
        ranks = data_gym_to_mergeable_bpe_ranks(str(m), str(v))
    if len(ranks) != N_GPT2_RANKS:
        raise ValueError(f"{vocab_json} + {merges_txt}: expected {N_GPT2_RANKS} GPT-2 ranks, got {len(ranks)}")
    return ranks


class CodeGen25Tokenizer(Tokenizer):
    """CodeGen2.5: tiktoken GPT-2 with whitespace-run ranks and control tokens appended, as the official remote
    ``tokenization_codegen25.py`` builds it: 31..2 spaces then 9..2 tabs as BPE ranks 50257-50294, then the 18
    StarCoder tokens, <dummy_0..3>, <sep> 50317, <eom> 50318 and <mask_N> = 51200 - N (N = 1..881) as specials.
    It reproduces the three published third-party test vectors (tests/test_tokenizer.py)."""

    kind = "codegen25"

    def __init__(self, vocab_json: str | Path | None = None, merges_txt: str | Path | None = None) -> None:
        if vocab_json is None and merges_txt is None and _tiktoken_gpt2_cached():
            gpt2 = tiktoken.get_encoding("gpt2")
            ranks = {gpt2.decode_single_token_bytes(i): i for i in range(N_GPT2_RANKS)}
        else:
            ranks = _gpt2_ranks_from_files(Path(vocab_json or BUNDLED_DIR / "vocab.json"),
                                           Path(merges_txt or BUNDLED_DIR / "merges.txt"))
        # Whitespace runs are *mergeable* ranks (not special tokens), longest first: 31..2 spaces, then
        # 9..2 tabs. As ranks they apply after the regex split, which is why "\n    return" keeps one space
        # attached to " return" here, unlike CodeGen2.
        runs = [b" " * n for n in range(31, 1, -1)] + [b"\t" * n for n in range(9, 1, -1)]
        ranks.update({run: N_GPT2_RANKS + 1 + k for k, run in enumerate(runs)})  # 50257 .. 50294
        names = [*STARCODER_TOKENS, *(f"<dummy_{k}>" for k in range(4)), "<sep>", "<eom>"]
        n_masks = VOCAB_SIZE - (len(ranks) + 1 + len(names))  # the masks fill the vocabulary up to 51200: 881
        names += [f"<mask_{n}>" for n in range(n_masks, 0, -1)]  # <mask_N> = 51200 - N
        self._special = {ENDOFTEXT: N_GPT2_RANKS}
        self._special.update({name: len(ranks) + 1 + k for k, name in enumerate(names)})
        self._enc = tiktoken.Encoding(name="codegen25", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self._special, explicit_n_vocab=VOCAB_SIZE)
        self._table = [self._enc.decode_single_token_bytes(i) for i in range(VOCAB_SIZE)]
        self._set_control_ids()

    def encode(self, text: str) -> list[int]:
        # encode_ordinary == encode(text, allowed_special=set(), disallowed_special=()): specials are text.
        return self._enc.encode_ordinary(text)

    def encode_with_control_tokens(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_tokenizer(source: str | Path | None = None, kind: str | None = None) -> Tokenizer:
    """The tokenizer for a model directory, or the bundled one for ``kind`` when ``source`` is None.

    A directory with tokenizer.json is CodeGen2-style. CodeGen2.5 is recognised by ``kind="codegen25"``, a
    tokenizer_config.json naming CodeGen25Tokenizer (its official tokenizer is remote code), or a LLaMA
    config.json; it uses the directory's vocab.json/merges.txt when both exist. A CodeGen config.json without
    tokenizer files gets the bundled CodeGen2 tokenizer (identical for all sizes)."""
    if kind not in (None, "codegen2", "codegen25"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'codegen2' or 'codegen25'")
    if source is None:
        return CodeGen25Tokenizer() if kind == "codegen25" else CodeGen2Tokenizer()
    d = Path(source)
    if not d.is_dir():
        raise ValueError(f"tokenizer source {str(d)!r} is not a directory")
    if (d / "tokenizer.json").is_file():
        return CodeGen2Tokenizer(d / "tokenizer.json")
    tok_cfg, cfg = _read_json(d / "tokenizer_config.json"), _read_json(d / "config.json")
    names_cg25 = "CodeGen25Tokenizer" in json.dumps([tok_cfg.get("tokenizer_class"), tok_cfg.get("auto_map")])
    if kind == "codegen25" or names_cg25 or cfg.get("model_type") == "llama":
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return CodeGen25Tokenizer(d / "vocab.json", d / "merges.txt")
        return CodeGen25Tokenizer()
    if cfg.get("model_type") == "codegen":
        return CodeGen2Tokenizer()
    raise ValueError(f"cannot tell which tokenizer {str(d)!r} needs: it has no tokenizer.json, no "
                     "tokenizer_config.json naming CodeGen25Tokenizer, and no config.json with model_type "
                     "'codegen' or 'llama'")
