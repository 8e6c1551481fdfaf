"""`codegen2 data build`: license detection, filters, dedup, splits, shards, determinism, TokenCorpus, CLI.

Every test builds a tiny source tree in tmp_path; builds run the worker in-process (workers=1) except where the
process pool itself is under test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from codegen2.tokenizer import load_tokenizer
from codegen2.train import cli as train_cli
from codegen2.train import data
from codegen2.train.corpus import SPLITS, TokenCorpus
from codegen2.train.data import build_corpus
from codegen2.train.licenses import (
    DEFAULT_LICENSES,
    classify_license_text,
    license_allowed,
    normalize_license,
)

MIT = """MIT License\n\nCopyright (c) 2024 Someone\n\nPermission is hereby granted, free of charge, to any person
obtaining a copy of this software and associated documentation files (the "Software"), to deal in the Software
without restriction...\n"""
BSD = """Copyright (c) 2024 Someone\n\nRedistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:\n..."""
BSD3 = BSD + """\n3. Neither the name of the copyright holder nor the names of its contributors may be used to
endorse or promote products derived from this software without specific prior written permission.\n"""
APACHE = "                                 Apache License\n                           Version 2.0, January 2004\n"
ISC = """Permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is
hereby granted, provided that the above copyright notice and this permission notice appear in all copies.\n"""
ZERO_BSD = """Permission to use, copy, modify, and/or distribute this software for any purpose with or without fee
is hereby granted.\n\nTHE SOFTWARE IS PROVIDED "AS IS"...\n"""
GPL3 = """                    GNU GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007\n...
  13. Use with the GNU Affero General Public License.\n"""
LGPL3 = """                   GNU LESSER GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007\n
  This version of the GNU Lesser General Public License incorporates the terms and conditions of version 3 of
