"""Tokenizer tests. Each compares against something independent of codegen2/tokenizer.py:

- CodeGen2: transformers' fast tokenizer on the published tokenizer.json (the reference ids), over every .py
  file of the standard library and hand-made whitespace/unicode edge cases, plus the model card's examples.
- CodeGen2.5: the published third-party test vectors and the known whitespace splits (where CodeGen2.5's BPE
  ranks differ from CodeGen2's added tokens), and the GPT-2 base cross-checked against the CodeGen2 reference
  on text where the two families must agree.
- Decoding: round trips, transformers' per-token decode, and Python's own UTF-8 decoder for streaming.
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest

from codegen2.tokenizer import (BUNDLED_DIR, CodeGen2Tokenizer, CodeGen25Tokenizer, Tokenizer,
                                load_tokenizer)


@pytest.fixture(scope="module")
def cg2() -> CodeGen2Tokenizer:
    return CodeGen2Tokenizer()


@pytest.fixture(scope="module")
def cg25() -> CodeGen25Tokenizer:
    return CodeGen25Tokenizer()


@pytest.fixture(scope="module")
def hf():
    # In transformers 5 PreTrainedTokenizerFast is TokenizersBackend: the fast tokenizer straight from the file.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def stdlib_texts() -> list[str]:
    """Every UTF-8 .py file of the standard library (not the site-packages that may live inside it)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for f in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(f.relative_to(root).parts) or not f.is_file():
            continue
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:  # a few test files are deliberately latin-1 / koi8-r
            continue
    assert len(texts) > 500
    return texts


def _edge_cases() -> list[str]:
    cases = ["", " ", "\t", "\n", "x", "\r\n", "a\r\nb\r\n\r\n", "trailing   ", "trailing\t\t\n", "  ", "\n\n\n"]
    for n in range(1, 71):
        sp, tb = " " * n, "\t" * n
        cases += [sp, tb, sp + "x", tb + "x", "x" + sp, "x" + tb, "\n" + sp + "return", "\n" + tb + "pass",
                  f"a{sp}b{tb}c", sp + tb + sp, "\t " * n, " \t" * (n % 7 + 1) + sp, f"#{sp}\n{tb}# c{sp}"]
    cases += ["héllo wörld", "日本語のテキスト  です", "Ελληνικά\tκείμενο", "emoji 🦜🐍🎉 and 👩‍👩‍👧 zwj",
              "  🦜  ", "\u00a0\u2003nbsp\u3000", "mixed\r\n    indented\r\n\t\ttabs\r\n", "é" * 1000,
              "def f(x):\n    return x  # comment   \n\n\n", "x" * 100_000, ("ab " * 40_000).strip(),
              " " * 5000 + "\t" * 5000, "if True:\n" + "".join(" " * k + f"v{k} = {k}\n" for k in range(0, 80, 3))]
    return cases


EDGE_CASES = _edge_cases()


# ---------------------------------------------------------------- CodeGen2


def test_codegen2_spec_examples(cg2: CodeGen2Tokenizer) -> None:
    assert cg2.encode("\n    return") == [198, 50284, 7783]
    assert cg2.encode("  # hi") == [50286, 2, 23105]
    assert cg2.encode("a\n    b") == [64, 198, 50284, 65]
    prompt = "def hello_world():\n    " + "<mask_1>" + "    return name" + "<|endoftext|>" + "<sep>" + "<mask_1>"
    assert cg2.encode_with_control_tokens(prompt) == [4299, 23748, 62, 6894, 33529, 198, 50284, 51199, 50284,
                                                      7783, 1438, 50256, 50299, 51199]
    assert (cg2.kind, cg2.vocab_size, cg2.eos_id, cg2.sep_id, cg2.eom_id) == ("codegen2", 51200, 50256, 50299, 50300)
    assert (cg2.mask_id(1), cg2.mask_id(899)) == (51199, 50301)


