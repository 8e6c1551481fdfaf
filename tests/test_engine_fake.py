"""The engine's bookkeeping on a scripted fake model (no model math, as nanochat tests its engine): stops,
max_tokens, abort, the queue, n > 1, deltas and logprobs. The fake puts all its probability on the token its
script gives for the last token it was fed, so every expected output is known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from codegen2.engine.engine import Engine
from codegen2.engine.sampling import SamplingParams
from codegen2.infill import Infill
from codegen2.tokenizer import CodeGen2Tokenizer

TOK = CodeGen2Tokenizer()
A, B, C, D = (TOK.encode(w)[0] for w in ("a", " b", " c", " d"))
EOS, EOM = TOK.eos_id, TOK.eom_id


class FakeConfig:
    n_layers, n_kv_heads, head_dim, max_seq_len, vocab_size = 1, 1, 1, 64, 51200


class FakeModel(nn.Module):
    """next token = script[last token fed], default last + 1; logits are 0 except 20 on that token (so its
    log-probability is about -51199 * e**-20, the others about -20)."""

    def __init__(self, script: dict[int, int] | None = None) -> None:
        super().__init__()
        self.config = FakeConfig()
        self.tok_embeddings = nn.Embedding(1, 1)  # the engine reads the weights' dtype and device here
        self.script = script or {}
        self.calls: list[tuple[int, int]] = []  # (rows, tokens per row) of each forward pass

    def forward(self, tokens, input_pos=None, cache=None, last_only=False):
        self.calls.append(tuple(tokens.shape))
        last = tokens[:, -1].tolist()
        logits = torch.zeros(tokens.shape[0], 1, self.config.vocab_size)
        for b, t in enumerate(last):
            logits[b, 0, self.script.get(t, (t + 1) % self.config.vocab_size)] = 20.0
        return logits


def run(engine: Engine):
    """Step to the end; per request id, the list of outputs it got."""
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out)
    return got


def test_stop_token_string_and_length():
    model = FakeModel({A: B, B: C, C: D, D: EOS})
    engine = Engine(model, TOK, max_batch=4)
    eos = engine.add_request([A], SamplingParams(max_tokens=10))
    word = engine.add_request([A], SamplingParams(max_tokens=10, stop=[" c d", " c"]))  # first listed wins
    length = engine.add_request([A], SamplingParams(max_tokens=2))
    ignore = engine.add_request([A], SamplingParams(max_tokens=6, ignore_eos=True))
    whole = {rid: "".join(o.outputs[0].text for o in outs) for rid, outs in run(engine).items()}
    assert whole[eos] == " b c d" and whole[word] == " b" and whole[length] == " b c"
    assert whole[ignore] == " b c d" + TOK.decode([EOS, EOS + 1, EOS + 2])  # eos is text when ignored


def test_finish_reasons_and_stop_reasons_arrive_once_at_the_end():
    engine = Engine(FakeModel({A: B, B: C, C: EOS}), TOK, max_batch=4)
    ids = {engine.add_request([A], SamplingParams(max_tokens=10)): ("stop", EOS),
           engine.add_request([A], SamplingParams(max_tokens=10, stop=["c"])): ("stop", "c"),
           engine.add_request([A], SamplingParams(max_tokens=1)): ("length", None)}
    for rid, outs in run(engine).items():
        finals = [o for out in outs for o in out.outputs if o.finish_reason is not None]
        assert [(o.finish_reason, o.stop_reason) for o in finals] == [ids[rid]]
        assert outs[-1].finished and not any(out.finished for out in outs[:-1])
        assert all(o.stop_reason is None for out in outs for o in out.outputs if o.finish_reason is None)


def test_deltas_carry_only_what_is_new():
    engine = Engine(FakeModel(), TOK)
    rid = engine.add_request([A], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=2))
    outs = run(engine)[rid]
    assert len(outs) == 5 and all(len(o.outputs) == 1 for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == [[A + i] for i in range(1, 6)]
    for o in outs:
        (lp,) = o.outputs[0].logprobs
        assert lp.token == o.outputs[0].token_ids[0] and lp.top[0][0] == lp.token
        # log-softmax in fp32 near 20: a few ulps of 20 (1.9e-6 each) of error
        assert lp.logprob == pytest.approx(-math.log1p(51199 * math.exp(-20)), abs=2e-5)
        assert lp.top[1][1] == pytest.approx(-20 - math.log1p(51199 * math.exp(-20)), abs=1e-4)
    assert "".join(o.outputs[0].text for o in outs) == TOK.decode([A + i for i in range(1, 6)])


def test_one_decode_pass_per_step_for_every_running_sequence():
    model = FakeModel()
    engine = Engine(model, TOK, max_batch=3)
    for _ in range(3):
        engine.add_request([A, B], SamplingParams(max_tokens=4, ignore_eos=True))
    run(engine)
    decode = [c for c in model.calls if c[1] == 1]
    prefill = [c for c in model.calls if c[1] == 2]
    assert len(prefill) == 3  # one prefill chunk per step at most
    assert max(rows for rows, _ in decode) == 3  # later steps decode all three in one pass


def test_queue_when_the_cache_is_full_and_abort_frees_the_slot():
    engine = Engine(FakeModel(), TOK, max_batch=2)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    rids = [engine.add_request([A + 10 * i], params) for i in range(4)]
    engine.step()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.slots_used) == (2, 2, 2)
    engine.abort(rids[0])
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == rids[0]]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    assert engine.stats().running == 2  # the freed slot went to the next waiting request
    got = run(engine)
    assert rids[0] not in got and set(got) == set(rids[1:])
    for i, rid in enumerate(rids[1:], start=1):
        tokens = [t for out in got[rid] for o in out.outputs for t in o.token_ids]
        assert tokens[-1] == A + 10 * i + 30  # every one ran to its full length, past the aborted one
    assert engine.stats().slots_used == 0 and not engine.has_unfinished()
    engine.abort(rids[1])  # finished or unknown ids are ignored
    engine.abort("nope")
    assert engine.step() == []


def test_n_completions_share_the_prompt_and_report_by_index():
    engine = Engine(FakeModel(), TOK, max_batch=4)
    rid = engine.add_request([A, B, C, D], SamplingParams(max_tokens=3, n=3, ignore_eos=True))
    outs = run(engine)[rid]
    per_index: dict[int, list[int]] = {}
    for out in outs:
        assert len({o.index for o in out.outputs}) == len(out.outputs)  # each completion at most once
        for o in out.outputs:
            per_index.setdefault(o.index, []).extend(o.token_ids)
    assert per_index == {i: [D + 1, D + 2, D + 3] for i in range(3)}
    assert engine.stats().reused_tokens == 2 * 3  # the siblings copied the first one's prompt (all but its last)


def test_an_infill_ends_at_eom_and_a_whole_generate_merges_the_deltas():
    prompt = Infill("a", " b")
    ids = Engine(FakeModel(), TOK).prepare(prompt).prompt_ids
    engine = Engine(FakeModel({ids[-1]: C, C: D, D: EOM}), TOK)
    (whole,) = engine.generate([prompt], SamplingParams(max_tokens=10))
    (o,) = whole.outputs
    assert (o.text, o.token_ids, o.finish_reason, o.stop_reason) == (" c d", [C, D], "stop", EOM)
    assert whole.finished and whole.prompt_token_ids == ids


def test_prefill_only_caches_the_prompt_and_generates_nothing():
    """llama.cpp's n_predict 0 (the editors' context warm-up): the prompt's K/V stay in a slot, so the next
    request sharing it computes only the rest."""
    model = FakeModel()
    engine = Engine(model, TOK, max_batch=2)
    context = [A + i for i in range(20)]
    warm = engine.add_request(engine.prepare(context, SamplingParams(n=3), prefill_only=True))
    (out,) = run(engine)[warm]
    assert out.finished and [(o.text, o.token_ids, o.finish_reason) for o in out.outputs] == [("", [], "length")]
    assert all(rows == 1 for rows, _ in model.calls)  # one sequence despite n=3: nothing to sample
    (whole,) = engine.generate([context + [B, C]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert whole.cached_prompt_tokens == 20 and whole.outputs[0].token_ids == [C + 1, C + 2]


class Recital(FakeModel):
    """Says ``text`` token by token after a one-token prompt, whatever it is fed: the token after position p is
    the text's p-th."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.said = TOK.encode(text) + [EOS]

    def forward(self, tokens, input_pos=None, cache=None, last_only=False):
        logits = torch.zeros(tokens.shape[0], 1, self.config.vocab_size)
        for b, p in enumerate(input_pos[:, -1].tolist()):
            logits[b, 0, self.said[min(p, len(self.said) - 1)]] = 20.0
        return logits