the GNU General Public License, supplemented by the additional permissions listed below.\n"""
UNLICENSE = "This is free and unencumbered software released into the public domain.\n\nAnyone is free to copy"
ZLIB = "3. This notice may not be removed. 2. Altered source versions must be plainly marked as such, and must"
MPL = "Mozilla Public License Version 2.0\n==================================\n"
MIT0 = """MIT No Attribution\n\nCopyright 2024 Someone\n\nPermission is hereby granted, free of charge, to any person
obtaining a copy of this software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do so.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND...\n"""
CC0 = "Creative Commons Legal Code\n\nCC0 1.0 Universal\n\n    CREATIVE COMMONS CORPORATION IS NOT A LAW FIRM\n"
CPYTHON_LICENSE = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"


def code(seed: int, lines: int = 40) -> str:
    """Distinct, plausible Python: every line names the seed, so two seeds share no 5-word shingle."""
    body = "".join(f"    value_{seed}_{i} = compute_{(seed * 7 + i) % 97}(alpha_{i}, beta_{seed}, gamma_{i % 5})\n"
                   for i in range(lines))
    return f"def function_{seed}(alpha, beta):\n{body}    return value_{seed}_0\n"


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def build(src, out, **options) -> dict:
    options = {"workers": 1, "progress": False, **options}
    return build_corpus(src if isinstance(src, list) else [src], out, **options)


def kept(manifest: dict) -> dict[str, str]:
    return {f["path"]: f["license"] for f in manifest["files"]}


def dropped(**counts: int) -> dict[str, int]:
    return {reason: counts.get(reason.replace("-", "_"), 0) for reason in data.DROP_REASONS}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, kind="codegen2")


# --- license detection ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    (MIT, "MIT"), (BSD, "BSD-2-Clause"), (BSD3, "BSD-3-Clause"), (APACHE, "Apache-2.0"), (ISC, "ISC"),
    (ZERO_BSD, "0BSD"), (GPL3, "GPL"), (LGPL3, "LGPL"), (UNLICENSE, "Unlicense"), (ZLIB, "Zlib"), (MPL, "MPL-2.0"),
    (MIT0, "MIT-0"), (MIT0.replace("MIT No Attribution\n", ""), "MIT-0"), (CC0, "CC0-1.0"),
    ("# **MIT License**\n\n**Permission** is hereby granted, free of charge, to any person", "MIT"),  # markdown
    ("All rights reserved. Do not copy.", None),
])
def test_license_texts(text, expected):
    assert classify_license_text(text) == expected


def test_cpython_license_is_psf():
    # PSF first, the 0BSD text for the docs later, "GPL-compatible" all over: the earliest license text wins.
    assert classify_license_text(CPYTHON_LICENSE.read_text()) == "PSF-2.0"


@pytest.mark.parametrize("expr,spdx,expected", [
    ("Apache License 2.0 OR mit", False, "Apache-2.0 OR MIT"), ("BSD License", False, "BSD-3-Clause"),
    ("Simplified BSD", False, "BSD-2-Clause"), ("GNU General Public License v3 (GPLv3)", False, "GPL"),
    ("Python Software Foundation License", False, "PSF-2.0"), ("Proprietary", False, None), ("UNKNOWN", False, None),
    ("(mit OR apache-2.0) AND isc", True, "(MIT OR Apache-2.0) AND ISC"), ("LicenseRef-Mine", True, "LicenseRef-Mine"),
    ("GPL-2.0-only WITH Linux-syscall-note", True, "GPL-2.0-only"),
    ("MIT No Attribution License (MIT-0)", False, "MIT-0"),
    ("CC0 1.0 Universal (CC0 1.0) Public Domain Dedication", False, "CC0-1.0"), ("mit-0 AND cc0-1.0", True, "MIT-0 AND CC0-1.0"),
])
def test_normalize_license(expr, spdx, expected):
    assert normalize_license(expr, spdx=spdx) == expected


@pytest.mark.parametrize("expr,ok", [
    ("MIT", True), ("mit", True), ("MIT OR GPL-3.0", True), ("GPL-3.0 OR MIT", True), ("MIT AND GPL-3.0", False),
    ("MIT AND Apache-2.0", True), ("(GPL-3.0 OR MIT) AND Apache-2.0", True), ("GPL-3.0 OR MIT AND LGPL", False),
    ("GPL-3.0", False), ("MIT OR", False), ("(MIT", False), ("", False), (None, False), ("unknown", False),
    # as permissive as the rest, in the default list: MIT-0 and CC0-1.0, alone or combined
    ("MIT-0", True), ("CC0-1.0", True), ("MIT AND CC0-1.0", True), ("(Apache-2.0 AND CC0-1.0) OR GPL-3.0", True),
    ("CC0-1.0 AND GPL-3.0", False),
])
def test_license_allowed(expr, ok):
    assert license_allowed(expr, {lic.lower() for lic in DEFAULT_LICENSES}) is ok


def dist(site: Path, name: str, metadata: str, files: dict[str, str], licenses: dict[str, str] | None = None):
    """An installed distribution: modules, plus name-1.0.dist-info with METADATA and a RECORD listing them."""
    write(site, files)
    info = f"{name}-1.0.dist-info"
    record = [f"{path},sha256=x,1" for path in files] + [f"{info}/METADATA,,", f"{info}/RECORD,,"]
    write(site / info, {"METADATA": f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n{metadata}",
                        "RECORD": "\n".join(record) + "\n", **(licenses or {})})


def test_dist_info_licenses(tmp_path):
    site = tmp_path / "env" / "lib" / "site-packages"
    dist(site, "clspkg", "Classifier: Programming Language :: Python\nClassifier: License :: OSI Approved :: BSD "
         "License\n", {"clspkg/__init__.py": code(1),
                       # the distribution's metadata outranks a header in one of its files
                       "clspkg/core.py": "# SPDX-License-Identifier: GPL-3.0-only\n" + code(2)})
    dist(site, "exprpkg", "License-Expression: MIT OR Apache-2.0\nLicense: GPL\n", {"exprpkg/mod.py": code(3)})
    dist(site, "dual", "Classifier: License :: OSI Approved :: Apache Software License\n"
         "Classifier: License :: OSI Approved :: BSD License\n", {"dual.py": code(4)})
    dist(site, "gplpkg", "License: GPLv3\n", {"gplpkg/__init__.py": code(5)})
    dist(site, "filepkg", "License-File: LICENSE\n", {"filepkg.py": code(6)}, {"licenses/LICENSE": ISC})
    write(site, {"stray.py": code(7)})  # in no RECORD, no header, no LICENSE file: unknown
    m = build(tmp_path / "env", tmp_path / "out")
    prefix = "lib/site-packages/"
    assert kept(m) == {prefix + "clspkg/__init__.py": "BSD-3-Clause", prefix + "clspkg/core.py": "BSD-3-Clause",
                       prefix + "dual.py": "Apache-2.0 OR BSD-3-Clause", prefix + "exprpkg/mod.py": "MIT OR Apache-2.0",
                       prefix + "filepkg.py": "ISC"}
    assert m["refused_licenses"] == {"GPL": 1, "unknown": 1}
    assert m["dropped"] == dropped(license=2)
    # A source root that is one package finds its dist-info next to it.
    assert kept(build(site / "exprpkg", tmp_path / "out2")) == {"mod.py": "MIT OR Apache-2.0"}


def test_mit0_and_cc0_are_kept_by_default(tmp_path):
    # Found over a real stdlib + site-packages: 518 MIT-0 files and 473 under an AND including CC0-1.0 refused.
    site = tmp_path / "env" / "site-packages"
    dist(site, "zero", "License-Expression: MIT-0\n", {"zero.py": code(1)})
    dist(site, "cls", "Classifier: License :: OSI Approved :: MIT No Attribution License (MIT-0)\n", {"cls.py": code(2)})
    dist(site, "both", "License-File: LICENSE\nLicense-File: NOTICE\n", {"both.py": code(3)},
         {"licenses/LICENSE": MIT, "licenses/NOTICE": CC0})
    write(tmp_path / "env" / "src", {"LICENSE": MIT0, "s.py": code(4)})
    assert kept(build(tmp_path / "env", tmp_path / "out")) == {
        "site-packages/zero.py": "MIT-0", "site-packages/cls.py": "MIT-0", "site-packages/both.py": "CC0-1.0 AND MIT",
        "src/s.py": "MIT-0"}


def test_spdx_headers_and_license_files(tmp_path):
    src = write(tmp_path / "src", {
        "LICENSE": MIT, "a.py": code(1), "sub/deeper/b.py": code(2),  # LICENSE in an ancestor
        "sub/c.py": "# SPDX-License-Identifier: Apache-2.0\n" + code(3),  # a header beats the LICENSE file
        "gplproj/COPYING": GPL3, "gplproj/d.py": code(4), "gplproj/e.py": "# SPDX-License-Identifier: MIT\n" + code(5),
        "dual/or.py": "#!/usr/bin/env python\n# SPDX-License-Identifier: GPL-3.0-or-later OR MIT\n" + code(6),
        "dual/and.py": "/* SPDX-License-Identifier: MIT AND GPL-2.0 */\n" + code(7),
        "rust/LICENSE-MIT": MIT, "rust/LICENSE.md": APACHE, "rust/lib.py": code(8),  # LICENSE.md counts, -MIT not
    })
    write(tmp_path / "other", {"f.py": code(9)})  # no license anywhere
    m = build([src, tmp_path / "other"], tmp_path / "out")
    assert kept(m) == {
        "a.py": "MIT", "sub/deeper/b.py": "MIT", "sub/c.py": "Apache-2.0", "gplproj/e.py": "MIT",
        "dual/or.py": "GPL-3.0-or-later OR MIT", "rust/lib.py": "Apache-2.0"}
    assert m["refused_licenses"] == {"GPL": 1, "MIT AND GPL-2.0": 1, "unknown": 1}
    assert m["dropped"] == dropped(license=3)
    # A custom allow-list, compared case-insensitively.
    m = build(src, tmp_path / "out2", licenses=["apache-2.0"])
    assert sorted(kept(m)) == ["rust/lib.py", "sub/c.py"]


def test_stdlib_files_are_psf(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "shlex.py"]
    for name in [*names, "LICENSE.txt"]:
        shutil.copy(stdlib / name, tmp_path / name)
    m = build(tmp_path, tmp_path / "out")
    assert kept(m) == {name: "PSF-2.0" for name in names}
    assert m["licenses"]["PSF-2.0"]["files"] == 5


def test_declared_licenses(tmp_path):
    """The issue's case: a folder of the standard library, whose LICENSE.txt sits above it. Refused, the build
    says why and what to declare; declared, its files are kept under the declaration, recorded as declared,
    except where something nearer says otherwise."""
    lib = tmp_path / "lib"
    write(lib, {"LICENSE.txt": CPYTHON_LICENSE.read_text(), "json/a.py": code(1), "json/sub/b.py": code(2),
                "json/vendored/COPYING": GPL3, "json/vendored/c.py": code(3),
                "json/d.py": "# SPDX-License-Identifier: GPL-3.0-only\n" + code(4)})
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        build(lib / "json", out)
    msg = str(e.value)
    assert "empty corpus: all 4 files found in" in msg and "4 license" in msg
    assert "refused licenses: unknown (2), GPL (1), GPL-3.0-only (1); allowed: MIT, MIT-0," in msg
    assert f"--source-license {lib / 'json'}=PSF-2.0" in msg and str(lib / "LICENSE.txt") in msg
    assert not out.exists() or not (out / "manifest.json").exists()  # nothing written

    m = build(lib / "json", out, declared_licenses={lib / "json": "psf-2.0"})
    assert kept(m) == {"a.py": "PSF-2.0", "sub/b.py": "PSF-2.0"}  # the GPL dir and the GPL header still decide
    assert [f["license_from"] for f in m["files"]] == ["declared", "declared"]
    assert m["options"]["declared_licenses"] == {str(lib / "json"): "PSF-2.0"}
    assert m["refused_licenses"] == {"GPL": 1, "GPL-3.0-only": 1}

    # One's own code with no usable LICENSE file: declared, it is used whatever the allow-list says.
    mine = write(tmp_path / "mine", {"LICENSE": "Copyright me. All rights reserved.\n", "x.py": code(5),
                                     "lib/y.py": "# SPDX-License-Identifier: MIT\n" + code(6)})
    m = build([mine, lib / "json"], tmp_path / "out2", declared_licenses={str(mine): "LicenseRef-Proprietary"},
              licenses=["MIT"])
    assert kept(m) == {"x.py": "LicenseRef-Proprietary", "lib/y.py": "MIT"}
    assert [f["license_from"] for f in m["files"]] == ["declared", "header"]  # x.py, then lib/y.py

    with pytest.raises(ValueError, match=f"declared for {tmp_path / 'other'}, which is not one of the sources"):
        build(mine, tmp_path / "out3", declared_licenses={tmp_path / "other": "MIT"})
    with pytest.raises(ValueError, match="'MIT OR', is not an SPDX expression"):
        build(mine, tmp_path / "out3", declared_licenses={mine: "MIT OR"})
    write(tmp_path / "go", {"LICENSE": MIT, "main.go": "package main\n"})
    with pytest.raises(ValueError, match=r"none of .*go holds python files \(\.py\)"):
        build(tmp_path / "go", tmp_path / "out3")


# --- filters and dedup ---------------------------------------------------------------------------------------

class LossyTokenizer:
    """Decodes "é" as "e": a tokenizer for which some texts do not round-trip."""

    def __init__(self, tok):
        self.tok, self.vocab_size = tok, tok.vocab_size

    def encode(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids).replace("é", "e")


def test_filters(tmp_path, monkeypatch, tok):
    monkeypatch.setattr(data, "load_tokenizer", lambda *a, **k: LossyTokenizer(tok))
    src = write(tmp_path / "src", {
        "LICENSE": MIT, "ok.py": code(1),
        "huge.py": code(2, lines=200),  # > max_bytes below
        "nul.py": b"x = 1\x00\n", "latin1.py": "s = 'caf\xe9'\n".encode("latin-1"),
        "empty.py": "", "blank.py": " \n\t\n",
        "pb2.py": "# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + code(3),
        "auto.py": '"""Auto-generated file."""\n' + code(4),
        "min.py": "x = [" + ", ".join(map(str, range(400))) + "]\n",  # one 2,000-character line
        "wide.py": ("y = '" + "a" * 150 + "'\n") * 15,  # no huge line, but 150 characters on average
        "accent.py": "# café\n" + code(5),  # does not survive this tokenizer's decode
        "notes.md": "not a language we asked for", "README": "no extension",
        ".hidden/h.py": code(6), "pkg/__pycache__/c.py": code(7), ".git/hooks/x.py": code(8), "pkg/.dot.py": code(9),
    })
    (src / "pkg" / "loop").symlink_to(src / "pkg", target_is_directory=True)  # a symlink loop is not followed
    (src / "pkg" / "link.py").symlink_to(src / "ok.py")
    m = build(src, tmp_path / "out", max_bytes=3000)
    assert kept(m) == {"ok.py": "MIT"}
    assert m["dropped"] == dropped(huge=1, binary=2, empty=2, generated=2, minified=2, roundtrip=1)


def test_exact_and_near_duplicates(tmp_path):
    original = code(1, lines=60)
    lines = original.splitlines(keepends=True)
    near = "".join(lines[:30] + ["    changed_line = something_else(entirely)\n"] + lines[31:])
    src = write(tmp_path / "src", {"LICENSE": MIT, "a/x.py": original, "b/x.py": original, "c/near.py": near,
                                   "d/other.py": code(2, lines=60)})
    m = build(src, tmp_path / "out")
    assert sorted(kept(m)) == ["a/x.py", "d/other.py"]  # the first in sorted order is kept
    assert m["dropped"] == dropped(duplicate=1, near_duplicate=1)
    # A stricter threshold keeps the near copy.
    assert sorted(kept(build(src, tmp_path / "out2", near_dup_threshold=0.99))) == ["a/x.py", "c/near.py", "d/other.py"]


# --- outputs -------------------------------------------------------------------------------------------------

def mixed_tree(root: Path, n: int = 12) -> Path:
    files = {"LICENSE": BSD3, "main.go": "package main\n\nfunc main() {\n\tprintln(\"hi\")\n}\n",
             "lib.rs": "// SPDX-License-Identifier: MIT OR Apache-2.0\nfn main() {\r\n    println!(\"é 😀\");\r\n}\r\n",
             "tricky.py": "\ufeff# <|endoftext|> <mask_1> <eom> are plain text here\r\nx = '\\t\t  '\n\n\n"}
    files.update({f"pkg/m{i:02d}.py": code(i, lines=5 + 7 * i) for i in range(n)})
    return write(root, files)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_builds_are_deterministic_and_parallel_equals_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_TOKENS", 1000)  # several shards per split
    src = mixed_tree(tmp_path / "src")
    options = {"languages": ["python", "go", "rust"], "val_fraction": 0.3}
    build(src, tmp_path / "one", **options)
    build(src, tmp_path / "two", **options, workers=2)  # the spawn pool, results in order
    first = files_of(tmp_path / "one")
    assert len([n for n in first if n.endswith(".bin")]) > 2
    assert files_of(tmp_path / "two") == first
    # Rebuilding in place after the tree shrank: same bytes as a fresh build, no stale shards left behind.
    for p in (src / "pkg").glob("m1*.py"):
        p.unlink()
    build(src, tmp_path / "one", **options)
    build(src, tmp_path / "fresh", **options)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "fresh")


@pytest.mark.parametrize("kind", ["codegen2", "codegen25"])
def test_shards_round_trip(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(data, "SHARD_TOKENS", 700)
    src = mixed_tree(tmp_path / "src")
    m = build(src, tmp_path / "out", languages=["python", "go", "rust"], val_fraction=0.3, tokenizer_kind=kind)
    tok = load_tokenizer(None, kind=kind)
    assert m["tokenizer"] == kind
    n_docs = 0
    for split in SPLITS:
        corpus = TokenCorpus(tmp_path / "out", split)
        n_docs += len(corpus)
        assert len(corpus) == m["totals"][split]["files"] > 0
        assert corpus.n_tokens == sum(len(corpus.tokens(i)) for i in range(len(corpus)))
        for i in range(len(corpus)):
            original = Path(corpus.path(i)).read_bytes()
            assert corpus.text(i).encode() == original  # byte for byte: BOM, CRLF, tabs, control strings
            tokens = corpus.tokens(i)
            assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)  # a view, not a copy
            assert tokens.tolist() == tok.encode(original.decode())
        for k, shard in enumerate(m["shards"][split]):
            offsets = np.load(tmp_path / "out" / shard["idx"])
            docs = [f for f in m["files"] if f["split"] == split and f["shard"] == k]
            assert offsets.tolist() == [f["offset"] for f in docs] + [shard["tokens"]]
            assert (tmp_path / "out" / shard["bin"]).stat().st_size == 2 * shard["tokens"]
            assert shard["tokens"] <= 700 or len(docs) == 1
    assert n_docs == len(m["files"]) == 15


def test_manifest_counts(tmp_path, tok):
    src = write(tmp_path / "src", {"LICENSE": MIT, "a.py": code(1), "b.py": code(2), "c.go": "package c\n",
                                   "d.rs": "// SPDX-License-Identifier: Apache-2.0\nfn d() {}\n", "e.py": code(1),
                                   "f.py": "", "g.js": "// SPDX-License-Identifier: GPL-2.0\nlet g = 1;\n"})
    m = build(src, tmp_path / "out", languages=["python", "go", "rust", "javascript"], val_fraction=0)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == m
    texts = {name: (src / name).read_text() for name in ["a.py", "b.py", "c.go", "d.rs"]}
    n = {name: len(tok.encode(t)) for name, t in texts.items()}
    assert m["totals"] == {"train": {"files": 4, "bytes": sum(len(t.encode()) for t in texts.values()),
                                     "tokens": sum(n.values())},
                           "val": {"files": 0, "bytes": 0, "tokens": 0}}
    assert m["languages"] == {"go": {"files": 1, "tokens": n["c.go"]},
                              "python": {"files": 2, "tokens": n["a.py"] + n["b.py"]},
                              "rust": {"files": 1, "tokens": n["d.rs"]}}
    assert m["licenses"] == {"Apache-2.0": {"files": 1, "tokens": n["d.rs"]},
                             "MIT": {"files": 3, "tokens": n["a.py"] + n["b.py"] + n["c.go"]}}
    assert m["dropped"] == dropped(empty=1, license=1, duplicate=1)
    assert m["refused_licenses"] == {"GPL-2.0": 1}
    assert m["sources"] == [str(src)] and m["shards"]["val"] == []
    a = m["files"][0]
    assert a == {"path": "a.py", "source": 0, "sha256": hashlib.sha256(texts["a.py"].encode()).hexdigest(),
                 "language": "python", "license": "MIT", "license_from": "file", "bytes": len(texts["a.py"]),
                 "tokens": n["a.py"], "split": "train", "shard": 0, "offset": 0}
    assert [f["offset"] for f in m["files"]] == [0, n["a.py"], n["a.py"] + n["b.py"], sum(n.values()) - n["d.rs"]]


def in_val(sha: str, fraction: float) -> bool:
    return int(sha[:16], 16) < fraction * 2**64


def test_val_split_rule(tmp_path):
    src = write(tmp_path / "src", {"LICENSE": MIT, **{f"m{i}.py": code(i) for i in range(20)}})
    m = build(src, tmp_path / "out", val_fraction=0.5)
    assert [f["split"] == "val" for f in m["files"]] == [in_val(f["sha256"], 0.5) for f in m["files"]]
    assert 0 < m["totals"]["val"]["files"] < 20
    # Adding files moves no other file between splits.
    write(src, {f"n{i}.py": code(100 + i) for i in range(5)})
    again = {f["path"]: f["split"] for f in build(src, tmp_path / "out2", val_fraction=0.5)["files"]}
    assert all(again[f["path"]] == f["split"] for f in m["files"])

    # A fraction that leaves val empty: the document with the smallest hash goes there.
    small = write(tmp_path / "small", {"LICENSE": MIT, **{f"m{i}.py": code(i) for i in range(3)}})
    m = build(small, tmp_path / "out3", val_fraction=1e-6)
    assert not any(in_val(f["sha256"], 1e-6) for f in m["files"])
    assert [f["path"] for f in m["files"] if f["split"] == "val"] == [min(m["files"], key=lambda f: f["sha256"])["path"]]
    assert (m["totals"]["train"]["files"], m["totals"]["val"]["files"]) == (2, 1)
    # One document stays in train; val_fraction=0 means no val at all.
    for name in ("m1.py", "m2.py"):
        (small / name).unlink()
    assert build(small, tmp_path / "out4", val_fraction=1e-6)["totals"]["val"]["files"] == 0
    assert build(src, tmp_path / "out5", val_fraction=0)["totals"]["val"]["files"] == 0


# --- errors and the command line -----------------------------------------------------------------------------

def test_bad_options_and_corpora(tmp_path):
    src = write(tmp_path / "src", {"LICENSE": MIT, "a.py": code(1), "b.py": code(2)})
    with pytest.raises(ValueError, match=r"'cobol'.*known: python, c, c\+\+.*vue"):
        build(src, tmp_path / "out", languages=["python", "cobol"])
    with pytest.raises(ValueError, match="not found: .*missing"):
        build([src, tmp_path / "missing"], tmp_path / "out")
    for bad in [{"val_fraction": 1.0}, {"near_dup_threshold": 0.0}, {"max_bytes": 0}, {"workers": 0},
                {"licenses": []}, {"tokenizer_kind": "gpt2"}]:
        with pytest.raises(ValueError):
            build(src, tmp_path / "out", **bad)
    with pytest.raises(ValueError, match="no manifest.json"):
        TokenCorpus(tmp_path)

    build(src, tmp_path / "out", val_fraction=0.5)
    with pytest.raises(ValueError, match="unknown split 'test'; expected one of train, val"):
        TokenCorpus(tmp_path / "out", "test")
    shard = tmp_path / "out" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train-00000.bin is missing or has the wrong size"):
        TokenCorpus(tmp_path / "out")
    (tmp_path / "out" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        TokenCorpus(tmp_path / "out")


def test_a_failed_build_leaves_the_previous_one(tmp_path, monkeypatch):
    src = write(tmp_path / "src", {"LICENSE": MIT, "a.py": code(1), "b.py": code(2)})
    build(src, tmp_path / "out")
    before = files_of(tmp_path / "out")
    write(src, {"c.py": code(3)})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(data, "_write_shards", crash)
    with pytest.raises(OSError, match="disk full"):
        build(src, tmp_path / "out")
    assert files_of(tmp_path / "out") == before  # and no staging directory left behind
    assert len(TokenCorpus(tmp_path / "out")) + len(TokenCorpus(tmp_path / "out", "val")) == 2


def cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="codegen2")
    train_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    train_cli.run(parser.parse_args(argv))


def test_cli(tmp_path, capsys):
    src = write(tmp_path / "src", {"LICENSE": MIT, "a.py": code(1), "b.go": "package b\n", "c.go": "package c\n"})
    out = str(tmp_path / "out")
    cli(["data", "build", "--source", str(src), "--out", out, "--language", "python", "--language", "go",
         "--licenses", "MIT, ISC", "--workers", "1", "--val-fraction", "0.2"])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "languages: go 2, python 1" in printed and "licenses: MIT 3" in printed
    cli(["data", "info", out])
    assert "train:" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["licenses"] == ["MIT", "ISC"]

    with pytest.raises(SystemExit, match="error: .* is not a built corpus"):
        cli(["data", "info", str(src)])
    with pytest.raises(SystemExit, match="error: sources must be existing directories"):
        cli(["data", "build", "--source", str(tmp_path / "nope"), "--out", out])
    mine = write(tmp_path / "mine", {"x.py": code(5)})  # no license anywhere: refused unless declared
    with pytest.raises(SystemExit, match=r"error: empty corpus: all 1 files .* 1 license\nrefused licenses: unknown"):
        cli(["data", "build", "--source", str(mine), "--out", out, "--workers", "1"])
    cli(["data", "build", "--source", str(mine), "--source-license", f"{mine}=LicenseRef-Mine", "--out", out])
    assert "licenses: LicenseRef-Mine 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: --source-license 'MIT' is not of the form DIR=SPDX"):
        cli(["data", "build", "--source", str(mine), "--source-license", "MIT", "--out", out])
    with pytest.raises(SystemExit, match=f"error: a license is declared for {src}, which is not one of the sources"):
        cli(["data", "build", "--source", str(mine), "--source-license", f"{src}=MIT", "--out", out])
    with pytest.raises(SystemExit, match="error: need at least one language and one allowed license"):
        cli(["data", "build", "--source", str(src), "--out", out, "--licenses", " , "])
    for argv in (["data", "build", "--source", str(src), "--out", out, "--language", "cobol"],
                 ["data", "build", "--source", str(src), "--out", out, "--tokenizer", "gpt2"],
                 ["data", "build", "--out", out], ["data"]):
        with pytest.raises(SystemExit) as e:  # argparse: usage and exit status 2
            cli(argv)
        assert e.value.code == 2
    assert "invalid choice: 'cobol'" in capsys.readouterr().err