@pytest.mark.slow
def test_codegen2_matches_transformers_on_stdlib(cg2: CodeGen2Tokenizer, hf, stdlib_texts: list[str]) -> None:
    ours = cg2.encode_batch(stdlib_texts)
    ref = hf(stdlib_texts, add_special_tokens=False)["input_ids"]
    control = re.compile("|".join(map(re.escape, cg2.special_ids())))
    identical, with_control = 0, 0
    for text, mine, theirs in zip(stdlib_texts, ours, ref):
        assert cg2.decode(mine) == text
        if control.search(text):
            # A file that literally contains a control string: our encode keeps it as text, so compare the
            # reference's semantics through the control-token path.
            with_control += cg2.encode_with_control_tokens(text) == theirs
        else:
            identical += mine == theirs
    print(f"\nCodeGen2 ids identical to transformers on {identical + with_control}/{len(stdlib_texts)} stdlib "
          f"files ({with_control} of them contain control strings, compared via encode_with_control_tokens)")
    assert identical + with_control == len(stdlib_texts)


def test_codegen2_matches_transformers_on_edge_cases(cg2: CodeGen2Tokenizer, hf) -> None:
    ref = hf(EDGE_CASES, add_special_tokens=False)["input_ids"]
    assert cg2.encode_batch(EDGE_CASES) == ref
    for text, theirs in zip(EDGE_CASES, ref):
        assert cg2.encode(text) == theirs
        assert cg2.encode_with_control_tokens(text) == theirs
        assert cg2.decode(theirs) == text == hf.decode(theirs)


def test_codegen2_matches_transformers_autotokenizer(cg2: CodeGen2Tokenizer) -> None:
    # transformers 5 AutoTokenizer builds its own GPT2Tokenizer for the directory: a second reference.
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(BUNDLED_DIR))
    texts = EDGE_CASES + ["def hello_world():\n    <mask_1>    return name<|endoftext|><sep><mask_1>"]
    assert [cg2.encode_with_control_tokens(t) for t in texts] == auto(texts, add_special_tokens=False)["input_ids"]


def test_codegen2_control_tokens_match_transformers(cg2: CodeGen2Tokenizer, hf) -> None:
    texts = ["a<mask_12>b<mask_1>c<mask_123>", "<|endoftext|><sep><eom><dummy_3>", "x <eom>\n    <sep>  y",
             "<mask_0><mask_900><mask_899>", "<eom<sep>>"]
    for text in texts:
        assert cg2.encode_with_control_tokens(text) == hf(text, add_special_tokens=False)["input_ids"]


def test_codegen2_token_bytes_match_transformers(cg2: CodeGen2Tokenizer, hf) -> None:
    assert [cg2.decode([i]) for i in range(cg2.vocab_size)] == [hf.decode([i]) for i in range(cg2.vocab_size)]
    assert cg2.token_bytes(50284) == b"    " and cg2.token_bytes(50294) == b"\t\t" and cg2.token_bytes(220) == b" "


# ---------------------------------------------------------------- CodeGen2.5


def test_codegen25_published_vectors(cg25: CodeGen25Tokenizer) -> None:
    assert cg25.encode("int add(int a, int b) { return a + b; }\nπ") == [
        600, 751, 7, 600, 257, 11, 493, 275, 8, 1391, 1441, 257, 1343, 275, 26, 1782, 198, 46582]
    assert cg25.encode_with_control_tokens("<fim_prefix>abc<fim_suffix>xyz<fim_middle>") == [
        50295, 39305, 50297, 5431, 89, 50296]
    assert cg25.encode_with_control_tokens("prefix<mask_1>suffix<|endoftext|><sep><mask_1>") == [
        40290, 51199, 37333, 844, 50256, 50317, 51199]
    assert cg25.encode("\n    return") == [198, 50285, 1441]
    assert cg25.encode("\n\t\tpass") == [198, 197, 197, 6603]


def test_codegen25_vocabulary(cg25: CodeGen25Tokenizer) -> None:
    special = cg25.special_ids()
    assert {k: special[k] for k in ["<|endoftext|>", "<fim_prefix>", "<reponame>", "<sep>", "<eom>", "<mask_1>",
                                    "<mask_881>", "<dummy_0>"]} == {
        "<|endoftext|>": 50256, "<fim_prefix>": 50295, "<reponame>": 50312, "<sep>": 50317, "<eom>": 50318,
        "<mask_1>": 51199, "<mask_881>": 50319, "<dummy_0>": 50313}
    assert len(special) == 906 and sorted(special.values()) == [50256, *range(50295, 51200)]
    assert (cg25.kind, cg25.vocab_size, cg25.eos_id, cg25.sep_id, cg25.eom_id) == ("codegen25", 51200, 50256,
                                                                                      50317, 50318)
    # Whitespace runs are ordinary tokens, not control tokens: 31..2 spaces, then 9..2 tabs.
    assert [cg25.token_bytes(i) for i in (50257, 50286, 50287, 50294)] == [b" " * 31, b"  ", b"\t" * 9, b"\t\t"]
    assert all(i not in special.values() for i in range(50257, 50295))


