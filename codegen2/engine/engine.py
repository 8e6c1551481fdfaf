"""The generation engine: requests in, incremental outputs out, with continuous batching.

    engine = Engine(model, tokenizer)
    rid = engine.add_request("def fib(n):", SamplingParams(max_tokens=64))
    rid2 = engine.add_request(Infill(prefix, suffix), SamplingParams(temperature=0.2, n=4, seed=1))
    while engine.has_unfinished():
        for out in engine.step(): ...            # RequestOutput with each completion's text so far and its delta

``generate([...])`` does that loop for you; ``AsyncEngine.stream(...)`` runs the loop in a background thread and
yields outputs to asyncio code (the server). Requests join and leave between steps (scheduler.py); the model
runs through the runner (runner.py), which owns the static KV cache.

Text is produced per sequence by an incremental UTF-8-safe decoder and a stop-string matcher, so streamed text
never contains half a character or any part of a stop string.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from codegen2 import infill
from codegen2.engine.kv_cache import KVCache
from codegen2.engine.runner import ModelRunner
from codegen2.engine.sampling import SamplingParams, apply_penalties, sample, top_logprobs
from codegen2.engine.scheduler import Scheduler, Sequence

if TYPE_CHECKING:
    from codegen2.tokenizer import IncrementalDecoder, Tokenizer

Prompt = str | list[int] | infill.Infill


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely (id, log-prob) pairs, best first


@dataclass
class CompletionOutput:
    index: int
    text: str  # everything generated so far (for infill: the middle), never a stop string or half a character
    token_ids: list[int]
    finish_reason: str | None  # None while running; then "stop", "length" or "abort"
    delta: str = ""  # text new since this completion's previous output
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


class StopStrings:
    """Finds stop strings across token boundaries and holds back text that might still become one."""

    def __init__(self, stops: Seq[str]) -> None:
        self.stops = list(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0

    def feed(self, chunk: str) -> tuple[str, bool]:
        """Add decoded text; return (text that is safe to emit now, whether a stop string was found)."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += chunk
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        end = min(hits) if hits else len(self.text) - self._held_back()
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        if hits:
            self.text = self.text[:end]
        return out, bool(hits)

    def _held_back(self) -> int:
        # The longest tail of the text that is a proper prefix of some stop string.
        for n in range(min(len(self.text), self.longest - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def rest(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


@dataclass(eq=False)
class _Stream:
    """Per-sequence text state."""
    decoder: IncrementalDecoder
    stops: StopStrings
    stop_ids: set[int]
    generator: torch.Generator | None
    delta: str = ""
    logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)
class _Request:
    id: str
    prompt_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 16, max_seq_len: int | None = None,
                 kv_cache_bytes: int = 4 << 30, prefill_chunk: int = 256, linear: str = "auto") -> None:
        """max_batch sequences run at once, each with a KV-cache slot of max_seq_len positions (default: the
        model's context), as many as fit in kv_cache_bytes; further requests wait in a queue.

        linear picks the matrix kernels, swapped into ``model`` in place: "bf16" (the native CPU decode kernels
        for a bf16 model), "int8" (weight-only int8, quantized here), "torch" (the model as given), or "auto":
        "bf16" for a bf16 model on the CPU, else "torch".
        """
        cfg = model.config
        weight = model.tok_embeddings.weight
        if linear == "auto":
            linear = "bf16" if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" else "torch"
        if linear not in ("bf16", "int8", "torch"):
            raise ValueError(f"linear must be 'auto', 'bf16', 'int8' or 'torch', got {linear!r}")
        if linear != "torch":
            from codegen2.engine.kernels import prepare_for_decode
            prepare_for_decode(model, linear)
        self.linear = linear
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

    # --- requests ---------------------------------------------------------------------------------------------

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt (text, token ids, or ``Infill(prefix, suffix)``); return its request id."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop_ids = set(params.stop_token_ids)
        if isinstance(prompt, infill.Infill):
            ids = infill.infill_prompt(self.tokenizer, prompt.prefix, prompt.suffix)
            stop_ids |= set(infill.stop_ids(self.tokenizer))
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.tokenizer.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.tokenizer.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if not params.ignore_eos:
            stop_ids.add(self.tokenizer.eos_id)
        request = _Request(request_id, ids)
        for index in range(params.n):
            seq = Sequence(request_id, index, ids, params)
            self.scheduler.add(seq)  # raises for a prompt that leaves no room to generate
            request.seqs.append(seq)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
            self._streams[seq] = _Stream(self.tokenizer.incremental_decoder(), StopStrings(params.stop), stop_ids,
                                         generator, logprobs=[] if params.logprobs is not None else None)
        self._requests[request_id] = request
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

    # --- the loop -----------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step: one decode token for every running sequence and at most one prefill chunk.
        Returns an output for each request that changed."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        for src, dst, length in batch.copies:
            self.runner.copy_prefix(src, dst, length)
        touched: dict[str, _Request] = {}
        if batch.decode:
            seqs = batch.decode
            logits = self.runner.decode([s.slot for s in seqs], [s.output[-1] for s in seqs],
                                        [len(s.tokens) - 1 for s in seqs])
            for seq, row in zip(seqs, logits):
                self.scheduler.decoded(seq)
                self._next_token(seq, row)
                touched[seq.request_id] = self._requests[seq.request_id]
        if batch.prefill is not None:
            chunk = batch.prefill
            logits = self.runner.prefill(chunk.seq.slot, chunk.tokens, chunk.start)
            self.scheduler.prefilled(chunk)
            if chunk.last:
                self._next_token(chunk.seq, logits)
                touched[chunk.seq.request_id] = self._requests[chunk.seq.request_id]
        for request in touched.values():
            outputs.append(self._output(request))
            if all(s.finished for s in request.seqs):
                self._forget(request)
        return outputs

    def generate(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion (continuously batched); return their final outputs in order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    # --- per-token work ---------------------------------------------------------------------------------------

    def _next_token(self, seq: Sequence, logits: torch.Tensor) -> None:
        params, stream = seq.params, self._streams[seq]
        row = apply_penalties(logits, params, seq.prompt, seq.output)
        token = int(sample(row[None], params, stream.generator)[0])
        if token in stream.stop_ids:
            self._finish(seq, "stop")
            return
        if stream.logprobs is not None:
            logprob, top = top_logprobs(logits, token, params.logprobs)
            stream.logprobs.append(TokenLogprob(token, logprob, top))
        seq.output.append(token)
        text, hit = stream.stops.feed(stream.decoder.push(token))
        stream.delta += text
        if hit:
            self._finish(seq, "stop", string_hit=True)
        elif len(seq.output) >= params.max_tokens or len(seq.tokens) >= self.max_seq_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, string_hit: bool = False) -> None:
        stream = self._streams[seq]
        if not string_hit:  # release what the UTF-8 decoder and the stop matcher still hold
            text, hit = stream.stops.feed(stream.decoder.flush())
            stream.delta += text if hit else text + stream.stops.rest()
            reason = "stop" if hit else reason
        self.scheduler.finish(seq, reason)

    def _output(self, request: _Request) -> RequestOutput:
        outs = []
        for seq in request.seqs:
            stream = self._streams[seq]
            outs.append(CompletionOutput(seq.index, stream.stops.text, list(seq.output), seq.finish_reason,
                                         stream.delta, list(stream.logprobs) if stream.logprobs is not None
                                         else None))
            stream.delta = ""
        return RequestOutput(request.id, request.prompt_ids, outs, all(s.finished for s in request.seqs))

    def _forget(self, request: _Request) -> None:
        self._requests.pop(request.id, None)
        for seq in request.seqs:
            self._streams.pop(seq, None)


class AsyncEngine:
    """Runs an Engine's step loop in a background thread; ``stream()`` yields a request's outputs to asyncio.

    Only the loop thread touches the engine: new requests and aborts go through a thread-safe inbox that the
    loop drains between steps, so the event loop never waits for a step. Leaving the ``async for`` early (a
    client disconnecting, a cancelled task) aborts the request, which frees its cache slots. If the loop ever
    fails, ``error`` holds the exception and every stream, current or new, raises instead of waiting forever.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="codegen2-engine", daemon=True)
        self._thread.start()

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come. A prompt the engine rejects raises its ValueError here."""
        if self.error is not None:
            raise RuntimeError("the engine loop has stopped") from self.error
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        self._queues[rid] = (loop, outputs)
        self._inbox.put(("add", rid, prompt, params))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, ValueError):
                    raise out
                if isinstance(out, BaseException):
                    raise RuntimeError("the engine loop failed") from out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            target[0].call_soon_threadsafe(target[1].put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "abort":
                self.engine.abort(item[1])
                continue
            _, rid, prompt, params = item
            try:
                self.engine.add_request(prompt, params, rid)
            except ValueError as e:  # a bad prompt fails its own stream only
                self._deliver(rid, e)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
            self._drain_inbox()  # aborts sent just before shutdown still free their slots
        except BaseException as e:  # deliver the failure to every waiting stream instead of hanging them
            self.error = e
            for rid in list(self._queues):
                self._deliver(rid, e)
            raise
