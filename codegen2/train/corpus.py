"""Reading a built corpus (``codegen2 data build``, data.py): its manifest and each document's token ids.

What this is not: building one (data.py) or turning documents into training rows (objective.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from codegen2.tokenizer import load_tokenizer

FORMAT = 1
SPLITS = ("train", "val")
SHARD_FILE = re.compile(r"(train|val)-\d{5}\.(bin|idx\.npy)")


def read_manifest(path: str | Path) -> dict:
    """A built corpus's manifest, with clear errors for anything else."""
    f = Path(path) / "manifest.json"
    if not f.is_file():
        raise ValueError(f"{path} is not a built corpus: it has no manifest.json (make one with `codegen2 data "
                         "build`; a build that crashed leaves none)")
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{f}: expected a corpus manifest of format {FORMAT}")
    if missing := {"tokenizer", "sources", "totals", "shards", "files"} - manifest.keys():
        raise ValueError(f"{f} is corrupt: it lacks {', '.join(sorted(missing))}")
    return manifest


class TokenCorpus:
    """One split of a built corpus: document ``i``'s tokens (memory-mapped, no copy), text and source path."""

    def __init__(self, path: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.root, self.split = Path(path), split
        self.manifest = read_manifest(self.root)
        self._docs = [e for e in self.manifest["files"] if e["split"] == split]
        self._shards = []
        for shard in self.manifest["shards"][split]:
            f = self.root / shard["bin"]
            if not f.is_file() or f.stat().st_size != 2 * shard["tokens"]:
                raise ValueError(f"{f} is missing or has the wrong size (expected {2 * shard['tokens']} bytes); "
                                 "rebuild the corpus")
            self._shards.append(np.memmap(f, dtype="<u2", mode="r"))
        self._tokenizer = None

    def __len__(self) -> int:
        return len(self._docs)

    def __reduce__(self):  # pickled (for RowStream's worker processes) as its path: the shards are re-mapped
        return (TokenCorpus, (str(self.root), self.split))

    @property
    def n_tokens(self) -> int:
        return self.manifest["totals"][self.split]["tokens"]

    def tokens(self, i: int) -> np.ndarray:
        """Document ``i``'s token ids: a uint16 view into its shard."""
        e = self._docs[i]
        return self._shards[e["shard"]][e["offset"]:e["offset"] + e["tokens"]]

    def text(self, i: int) -> str:
        """Document ``i``'s text, exactly as the file read (the build checked that decoding restores it).
        Training reads ``tokens``; this is for people and for picking held-out examples."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(None, kind=self.manifest["tokenizer"])
        return self._tokenizer.decode(self.tokens(i).tolist())

    def path(self, i: int) -> str:
        """The file document ``i`` was read from: its source root joined with its source-relative path."""
        e = self._docs[i]
        return str(Path(self.manifest["sources"][e["source"]]) / e["path"])


def summary(manifest: dict) -> str:
    """A few lines for people: sources, per-split totals, file counts by language and license, drops."""
    lines = [f"tokenizer {manifest['tokenizer']}; sources: {', '.join(manifest['sources'])}"]
    lines += [f"{s}: {t['files']} files, {t['bytes']:,} bytes, {t['tokens']:,} tokens, "
              f"{len(manifest['shards'][s])} shard(s)" for s, t in manifest["totals"].items()]
    for key in ("languages", "licenses", "dropped", "refused_licenses"):
        counts = ", ".join(f"{k} {v['files'] if isinstance(v, dict) else v}" for k, v in manifest[key].items() if v)
        lines.append(f"{key.replace('_', ' ')}: {counts or '-'}")
    return "\n".join(lines)