def test_codegen25_gpt2_base_matches_codegen2_reference(cg25: CodeGen25Tokenizer, hf,
                                                        stdlib_texts: list[str]) -> None:
    # Without runs of 2+ spaces or tabs the CodeGen2 added tokens never fire, so both are plain GPT-2 BPE:
    # tiktoken's ranks (built here from vocab.json/merges.txt) must give the reference tokenizer's ids.
    lines = [ln for t in stdlib_texts[::10] for ln in t.splitlines(keepends=True)
             if "  " not in ln and "\t\t" not in ln and "<" not in ln]
    text = "".join(lines) + "".join(t for t in EDGE_CASES if "  " not in t and "\t\t" not in t)
    assert len(lines) > 10_000
    assert cg25.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    # Every base and whitespace-run token decodes as the reference does (partial UTF-8 included).
    assert [cg25.decode([i]) for i in range(50295)] == [hf.decode([i]) for i in range(50295)]


def test_codegen25_round_trip(cg25: CodeGen25Tokenizer, stdlib_texts: list[str]) -> None:
    sample = stdlib_texts[::5] + EDGE_CASES
    for text, ids in zip(sample, cg25.encode_batch(sample)):
        assert cg25.decode(ids) == text
        assert cg25.encode(text) == ids


def test_codegen25_offline_construction(monkeypatch, tmp_path: Path) -> None:
    # With an empty tiktoken cache the constructor must not try get_encoding("gpt2") (a download).
    import tiktoken

    def no_network(name: str):
        raise AssertionError("get_encoding would download")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    assert CodeGen25Tokenizer().encode("\n    return") == [198, 50285, 1441]


def test_codegen25_uses_cached_tiktoken_gpt2(monkeypatch, tmp_path: Path, cg25: CodeGen25Tokenizer) -> None:
    # When tiktoken's cache holds verified gpt2 files, the base ranks come from get_encoding("gpt2").
    # The real files cannot be had offline, so stand-ins with matching hashes and a stand-in encoding are used.
    import hashlib

    import tiktoken

    import codegen2.tokenizer as module

    files = {}
    for k, url in enumerate(module._GPT2_FILES):
        data = f"stand-in {k}".encode()
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
        files[url] = hashlib.sha256(data).hexdigest()
    calls = []
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(module, "_GPT2_FILES", files)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: calls.append(name) or cg25._enc)
    tok = CodeGen25Tokenizer()
    assert calls == ["gpt2"] and tok._table == cg25._table


def test_codegen25_from_vocab_with_extra_entries(cg25: CodeGen25Tokenizer, tmp_path: Path) -> None:
    # A vocab.json/merges.txt carrying more than GPT-2 (here CodeGen2's added tokens) still gives the same base.
    vocab = json.loads((BUNDLED_DIR / "vocab.json").read_text())
    vocab.update(json.loads((BUNDLED_DIR / "added_tokens.json").read_text()))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    # ... and a merges.txt without its "#version" header (the real merges include some starting with "#").
    merges = (BUNDLED_DIR / "merges.txt").read_text().split("\n", 1)[1]
    (tmp_path / "merges.txt").write_text(merges + "Ġ Ġ\n")
    tok = CodeGen25Tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert tok._table == cg25._table and tok.special_ids() == cg25.special_ids()


# ---------------------------------------------------------------- both families


@pytest.fixture(scope="module", params=["codegen2", "codegen25"])
def tok(request, cg2: CodeGen2Tokenizer, cg25: CodeGen25Tokenizer) -> Tokenizer:
    return cg2 if request.param == "codegen2" else cg25


