"""The infill format, in one place: building prompts and extracting the generated middles.

CodeGen2 and CodeGen2.5 share one format (their model cards), only the ids differ per tokenizer:

    prompt:   piece_0 <mask_1> piece_1 <mask_2> ... <mask_N> piece_N <|endoftext|> <sep> <mask_1>
    model:    middle_1 <eom> <mask_2> middle_2 <eom> ... <mask_N> middle_N <eom>

With one hole that is ``prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>`` and the middle ends at ``<eom>``.
Generation must also end at ``<|endoftext|>`` and never at the configs' eos id 2 (which is ``#``, and follows
every indentation token in CodeGen2's tokenizer: stopping there ends at the first indented comment).

User text (prefix, suffix) is encoded with ``Tokenizer.encode``, which treats control-token strings as plain text,
so a file containing ``<eom>`` cannot end or restructure the prompt; the control ids are added here and only here.
Each piece is tokenized on its own, exactly as at training time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codegen2.tokenizer import Tokenizer


@dataclass
class Infill:
    """An infill request: generate the middle between ``prefix`` and ``suffix``."""

    prefix: str
    suffix: str


def infill_prompt(tokenizer: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """Ids of the one-hole prompt ``prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>``."""
    return multi_infill_prompt(tokenizer, [prefix, suffix])


def _tokens_at(tokenizer: Tokenizer, text: str, n: int, end: bool) -> tuple[list[int], str]:
    """The ids of a window of ``text`` at its end (or start) holding more than n tokens, or of all of it, and
    the window. A token is at most max_token_bytes long, so windows grow from 8 characters a token and double;
    a 3 MB file near the hole costs a few thousand characters of tokenizing, not 3 MB (10 s for CodeGen2)."""
    width = 8 * (n + 2)
    while True:
        window = text[-width:] if end else text[:width]
        ids = tokenizer.encode(window)
        if len(window) == len(text) or len(ids) > n + 2:
            return ids, window
        width *= 2


def _cut(tokenizer: Tokenizer, ids: list[int], window: str, keep: int, end: bool) -> str:
    """The text of the last (or first) ``keep`` tokens of window's ids, cut from the window by their byte length
    (so it is exactly a piece of the window), moved to a character boundary if a token split a character."""
    data = window.encode("utf-8")
    kept = ids[len(ids) - keep:] if end else ids[:keep]
    n = sum(len(tokenizer.token_bytes(t)) for t in kept)
    piece = data[len(data) - n:] if end else data[:n]
    return piece.decode("utf-8", errors="ignore")  # drops only the bytes of a split character at the cut


def fit_infill(tokenizer: Tokenizer, prefix: str, suffix: str, room: int) -> tuple[list[int], bool]:
    """The one-hole prompt in at most ``room`` tokens, and whether text had to be cut to get there.

    A prompt that does not fit keeps the end of the prefix and the start of the suffix, as llama.cpp's /infill
    does: the suffix keeps at least a quarter of the budget when it is that long, the prefix gets the rest. The
    kept pieces are re-tokenized as text, which can change a few tokens at the cut, hence 8 tokens of slack, then
    a check."""
    budget = max(room - 4 - 8, 2)  # 4 control tokens: <mask_1> ... <|endoftext|> <sep> <mask_1>
    pre, pre_window = _tokens_at(tokenizer, prefix, budget, end=True)
    suf, suf_window = _tokens_at(tokenizer, suffix, budget, end=False)
    if len(pre_window) == len(prefix) and len(suf_window) == len(suffix) and len(pre) + len(suf) + 4 <= room:
        ids = infill_prompt(tokenizer, prefix, suffix)
        if len(ids) <= room:
            return ids, False
    while True:  # len(pre), len(suf): exact for a whole piece, else more than the budget, which is all it needs
        keep_s = min(len(suf), max(budget // 4, budget - len(pre)))
        keep_p = min(len(pre), budget - keep_s)
        ids = infill_prompt(tokenizer, _cut(tokenizer, pre, pre_window, keep_p, end=True),
                            _cut(tokenizer, suf, suf_window, keep_s, end=False))
        if len(ids) <= room or budget <= 2:
            return ids, True
        budget = max(budget - (len(ids) - room), 2)


def multi_infill_prompt(tokenizer: Tokenizer, pieces: Sequence[str]) -> list[int]:
    """Ids of a prompt with ``len(pieces) - 1`` holes, one between each pair of consecutive pieces."""
    if len(pieces) < 2:
        raise ValueError(f"an infill prompt needs at least two pieces (prefix and suffix), got {len(pieces)}")
    ids = tokenizer.encode(pieces[0])
    for n, piece in enumerate(pieces[1:], start=1):
        ids += [tokenizer.mask_id(n)] + tokenizer.encode(piece)
    return ids + [tokenizer.eos_id, tokenizer.sep_id, tokenizer.mask_id(1)]


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens that end a one-hole infill: <eom>, and <|endoftext|> in case the model skips <eom>."""
    return [tokenizer.eom_id, tokenizer.eos_id]


def split_middles(tokenizer: Tokenizer, generated: Sequence[int], n_holes: int = 1) -> tuple[list[list[int]], bool]:
    """Generated ids (after the prompt) -> the ids of each middle, and whether all ``n_holes`` were closed.

    Each middle ends at <eom>; the <mask_k> the model writes before middle k (k >= 2) is dropped. Everything
    after <|endoftext|> or after the last expected <eom> is ignored. An unfinished last middle is returned as is.
    """
    middles: list[list[int]] = [[]]
    masks = {tokenizer.mask_id(k) for k in range(2, n_holes + 1)}
    for tok in generated:
        if tok == tokenizer.eos_id:
            break
        if tok == tokenizer.eom_id:
            if len(middles) == n_holes:
                return middles, True
            middles.append([])
            continue
        if tok in masks and not middles[-1]:
            continue
        middles[-1].append(tok)
    return middles, False


def extract_middles(tokenizer: Tokenizer, generated: Sequence[int], n_holes: int = 1) -> tuple[list[str], bool]:
    """Like ``split_middles``, decoded to text."""
    middles, complete = split_middles(tokenizer, generated, n_holes)
    return [tokenizer.decode(m) for m in middles], complete


def is_finished(tokenizer: Tokenizer, generated: Sequence[int], n_holes: int = 1) -> bool:
    """True once the model closed every hole or ended the document."""
    return tokenizer.eos_id in generated or sum(t == tokenizer.eom_id for t in generated) >= n_holes


def training_sequence(tokenizer: Tokenizer, pieces: Sequence[str], middles: Sequence[str]) -> list[int]:
    """The full span-corruption sequence: the prompt for ``pieces`` followed by every middle and its <eom>.

    ``pieces[i] + middles[i] + pieces[i + 1] ...`` is the original text; training uses this as one example.
    """
    if len(middles) != len(pieces) - 1:
        raise ValueError(f"{len(pieces)} pieces need {len(pieces) - 1} middles, got {len(middles)}")
    ids = multi_infill_prompt(tokenizer, pieces)
    for n, middle in enumerate(middles, start=1):
        if n > 1:
            ids.append(tokenizer.mask_id(n))
        ids += tokenizer.encode(middle) + [tokenizer.eom_id]
    return ids
