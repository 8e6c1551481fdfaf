"""The HTTP app: routes for OpenAI's /v1/completions, llama.cpp's /infill and /completion, /v1/models, /health,
/metrics and a playground page at /, over one AsyncEngine.

What this is: routes, body parsing, errors in OpenAI's shape, API keys, CORS, the body-size guard and response
counting. The model loads in a background thread; until then /health answers 503. Requests run concurrently and
the engine batches them; nothing here serialises generation.
What this is not: turning a request into engine work and choices (serving.py), metrics (metrics.py), a prompt
format (infill.py), or a process (cli.py runs it under uvicorn). Client input never reaches the engine unchecked:
prompts are prepared by the engine's one prompt path first, so a bad request is a 4xx before any response starts.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from codegen2.engine.async_engine import AsyncEngine
from codegen2.engine.engine import Engine
from codegen2.engine.errors import InvalidRequest
from codegen2.server import protocol as p
from codegen2.server.metrics import Metrics
from codegen2.server.playground import PAGE
from codegen2.server.serving import APIError, EngineFailure, Serving

log = logging.getLogger("codegen2.server")
MAX_BODY = 16 << 20  # bytes; a larger Content-Length is refused (413) before anything is read
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/completion", "/infill")


@dataclass
class _State:
    """What the routes share, kept on ``app.state.codegen2``."""
    model_names: list[str]  # the first is the id responses carry; the others are aliases a request may use
    api_keys: Sequence[str]
    metrics: Metrics
    created: int
    serving: Serving | None = None  # set once the model has loaded
    load_error: str | None = None


def _state(request: Request) -> _State:
    return request.app.state.codegen2


class _TooLarge(Exception):
    pass


class _Guard:
    """Pure ASGI middleware (BaseHTTPMiddleware would get between routes and client disconnects): counts
    responses per route and refuses bodies over MAX_BODY, by their Content-Length before anything is read, and
    while they arrive when they come in chunks without one (a 24 MiB chunked body is refused after 16 MiB, not
    read and tokenized to the end)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
        started = False

        async def counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests[(route, message["status"])] += 1
            await send(message)

        def too_large(size: str) -> JSONResponse:
            body = p.error_body(f"the request body has {size} bytes; the limit is {MAX_BODY}",
                                "invalid_request_error", code="request_too_large")
            return JSONResponse(body, 413)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY:
            return await too_large(str(int(length)))(scope, receive, counted)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise _TooLarge
            return message
        try:
            await self.app(scope, limited, counted)
        except _TooLarge:
            if started:
                raise
            await too_large(f"more than {MAX_BODY}")(scope, receive, counted)


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


async def _parse(request: Request, schema: type[BaseModel]) -> BaseModel:
    # JSON only: a web page can send text/plain, form or multipart bodies to any server without asking
    # (no CORS preflight), but not application/json.
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the request body must be JSON with Content-Type: application/json, got "
                       f"{kind or 'no Content-Type'}", code="unsupported_media_type")
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise _schema_error(e) from None


async def _authorize(request: Request) -> None:
    keys = _state(request).api_keys
    if not keys:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def _serving(request: Request) -> Serving:
    state = _state(request)
    if state.serving is None:
        raise APIError(503, state.load_error or "the model is still loading", code="model_loading",
                       type="unavailable_error")
    if state.serving.engine.error is not None:  # the step loop died (a bug): say so instead of queueing forever
        raise APIError(503, f"the engine stopped: {state.serving.engine.error!r}", code="engine_failed",
                       type="server_error")
    return state.serving


router = APIRouter()
guarded = [Depends(_authorize)]


@router.post("/v1/completions", dependencies=guarded)
async def completions(request: Request):
    serving = _serving(request)
    return await serving.completions(request, await _parse(request, p.CompletionRequest))


@router.post("/completion", dependencies=guarded)
async def completion(request: Request):
    serving = _serving(request)
    return await serving.llama(request, await _parse(request, p.LlamaCompletionRequest))


@router.post("/infill", dependencies=guarded)
async def infill(request: Request):
    serving = _serving(request)
    return await serving.llama(request, await _parse(request, p.InfillRequest))


def _card(state: _State) -> dict:
    card = {"id": state.model_names[0], "object": "model", "created": state.created, "owned_by": "codegen2",
            "aliases": state.model_names[1:]}
    if state.serving is not None:
        card["max_model_len"] = state.serving.max_seq_len
    return card


@router.get("/v1/models", dependencies=guarded)
async def models(request: Request) -> dict:
    return {"object": "list", "data": [_card(_state(request))]}


@router.get("/v1/models/{model_id:path}", dependencies=guarded)
async def model(request: Request, model_id: str) -> dict:
    state = _state(request)
    if model_id not in state.model_names:
        raise APIError(404, f"the model '{model_id}' does not exist; this server serves "
                       f"{', '.join(repr(n) for n in state.model_names)}", "model", "model_not_found")
    return _card(state)


@router.get("/health")
async def health(request: Request) -> dict:
    _serving(request)
    return {"status": "ok"}


@router.get("/metrics", dependencies=guarded)
async def prometheus(request: Request) -> PlainTextResponse:
    state = _state(request)
    stats = state.serving.engine.stats() if state.serving is not None else None
    return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4")


@router.get("/")
async def playground() -> HTMLResponse:
    return HTMLResponse(PAGE)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(p.error_body(e.message, e.type, e.param, e.code), e.status)


async def _invalid_request(request: Request, e: InvalidRequest) -> JSONResponse:
    return JSONResponse(p.error_body(e.message, "invalid_request_error", e.param, e.code), e.status)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown routes and methods
    message = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(p.error_body(message, "invalid_request_error"), e.status_code, headers=e.headers)


async def _engine_failure(request: Request, e: EngineFailure) -> JSONResponse:
    return JSONResponse(p.error_body(f"the engine failed this request: {e}", "server_error"), 500)


async def _server_error(request: Request, e: Exception) -> JSONResponse:
    return JSONResponse(p.error_body(f"internal server error: {type(e).__name__}", "server_error"), 500)


def create_app(load_engine: Callable[[], Engine], model_name: str | Sequence[str], api_keys: Sequence[str] = (),
               cors_origins: Sequence[str] = ()) -> FastAPI:
    """An app serving the engine that ``load_engine`` builds (in a background thread, at startup) as
    ``model_name`` (or several names: the first is the one responses carry, the others are aliases). With
    api_keys, every route but / and /health needs ``Authorization: Bearer <key>``."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"model names must be non-empty strings, got {model_name!r}")
    state = _State(names, list(api_keys), Metrics(), int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def load() -> None:
            try:
                state.serving = Serving(AsyncEngine(load_engine()), state.metrics, names)
                log.info("model %s loaded", names[0])
            except BaseException as e:
                state.load_error = f"{type(e).__name__}: {e}"
                log.exception("loading the model failed")
        threading.Thread(target=load, name="codegen2-load", daemon=True).start()
        yield
        if state.serving is not None:
            state.serving.shutdown()

    app = FastAPI(title="codegen2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.codegen2 = state
    app.add_middleware(_Guard, metrics=state.metrics)
    if cors_origins:  # off unless asked for: a browser page from another origin must not drive the server
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(InvalidRequest, _invalid_request)
    app.add_exception_handler(EngineFailure, _engine_failure)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.include_router(router)
    return app
