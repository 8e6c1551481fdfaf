"""The HTTP app: OpenAI's /v1/completions, llama.cpp's /infill and /completion, /v1/models, /health, /metrics
and a playground page at /, over one AsyncEngine.

What this is: routes, server-sent-event streaming, errors in OpenAI's shape, API keys, CORS, Prometheus metrics,
and aborting the requests of clients that go away. Requests run concurrently and the engine batches them; nothing
here serialises generation. The model loads in a background thread; until then /health answers 503.
What this is not: a scheduler (the engine queues what does not fit), a prompt format (infill.py), or a process
(cli.py runs it under uvicorn). Client input never reaches the engine unchecked: prompts are tokenized and
measured here, so a bad request is a 4xx before any response starts.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from codegen2 import infill
from codegen2.engine.engine import AsyncEngine, CompletionOutput, Engine
from codegen2.engine.sampling import SamplingParams
from codegen2.server import protocol as p
from codegen2.server.playground import PAGE

log = logging.getLogger("codegen2.server")
MAX_BODY = 16 << 20  # bytes; a larger Content-Length is refused (413) before anything is read
MAX_CHOICES = SamplingParams.MAX_N  # prompts x n per request
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/completion", "/infill")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help, list(buckets)
        self.counts, self.sum = [0] * (len(self.buckets) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self) -> list[str]:
        lines, total = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"], 0
        for le, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, HTTP status) -> responses
        self.tokens = Counter()  # "prompt" / "generation" -> tokens
        buckets = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
        self.latency = Histogram("codegen2_request_duration_seconds", "Generation time per request.", buckets)
        self.ttft = Histogram("codegen2_time_to_first_token_seconds", "Time to the first token.", buckets)

    def render(self, engine: Engine | None) -> str:
        def metric(name: str, kind: str, help: str, samples: dict[str, float]) -> list[str]:
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", *(f"{name}{k} {v}" for k, v in samples.items())]
        lines = metric("codegen2_requests_total", "counter", "HTTP responses by route and status.",
                       {f'{{route="{r}",status="{s}"}}': c for (r, s), c in sorted(self.requests.items())})
        for kind in ("prompt", "generation"):
            lines += metric(f"codegen2_{kind}_tokens_total", "counter", f"{kind} tokens.", {"": self.tokens[kind]})
        lines += self.latency.render() + self.ttft.render()
        if engine is not None:  # read without the engine's lock: a scrape may be one step stale, never wrong
            s = engine.scheduler
            running = list(s.running)
            gauges = {"requests_waiting": len(s.waiting) + sum(map(len, list(s.held.values()))),
                      "requests_running": len(running), "kv_cache_slots": s.n_slots,
                      "kv_cache_slots_used": s.n_slots - len(s.free),
                      "kv_cache_usage": sum(len(q.tokens) for q in running) / (s.n_slots * s.max_seq_len)}
            for name, value in gauges.items():
                lines += metric(f"codegen2_{name}", "gauge", name.replace("_", " ") + ".", {"": value})
            lines += metric("codegen2_prefix_cache_tokens_total", "counter", "prompt tokens reused from the cache.",
                            {"": s.reused_tokens})
        return "\n".join(lines) + "\n"


class _Guard:
    """Pure ASGI middleware (BaseHTTPMiddleware would get between routes and client disconnects): counts
    responses per route and refuses bodies whose Content-Length is over MAX_BODY."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests[(route, message["status"])] += 1
            await send(message)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY:
            body = p.error_body(f"the request body has {int(length)} bytes; the limit is {MAX_BODY}",
                                "invalid_request_error", code="request_too_large")
            return await JSONResponse(body, 413)(scope, receive, counted)
        await self.app(scope, receive, counted)


