"""The one prompt path (engine/prompt.py): every kind of prompt -> validated ids and final params, or one
InvalidRequest naming the parameter and its HTTP status."""

from __future__ import annotations

import pytest

from codegen2.engine.errors import InvalidRequest
from codegen2.engine.prompt import prepare_request
from codegen2.engine.sampling import SamplingParams
from codegen2.infill import Infill, infill_prompt
from codegen2.tokenizer import load_tokenizer


@pytest.fixture(scope="module", params=["codegen2", "codegen25"])
def tok(request):
    return load_tokenizer(None, kind=request.param)


def test_text_ids_and_infill_prompts(tok):
    params = SamplingParams(max_tokens=5, stop_token_ids=[7])
    text = prepare_request(tok, "def f(x):", params, 64)
    assert text.prompt_ids == tok.encode("def f(x):") and not text.truncated
    assert text.params.stop_token_ids == [7, tok.eos_id] and text.params.max_tokens == 5
    assert params.stop_token_ids == [7]  # the caller's params are not changed
    ids = prepare_request(tok, tok.encode("def f(x):"), params, 64)
    assert ids.prompt_ids == text.prompt_ids and ids.params == text.params
    hole = prepare_request(tok, Infill("def f(x):\n    ", "\n    return y\n"), params, 64)
    assert hole.prompt_ids == infill_prompt(tok, "def f(x):\n    ", "\n    return y\n")
    assert hole.params.stop_token_ids == [7, tok.eom_id, tok.eos_id]  # each once: eos is an infill stop too
    free = prepare_request(tok, "x", SamplingParams(ignore_eos=True), 64)
    assert free.params.stop_token_ids == []
    assert prepare_request(tok, Infill("a", "b"), SamplingParams(ignore_eos=True), 64).params.stop_token_ids == \
        [tok.eom_id, tok.eos_id]  # an infill still ends at <eom>


@pytest.mark.parametrize("prompt,words,status,code", [
    ("", "the prompt is empty", 400, None),
    ([], "the prompt is empty", 400, None),
    ([1, 51200], "token ids must be in [0, 51200), got 51200", 400, None),
    ([1, -1], "token ids must be in [0, 51200), got -1", 400, None),
    ([1, True], "token ids must be in [0, 51200), got True", 400, None),
    (3.5, "a prompt is text, a list of token ids or an Infill", 400, None),
    ([1] * 8, "the prompt has 8 tokens; the context is 8 tokens, which leaves no room to generate", 413,
     "context_length_exceeded"),
])
def test_bad_prompts_raise_one_typed_error(tok, prompt, words, status, code):
    with pytest.raises(InvalidRequest) as e:
        prepare_request(tok, prompt, SamplingParams(), 8)
    assert words in str(e.value) and e.value.message == str(e.value)
    assert (e.value.param, e.value.status, e.value.code) == ("prompt", status, code)
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


def test_fit_cuts_a_long_infill_keeping_the_text_near_the_hole(tok):
    """llama.cpp's rule: the end of the prefix and the start of the suffix survive, the suffix keeps at least a
    quarter of the budget, and the prompt leaves max_tokens (at most half the context) to generate."""
    prefix = "".join(f"a{i} = {i}\n" for i in range(300))
    suffix = "".join(f"b{i} = {i}\n" for i in range(300))
    params = SamplingParams(max_tokens=16)
    with pytest.raises(InvalidRequest, match="leaves no room"):
        prepare_request(tok, Infill(prefix, suffix), params, 256)
    r = prepare_request(tok, Infill(prefix, suffix), params, 256, fit=True)
    assert r.truncated and len(r.prompt_ids) <= 256 - 16
    text = tok.decode(r.prompt_ids)
    kept_prefix, kept_suffix = text.split("<mask_1>")[0], text.split("<mask_1>")[1].split("<|endoftext|>")[0]
    assert prefix.endswith(kept_prefix) and suffix.startswith(kept_suffix)
    assert len(tok.encode(kept_suffix)) >= (256 - 16 - 8 - 3) // 4 - 2
    assert "a299 = 299\n" in kept_prefix and "b0 = 0\n" in kept_suffix
    short = prepare_request(tok, Infill("x = 1\n", "y = 2\n"), params, 256, fit=True)
    assert not short.truncated and short.prompt_ids == infill_prompt(tok, "x = 1\n", "y = 2\n")
