"""The generation engine: requests in, incremental outputs (deltas) out, with continuous batching.

    engine = Engine.from_pretrained("Salesforce/codegen2-1B_P", quant="int8")   # or Engine(model, tokenizer)
    rid = engine.add_request("def fib(n):", SamplingParams(max_tokens=64))
    rid2 = engine.add_request(Infill(prefix, suffix), SamplingParams(temperature=0.2, n=4, seed=1))
    while engine.has_unfinished():
        for out in engine.step(): ...   # per completion that changed: its new text, token ids and logprobs

``generate([...])`` runs that loop and returns whole completions; ``AsyncEngine`` (async_engine.py) runs it in a
background thread for asyncio code (the server). Requests join and leave between steps (scheduler.py); the model
runs through the runner (runner.py), which owns the static KV cache; prompts are built and checked by
``prepare_request`` (prompt.py); each step samples every row in one call (sampling.py) and turns tokens into text
per sequence (detokenize.py). The engine never changes the model it is given: kernels and quantization are applied
when the model is loaded (``Engine.from_pretrained``, or ``codegen2.kernels.prepare_for_inference``).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from codegen2.engine.detokenize import TextStream
from codegen2.engine.prompt import PreparedRequest, Prompt, prepare_request
from codegen2.engine.runner import ModelRunner
from codegen2.engine.sampling import (
    InfillVocab,
    SamplingParams,
    sample_batch,
    token_logprobs,
    verify_row,
)
from codegen2.engine.scheduler import Scheduler, Sequence
from codegen2.engine.speculative import DraftProposer, NgramProposer, SpeculativeConfig
from codegen2.engine.threads import ThreadGovernor
from codegen2.models.checkpoint import check_device  # noqa: F401  (the server reaches models only through the engine)
from codegen2.models.kv_cache import KVCache

if TYPE_CHECKING:
    from codegen2.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely (id, log-prob) pairs, best first


@dataclass
class CompletionOutput:
    """What is new in one completion since its previous output (in ``generate``'s result: all of it)."""
    index: int  # which of the request's n completions
    text: str  # never a stop string or half a character; for an infill: the middle
    token_ids: list[int]
    finish_reason: str | None  # None while running; then "stop", "length" or "abort"
    stop_reason: str | int | None = None  # with "stop": the stop string, or the stop token id, that ended it
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when logprobs were asked for

    def add(self, newer: CompletionOutput) -> None:
        """Append a later delta of the same completion."""
        self.text += newer.text
        self.token_ids += newer.token_ids
        if newer.logprobs is not None:
            self.logprobs = (self.logprobs or []) + newer.logprobs
        self.finish_reason, self.stop_reason = newer.finish_reason, newer.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # the completions that changed (each at most once per output)
    finished: bool  # every completion of the request has finished
    cached_prompt_tokens: int = 0  # prompt tokens found in the KV cache instead of computed (0 until admitted)
    error: str | None = None  # set when the engine failed this request (its completions end with "abort")
    draft_tokens: int = 0  # speculative decoding: drafts proposed for the request so far
    accepted_draft_tokens: int = 0  # ... and kept


@dataclass
class EngineStats:
    waiting: int  # sequences queued for a slot
    running: int
    slots: int
    slots_used: int
    cached_tokens: int  # tokens of the running sequences held in the cache
    max_seq_len: int
    reused_tokens: int  # prompt tokens served from the cache instead of prefilled, since the start
    draft_tokens: int = 0  # speculative decoding: drafts proposed since the start
    accepted_draft_tokens: int = 0  # ... and kept


@dataclass(eq=False)
class _Stream:
    """Per-sequence state between steps: its text, its stops, its random generator, and what is undelivered."""
    text: TextStream
    stop_ids: set[int]
    generator: torch.Generator | None
    new_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None
    reported: bool = False  # the final output was delivered
    drafted: int = 0  # speculative decoding: drafts proposed, and kept
    accepted: int = 0


@dataclass(eq=False)
class _Request:
    id: str
    prompt_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 16, max_seq_len: int | None = None,
                 kv_cache_bytes: int = 4 << 30, prefill_chunk: int = 256,
                 speculative: SpeculativeConfig | None = None, adapt_threads: bool | None = None) -> None:
        """max_batch sequences run at once, each with a KV-cache slot of max_seq_len positions (default: the
        model's context), as many as fit in kv_cache_bytes; further requests wait in a queue. speculative: draft
        tokens proposed by prompt lookup or a draft model and verified in the decode pass (speculative.py).
        adapt_threads: on a CPU, use fewer of torch's threads while other processes keep cores busy (threads.py);
        default on unless $CODEGEN2_ADAPT_THREADS is 0 (the test suite turns it off: torch's own fp32 kernels
        may round differently at another thread count, and its tests compare runs token for token)."""
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        dtype = model.tok_embeddings.weight.dtype
        per_slot = KVCache.bytes_per_slot(cfg.n_layers, cfg.n_kv_heads, self.max_seq_len, cfg.head_dim, dtype)
        n_slots = min(max_batch, kv_cache_bytes // per_slot)
        if n_slots < 1:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} cannot hold one sequence of {self.max_seq_len} "
                             f"tokens ({per_slot} bytes); raise it or lower max_seq_len")
        self.scheduler = Scheduler(n_slots, self.max_seq_len, prefill_chunk)
        self.runner = ModelRunner(model, n_slots, self.max_seq_len)
        self._requests: dict[str, _Request] = {}
        self._streams: dict[Sequence, _Stream] = {}
        self._pending: list[RequestOutput] = []  # finals of aborted requests, delivered by the next step
        self._ids = itertools.count()
        self._vocab: InfillVocab | None = None  # for the infill sampling stage, built on first use
        self.speculative, self._proposer = speculative, None
        if speculative is not None and speculative.method == "ngram":
            self._proposer = NgramProposer(speculative)
        elif speculative is not None:
            draft_cfg = speculative.draft.config
            if draft_cfg.vocab_size != cfg.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft_cfg.vocab_size}) is not the model's "
                                 f"({cfg.vocab_size}): a draft must share the tokenizer")
            if draft_cfg.max_seq_len < self.max_seq_len:
                raise ValueError(f"the draft model's context ({draft_cfg.max_seq_len}) is shorter than the "
                                 f"engine's ({self.max_seq_len})")
            self._vocab = InfillVocab.of(tokenizer)
            self._proposer = DraftProposer(speculative, n_slots, self.max_seq_len, self._vocab, prefill_chunk)
        self._drafted = self._accepted = 0
        on_cpu = next(model.parameters()).device.type == "cpu"
        if adapt_threads is None:
            adapt_threads = os.environ.get("CODEGEN2_ADAPT_THREADS", "1") != "0"
        self._threads = ThreadGovernor() if adapt_threads and on_cpu else None

    @classmethod
    def from_pretrained(cls, model: str | Path, *, dtype: str = "bf16", device: str = "cpu", quant: str | None = None,
                        mp_num: int | None = None, adapter: str | Path | None = None,
                        speculative: str | None = None, num_speculative_tokens: int = 5, **engine_args) -> Engine:
        """Load a checkpoint directory or hub id, add a LoRA ``adapter`` directory (peft's format) unmerged if
        given, apply the weight format ``quant`` and the native kernels (codegen2.kernels) to the base layers,
        load its tokenizer, and build an engine (``engine_args``: see ``Engine``). speculative: "ngram" (prompt
        lookup) or "draft:DIR" (a smaller model with the same tokenizer, loaded the same way), proposing
        num_speculative_tokens drafts per step."""
        from codegen2.kernels import prepare_for_inference, quantizer
        from codegen2.models.checkpoint import load_model, resolve
        from codegen2.models.lora import apply_adapter
        from codegen2.tokenizer import load_tokenizer

        spec = None
        if speculative is not None:
            method, _, where = speculative.partition(":")
            if method not in ("ngram", "draft") or (method == "draft") != bool(where):
                raise ValueError(f"speculative must be 'ngram' or 'draft:DIR', got {speculative!r}")
            draft = None
            if method == "draft":
                draft = prepare_for_inference(load_model(resolve(where), dtype=dtype, device=device,
                                                         on_block=quantizer(quant)), quant)
            spec = SpeculativeConfig(method, num_speculative_tokens, draft=draft)
        directory = resolve(model)
        # Quantized formats are applied block by block while loading: no second copy of the weights. An adapter
        # then wraps the quantized base layers (LoRALinear keeps whatever layer it wraps).
        loaded = load_model(directory, dtype=dtype, device=device, mp_num=mp_num, on_block=quantizer(quant))
        if adapter is not None:
            apply_adapter(loaded, adapter, directory, mp_num)
        return cls(prepare_for_inference(loaded, quant), load_tokenizer(directory), speculative=spec, **engine_args)

    # --- requests ---------------------------------------------------------------------------------------------

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None, fit: bool = False,
                prefill_only: bool = False) -> PreparedRequest:
        """Tokenize and check a prompt for this engine (any thread may call this); see prompt.py."""
        return prepare_request(self.tokenizer, prompt, params, self.max_seq_len, fit, prefill_only)

    def add_request(self, prompt: Prompt | PreparedRequest, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt (text, token ids, ``Infill(prefix, suffix)``, or one already prepared); return its id.
        Raises InvalidRequest for a prompt that cannot run."""
        request = prompt if isinstance(prompt, PreparedRequest) else self.prepare(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids, params = request.prompt_ids, request.params
        entry = _Request(request_id, ids)
        for index in range(params.n):
            seq = Sequence(request_id, index, ids, params, prefill_only=request.prefill_only)
            self.scheduler.add(seq)
            entry.seqs.append(seq)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
            self._streams[seq] = _Stream(TextStream(self.tokenizer, params.stop, params.min_indent),
                                         set(params.stop_token_ids), generator,
                                         new_logprobs=[] if params.logprobs is not None else None)
        self._requests[request_id] = entry
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its cache slots are freed and its final output (finish_reason 'abort') is returned
        by the next step(). Unknown or finished ids are ignored."""
        request = self._requests.get(request_id)
        if request is None:
            return
        self.scheduler.abort(request_id)
        self._pending.append(self._output(request))
        self._forget(request)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(waiting=len(s.waiting) + sum(map(len, s.held.values())), running=len(s.running),
                           slots=s.n_slots, slots_used=s.n_slots - len(s.free),
                           cached_tokens=sum(q.n_cached for q in s.running), max_seq_len=s.max_seq_len,
                           reused_tokens=s.reused_tokens, draft_tokens=self._drafted,
                           accepted_draft_tokens=self._accepted)

    # --- the loop -----------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step: one decode token for every running sequence and at most one prefill chunk.
        Returns an output for each request that changed.

        A request whose work raises (a bug, or a state no input should reach) fails alone: it ends with
        finish_reason "abort" and ``error`` set, and the others go on; a failed batched forward pass is retried
        row by row to find the rows at fault."""
        outputs, self._pending = self._pending, []
        if self._threads is not None:
            self._threads.update()
        batch = self.scheduler.schedule()
        for src, dst, length in batch.copies:
            self.runner.copy_prefix(src, dst, length)
        rows: list[Sequence] = []  # the sequences that get a token this step, in the order of `logits`
        logits: list[torch.Tensor] = []
        touched: dict[str, _Request] = {}
        if batch.decode:
            touched.update((s.request_id, self._requests[s.request_id]) for s in batch.decode)
            plain = self._speculate(batch.decode) if self._proposer is not None else batch.decode
            seqs, out = self._decode(plain) if plain else ([], [])
            for seq in seqs:
                self.scheduler.decoded(seq)
            rows += seqs
            logits += out
        if batch.prefill is not None:
            chunk, seq = batch.prefill, batch.prefill.seq
            try:
                last = self.runner.prefill(seq.slot, chunk.tokens, chunk.start)
            except Exception as e:  # noqa: BLE001 - see the docstring
                self._fail(seq, e)
                touched[seq.request_id] = self._requests[seq.request_id]
            else:
                self.scheduler.prefilled(chunk)
                if chunk.last:
                    touched[seq.request_id] = self._requests[seq.request_id]
                    if seq.prefill_only:
                        self._finish(seq, "length")
                    else:
                        logits.append(last)
                        rows.append(seq)
        for seq, choice in self._sample(rows, logits):
            if seq.finished:  # its request failed earlier in this loop
                continue
            try:
                self._accept(seq, choice.token, choice.logprob, choice.top)
            except Exception as e:  # noqa: BLE001 - see the docstring
                self._fail(seq, e)
        for request in touched.values():
            out = self._output(request)
            if out.outputs:
                outputs.append(out)
            if out.finished:
                self._forget(request)
        return outputs

    def _speculate(self, seqs: list[Sequence]) -> list[Sequence]:
        """Propose drafts for the decode rows and verify them in one pass; return the rows left for the plain
        decode pass (all of them when nothing was proposed)."""
        ks = [max(0, min(self.speculative.num_tokens, s.params.max_tokens - len(s.output) - 1,
                         self.max_seq_len - len(s.tokens) - 1)) for s in seqs]
        try:
            if isinstance(self._proposer, DraftProposer):
                proposals = self._proposer.propose(seqs, ks, [self._streams[s].generator for s in seqs])
            else:
                proposals = self._proposer.propose(seqs, ks)
        except Exception:  # noqa: BLE001 - a proposer that fails costs the speedup, never a request
            log.exception("the speculative proposer failed; decoding without drafts this step")
            return seqs
        if not any(d for d, _ in proposals):
            return seqs
        rows = [[s.output[-1], *d] for s, (d, _) in zip(seqs, proposals)]
        try:
            logits = self.runner.verify([s.slot for s in seqs], rows, [len(s.tokens) - 1 for s in seqs])
        except Exception:  # noqa: BLE001 - the plain pass finds the rows at fault
            log.exception("the speculative verification failed; decoding without drafts this step")
            return seqs
        for b, (seq, (drafts, qs)) in enumerate(zip(seqs, proposals)):
            stream, params = self._streams[seq], seq.params
            try:
                kept = verify_row(logits[b], drafts, qs, params, (seq.prompt, seq.output), stream.generator,
                                  self._vocab if "infill" in params.order else None)
                lps = token_logprobs(logits[b], kept, params.logprobs) if params.logprobs is not None else None
            except Exception as e:  # noqa: BLE001
                self._fail(seq, e)
                continue
            accepted = len(kept) - 1  # drafts kept; the last token is the target's own
            self._proposer.verified(seq, len(seq.tokens), accepted)
            stream.drafted, stream.accepted = stream.drafted + len(drafts), stream.accepted + accepted
            self._drafted, self._accepted = self._drafted + len(drafts), self._accepted + accepted
            # The pass wrote K/V for the last token and every draft; those of the kept drafts are valid.
            seq.n_cached = len(seq.tokens) + accepted
            for i, token in enumerate(kept):
                try:
                    self._accept(seq, token, *(lps[i] if lps is not None else (None, None)))
                except Exception as e:  # noqa: BLE001
                    self._fail(seq, e)
                if seq.finished:
                    break
        return []

    def _decode(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[torch.Tensor]]:
        """One decode pass for seqs -> (the seqs that succeeded, their logits as one (B, V) tensor or none)."""
        args = lambda group: ([s.slot for s in group], [s.output[-1] for s in group],  # noqa: E731
                              [len(s.tokens) - 1 for s in group])
        try:
            return seqs, [self.runner.decode(*args(seqs))]
        except Exception as e:  # noqa: BLE001 - retried row by row below
            if len(seqs) == 1:
                self._fail(seqs[0], e)
                return [], []
        good, out = [], []
        for seq in seqs:
            try:
                out.append(self.runner.decode(*args([seq])))
                good.append(seq)
            except Exception as e:  # noqa: BLE001
                self._fail(seq, e)
        return good, out

    def _sample(self, rows: list[Sequence], logits: list[torch.Tensor]):
        """(seq, Sampled) for every row still running, sampled in one call (row by row only after a failure)."""
        rows = [s for s in rows if not s.finished]
        if not rows:
            return []
        logits = torch.cat(logits)  # (B, V)
        if any("infill" in s.params.order for s in rows) and self._vocab is None:
            self._vocab = InfillVocab.of(self.tokenizer)

        def run(idx: list[int]):
            return sample_batch(logits[idx], [rows[i].params for i in idx],
                                [self._streams[rows[i]].generator for i in idx],
                                [(rows[i].prompt, rows[i].output) for i in idx], self._vocab)
        try:
            return list(zip(rows, run(list(range(len(rows))))))
        except Exception:  # noqa: BLE001 - find the rows at fault
            done = []
            for i, seq in enumerate(rows):
                try:
                    done.append((seq, run([i])[0]))
                except Exception as e:  # noqa: BLE001
                    self._fail(seq, e)
            return done

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """End seq's whole request with an error; the engine goes on with the others."""
        request = self._requests[seq.request_id]
        log.error("request %s failed in the engine", request.id, exc_info=error)
        request.error = f"{type(error).__name__}: {error}"
        self.scheduler.abort(request.id)

    def generate(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion (continuously batched); return their whole outputs in order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        whole: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                acc = whole.setdefault(out.request_id, RequestOutput(out.request_id, out.prompt_token_ids, [], False))
                merge(acc, out)
        return [whole[i] for i in ids]

    # --- per-token work ---------------------------------------------------------------------------------------

    def _accept(self, seq: Sequence, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        params, stream = seq.params, self._streams[seq]
        if token in stream.stop_ids:
            self._finish(seq, "stop", token)
            return
        if stream.new_logprobs is not None:
            stream.new_logprobs.append(TokenLogprob(token, logprob, top))
        seq.output.append(token)
        stream.new_ids.append(token)
        text, hit, cut = stream.text.push(token)
        stream.new_text += text
        if hit is not None:
            self._finish(seq, "stop", hit, flush=False)
        elif cut:  # a line indented less than min_indent: llama.cpp reports it as a limit
            self._finish(seq, "length", flush=False)
        elif len(seq.output) >= params.max_tokens or len(seq.tokens) >= self.max_seq_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop: str | int | None = None, flush: bool = True) -> None:
        stream = self._streams[seq]
        if flush:  # release what the UTF-8 decoder and the stop matcher still hold
            text, hit, cut = stream.text.finish()
            stream.new_text += text
            if hit is not None:
                reason, stop = "stop", hit
            elif cut:
                reason, stop = "length", None
        stream.stop_reason = stop
        self.scheduler.finish(seq, reason)

    def _output(self, request: _Request) -> RequestOutput:
        """The request's undelivered deltas: each completion with new tokens or a finish not yet reported."""
        outs = []
        for seq in request.seqs:
            stream = self._streams[seq]
            if not (stream.new_ids or stream.new_text or (seq.finished and not stream.reported)):
                continue
            outs.append(CompletionOutput(seq.index, stream.new_text, stream.new_ids, seq.finish_reason,
                                         stream.stop_reason if seq.finished else None, stream.new_logprobs))
            stream.new_ids, stream.new_text = [], ""
            stream.new_logprobs = [] if stream.new_logprobs is not None else None
            stream.reported = seq.finished
        streams = [self._streams[s] for s in request.seqs]
        return RequestOutput(request.id, request.prompt_ids, outs, all(s.finished for s in request.seqs),
                             request.seqs[0].reused, request.error, sum(s.drafted for s in streams),
                             sum(s.accepted for s in streams))

    def _forget(self, request: _Request) -> None:
        self._requests.pop(request.id, None)
        for seq in request.seqs:
            self._streams.pop(seq, None)
            if self._proposer is not None:
                self._proposer.forget(seq)


def merge(whole: RequestOutput, delta: RequestOutput) -> None:
    """Fold a later output of the same request into ``whole`` (completions kept in index order)."""
    by_index = {o.index: o for o in whole.outputs}
    for o in delta.outputs:
        if o.index in by_index:
            by_index[o.index].add(o)
        else:
            by_index[o.index] = CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason, o.stop_reason,
                                                 None if o.logprobs is None else list(o.logprobs))
    whole.outputs = [by_index[i] for i in sorted(by_index)]
    whole.finished, whole.cached_prompt_tokens = delta.finished, delta.cached_prompt_tokens
    whole.error = delta.error or whole.error
    whole.draft_tokens, whole.accepted_draft_tokens = delta.draft_tokens, delta.accepted_draft_tokens
