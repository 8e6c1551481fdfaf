"""`codegen2 complete` and `codegen2 infill` end to end, against transformers' greedy output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from codegen2.__main__ import split_at
from codegen2.infill import infill_prompt
from codegen2.tokenizer import CodeGen2Tokenizer


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codegen2", *args], capture_output=True, text=True, input=stdin)


@pytest.fixture(scope="module")
def model_dir(codegen_dir):
    return codegen_dir


def reference_greedy(model_dir, ids: list[int], n: int, stop_ids: set[int]) -> str:
    """transformers' greedy tokens, cut at the first stop token, decoded."""
    from transformers import CodeGenForCausalLM
    hf = CodeGenForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    new = out[0, len(ids):].tolist()
    for i, t in enumerate(new):
        if t in stop_ids:
            new = new[:i]
            break
    return CodeGen2Tokenizer().decode(new)


def test_complete_matches_transformers(model_dir):
    prompt = "def fib(n):"
    out = run("complete", "--model", str(model_dir), "--dtype", "fp32", "--max-tokens", "12", prompt)
    assert out.returncode == 0, out.stderr
    tok = CodeGen2Tokenizer()
    assert out.stdout == reference_greedy(model_dir, tok.encode(prompt), 12, {50256}) + "\n"
    assert "finish_reason=" in out.stderr


def test_speculative_decoding_gives_the_same_text(model_dir, llama_dir):
    """--speculative ngram and draft:DIR (a model of the other family: same vocabulary, its quality does not
    matter for greedy exactness) give transformers' greedy text."""
    prompt = "x = [1, 2, 3, 1, 2, 3, 1, 2"
    tok = CodeGen2Tokenizer()
    ref = reference_greedy(model_dir, tok.encode(prompt), 16, {50256}) + "\n"
    for spec in ("ngram", f"draft:{llama_dir}"):
        out = run("complete", "--model", str(model_dir), "--dtype", "fp32", "--max-tokens", "16", "--speculative",
                  spec, "--num-speculative-tokens", "3", prompt)
        assert out.returncode == 0, out.stderr
        assert out.stdout == ref
    bad = run("complete", "--model", str(model_dir), "--speculative", "beam", prompt)
    assert bad.returncode != 0 and "speculative must be 'ngram' or 'draft:DIR'" in bad.stderr


def test_infill_from_file_and_line(model_dir, tmp_path):
    source = "import os\n\ndef main():\n    pass\n"
    (tmp_path / "x.py").write_text(source)
    out = run("infill", "--model", str(model_dir), "--dtype", "fp32", "--max-tokens", "10",
              "--file", str(tmp_path / "x.py"), "--line", "4", "--column", "5")
    assert out.returncode == 0, out.stderr
    tok = CodeGen2Tokenizer()
    ids = infill_prompt(tok, "import os\n\ndef main():\n    ", "pass\n")
    assert out.stdout == reference_greedy(model_dir, ids, 10, {50256, 50300}) + "\n"
    # The same through --prefix-file / --suffix-file with stdin.
    (tmp_path / "prefix.py").write_text("import os\n\ndef main():\n    ")
    again = run("infill", "--model", str(model_dir), "--dtype", "fp32", "--max-tokens", "10",
                "--prefix-file", str(tmp_path / "prefix.py"), "--suffix-file", "-", stdin="pass\n")
    assert again.returncode == 0, again.stderr
    assert again.stdout == out.stdout


def test_split_at_by_hand():
    text = "ab\ncd\n"
    assert split_at(text, 1) == ("", "ab\ncd\n")
    assert split_at(text, 2, 2) == ("ab\nc", "d\n")
    assert split_at(text, 2, 3) == ("ab\ncd", "\n")
    assert split_at(text, 3) == ("ab\ncd\n", "")
    with pytest.raises(SystemExit, match="outside the file"):
        split_at(text, 4)
    with pytest.raises(SystemExit, match="outside line 2"):
        split_at(text, 2, 4)


def test_bad_input_gets_one_line_errors(model_dir, tmp_path):
    out = run("infill", "--model", str(model_dir), "--file", str(tmp_path / "missing.py"), "--line", "1")
    assert out.returncode != 0 and "cannot read" in out.stderr and "Traceback" not in out.stderr
    out = run("complete", "--model", str(model_dir), "--top-p", "0", "x")
    assert out.returncode != 0 and "top_p" in out.stderr and "Traceback" not in out.stderr
    out = run("complete", "--model", str(tmp_path / "nowhere"), "x")
    assert out.returncode != 0 and "neither a model directory" in out.stderr and "Traceback" not in out.stderr