def test_min_indent_ends_at_a_line_indented_less():
    """After the first generated line break, a line with fewer leading spaces than min_indent ends the text
    before its first character (llama.cpp's n_indent); the cursor's own line is never checked."""
    text = "x\n    y\n  z\n"
    engine = Engine(Recital(text), TOK)
    (four,) = engine.generate([[A]], SamplingParams(max_tokens=20, min_indent=4))
    assert (four.outputs[0].text, four.outputs[0].finish_reason) == ("x\n    y\n  ", "length")
    (two,) = engine.generate([[A]], SamplingParams(max_tokens=20, min_indent=2))
    assert (two.outputs[0].text, two.outputs[0].finish_reason) == (text, "stop")  # indented enough: no cut
    (empty,) = engine.__class__(Recital("x\n    y\n\n    z"), TOK).generate([[A]], SamplingParams(min_indent=4))
    assert empty.outputs[0].text == "x\n    y\n"  # an empty line ends it too, as in llama.cpp
    (first,) = Engine(Recital("  x\n    y"), TOK).generate([[A]], SamplingParams(min_indent=4))
    assert first.outputs[0].text == "  x\n    y"  # the first line is the cursor's: never checked
    streamed = []
    rid = engine.add_request([A], SamplingParams(max_tokens=20, min_indent=4))
    while engine.has_unfinished():
        streamed += [o.text for out in engine.step() if out.request_id == rid for o in out.outputs]
    assert "".join(streamed) == "x\n    y\n  "  # nothing shown was taken back


