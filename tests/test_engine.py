"""The engine on real (tiny, random) models: greedy == transformers, batching invariants, sampling parameters,
stops, abort, queueing, reuse, and the native kernels. The same behaviours on a scripted fake model, without
any model math, are in test_engine_fake.py."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import hf_codegen

from codegen2.engine.async_engine import AsyncEngine
from codegen2.engine.detokenize import StopStrings
from codegen2.engine.engine import Engine
from codegen2.engine.errors import InvalidRequest
from codegen2.engine.sampling import SamplingParams, apply_penalties, filter_logits, sample, sample_batch
from codegen2.infill import Infill, infill_prompt
from codegen2.kernels import DecodeLinear, prepare_for_inference, quantizer
from codegen2.models.checkpoint import load_model
from codegen2.models.kv_cache import KVCache
from codegen2.tokenizer import CodeGen2Tokenizer, CodeGen25Tokenizer

PROMPTS = ["def fibonacci(n):\n    ", "import os\n", "class Stack:\n    def push(self, x):\n        self.items",
           "# sum a list\ndef total(xs):", "x = [i * i for i in range(10)]\nprint("]


@pytest.fixture(scope="module", params=["codegen2", "llama"])
def setup(request, checkpoints):
    tok = CodeGen2Tokenizer() if request.param == "codegen2" else CodeGen25Tokenizer()
    return checkpoints.reference(request.param), load_model(checkpoints(request.param)), tok


def run_alone(model, tok, prompt, params, **kw):
    return Engine(model, tok, max_batch=1, **kw).generate([prompt], params)[0].outputs[0]


@torch.no_grad()
def test_greedy_equals_transformers_greedy(setup):
    hf, model, tok = setup
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        ref = ref[0, len(ids):].tolist()
        out = run_alone(model, tok, prompt, SamplingParams(max_tokens=24, ignore_eos=True))
        assert out.token_ids == ref
        assert out.finish_reason == "length" and out.text == tok.decode(ref)


def test_batched_greedy_equals_each_alone(setup):
    _, model, tok = setup
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    alone = [run_alone(model, tok, p, params).token_ids for p in PROMPTS]
    batched = Engine(model, tok, max_batch=8).generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in batched] == alone


def test_requests_arriving_mid_stream_and_chunked_prefill(setup):
    """Requests join while others decode; long prompts are prefilled in small chunks; different max_tokens make
    requests leave at different steps. Every request still gets exactly its solo tokens."""
    _, model, tok = setup
    prompts = PROMPTS + [PROMPTS[2] * 6]  # one long prompt, many chunks of 8
    lengths = [5, 17, 9, 12, 3, 10]
    alone = [run_alone(model, tok, p, SamplingParams(max_tokens=n, ignore_eos=True)).token_ids
             for p, n in zip(prompts, lengths)]
    engine = Engine(model, tok, max_batch=4, prefill_chunk=8)
    ids, tokens, finals, step = {}, {}, {}, 0
    while len(finals) < len(prompts):
        if step < len(prompts) * 2 and step % 2 == 0:  # a new request every other step
            k = step // 2
            ids[engine.add_request(prompts[k], SamplingParams(max_tokens=lengths[k], ignore_eos=True))] = k
        for out in engine.step():  # deltas: each step's new tokens
            tokens.setdefault(ids[out.request_id], []).extend(out.outputs[0].token_ids)
            if out.finished:
                finals[ids[out.request_id]] = tokens[ids[out.request_id]]
        step += 1
    assert [finals[k] for k in range(len(prompts))] == alone


def test_streamed_deltas_add_up_to_the_text(setup):
    _, model, tok = setup
    engine = Engine(model, tok)
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=3)
    rid = engine.add_request(PROMPTS[0], params)
    deltas, ids = [], []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid and len(out.outputs) == 1
            deltas.append(out.outputs[0].text)
            ids += out.outputs[0].token_ids
    whole = Engine(model, tok).generate([PROMPTS[0]], params)[0].outputs[0]
    assert "".join(deltas) == whole.text == tok.decode(ids) and ids == whole.token_ids


def test_async_stream_and_abort_on_early_exit(setup):
    _, model, tok = setup
    engine = Engine(model, tok, max_batch=2)
    async_engine = AsyncEngine(engine)

    async def consume(prompt, stop_after=None):
        texts = []
        async for out in async_engine.stream(prompt, SamplingParams(max_tokens=12, ignore_eos=True)):
            texts.append(out.outputs[0].text)
            if stop_after is not None and len(texts) >= stop_after:
                break  # the client goes away
        return "".join(texts), out

    async def main():
        return await asyncio.gather(consume(PROMPTS[0]), consume(PROMPTS[1], stop_after=2), consume(PROMPTS[3]))

    try:
        results = asyncio.run(main())
    finally:
        async_engine.shutdown()
    solo = run_alone(model, tok, PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True))
    assert results[0][0] == solo.text and results[0][1].finished
    assert not results[1][1].finished
    assert len(engine.scheduler.free) == engine.scheduler.n_slots and not engine.has_unfinished()


def test_stop_string_across_token_boundary(setup):
    _, model, tok = setup
    full = run_alone(model, tok, PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True))
    pieces = [tok.decode([t]) for t in full.token_ids]
    k = next(i for i in range(3, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    boundary = len("".join(pieces[: k + 1]))
    stop = full.text[boundary - 1: boundary + 1]  # the last char of one token and the first of the next
    expected = full.text[: full.text.find(stop)]
    out = run_alone(model, tok, PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True, stop=[stop]))
    assert out.text == expected and out.finish_reason == "stop"


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


def test_seeded_sampling_is_reproducible_and_n_gives_seed_plus_index(setup):
    _, model, tok = setup
    p = lambda seed, n=1: SamplingParams(max_tokens=16, temperature=1.0, seed=seed, n=n, ignore_eos=True)
    a, b, c = (run_alone(model, tok, PROMPTS[0], p(s)).token_ids for s in (7, 7, 8))
    assert a == b and a != c
    # n=2 with seed 7: completion i uses seed 7 + i; the second copies the first's prompt K/V.
    engine = Engine(model, tok, max_batch=4)
    out = engine.generate([PROMPTS[0]], p(7, n=2))[0]
    assert [o.token_ids for o in out.outputs] == [a, c]
    assert engine.scheduler.reused_tokens == len(tok.encode(PROMPTS[0])) - 1


def test_logprobs_are_the_models_distribution(setup):
    _, model, tok = setup
    out = run_alone(model, tok, PROMPTS[1], SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3))
    ids = tok.encode(PROMPTS[1]) + out.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    for i, lp in enumerate(out.logprobs):
        row = logp[len(ids) - len(out.token_ids) - 1 + i]
        assert lp.token == out.token_ids[i]
        assert abs(lp.logprob - row[lp.token].item()) < 1e-4
        assert [t for t, _ in lp.top] == torch.topk(row, 3).indices.tolist()
        assert lp.top[0][0] == lp.token  # greedy picks the most likely token


def test_prefix_reuse_skips_the_shared_prefix_and_gives_the_same_tokens(setup):
    _, model, tok = setup
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    file_v1 = PROMPTS[2] * 3
    file_v2 = file_v1 + "\n    def pop(self):"
    engine = Engine(model, tok, max_batch=2)
    engine.generate([file_v1], params)
    first = engine.scheduler.reused_tokens
    out = engine.generate([file_v2], params)[0].outputs[0]
    reused = engine.scheduler.reused_tokens - first
    assert reused >= len(tok.encode(file_v1)) - 1
    assert out.token_ids == run_alone(model, tok, file_v2, params).token_ids


def test_abort_frees_the_slot_and_a_full_cache_queues(setup):
    _, model, tok = setup
    engine = Engine(model, tok, max_batch=2)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS[:4]]
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2  # two slots: two wait
    engine.abort(ids[0])
    outs = engine.step()
    aborted = next(o for o in outs if o.request_id == ids[0])
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert {s.request_id for s in engine.scheduler.running} == {ids[1], ids[2]}  # the freed slot went to #3
    while engine.has_unfinished():
        engine.step()
    assert len(engine.scheduler.free) == 2


def test_budget_limits_slots_and_rejects_too_small(codegen_dir):
    tok = CodeGen2Tokenizer()
    model = load_model(codegen_dir)
    cfg = model.config
    per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * (cfg.max_seq_len + 1) * cfg.head_dim * 4
    assert Engine(model, tok, max_batch=16, kv_cache_bytes=3 * per_slot).scheduler.n_slots == 3
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(model, tok, kv_cache_bytes=per_slot - 1)


def _biased_model(tmp_path, token_id: int):
    """A tiny CodeGen2 whose lm_head bias makes ``token_id`` the certain next token."""
    hf = hf_codegen()
    with torch.no_grad():
        hf.lm_head.bias[token_id] = 1000.0
    hf.save_pretrained(tmp_path)
    return load_model(tmp_path)


def test_never_stops_at_config_eos_2_but_at_endoftext_and_infill_at_eom(tmp_path):
    tok = CodeGen2Tokenizer()
    assert tok.encode("#") == [2]  # the official configs' eos id is '#'
    out = run_alone(_biased_model(tmp_path / "hash", 2), tok, "x = 1  ", SamplingParams(max_tokens=5))
    assert out.text == "#####" and out.finish_reason == "length"
    out = run_alone(_biased_model(tmp_path / "eos", 50256), tok, "x", SamplingParams(max_tokens=5))
    assert out.token_ids == [] and out.finish_reason == "stop"
    out = run_alone(_biased_model(tmp_path / "eom", 50300), tok, Infill("a", "b"), SamplingParams(max_tokens=5))
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "stop"


def test_context_limits(setup):
    _, model, tok = setup
    n = model.config.max_seq_len
    engine = Engine(model, tok)
    with pytest.raises(InvalidRequest, match="leaves no room") as e:
        engine.add_request([1] * n, SamplingParams())
    assert (e.value.param, e.value.status, e.value.code) == ("prompt", 413, "context_length_exceeded")
    with pytest.raises(InvalidRequest, match="prompt is empty") as e:
        engine.add_request("", SamplingParams())
    assert (e.value.param, e.value.status) == ("prompt", 400)
    with pytest.raises(InvalidRequest, match="token ids must be"):
        engine.add_request([1, 51200], SamplingParams())
    assert not engine.has_unfinished()
    out = engine.generate([[1] * (n - 3)], SamplingParams(max_tokens=50, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_infill_request_uses_the_infill_prompt(setup):
    _, model, tok = setup
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    a = run_alone(model, tok, Infill("def f(x):\n    ", "\n    return y\n"), params)
    b = run_alone(model, tok, infill_prompt(tok, "def f(x):\n    ", "\n    return y\n"),
                  SamplingParams(max_tokens=6, ignore_eos=True, stop_token_ids=[tok.eom_id]))
    assert a.token_ids == b.token_ids


# --- sampling parameters against hand-computed distributions -----------------------------------------------------

def test_top_k_top_p_min_p_temperature_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw))).tolist()
    assert kept(top_k=3) == [[True, True, True, False]]
    # Cumulative mass before each token: 0, .5, .8, .95 -> with top_p .8 the third is dropped.
    assert kept(top_p=0.8) == [[True, True, False, False]]
    assert kept(top_p=0.81) == [[True, True, True, False]]
    # min_p .35: keep p >= .35 * .5 = .175 -> the first two.
    assert kept(min_p=0.35) == [[True, True, False, False]]
    # Temperature 0.5 squares the probabilities before renormalising: p ~ [.25, .09, .0225, .0025].
    probs = torch.softmax(filter_logits(logits, SamplingParams(temperature=0.5)), -1)
    assert torch.allclose(probs[0], torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365, atol=1e-6)


def test_penalties_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1])
    assert rep.tolist() == [1.0, -2.0, 0.5, 3.0]  # positive / 2, negative * 2, unseen unchanged
    pen = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[2],
                          output=[3, 3, 1])
    assert pen.tolist() == [2.0, -1.0 - 0.5 - 0.25, 0.5, 3.0 - 0.5 - 0.5]  # the prompt does not count


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0), g), minlength=4) / 20000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0, top_k=2), g), minlength=4) / 20000
    assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)


def test_batched_sampling_gives_each_row_its_own_result():
    """sample_batch over rows with different parameters equals each row sampled alone: greedy rows their
    argmax, seeded rows what their own generator draws, penalties from each row's own history, and the
    log-probabilities of the model's distribution."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=10, seed=5, logprobs=3),
              SamplingParams(temperature=1.0, top_p=0.9, seed=6), SamplingParams(repetition_penalty=3.0, logprobs=0)]
    histories = [([], []), ([1, 2], [3]), ([], []), ([int(logits[3].argmax())], [])]
    gens = [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6), None]
    got = sample_batch(logits, params, gens, histories)
    alone = [int(sample(apply_penalties(logits[b], params[b], *histories[b])[None], params[b],
                        torch.Generator().manual_seed(params[b].seed) if params[b].seed is not None else None)[0])
             for b in range(4)]
    assert [g.token for g in got] == alone
    assert got[0].token == int(logits[0].argmax()) and got[3].token != int(logits[3].argmax())  # penalised
    logp = torch.log_softmax(logits, -1)
    assert got[1].logprob == pytest.approx(float(logp[1, got[1].token]), abs=1e-6)
    assert [t for t, _ in got[1].top] == torch.topk(logp[1], 3).indices.tolist()
    assert got[3].top == [] and got[3].logprob == pytest.approx(float(logp[3, got[3].token]), abs=1e-6)
    assert got[0].logprob is None and got[2].top is None


