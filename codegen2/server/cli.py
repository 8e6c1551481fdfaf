"""``codegen2 serve``: the command's arguments, and the process around the app (app.py) under uvicorn.

    codegen2 serve --model Salesforce/codegen2-1B_P [--host 127.0.0.1] [--port 8000] [--api-key KEY ...]
                   [--max-concurrency 16] [--dtype bf16] [--device cpu] [--quant none|int8]
                   [--cors-origin ORIGIN ...] [--adapter LORA_DIR]

The server listens at once and loads the model in the background (/health answers 503 until it is ready); if
loading fails the server stops with the error. What this is not: the routes (app.py).
"""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI- and llama.cpp-compatible completion and infill server",
                              description="Serve a model over HTTP: /v1/completions (OpenAI, with suffix for "
                                          "infill), /infill and /completion (llama.cpp), a playground at /.")
    p.add_argument("--model", required=True, help="model directory or Hugging Face hub id (downloaded on first use)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter for --model (peft's format), applied unmerged")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' (repeatable; also $CODEGEN2_API_KEY)")
    p.add_argument("--max-concurrency", type=int, default=16,
                   help="sequences generated together, one KV-cache slot each; more requests wait in a queue")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="compute dtype (default bf16)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--quant", default="none", choices=["none", "int8"],
                   help="weight format: none = as loaded in --dtype, int8 = weight-only int8 (faster CPU decode)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="let browser pages from this origin call the API (repeatable, '*' for any); off by default")


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from codegen2.server.app import create_app
    except ImportError as e:
        raise SystemExit(f"error: codegen2 serve needs the server extra ({e.name} is missing): "
                         "pip install 'codegen2[server]'") from None
    from codegen2.engine.engine import Engine

    if args.max_concurrency < 1:
        raise SystemExit(f"error: --max-concurrency must be >= 1, got {args.max_concurrency}")
    keys = args.api_key + ([os.environ["CODEGEN2_API_KEY"]] if os.environ.get("CODEGEN2_API_KEY") else [])

    def load() -> Engine:
        try:
            return Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, quant=args.quant,
                                          adapter=args.adapter, max_batch=args.max_concurrency)
        except BaseException:
            server.should_exit = True  # a server without a model only answers 503: stop instead
            raise

    app = create_app(load, args.model, api_keys=keys, cors_origins=args.cors_origin)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    server.run()
    if app.state.codegen2.load_error:
        raise SystemExit(f"error: {app.state.codegen2.load_error}")
