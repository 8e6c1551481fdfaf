"""The infill format for both tokenizers: prompt ids, extraction of middles, and control-token safety."""

from __future__ import annotations

import pytest

from codegen2.infill import (extract_middles, infill_prompt, is_finished, multi_infill_prompt, split_middles,
                             training_sequence)
from codegen2.tokenizer import CodeGen2Tokenizer, CodeGen25Tokenizer


@pytest.fixture(scope="module", params=["codegen2", "codegen25"])
def tok(request):
    return CodeGen2Tokenizer() if request.param == "codegen2" else CodeGen25Tokenizer()


def test_model_card_example_ids():
    """Spec §3: the fast tokenizer's ids for the model card's infill example."""
    ids = infill_prompt(CodeGen2Tokenizer(), "def hello_world():\n    ", "    return name")
    assert ids == [4299, 23748, 62, 6894, 33529, 198, 50284, 51199, 50284, 7783, 1438, 50256, 50299, 51199]


def test_prompt_equals_the_official_string_format(tok):
    """Building from ids equals tokenizing the documented prompt string the way the official tokenizers do."""
    prefix, suffix = "import os\n\ndef read(path):\n    ", "\n    return data\n"
    expected = tok.encode_with_control_tokens(prefix + "<mask_1>" + suffix + "<|endoftext|><sep><mask_1>")
    assert infill_prompt(tok, prefix, suffix) == expected
    pieces = ["a = 1\n", "\nb = 2\n", "\nc = 3\n"]
    expected = tok.encode_with_control_tokens("a = 1\n<mask_1>\nb = 2\n<mask_2>\nc = 3\n<|endoftext|><sep><mask_1>")
    assert multi_infill_prompt(tok, pieces) == expected


def test_user_text_cannot_inject_control_tokens(tok):
    prefix = "s = '<eom><sep><|endoftext|>'\n"
    suffix = "# <mask_1> <mask_2>\n"
    ids = infill_prompt(tok, prefix, suffix)
    assert ids.count(tok.mask_id(1)) == 2 and ids.count(tok.eos_id) == 1 and ids.count(tok.sep_id) == 1
    assert tok.eom_id not in ids and tok.mask_id(2) not in ids
    assert tok.decode(ids) == prefix + "<mask_1>" + suffix + "<|endoftext|><sep><mask_1>"


@pytest.mark.parametrize("text,cuts", [
    ("def f(x):\n    y = x * 2\n    return y\n", [(14, 23)]),
    ("class A:\n\tdef g(self):\n\t\treturn 'π ✓ 🎉'\n", [(3, 8), (20, 31), (35, 38)]),
    ("x = 1\n", [(0, 0)]),  # an empty middle at the start
])
def test_training_sequence_round_trip(tok, text, cuts):
    """Spans cut out and rendered in the training format come back out, and put back give the text again."""
    pieces, middles, last = [], [], 0
    for a, b in cuts:
        pieces.append(text[last:a])
        middles.append(text[a:b])
        last = b
    pieces.append(text[last:])
    seq = training_sequence(tok, pieces, middles)
    prompt = multi_infill_prompt(tok, pieces)
    assert seq[: len(prompt)] == prompt
    got, complete = extract_middles(tok, seq[len(prompt):], n_holes=len(middles))
    assert complete and got == middles
    rebuilt = pieces[0] + "".join(m + p for m, p in zip(got, pieces[1:]))
    assert rebuilt == text


def test_extraction_stops_at_eom_and_endoftext(tok):
    body = tok.encode("return 1")
    middles, complete = split_middles(tok, body + [tok.eom_id] + tok.encode("junk"))
    assert middles == [body] and complete
    middles, complete = split_middles(tok, body + [tok.eos_id] + tok.encode("junk"))
    assert middles == [body] and not complete
    middles, complete = split_middles(tok, body)  # cut off by max_tokens
    assert middles == [body] and not complete
    assert not is_finished(tok, body) and is_finished(tok, body + [tok.eom_id])
    assert is_finished(tok, body + [tok.eos_id], n_holes=3)
    assert not is_finished(tok, body + [tok.eom_id], n_holes=2)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="at least two pieces"):
        multi_infill_prompt(tok, ["only one"])
    with pytest.raises(ValueError, match="need 1 middles"):
        training_sequence(tok, ["a", "b"], [])
