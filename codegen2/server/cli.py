"""``codegen2 serve``: the command's arguments, and the process around the app (app.py) under uvicorn.

    codegen2 serve --model Salesforce/codegen2-1B_P [--served-model-name NAME ...] [--host 127.0.0.1]
                   [--port 8000] [--api-key KEY ...] [--max-concurrency 16] [--max-model-len N]
                   [--kv-cache-gib 4] [--dtype bf16] [--device cpu] [--quant none|int8|int4]
                   [--cors-origin ORIGIN ...] [--adapter LORA_DIR] [--speculative ngram|draft:DIR] [--mp-num 4|8]

The server listens at once and loads the model in the background (/health answers 503 until it is ready); if
loading fails the server stops with the error. What this is not: the routes (app.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket

from codegen2.engine.options import add_load_args, load_kwargs


class _Defaults(argparse.HelpFormatter):
    """--help shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, [], False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI- and llama.cpp-compatible completion and infill server",
                              description="Serve a model over HTTP: /v1/completions (OpenAI, with suffix for "
                                          "infill), /infill and /completion (llama.cpp), a playground at /.",
                              formatter_class=_Defaults)
    p.add_argument("--model", required=True, help="model directory or Hugging Face hub id (downloaded on first use)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the name(s) requests may give as model; responses carry the first (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (llama.vscode and llama.vim expect 8012)")
    p.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' (repeatable; also $CODEGEN2_API_KEY)")
    p.add_argument("--max-concurrency", type=int, default=16,
                   help="sequences generated together, one KV-cache slot each; more requests wait in a queue")
    p.add_argument("--max-model-len", type=int, help="context length in tokens (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, default=4.0,
                   help="memory for the KV cache; it bounds the concurrent sequences as well")
    add_load_args(p)
    p.add_argument("--cors-origin", action="append", default=[],
                   help="let browser pages from this origin call the API (repeatable, '*' for any); off by default")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port is one clear error, not a crash."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise SystemExit(f"error: --host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = " (another server is using it: stop it or choose another --port)" if e.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from codegen2.server.app import create_app
    except ImportError as e:
        raise SystemExit(f"error: codegen2 serve needs the server extra ({e.name} is missing): "
                         "pip install 'codegen2[server]'") from None
    from codegen2.engine.engine import Engine, check_device

    limits = (("--max-concurrency", args.max_concurrency, 1), ("--max-model-len", args.max_model_len, 2))
    for name, value, low in limits:
        if value is not None and value < low:
            raise SystemExit(f"error: {name} must be >= {low}, got {value}")
    if not args.kv_cache_gib > 0:
        raise SystemExit(f"error: --kv-cache-gib must be > 0, got {args.kv_cache_gib}")
    try:
        check_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    keys = args.api_key + ([os.environ["CODEGEN2_API_KEY"]] if os.environ.get("CODEGEN2_API_KEY") else [])
    sock = _listen(args.host, args.port)

    def load() -> Engine:
        try:
            return Engine.from_pretrained(args.model, **load_kwargs(args), max_batch=args.max_concurrency,
                                          max_seq_len=args.max_model_len, kv_cache_bytes=int(args.kv_cache_gib * 2**30))
        except BaseException:
            server.should_exit = True  # a server without a model only answers 503: stop instead
            raise

    app = create_app(load, args.served_model_name or [args.model], api_keys=keys, cors_origins=args.cors_origin)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    server.run(sockets=[sock])
    if app.state.codegen2.load_error:
        raise SystemExit(f"error: {app.state.codegen2.load_error}")
