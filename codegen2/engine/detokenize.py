"""Per-sequence text: token ids in, safe-to-show text out, and which stop fired.

Text is produced by an incremental UTF-8-safe decoder and a stop-string matcher, so streamed text never contains
half a character or any part of a stop string. What this is not: sampling or scheduling; it sees one sequence.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codegen2.tokenizer import Tokenizer


class StopStrings:
    """Finds stop strings across token boundaries and holds back text that might still become one."""

    def __init__(self, stops: Seq[str]) -> None:
        self.stops = list(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0
        self.hit: str | None = None  # the stop string that was found

    def feed(self, chunk: str) -> tuple[str, bool]:
        """Add decoded text; return (text that is safe to emit now, whether a stop string was found)."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += chunk
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        end = min(hits)[0] if hits else len(self.text) - self._held_back()
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        if hits:
            # The earliest match; of two starting at the same place, the one listed first.
            self.hit = next(s for s in self.stops if (end, s) in hits)
            self.text = self.text[:end]
        return out, bool(hits)

    def _held_back(self) -> int:
        # The longest tail of the text that is a proper prefix of some stop string.
        for n in range(min(len(self.text), self.longest - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def rest(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


class MinIndent:
    """llama.cpp's n_indent rule: after the first generated line break, a line whose leading spaces and tabs (each
    counts 1) are fewer than ``n`` ends the text before its first other character, an empty line included.
    Text at the start of a line is held back until its indentation is known, so a cut never takes back text
    already shown."""

    def __init__(self, n: int) -> None:
        self.n, self.at_line_start, self.held = n, False, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether the rule cut the text here)."""
        if not self.n:
            return text, False
        text, self.held, out = self.held + text, "", []
        while text:
            if not self.at_line_start:
                i = text.find("\n")
                if i < 0:
                    out.append(text)
                    break
                out.append(text[:i + 1])
                text, self.at_line_start = text[i + 1:], True
                continue
            indent = len(text) - len(text.lstrip(" \t"))
            if indent == len(text):  # only indentation so far: wait for the line's first other character
                self.held = text
                break
            if indent < self.n:
                out.append(text[:indent])
                return "".join(out), True
            self.at_line_start = False
        return "".join(out), False

    def rest(self) -> str:
        out, self.held = self.held, ""
        return out


class TextStream:
    """One sequence's text: ``push`` each generated token, ``finish`` when it ends for another reason."""

    def __init__(self, tokenizer: Tokenizer, stops: Seq[str], min_indent: int = 0) -> None:
        self.decoder = tokenizer.incremental_decoder()
        self.stops = StopStrings(stops)
        self.indent = MinIndent(min_indent)

    def push(self, token: int) -> tuple[str, str | None, bool]:
        """(new text safe to show, the stop string found or None, whether the indentation rule ended it)."""
        text, hit = self.stops.feed(self.decoder.push(token))
        text, cut = self.indent.feed(text)
        if hit and not cut:  # the text ends at the stop string: indentation held before it is part of it
            text += self.indent.rest()
        return text, self.stops.hit if hit and not cut else None, cut

    def finish(self) -> tuple[str, str | None, bool]:
        """Release what the decoder and the matchers hold back, as ``push`` reports it."""
        text, hit = self.stops.feed(self.decoder.flush())
        if not hit:
            text += self.stops.rest()
        text, cut = self.indent.feed(text)
        if not cut:
            text += self.indent.rest()
        return text, self.stops.hit if hit and not cut else None, cut
