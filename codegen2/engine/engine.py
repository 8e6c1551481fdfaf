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
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from codegen2.engine.detokenize import TextStream
from codegen2.engine.prompt import PreparedRequest, Prompt, prepare_request
from codegen2.engine.runner import ModelRunner
from codegen2.engine.sampling import SamplingParams, sample_batch
from codegen2.engine.scheduler import Scheduler, Sequence
from codegen2.models.kv_cache import KVCache

if TYPE_CHECKING:
    from codegen2.tokenizer import Tokenizer


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


@dataclass
class EngineStats:
    waiting: int  # sequences queued for a slot
    running: int
    slots: int
    slots_used: int
    cached_tokens: int  # tokens of the running sequences held in the cache
    max_seq_len: int
    reused_tokens: int  # prompt tokens served from the cache instead of prefilled, since the start


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


@dataclass(eq=False)
class _Request:
    id: str
    prompt_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 16, max_seq_len: int | None = None,
                 kv_cache_bytes: int = 4 << 30, prefill_chunk: int = 256) -> None:
        """max_batch sequences run at once, each with a KV-cache slot of max_seq_len positions (default: the
        model's context), as many as fit in kv_cache_bytes; further requests wait in a queue."""
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

    @classmethod
    def from_pretrained(cls, model: str | Path, *, dtype: str = "bf16", device: str = "cpu", quant: str | None = None,
                        mp_num: int | None = None, adapter: str | Path | None = None, **engine_args) -> Engine:
        """Load a checkpoint directory or hub id, add a LoRA ``adapter`` directory (peft's format) unmerged if
        given, apply the weight format ``quant`` and the native kernels (codegen2.kernels) to the base layers,
        load its tokenizer, and build an engine (``engine_args``: see ``Engine``)."""
        from codegen2.kernels import prepare_for_inference
        from codegen2.models.checkpoint import load_model, resolve
        from codegen2.models.lora import apply_adapter
        from codegen2.tokenizer import load_tokenizer

        directory = resolve(model)
        loaded = load_model(directory, dtype=dtype, device=device, mp_num=mp_num)
        if adapter is not None:
            apply_adapter(loaded, adapter, directory, mp_num)
        return cls(prepare_for_inference(loaded, quant), load_tokenizer(directory), **engine_args)

    # --- requests ---------------------------------------------------------------------------------------------

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None, fit: bool = False) -> PreparedRequest:
        """Tokenize and check a prompt for this engine (any thread may call this); see prompt.py."""
        return prepare_request(self.tokenizer, prompt, params, self.max_seq_len, fit)

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
            seq = Sequence(request_id, index, ids, params)
            self.scheduler.add(seq)
            entry.seqs.append(seq)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
            self._streams[seq] = _Stream(TextStream(self.tokenizer, params.stop), set(params.stop_token_ids),
                                         generator, new_logprobs=[] if params.logprobs is not None else None)
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
                           reused_tokens=s.reused_tokens)

    # --- the loop -----------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step: one decode token for every running sequence and at most one prefill chunk.
        Returns an output for each request that changed."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        for src, dst, length in batch.copies:
            self.runner.copy_prefix(src, dst, length)
        rows: list[Sequence] = []  # the sequences that get a token this step, in the order of `logits`
        logits: list[torch.Tensor] = []
        if batch.decode:
            seqs = batch.decode
            logits.append(self.runner.decode([s.slot for s in seqs], [s.output[-1] for s in seqs],
                                             [len(s.tokens) - 1 for s in seqs]))
            for seq in seqs:
                self.scheduler.decoded(seq)
            rows += seqs
        if batch.prefill is not None:
            chunk = batch.prefill
            last = self.runner.prefill(chunk.seq.slot, chunk.tokens, chunk.start)
            self.scheduler.prefilled(chunk)
            if chunk.last:
                logits.append(last)
                rows.append(chunk.seq)
        if rows:
            sampled = sample_batch(torch.cat(logits), [s.params for s in rows],
                                   [self._streams[s].generator for s in rows], [(s.prompt, s.output) for s in rows])
            for seq, choice in zip(rows, sampled):
                self._accept(seq, choice.token, choice.logprob, choice.top)
        for request in {self._requests[s.request_id].id: self._requests[s.request_id] for s in rows}.values():
            out = self._output(request)
            if out.outputs:
                outputs.append(out)
            if out.finished:
                self._forget(request)
        return outputs

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
        text, hit = stream.text.push(token)
        stream.new_text += text
        if hit is not None:
            self._finish(seq, "stop", hit, flush=False)
        elif len(seq.output) >= params.max_tokens or len(seq.tokens) >= self.max_seq_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop: str | int | None = None, flush: bool = True) -> None:
        stream = self._streams[seq]
        if flush:  # release what the UTF-8 decoder and the stop matcher still hold
            text, hit = stream.text.finish()
            stream.new_text += text
            if hit is not None:
                reason, stop = "stop", hit
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
        return RequestOutput(request.id, request.prompt_ids, outs, all(s.finished for s in request.seqs))

    def _forget(self, request: _Request) -> None:
        self._requests.pop(request.id, None)
        for seq in request.seqs:
            self._streams.pop(seq, None)


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
    whole.finished = delta.finished
