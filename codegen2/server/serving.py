"""Serving: one HTTP request -> prepared prompts -> engine streams -> OpenAI or llama.cpp choices.

What this is: for each API, turning a parsed body into engine requests (through the one prompt path,
``engine.prepare``, run in a worker thread so a huge prompt never stalls the event loop), running them
concurrently, merging their deltas per choice, and shaping the JSON or server-sent events of the response.
What this is not: routing, auth or body parsing (app.py), the wire schemas (protocol.py), or prompt rules
(engine/prompt.py, infill.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from codegen2.engine.async_engine import AsyncEngine
from codegen2.engine.engine import CompletionOutput
from codegen2.engine.errors import InvalidRequest
from codegen2.engine.prompt import PreparedRequest
from codegen2.engine.sampling import SamplingParams
from codegen2.infill import Infill
from codegen2.server import protocol as p
from codegen2.server.metrics import Metrics

log = logging.getLogger("codegen2.server")
MAX_CHOICES = SamplingParams.MAX_N  # prompts x n per request


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


class EngineFailure(Exception):
    """The engine failed a request (its other requests go on): a 500 for this request only."""


class _Job:
    """One HTTP request's generation: an engine request per prompt, their deltas merged per choice.

    ``run()`` yields lists of (choice index, delta) in arrival order, choice index = prompt * n + completion;
    ``outputs`` holds each choice's whole completion so far. A client disconnect cancels the engine streams,
    which aborts the requests and frees their cache slots.
    """

    def __init__(self, engine: AsyncEngine, metrics: Metrics, request: Request, prepared: list[PreparedRequest],
                 budget_ms: int | None) -> None:
        self.engine, self.metrics, self.request, self.prepared = engine, metrics, request, prepared
        self.n, self.budget_ms = prepared[0].params.n, budget_ms
        self.outputs: dict[int, CompletionOutput] = {}
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None
        self.cached = 0  # prompt tokens found in the KV cache (the first prompt's)
        self.drafts = (0, 0)  # speculative decoding: (proposed, kept), the first prompt's
        self.error: str | None = None

    def usage(self) -> dict:
        return p.usage(sum(len(r.prompt_ids) for r in self.prepared),
                       sum(len(o.token_ids) for o in self.outputs.values()))

    def times(self) -> tuple[float, float, float]:
        end = self.end or time.perf_counter()
        return self.start, self.first or end, end

    def _record(self, choice: int, delta: CompletionOutput) -> None:
        whole = self.outputs.get(choice)
        if whole is None:
            self.outputs[choice] = replace(delta, token_ids=list(delta.token_ids),
                                           logprobs=None if delta.logprobs is None else list(delta.logprobs))
        else:
            whole.add(delta)

    async def run(self) -> AsyncIterator[list[tuple[int, CompletionOutput]]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prepared: PreparedRequest) -> None:
            try:
                async for out in self.engine.stream(prepared):
                    queue.put_nowait((i, out))
            except Exception as e:  # the engine loop failed: tell the consumer instead of hanging it
                queue.put_nowait((i, e))

        pumps = [asyncio.create_task(pump(i, r)) for i, r in enumerate(self.prepared)]

        async def watch() -> None:  # the body is read, so receive() now returns only at a disconnect
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
            for task in pumps:  # directly, in case the consumer is not reading the queue right now
                task.cancel()
            queue.put_nowait((None, None))

        tasks, left = [*pumps, asyncio.create_task(watch())], len(self.prepared)
        try:
            while left:
                i, out = await queue.get()
                if i is None:
                    return
                if isinstance(out, BaseException):
                    raise out
                now, left = time.perf_counter(), left - out.finished
                if i == 0:
                    self.cached = out.cached_prompt_tokens
                    self.drafts = (out.draft_tokens, out.accepted_draft_tokens)
                if out.error is not None:  # the engine failed this request: an error, never a partial answer
                    raise EngineFailure(out.error)
                if self.first is None:
                    self.first = now
                    self.metrics.ttft.observe(now - self.start)
                changed = [(i * self.n + o.index, o) for o in out.outputs]
                for choice, delta in changed:
                    self._record(choice, delta)
                if changed:
                    yield changed
                # llama.cpp's t_max_predict_ms: past the budget, stop once every running completion has a newline.
                running = [c for c, o in self.outputs.items() if o.finish_reason is None]
                if ((self.budget_ms or 0) > 0 and left and (now - self.first) * 1e3 > self.budget_ms
                        and len(self.outputs) == len(self.prepared) * self.n
                        and all("\n" in self.outputs[c].text for c in running)):
                    cut = [(c, CompletionOutput(self.outputs[c].index, "", [], "length")) for c in running]
                    for choice, delta in cut:
                        self._record(choice, delta)
                    yield cut
                    return
        finally:
            for task in tasks:
                task.cancel()
            self.end = time.perf_counter()
            self.metrics.latency.observe(self.end - self.start)
            usage = self.usage()
            self.metrics.tokens.update(prompt=usage["prompt_tokens"], generation=usage["completion_tokens"])


def _json(obj) -> str:
    # Compact, like llama.cpp: llama.vim only takes a response whose text matches '"content":"'.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _sse(events: AsyncIterator[dict], done: bool) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {_json(event)}\n\n"
            if done:
                yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is gone already: the error becomes the last event
            if not isinstance(e, EngineFailure):
                log.exception("stream failed")
            yield f"data: {_json(p.error_body(str(e), 'server_error'))}\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _drain(job: _Job) -> None:
    async with aclosing(job.run()) as outputs:
        async for _ in outputs:
            pass


class Serving:
    """The completions of both APIs over one AsyncEngine, served as ``model_names[0]`` (requests may name any)."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics, model_names: list[str]) -> None:
        self.engine, self.metrics, self.model_names = engine, metrics, model_names
        self.model_name = model_names[0]
        self.tokenizer, self.max_seq_len = engine.engine.tokenizer, engine.engine.max_seq_len
        self._tokenizing = ThreadPoolExecutor(2, thread_name_prefix="codegen2-prompt")

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def _prepare(self, prompts: list, params: SamplingParams, fit: bool = False,
                       prefill_only: bool = False) -> list[PreparedRequest]:
        # In a worker thread: tokenizing a long prompt must not stall the event loop, which feeds every other
        # stream. Two workers of its own, so a few large prompts cannot take the loop's default pool.
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizing, lambda: [self.engine.engine.prepare(x, params, fit, prefill_only) for x in prompts])

    async def completions(self, request: Request, body: p.CompletionRequest):
        """OpenAI's /v1/completions; ``suffix`` makes every prompt an infill."""
        if body.model is not None and body.model not in self.model_names:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")
        params = body.sampling_params(self.max_seq_len)
        many = isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
        prompts = body.prompt if many else [body.prompt]
        if len(prompts) * params.n > MAX_CHOICES:
            raise InvalidRequest(f"{len(prompts)} prompts x n={params.n} is {len(prompts) * params.n} completions; "
                                 f"the limit is {MAX_CHOICES}", "n")
        if body.suffix is not None:
            if not all(isinstance(x, str) for x in prompts):
                raise InvalidRequest("suffix needs a text prompt (the code before the hole), not token ids", "suffix")
            prompts = [Infill(x, body.suffix) for x in prompts]
        prepared = await self._prepare(prompts, params)
        tok, n = self.tokenizer, params.n
        echo = [""] * len(prompts)
        if body.echo:
            echo = [x.prefix if isinstance(x, Infill) else x if isinstance(x, str) else tok.decode(x) for x in prompts]
        job = _Job(self.engine, self.metrics, request, prepared, body.t_max_predict_ms)
        rid, now, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name

        def logprobs(o: CompletionOutput, offset: int) -> dict | None:
            return None if o.logprobs is None else p.openai_logprobs(tok, o.logprobs, offset)
        if not body.stream:
            await _drain(job)
            choices = [p.openai_choice(c, echo[c // n] + o.text, o.finish_reason, logprobs(o, len(echo[c // n])))
                       for c, o in sorted(job.outputs.items())]
            return JSONResponse(p.openai_completion(rid, now, name, choices, usage=job.usage()))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        async def events() -> AsyncIterator[dict]:
            if body.echo:
                yield p.openai_completion(rid, now, name, [p.openai_choice(c, echo[c // n], None)
                                                           for c in range(len(prompts) * n)], **extra)
            async with aclosing(job.run()) as outputs:
                async for changed in outputs:
                    # job.outputs already holds each delta: its text starts len(delta.text) before the end.
                    choices = [p.openai_choice(c, d.text, d.finish_reason,
                                               logprobs(d, len(echo[c // n]) + len(job.outputs[c].text) - len(d.text)))
                               for c, d in changed]
                    yield p.openai_completion(rid, now, name, choices, **extra)
            if include_usage:
                yield p.openai_completion(rid, now, name, [], usage=job.usage())
        return _sse(events(), done=True)

    async def llama(self, request: Request, body: p.LlamaCompletionRequest):
        """llama.cpp's /completion, and /infill for a p.InfillRequest (too long a file is cut to fit, as there).
        n_predict 0 only puts the prompt in the cache (the editors' context warm-up); n_cmpl > 1 answers a list."""
        params = body.sampling_params(self.max_seq_len)
        prefill_only = body.n_predict == 0
        if isinstance(body, p.InfillRequest):
            if not isinstance(body.prompt, str):
                raise InvalidRequest("prompt must be text for /infill (the code right before the hole)", "prompt")
            context = "".join(c.text if c.text.endswith("\n") or not c.text else c.text + "\n"
                              for c in body.input_extra)
            prompt = Infill(context + body.input_prefix + body.prompt, body.input_suffix)
            (prepared,) = await self._prepare([prompt], params, fit=True, prefill_only=prefill_only)
        else:
            (prepared,) = await self._prepare([body.prompt], params, prefill_only=prefill_only)
        job = _Job(self.engine, self.metrics, request, [prepared], body.t_max_predict_ms or None)
        settings = body.generation_settings(prepared.params, self.max_seq_len, self.model_name)

        def results() -> dict | list[dict]:
            empty = CompletionOutput(0, "", [], "length" if prefill_only else "stop")
            out = [p.llama_result(job.outputs.get(c, replace(empty, index=c)), c, self.model_name,
                                  prepared.prompt_ids, job.cached, prepared.truncated, job.times(), settings,
                                  self.tokenizer, body, job.drafts) for c in range(prepared.params.n)]
            return out[0] if len(out) == 1 else out
        if not body.stream:
            await _drain(job)
            return JSONResponse(results())

        async def events() -> AsyncIterator[dict]:
            async with aclosing(job.run()) as outputs:
                async for changed in outputs:
                    for c, d in changed:
                        if d.text:
                            yield {"index": c, "content": d.text, "tokens": [], "stop": False,
                                   "id_slot": body.id_slot, "tokens_predicted": len(job.outputs[c].token_ids),
                                   "tokens_evaluated": len(prepared.prompt_ids)}
            final = results()
            for r in final if isinstance(final, list) else [final]:  # llama.cpp's last events: text already sent
                yield {**r, "content": ""} if "content" in r else r
        return _sse(events(), done=False)