class _Job:
    """One HTTP request's generation: an engine request per prompt, their outputs merged in arrival order.

    ``run()`` yields lists of (choice index, CompletionOutput) that changed, choice index = prompt * n + index.
    A client disconnect cancels the engine streams, which aborts the requests and frees their cache slots.
    """

    def __init__(self, engine: AsyncEngine, metrics: Metrics, request: Request, prompts: list[list[int]],
                 params: SamplingParams, budget_ms: int | None) -> None:
        self.engine, self.metrics, self.request = engine, metrics, request
        self.prompts, self.params, self.budget_ms = prompts, params, budget_ms
        self.outputs: dict[int, CompletionOutput] = {}  # the latest output of each choice
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None

    def usage(self) -> dict:
        return p.usage(sum(map(len, self.prompts)), sum(len(o.token_ids) for o in self.outputs.values()))

    def times(self) -> tuple[float, float, float]:
        end = self.end or time.perf_counter()
        return self.start, self.first or end, end

    async def run(self) -> AsyncIterator[list[tuple[int, CompletionOutput]]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, ids: list[int]) -> None:
            try:
                async for out in self.engine.stream(ids, self.params):
                    queue.put_nowait((i, out))
            except Exception as e:  # the engine loop failed: tell the consumer instead of hanging it
                queue.put_nowait((i, e))

        pumps = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(self.prompts)]

        async def watch() -> None:  # the body is read, so receive() now returns only at a disconnect
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
            for task in pumps:  # directly, in case the consumer is not reading the queue right now
                task.cancel()
            queue.put_nowait((None, None))

        tasks, n, left = [*pumps, asyncio.create_task(watch())], self.params.n, len(self.prompts)
        try:
            while left:
                i, out = await queue.get()
                if i is None:
                    return
                if isinstance(out, BaseException):
                    raise out
                now, left = time.perf_counter(), left - out.finished
                if self.first is None:
                    self.first = now
                    self.metrics.ttft.observe(now - self.start)
                # Siblings (n > 1) repeat in every output: keep what is new, and each finish once.
                prev = {o.index: self.outputs.get(i * n + o.index) for o in out.outputs}
                changed = [(i * n + o.index, o) for o in out.outputs if prev[o.index] is None or o.delta
                           or (o.finish_reason and not prev[o.index].finish_reason)]
                self.outputs.update(changed)
                if changed:
                    yield changed
                # llama.cpp's t_max_predict_ms: past the budget, stop once every running completion has a newline.
                running = [(c, o) for c, o in self.outputs.items() if o.finish_reason is None]
                if ((self.budget_ms or 0) > 0 and left and (now - self.first) * 1e3 > self.budget_ms
                        and len(self.outputs) == len(self.prompts) * n and all("\n" in o.text for _, o in running)):
                    cut = [(c, replace(o, delta="", finish_reason="length")) for c, o in running]
                    self.outputs.update(cut)
                    yield cut
                    return
        finally:
            for task in tasks:
                task.cancel()
            self.end = time.perf_counter()
            self.metrics.latency.observe(self.end - self.start)
            usage = self.usage()
            self.metrics.tokens.update(prompt=usage["prompt_tokens"], generation=usage["completion_tokens"])


def _schema_error(e: ValidationError) -> APIError:
    errors = e.errors()
    err, loc = errors[0], errors[0]["loc"]
    field = str(loc[0]) if loc else None
    if err["type"] == "json_invalid":
        return APIError(400, f"malformed JSON: {err['ctx']['error']}", code="invalid_json")
    if not loc:
        return APIError(422, "the request body must be a JSON object", code="invalid_type")
    if err["type"] == "extra_forbidden":
        return APIError(422, f"unrecognized request argument supplied: {field}", field, "unknown_argument")
    if err["type"] == "missing":
        return APIError(422, f"missing required argument: {field}", field, "missing_argument")
    union = [str(x["loc"][1]) for x in errors if x["loc"][:1] == loc[:1] and len(x["loc"]) > 1]
    what = f"expected one of {', '.join(union)}" if len(union) > 1 else err["msg"]
    return APIError(422, f"invalid type for '{field}': {what}, got {json.dumps(err['input'])[:80]}", field,
                    "invalid_type")


