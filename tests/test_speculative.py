"""Speculative decoding: greedy output identical with and without it (real tiny models of both families, alone and
batched, requests joining mid-stream, with stops, limits, logprobs and penalties), the sampling distribution kept
exactly (a fake Markov model whose every distribution is known), and the options of the API, CLI and server."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch import nn

from codegen2.engine.engine import Engine
from codegen2.engine.sampling import SamplingParams
from codegen2.engine.speculative import NgramProposer, SpeculativeConfig, _Index
from codegen2.models.checkpoint import load_model
from codegen2.tokenizer import CodeGen2Tokenizer, CodeGen25Tokenizer

REPETITIVE = ["x = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3", "import os\nimport sys\nimport os\nimport sys\nimport",
              "def f(a):\n    return a + 1\n\n\ndef g(a):\n    return a + 1\n\n\ndef h(a):\n", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module", params=["codegen2", "llama"])
def setup(request, checkpoints):
    tok = CodeGen2Tokenizer() if request.param == "codegen2" else CodeGen25Tokenizer()
    other = "llama" if request.param == "codegen2" else "codegen2"
    return load_model(checkpoints(request.param)), tok, load_model(checkpoints(other))


def configs(draft: nn.Module) -> list[SpeculativeConfig]:
    return [SpeculativeConfig("ngram", 4), SpeculativeConfig("ngram", 2, ngram_min=1, ngram_max=2),
            SpeculativeConfig("draft", 3, draft=draft)]


def test_ngram_index_proposes_what_followed_the_latest_earlier_occurrence():
    index = _Index(2, 3)
    assert index.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 4) == [7, 1, 2, 3]  # the latest occurrence of (1, 2, 3)
    assert index.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3, 5, 2, 3], 2) == [5, 2]  # (5, 2, 3) is new; (2, 3) last before 5
    assert _Index(2, 3).propose([5, 6, 7], 3) == []  # no n-gram occurs twice
    assert _Index(1, 1).propose([4, 4], 3) == [4]  # what follows may run to the end


def test_greedy_is_identical_alone_and_batched(setup):
    model, tok, draft = setup
    params = [SamplingParams(max_tokens=24, ignore_eos=True), SamplingParams(max_tokens=20, stop=["\n\n", "3,"]),
              SamplingParams(max_tokens=16, repetition_penalty=1.3, presence_penalty=0.2, logprobs=2),
              SamplingParams(max_tokens=9)]
    plain = [o.outputs[0] for o in Engine(model, tok, max_batch=4).generate(REPETITIVE, params)]
    for cfg in configs(draft):
        alone = [Engine(model, tok, max_batch=1, speculative=cfg).generate([p], [sp])[0].outputs[0]
                 for p, sp in zip(REPETITIVE, params)]
        engine = Engine(model, tok, max_batch=4, speculative=cfg)
        batched = [o.outputs[0] for o in engine.generate(REPETITIVE, params)]
        for a, b, c in zip(plain, alone, batched):
            assert a.token_ids == b.token_ids == c.token_ids and a.text == b.text == c.text
            assert a.finish_reason == b.finish_reason == c.finish_reason and a.stop_reason == c.stop_reason
        for a, c in zip(plain[2].logprobs, batched[2].logprobs):  # the model's own log-probabilities, per token
            assert a.token == c.token and abs(a.logprob - c.logprob) < 1e-4 and [t for t, _ in a.top] == \
                [t for t, _ in c.top]
        stats = engine.stats()
        assert stats.draft_tokens > 0 and 0 <= stats.accepted_draft_tokens <= stats.draft_tokens


def test_greedy_is_identical_with_requests_joining_mid_stream(setup):
    model, tok, draft = setup
    prompts = REPETITIVE + [REPETITIVE[2] * 3]
    lengths = [7, 19, 11, 5, 14]
    ref = [o.outputs[0].token_ids for o in Engine(model, tok).generate(
        prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])]
    for cfg in configs(draft):
        engine = Engine(model, tok, max_batch=3, prefill_chunk=8, speculative=cfg)
        ids, tokens, step = {}, collections.defaultdict(list), 0
        while step < 2 * len(prompts) or engine.has_unfinished():
            if step % 2 == 0 and step // 2 < len(prompts):
                k = step // 2
                ids[engine.add_request(prompts[k], SamplingParams(max_tokens=lengths[k], ignore_eos=True))] = k
            for out in engine.step():
                tokens[ids[out.request_id]] += out.outputs[0].token_ids
            step += 1
        assert [tokens[k] for k in range(len(prompts))] == ref


# --- the sampling distribution, on a model whose distributions are known -----------------------------------------

TOK = CodeGen2Tokenizer()
STATES = [10, 11, 12, 13]  # "+", ",", "-", "."
V = 64  # the fake model's vocabulary: ids the tokenizer decodes, few enough that sampling a row is cheap


class FakeConfig:
    n_layers, n_kv_heads, head_dim, max_seq_len, vocab_size = 1, 1, 1, 64, V


class Markov(nn.Module):
    """Next-token distribution = a fixed matrix row of the current token (4 states; every other token impossible),
    at every position of the input, as a verifying pass needs."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.config, self.tok_embeddings = FakeConfig(), nn.Embedding(1, 1)
        self.logits = torch.full((4, V), -1e9)
        self.logits[:, STATES] = torch.log(torch.tensor(table))
        self.state = torch.zeros(V, dtype=torch.long)  # any other token behaves as the first state
        self.state[STATES] = torch.arange(4)

    def forward(self, tokens, input_pos=None, cache=None, last_only=False):
        out = self.logits[self.state[tokens]]  # (B, T, V)
        return out[:, -1:] if last_only else out


