"""Serving under load: N concurrent streaming clients against `codegen2 serve`, then the same requests one at a time.

    python benchmarks/serve.py --model Salesforce/codegen2-1B_P --device cuda --clients 16 --requests 64
    python benchmarks/serve.py --tiny            # a tiny random CodeGen (needs transformers): checks the benchmark

The server runs in its own process, started the way `codegen2 serve` starts it (cli.run), so the clients do not
compete with it for the GIL. Every request streams from /v1/completions, greedy, from a fixed mix: two of three
continue a prompt, one of three fills a hole (suffix). Per mode it prints p50 / p95 latency (request sent ->
last event), time to first token (-> first event with text) and aggregate generated tokens/s; the ratio of
tokens/s, concurrent over one-at-a-time, is what batching gains. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

SERVE = ("import argparse, sys\nfrom codegen2.server import cli\np = argparse.ArgumentParser()\n"
         "cli.add_parser(p.add_subparsers())\ncli.run(p.parse_args(sys.argv[1:]))")
SNIPPETS = ["def fibonacci(n):\n    ", "import os\nimport sys\n\ndef main(argv):\n", "class Stack:\n    def __init__",
            "# read a CSV file and sum the second column\ndef total(path):\n", "for i in range(10):\n    if i %",
            "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot ="]


def mix(n: int, max_tokens: int) -> list[dict]:
    """The fixed request mix: request i is an infill when i % 3 == 2, else a completion."""
    out = []
    for i in range(n):
        body = {"prompt": SNIPPETS[i % len(SNIPPETS)] + f"  # {i}\n", "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        if i % 3 == 2:
            body["suffix"] = "\n    return result\n"
        out.append(body)
    return out


async def one(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    """(latency, time to first token, generated tokens) of one streamed request."""
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any(c["text"] for c in event["choices"]):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens


async def load(url: str, bodies: list[dict], clients: int) -> dict:
    queue = list(reversed(bodies))
    results = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:  # bounded: each client takes requests from the fixed list until it is empty
            results.append(await one(http, url, queue.pop()))
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]
    lat, ttft = [r[0] for r in results], [r[1] for r in results]
    return {"requests": len(results), "clients": clients,
            "p50_latency_s": pct(lat, 0.5), "p95_latency_s": pct(lat, 0.95),
            "p50_ttft_s": pct(ttft, 0.5), "p95_ttft_s": pct(ttft, 0.95), "tokens": sum(r[2] for r in results),
            "wall_s": wall, "tokens_per_s": sum(r[2] for r in results) / wall}


def tiny_checkpoint(directory: str) -> str:
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(0)
    cfg = CodeGenConfig(vocab_size=51200, n_positions=256, n_ctx=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                        bos_token_id=50256, eos_token_id=50256)
    CodeGenForCausalLM(cfg).save_pretrained(directory)
    return directory


@contextlib.contextmanager
def server(args: argparse.Namespace, model: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    cmd = [sys.executable, "-c", SERVE, "serve", "--model", model, "--port", str(port), "--dtype", args.dtype,
           "--device", args.device, "--max-concurrency", str(args.clients)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + args.load_timeout
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not come up: {' '.join(cmd)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory or hub id")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random model (checks the benchmark runs)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (also the server's batch)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads in the server (OMP_NUM_THREADS)")
    ap.add_argument("--load-timeout", type=float, default=900, help="seconds to wait for the model to load")
    args = ap.parse_args()
    if not args.model and not args.tiny:
        ap.error("give --model M or --tiny")
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_checkpoint(tmp) if args.tiny else args.model
        bodies = mix(args.requests, args.max_tokens)
        with server(args, model) as url:
            asyncio.run(load(url, bodies[:2], 1))  # warm-up
            rows = {"concurrent": asyncio.run(load(url, bodies, args.clients)),
                    "one_at_a_time": asyncio.run(load(url, bodies, 1))}
    cols = ["requests", "clients", "p50_latency_s", "p95_latency_s", "p50_ttft_s", "p95_ttft_s", "tokens_per_s"]
    print(f"{'mode':<14}" + "".join(f"{c:>15}" for c in cols))
    for mode, row in rows.items():
        print(f"{mode:<14}" + "".join(f"{row[c]:>15.3f}" if isinstance(row[c], float) else f"{row[c]:>15}"
                                      for c in cols))
    gain = rows["concurrent"]["tokens_per_s"] / rows["one_at_a_time"]["tokens_per_s"]
    print(f"batching gain (tokens/s, concurrent / one at a time): {gain:.2f}x")
    print(json.dumps({"benchmark": "serve", "model": "tiny" if args.tiny else args.model, "device": args.device,
                      "dtype": args.dtype, "max_tokens": args.max_tokens, **rows, "batching_gain": gain}))


if __name__ == "__main__":
    main()