def test_sampler_chains_run_in_the_order_given():
    """samplers: llama.cpp's chain. Its default puts temperature last, so top_p sees the untempered
    distribution: with [0.5, 0.3, 0.15, 0.05], temperature 0.5 and top_p 0.6, ours (temperature first:
    [0.685, 0.247, ...]) keeps one token, llama.cpp's order keeps two. A stage not listed does not run:
    temperature 0 without a temperature stage is not greedy."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(filter_logits(logits, p)).tolist()  # noqa: E731
    assert kept(SamplingParams(temperature=0.5, top_p=0.6)) == [[True, False, False, False]]
    llama = ["penalties", "top_k", "top_p", "min_p", "temperature"]
    assert kept(SamplingParams(temperature=0.5, top_p=0.6, samplers=llama)) == [[True, True, False, False]]
    plain = SamplingParams(temperature=0.0, top_k=2, samplers=["top_k"])
    assert not plain.greedy and kept(plain) == [[True, True, False, False]]
    assert torch.equal(filter_logits(logits, plain)[0, :2], logits[0, :2])  # no temperature applied
    assert kept(SamplingParams(temperature=0.0, samplers=[])) == [[True] * 4]
    g = torch.Generator().manual_seed(0)
    draws = torch.bincount(sample(logits.expand(4000, 4), SamplingParams(samplers=[]), g), minlength=4) / 4000
    assert torch.allclose(draws, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    with pytest.raises(InvalidRequest, match="samplers must list each of") as e:
        SamplingParams(samplers=["top_k", "dry"])
    assert e.value.param == "samplers"


def test_infill_stage_by_hand():
    """llama.cpp's infill sampler, on candidates whose probabilities are given. Pieces: 0 "ab", 1 "a", 2 "abc",
    3 "x", 4 the end of the middle."""
    from codegen2.engine.sampling import InfillVocab, _infill

    vocab = InfillVocab([b"ab", b"a", b"abc", b"x", b"<eom>", b"q", b"r", b"s", b"t", b"u", b"v"],
                        frozenset({4}), 4)

    def run(probs: dict[int, float]) -> set[int]:
        ids = torch.tensor(list(probs))
        kept, _ = _infill(ids, torch.log(torch.tensor(list(probs.values()), dtype=torch.float64)).float(), vocab)
        return set(kept.tolist())
    # "a" and "abc" merge into "ab" (0.33 + 0.10 + 0.30 = 0.73); "x" (0.22) passes the 0.2 threshold, then fails
    # 1 / (2 texts + 1); the end of the middle is always kept.
    assert run({0: 0.33, 1: 0.30, 2: 0.10, 3: 0.22, 4: 0.05}) == {0, 4}
    # The end holds more than a third of the text mass per candidate (3 * 0.2 * 3 > 0.8): only it is kept.
    assert run({0: 0.5, 3: 0.3, 4: 0.2}) == {4}
    # No text token reaches 0.2 and none merge: the middle ends.
    assert run({5: 0.16, 6: 0.16, 7: 0.16, 8: 0.16, 9: 0.16, 10: 0.16, 4: 0.04}) == {4}


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(stop=[""]), "stop strings"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"), (dict(n=0), "n must"), (dict(seed="x"), "seed"),
    (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"),
    (dict(logprobs=50), "logprobs"), (dict(temperature=float("nan")), "temperature"),
    (dict(max_tokens=True), "max_tokens"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        SamplingParams(**kwargs)
    assert e.value.param == next(iter(kwargs)) and e.value.status == 400


@pytest.mark.parametrize("quant", [None, "int8"])
def test_native_kernels_follow_the_bf16_model(codegen_dir, quant):
    """An engine over a bf16 model prepared for inference (native bf16 kernels where they build, or int8
    weights) decodes exactly its own model's greedy tokens (the same model run step by step over a KV cache of
    its own), and that model's logits stay within the error of its weight format of the plain bf16 model's,
    teacher-forced over the same tokens."""
    tok = CodeGen2Tokenizer()
    reference = load_model(codegen_dir, dtype="bf16")
    fast_model = prepare_for_inference(load_model(codegen_dir, dtype="bf16"), quant)
    layers = [m for m in fast_model.modules() if isinstance(m, DecodeLinear)]
    assert all(m.mode == (quant or "bf16") for m in layers) and (quant is None or layers)
    prompt = tok.encode(PROMPTS[0])
    out = Engine(fast_model, tok).generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].outputs[0]
    cfg, P = fast_model.config, len(prompt)
    seq = torch.tensor([prompt + out.token_ids])
    cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim, torch.bfloat16)
    with torch.no_grad():
        steps = [fast_model(seq[:, :P], torch.arange(P)[None], cache)[0, -1]]
        steps += [fast_model(seq[:, t:t + 1], torch.tensor([[t]]), cache)[0, -1] for t in range(P, seq.shape[1] - 1)]
        own = torch.stack(steps)  # (12, V): what the engine's model predicts at each step
        ref = reference(seq)[0, P - 1:-1]  # the plain bf16 model, uncached
    assert own.argmax(-1).tolist() == out.token_ids
    # The logits of this 2-layer model are ~3 at most: bf16 kernels and the bf16 cache only round differently
    # (measured <= 0.025 over three prompts on AVX2); int8 rows carry 1/254 of their range of error (<= 0.051).
    assert float((own - ref).abs().max()) < (0.06 if quant is None else 0.15)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("family", ["codegen", "llama"])
def test_quantize_while_loading_equals_quantize_after(request, family, quant):
    """load_model(on_block=quantizer(q)) then prepare_for_inference(q): the same int weights, scales and logits
    as quantizing after a full load; the bf16 block weights are not kept (each is released with its block)."""
    directory = request.getfixturevalue(f"{family}_dir")
    after = prepare_for_inference(load_model(directory, dtype="bf16"), quant)
    seen = []
    hook = quantizer(quant)
    streamed = load_model(directory, dtype="bf16", on_block=lambda block: seen.append(hook(block)))
    assert len(seen) == streamed.config.n_layers and all(
        type(m) is not torch.nn.Linear for b in seen for m in b.modules())  # each block done before the next
    prepare_for_inference(streamed, quant)
    a, b = after.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(after(tokens), streamed(tokens))
    with pytest.raises(ValueError, match="already"):
        prepare_for_inference(streamed, quant)
    other = "int4" if quant == "int8" else "int8"
    with pytest.raises(ValueError, match=f"already {quant}, not {other}"):
        prepare_for_inference(load_model(directory, dtype="bf16", on_block=hook), other)


@torch.no_grad()
def test_runner_rows_in_any_slot_order(setup):
    """The runner runs a step in slot order (consecutive slots read the cache as a view) and hands the logits
    back in the caller's order: decode and verify with the slots shuffled give, row for row, what one slot
    alone gives."""
    from codegen2.engine.runner import ModelRunner

    _, model, tok = setup
    prompts = [tok.encode(p)[:6] for p in PROMPTS[:4]]
    runner = ModelRunner(model, n_slots=4, max_seq_len=64)
    for slot, ids in enumerate(prompts):
        runner.prefill(slot, ids[:-1], 0)
    slots = [2, 0, 3, 1]
    tokens, positions = [prompts[s][-1] for s in slots], [len(prompts[s]) - 1 for s in slots]
    shuffled = runner.decode(slots, tokens, positions)
    for b, slot in enumerate(slots):
        alone = runner.decode([slot], [tokens[b]], [positions[b]])
        torch.testing.assert_close(shuffled[b], alone[0], rtol=0, atol=1e-4)
    rows = [[tokens[b], 5 + b] for b in range(4)]
    verified = runner.verify(slots, rows, positions)
    for b, slot in enumerate(slots):
        torch.testing.assert_close(verified[b], runner.verify([slot], [rows[b]], [positions[b]])[0], rtol=0,
                                   atol=1e-4)