P = [[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]
Q = [[0.1, 0.6, 0.2, 0.1], [0.4, 0.4, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]


def exact(start: int, n: int) -> dict[tuple[int, ...], float]:
    """P(the n tokens after `start`) under the Markov chain P, by enumeration."""
    out = {(): 1.0}
    for _ in range(n):
        out = {seq + (STATES[j],): p * P[STATES.index(seq[-1] if seq else start)][j]
               for seq, p in out.items() for j in range(4)}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampling_distribution_is_kept(method):
    """4,000 seeded samples of 3 tokens at temperature 1 and at 0.7 with top_p 0.9: the empirical distribution
    of the 64 possible continuations is within a total-variation distance of 0.06 of the exact one (for 4,000
    draws of 64 outcomes the expected distance is ~0.04; keeping every draft instead gives 0.25 and 0.44).
    The prompt repeats itself so that lookup proposes drafts; the draft model proposes from another chain Q."""
    prompt = [STATES[i] for i in (0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0)]
    cfg = SpeculativeConfig("ngram", 3) if method == "ngram" else SpeculativeConfig("draft", 3, draft=Markov(Q))
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        engine = Engine(Markov(P), TOK, max_batch=16, speculative=cfg)
        params = [SamplingParams(max_tokens=3, temperature=temperature, top_p=top_p, seed=s, ignore_eos=True)
                  for s in range(4000)]
        got = collections.Counter(tuple(o.outputs[0].token_ids) for o in engine.generate([prompt] * 4000, params))
        want = exact(prompt[-1], 3) if (temperature, top_p) == (1.0, 1.0) else tempered(prompt[-1], 3, temperature,
                                                                                           top_p)
        tv = 0.5 * sum(abs(got[k] / 4000 - want.get(k, 0.0)) for k in set(got) | set(want))
        assert tv < 0.06, (method, temperature, tv)
        # Both branches of the rule ran many times: drafts kept, and drafts rejected and corrected.
        stats = engine.stats()
        assert stats.draft_tokens > 1000 and 100 < stats.accepted_draft_tokens < stats.draft_tokens - 100


def tempered(start: int, n: int, temperature: float, top_p: float) -> dict[tuple[int, ...], float]:
    """The same enumeration for temperature then top_p applied to each row of P (our stages' order)."""
    rows = []
    for row in P:
        w = [p ** (1 / temperature) for p in row]
        w = [x / sum(w) for x in w]
        order = sorted(range(4), key=lambda j: -w[j])
        keep, mass = set(), 0.0
        for j in order:
            if mass < top_p:
                keep.add(j)
            mass += w[j]
        z = sum(w[j] for j in keep)
        rows.append([w[j] / z if j in keep else 0.0 for j in range(4)])
    out = {(): 1.0}
    for _ in range(n):
        out = {seq + (STATES[j],): p * rows[STATES.index(seq[-1] if seq else start)][j]
               for seq, p in out.items() for j in range(4) if rows[STATES.index(seq[-1] if seq else start)][j] > 0}
    return out


def test_server_reports_drafts_in_metrics_and_llama_timings(setup):
    pytest.importorskip("fastapi")
    import httpx
    from test_server import live_server

    from codegen2.server.app import create_app

    model, tok, _ = setup
    engine = Engine(model, tok, max_batch=2, speculative=SpeculativeConfig("ngram", 4))
    with live_server(create_app(lambda: engine, "tiny")) as url:
        r = httpx.post(url + "/completion", json={"prompt": REPETITIVE[0], "n_predict": 20, "temperature": 0},
                       timeout=120).json()
        plain = Engine(model, tok).generate([REPETITIVE[0]], SamplingParams(max_tokens=20))[0].outputs[0]
        assert r["content"] == plain.text
        assert r["timings"]["draft_n"] > 0 and 0 <= r["timings"]["draft_n_accepted"] <= r["timings"]["draft_n"]
        text = httpx.get(url + "/metrics").text
        assert f"codegen2_draft_tokens_total {engine.stats().draft_tokens}" in text
        assert "codegen2_draft_tokens_accepted_total" in text


def test_speculative_options_are_checked(setup):
    model, tok, draft = setup
    for kwargs, words in [(dict(method="beam"), "speculative method must be one of ngram, draft"),
                          (dict(method="ngram", num_tokens=0), "num_speculative_tokens must be"),
                          (dict(method="ngram", ngram_min=3, ngram_max=2), "ngram_min"),
                          (dict(method="draft"), "the draft method needs a draft model")]:
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig(**kwargs)
    with pytest.raises(ValueError, match="speculative must be 'ngram' or 'draft:DIR'"):
        Engine.from_pretrained("unused", speculative="draft")
    assert isinstance(Engine(model, tok, speculative=SpeculativeConfig("ngram"))._proposer, NgramProposer)
    assert math.isfinite(Engine(model, tok, speculative=SpeculativeConfig("draft", draft=draft)).stats().slots)