def test_one_failing_request_does_not_hurt_the_others():
    """A forward pass that raises for one row (a poisoned token here) fails that request alone, with its error;
    the rows it was batched with get their own tokens, and the engine keeps serving."""
    POISON = 777

    class Flaky(FakeModel):
        def forward(self, tokens, *args, **kwargs):
            if (tokens == POISON).any():
                raise RuntimeError("poisoned row")
            return super().forward(tokens, *args, **kwargs)

    engine = Engine(Flaky({POISON - 1: POISON}), TOK, max_batch=4)
    good = engine.add_request([A], SamplingParams(max_tokens=6, ignore_eos=True))
    bad = engine.add_request([POISON - 2], SamplingParams(max_tokens=6, ignore_eos=True))  # -> POISON - 1 -> POISON
    got = run(engine)
    assert [t for out in got[good] for o in out.outputs for t in o.token_ids] == [A + i for i in range(1, 7)]
    assert got[bad][-1].finished and "poisoned row" in got[bad][-1].error
    assert got[bad][-1].outputs[-1].finish_reason == "abort"
    (after,) = engine.generate([[B]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert after.outputs[0].token_ids == [B + 1, B + 2] and after.error is None
    assert engine.stats().slots_used == 0


def test_a_failure_after_sampling_fails_its_request_only(monkeypatch):
    engine = Engine(FakeModel(), TOK, max_batch=4)
    good = engine.add_request([A], SamplingParams(max_tokens=4, ignore_eos=True))
    bad = engine.add_request([B], SamplingParams(max_tokens=4, ignore_eos=True), request_id="bad")
    real = Engine._accept

    def accept(self, seq, *args):
        if seq.request_id == "bad" and len(seq.output) == 2:
            raise ValueError("detokenizer bug")
        return real(self, seq, *args)
    monkeypatch.setattr(Engine, "_accept", accept)
    got = run(engine)
    assert sum(len(o.token_ids) for out in got[good] for o in out.outputs) == 4
    assert got[bad][-1].error == "ValueError: detokenizer bug" and got[bad][-1].finished