def _sse(events: AsyncIterator[dict], done: bool) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            if done:
                yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is gone already: the error becomes the last event
            log.exception("stream failed")
            yield f"data: {json.dumps(p.error_body(str(e), 'server_error'))}\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(load_engine: Callable[[], Engine], model_name: str, api_keys: Sequence[str] = (),
               cors_origins: Sequence[str] = ()) -> FastAPI:
    """An app serving the engine that ``load_engine`` builds (in a background thread, at startup) as
    ``model_name``. With api_keys, every route but / and /health needs ``Authorization: Bearer <key>``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def load() -> None:
            try:
                app.state.engine = AsyncEngine(load_engine())
                log.info("model %s loaded", model_name)
            except BaseException as e:
                app.state.load_error = f"{type(e).__name__}: {e}"
                log.exception("loading the model failed")
        threading.Thread(target=load, name="codegen2-load", daemon=True).start()
        yield
        if app.state.engine is not None:
            app.state.engine.shutdown()

    app = FastAPI(title="codegen2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.load_error = None, None
    metrics, created = Metrics(), int(time.time())
    app.add_middleware(_Guard, metrics=metrics)
    if cors_origins:  # off unless asked for: a browser page from another origin must not drive the server
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(p.error_body(e.message, e.type, e.param, e.code), e.status)

    @app.exception_handler(HTTPException)  # unknown routes and methods
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(p.error_body(message, "invalid_request_error"), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(p.error_body(f"internal server error: {type(e).__name__}", "server_error"), 500)

    async def authorize(request: Request) -> None:
        if not api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.encode(), k.encode()) for k in api_keys):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    guarded = [Depends(authorize)]

    def ready() -> AsyncEngine:
        engine = app.state.engine
        if engine is None:
            message = app.state.load_error or "the model is still loading"
            raise APIError(503, message, code="model_loading", type="unavailable_error")
        if engine.error is not None:  # the step loop died (a bug): say so instead of queueing forever
            raise APIError(503, f"the engine stopped: {engine.error!r}", code="engine_failed", type="server_error")
        return engine

    async def parse(request: Request, schema: type[BaseModel]) -> BaseModel:
        try:
            return schema.model_validate_json(await request.body())
        except ValidationError as e:
            raise _schema_error(e) from None

    def checked(make: Callable[[], SamplingParams], schema: type[BaseModel]) -> SamplingParams:
        try:
            return make()
        except ValueError as e:  # SamplingParams' messages start with the field's name
            name = str(e).split()[0]
            raise APIError(400, str(e), name if name in schema.model_fields else None) from None

    def encode(engine: Engine, prompt: str | list[int], suffix: str | None = None) -> list[int]:
        tok, limit = engine.tokenizer, engine.max_seq_len
        if suffix is not None:
            if not isinstance(prompt, str):
                raise APIError(400, "suffix needs a text prompt (the code before the hole), not token ids", "suffix")
            ids = infill.infill_prompt(tok, prompt, suffix)
        elif isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            ids = prompt
            if not all(0 <= t < tok.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {tok.vocab_size})", "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", "prompt")
        if len(ids) >= limit:
            raise APIError(413, f"the prompt has {len(ids)} tokens; the context is {limit} tokens, which leaves "
                           "no room to generate", "prompt", "context_length_exceeded")
        return ids

    async def drain(job: _Job) -> None:
        async with aclosing(job.run()) as outputs:
            async for _ in outputs:
                pass

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        engine = ready()
        body: p.CompletionRequest = await parse(request, p.CompletionRequest)
        if body.model not in (None, model_name):
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                           "model", "model_not_found")
        tok = engine.engine.tokenizer
        params = checked(lambda: body.sampling_params(engine.engine.max_seq_len), p.CompletionRequest)
        if body.suffix is not None:
            params.stop_token_ids += infill.stop_ids(tok)  # what the engine adds for an Infill prompt
        many = isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
        prompts = body.prompt if many else [body.prompt]
        if len(prompts) * params.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={params.n} is {len(prompts) * params.n} completions; "
                           f"the limit is {MAX_CHOICES}", "n")
        # In a thread: a long prompt must not stall the event loop, which feeds every other stream.
        ids = await asyncio.to_thread(lambda: [encode(engine.engine, x, body.suffix) for x in prompts])
        echo = [x if isinstance(x, str) else tok.decode(x) for x in prompts] if body.echo else [""] * len(prompts)
        job = _Job(engine, metrics, request, ids, params, body.t_max_predict_ms)
        rid, now, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n

        def logprobs(o: CompletionOutput, start: int, offset: int) -> dict | None:
            return None if o.logprobs is None else p.openai_logprobs(tok, o.logprobs[start:], offset)
        if not body.stream:
            await drain(job)
            choices = [p.openai_choice(c, echo[c // n] + o.text, o.finish_reason, logprobs(o, 0, len(echo[c // n])))
                       for c, o in sorted(job.outputs.items())]
            return JSONResponse(p.openai_completion(rid, now, model_name, choices, usage=job.usage()))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        async def events() -> AsyncIterator[dict]:
            sent: Counter[int] = Counter()  # log-probs already sent, per choice
            if body.echo:
                yield p.openai_completion(rid, now, model_name, [p.openai_choice(c, echo[c // n], None)
                                                                 for c in range(len(ids) * n)], **extra)
            async with aclosing(job.run()) as outputs:
                async for changed in outputs:
                    choices = []
                    for c, o in changed:
                        lp = logprobs(o, sent[c], len(echo[c // n]) + len(o.text) - len(o.delta))
                        sent[c] = len(o.logprobs or ())
                        choices.append(p.openai_choice(c, o.delta, o.finish_reason, lp))
                    yield p.openai_completion(rid, now, model_name, choices, **extra)
            if include_usage:
                yield p.openai_completion(rid, now, model_name, [], usage=job.usage())
        return _sse(events(), done=True)

    async def llama(request: Request, engine: AsyncEngine, body: p.LlamaCompletionRequest, ids: list[int],
                    params: SamplingParams, truncated: bool):
        job = _Job(engine, metrics, request, [ids], params, body.t_max_predict_ms or None)

        def final() -> dict:
            o = job.outputs.get(0) or CompletionOutput(0, "", [], "stop")
            # The engine does not say which stop string ended a completion; it is what follows the text.
            rest = engine.engine.tokenizer.decode(o.token_ids)[len(o.text):] if o.finish_reason == "stop" else ""
            word = next((s for s in params.stop if rest.startswith(s)), "")
            return p.llama_final(o, model_name, len(ids), word, truncated, job.times())
        if not body.stream:
            await drain(job)
            return JSONResponse(final())

        async def events() -> AsyncIterator[dict]:
            async with aclosing(job.run()) as outputs:
                async for changed in outputs:
                    for _, o in changed:
                        if o.delta:
                            yield {"index": 0, "content": o.delta, "tokens": [], "stop": False, "id_slot": -1,
                                   "tokens_predicted": len(o.token_ids), "tokens_evaluated": len(ids)}
            yield {**final(), "content": ""}  # llama.cpp's last event: the text was streamed already
        return _sse(events(), done=False)

    @app.post("/completion", dependencies=guarded)
    async def completion(request: Request):
        engine = ready()
        body: p.LlamaCompletionRequest = await parse(request, p.LlamaCompletionRequest)
        params = checked(lambda: body.sampling_params(engine.engine.max_seq_len), p.LlamaCompletionRequest)
        return await llama(request, engine, body, encode(engine.engine, body.prompt), params, False)

    @app.post("/infill", dependencies=guarded)
    async def infill_(request: Request):
        engine = ready()
        body: p.InfillRequest = await parse(request, p.InfillRequest)
        tok, limit = engine.engine.tokenizer, engine.engine.max_seq_len
        params = checked(lambda: body.sampling_params(limit, infill.stop_ids(tok)), p.InfillRequest)
        context = "".join(c.text if c.text.endswith("\n") or not c.text else c.text + "\n" for c in body.input_extra)
        prefix, suffix = context + body.input_prefix + body.prompt, body.input_suffix
        ids = infill.infill_prompt(tok, prefix, suffix)
        room = limit - min(params.max_tokens, limit // 2)  # prompt tokens that leave room to generate
        truncated = len(ids) > room
        if truncated:  # like llama.cpp: keep the end of the prefix and the start of the suffix (>= a quarter)
            pre, suf = tok.encode(prefix), tok.encode(suffix)
            budget = max(room - (len(ids) - len(pre) - len(suf)) - 8, 2)  # 8: slack for re-tokenizing the cuts
            keep_s = min(len(suf), max(budget // 4, budget - len(pre)))
            keep_p = min(len(pre), budget - keep_s)
            ids = infill.infill_prompt(tok, tok.decode(pre[len(pre) - keep_p:]), tok.decode(suf[:keep_s]))
        return await llama(request, engine, body, encode(engine.engine, ids), params, truncated)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        engine = app.state.engine
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "codegen2"}
        if engine is not None:
            card["max_model_len"] = engine.engine.max_seq_len
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict:
        ready()
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> PlainTextResponse:
        engine = app.state.engine
        return PlainTextResponse(metrics.render(engine and engine.engine), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def playground() -> HTMLResponse:
        return HTMLResponse(PAGE)

    return app