def test_control_strings_in_user_text_are_plain_text(tok: Tokenizer) -> None:
    special = tok.special_ids()
    control_ids = set(special.values())
    text = "x <eom> <sep> <mask_1> <|endoftext|> y <fim_prefix><dummy_0><mask_12>"
    ids = tok.encode(text)
    assert control_ids.isdisjoint(ids) and tok.decode(ids) == text
    with_control = tok.encode_with_control_tokens(text)
    assert {tok.eom_id, tok.sep_id, tok.mask_id(1), tok.eos_id, tok.mask_id(12)} <= set(with_control)
    assert tok.decode(with_control) == text
    for name, id in special.items():  # every control token, both ways
        assert control_ids.isdisjoint(tok.encode(name)) and tok.decode(tok.encode(name)) == name
        assert tok.encode_with_control_tokens(name) == [id] and tok.decode([id]) == name


def test_whitespace_runs_still_merge_in_plain_encode(tok: Tokenizer) -> None:
    ids = tok.encode("def f():\n        return 1")
    assert any(50257 <= i <= 50294 for i in ids)


def test_mask_id_range(tok: Tokenizer) -> None:
    n_max = 899 if tok.kind == "codegen2" else 881
    assert tok.mask_id(n_max) == 51200 - n_max
    for bad in (0, -1, n_max + 1, 10_000, True):
        with pytest.raises(ValueError, match="mask"):
            tok.mask_id(bad)


def test_decode_rejects_unknown_ids(tok: Tokenizer) -> None:
    for bad in (-1, 51200):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([1, bad])
        with pytest.raises(ValueError):
            tok.token_bytes(bad)


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = tok.incremental_decoder()
    return [dec.push(i) for i in ids], dec.flush()


def test_incremental_decoder(tok: Tokenizer) -> None:
    emoji = "🦜"
    assert len(tok.encode(emoji)) > 1  # one character split over several byte-level tokens
    text = f"print('{emoji}🐍 naïve 日本語 Ελλ')\n    # 👩‍👩‍👧 done {emoji}{emoji}"
    ids = tok.encode(text)
    chunks, tail = _stream(tok, ids)
    full = b"".join(tok.token_bytes(i) for i in ids)
    assert "".join(chunks) + tail == tok.decode(ids) == text and tail == ""
    emitted = ""
    for i, chunk in enumerate(chunks):
        emitted += chunk
        assert "\ufffd" not in chunk
        # What was emitted is exactly the complete characters of the bytes pushed so far.
        assert full.startswith(emitted.encode())
        pushed = b"".join(tok.token_bytes(j) for j in ids[: i + 1])
        assert len(pushed) - len(emitted.encode()) < 4
    # A stream cut inside the emoji: the held-back bytes come out of flush() as U+FFFD, as decode() does.
    cut = tok.encode(emoji)[:-1]
    chunks, tail = _stream(tok, cut)
    assert "".join(chunks) == "" and tail == tok.decode(cut) and "\ufffd" in tail


# ---------------------------------------------------------------- load_tokenizer


def test_load_tokenizer(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(), CodeGen2Tokenizer)
    assert isinstance(load_tokenizer(kind="codegen25"), CodeGen25Tokenizer)
    assert isinstance(load_tokenizer(BUNDLED_DIR), CodeGen2Tokenizer)

    def model_dir(name: str, files: dict[str, dict]) -> Path:
        d = tmp_path / name
        d.mkdir()
        for fname, content in files.items():
            (d / fname).write_text(json.dumps(content))
        return d

    llama = model_dir("llama", {"config.json": {"model_type": "llama"}})
    named = model_dir("named", {"tokenizer_config.json": {"tokenizer_class": "CodeGen25Tokenizer"}})
    codegen = model_dir("codegen", {"config.json": {"model_type": "codegen"}})
    empty = model_dir("empty", {})
    assert isinstance(load_tokenizer(llama), CodeGen25Tokenizer)
    assert isinstance(load_tokenizer(str(named)), CodeGen25Tokenizer)
    assert isinstance(load_tokenizer(empty, kind="codegen25"), CodeGen25Tokenizer)
    assert isinstance(load_tokenizer(codegen), CodeGen2Tokenizer)
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        load_tokenizer(empty)
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="kind"):
        load_tokenizer(kind="gpt2")
