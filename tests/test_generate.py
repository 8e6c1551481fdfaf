"""The simple generation path: greedy == transformers' greedy, sampling parameters, stops, streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_codegen, hf_llama

from codegen2.engine.sampling import SamplingParams, filter_logits, sample
from codegen2.generate import StopStrings, generate
from codegen2.models.checkpoint import load_model
from codegen2.tokenizer import CodeGen2Tokenizer, CodeGen25Tokenizer

PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module", params=["codegen2", "llama"])
def setup(request, tmp_path_factory):
    hf = hf_codegen() if request.param == "codegen2" else hf_llama()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    tok = CodeGen2Tokenizer() if request.param == "codegen2" else CodeGen25Tokenizer()
    return hf, load_model(path), tok


@torch.no_grad()
def test_greedy_equals_transformers_greedy(setup):
    hf, model, tok = setup
    ids = tok.encode(PROMPT)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    ref = ref[0, len(ids):].tolist()
    out = generate(model, tok, ids, SamplingParams(max_tokens=24, ignore_eos=True))
    assert out.token_ids == ref
    assert out.finish_reason == "length"
    assert out.text == tok.decode(ref)


def test_streamed_text_equals_final_text(setup):
    _, model, tok = setup
    chunks: list[str] = []
    out = generate(model, tok, tok.encode(PROMPT), SamplingParams(max_tokens=30, temperature=1.0, seed=3),
                   on_text=chunks.append)
    assert "".join(chunks) == out.text == tok.decode(out.token_ids)


def test_stop_string_across_token_boundary(setup):
    _, model, tok = setup
    ids = tok.encode(PROMPT)
    full = generate(model, tok, ids, SamplingParams(max_tokens=20, ignore_eos=True))
    pieces = [tok.decode([t]) for t in full.token_ids]
    # A stop string made of the last char of one token and the first char of the next.
    k = next(i for i in range(3, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    boundary = len("".join(pieces[: k + 1]))
    stop = full.text[boundary - 1: boundary + 1]
    expected = full.text[: full.text.find(stop)]
    chunks: list[str] = []
    out = generate(model, tok, ids, SamplingParams(max_tokens=20, ignore_eos=True, stop=[stop]),
                   on_text=chunks.append)
    assert out.text == expected and "".join(chunks) == expected
    assert out.finish_reason == "stop"


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["</div>", "\n\n"])
    assert s.feed("hello <") == ("hello ", False)
    assert s.feed("/d") == ("", False)
    assert s.feed("iv> tail") == ("", True)
    assert s.text == "hello "
    s = StopStrings(["\n\n"])
    assert s.feed("a\n") == ("a", False)
    assert s.feed("b") == ("\nb", False)  # the held-back "\n" was not a stop after all
    assert s.rest() == ""


def test_seeded_sampling_is_reproducible(setup):
    _, model, tok = setup
    ids = tok.encode(PROMPT)
    runs = [generate(model, tok, ids, SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True))
            for s in (7, 7, 8)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids


def test_top_k_1_is_greedy(setup):
    _, model, tok = setup
    ids = tok.encode(PROMPT)
    greedy = generate(model, tok, ids, SamplingParams(max_tokens=12, ignore_eos=True))
    topk1 = generate(model, tok, ids, SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=0,
                                                     ignore_eos=True))
    assert greedy.token_ids == topk1.token_ids


def _biased_model(tmp_path, token_id: int):
    """A tiny CodeGen2 whose lm_head bias makes ``token_id`` the certain next token."""
    hf = hf_codegen()
    with torch.no_grad():
        hf.lm_head.bias[token_id] = 1000.0
    hf.save_pretrained(tmp_path)
    return load_model(tmp_path)


def test_never_stops_at_config_eos_2_but_at_endoftext(tmp_path):
    tok = CodeGen2Tokenizer()
    assert tok.encode("#") == [2]  # the official configs' eos id is '#'
    out = generate(_biased_model(tmp_path / "hash", 2), tok, tok.encode("x = 1  "), SamplingParams(max_tokens=5))
    assert out.text == "#####" and out.finish_reason == "length"
    out = generate(_biased_model(tmp_path / "eos", 50256), tok, tok.encode("x"), SamplingParams(max_tokens=5))
    assert out.token_ids == [] and out.finish_reason == "stop"


def test_context_limits(setup):
    _, model, tok = setup
    n = model.config.max_seq_len
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, tok, [1] * n, SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tok, [], SamplingParams())
    out = generate(model, tok, [1] * (n - 3), SamplingParams(max_tokens=50, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_top_k_and_top_p_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=3)))
    assert kept.tolist() == [[True, True, True, False]]
    # Cumulative mass before each token: 0, .5, .8, .95 -> with top_p .8 the third is dropped.
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.81)))
    assert kept.tolist() == [[True, True, True, False]]
    # Temperature 0.5 squares the probabilities before renormalising: p ~ [.25, .09, .0225, .0025].
    probs = torch.softmax(filter_logits(logits, SamplingParams(temperature=0.5)), -1)
    expected = torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365
    assert torch.allclose(probs[0], expected, atol=1e-6)


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0), g), minlength=4) / 20000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(stop=[""]), "stop strings"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"), (dict(seed="x"), "seed"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
