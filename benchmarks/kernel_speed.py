"""Decode linear layers: GB/s of weights streamed by torch's F.linear vs our bf16, int8 and int4 kernels.

CodeGen2-1B layer shapes, x of M = 1 and M = 16 rows, against the machine's read bandwidth (a torch sum over
1 GiB). Each layer is rotated through enough copies of its weight (>= 256 MiB) that every call streams it from
memory, as in a real decode step, instead of finding it in the last-level cache. Methods are interleaved round
by round (rounds of ~5 ms) so that a noisy neighbour hurts them alike; the fastest round is reported (the least
disturbed one: on a shared machine the median mostly measures the neighbours).

    python benchmarks/kernel_speed.py [--rounds 30] [--threads 2] [--prefill] [--int4-groups 32,64,128]

(Named kernel_speed, not kernels: a script runs with its own folder first on sys.path, so a benchmarks/kernels.py
shadowed Hugging Face's `kernels` package for every script here, and transformers' import of it failed.)

Prints a table and one JSON line. GB/s counts the bytes of the weight in its own format (int8: 1 byte each,
int4: half a byte plus a 2-byte scale per group); the --prefill row (M = 1024) shows milliseconds per call
instead. The kernel level is the one detected (or CODEGEN2_KERNEL_LEVEL).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from codegen2.kernels import (
    DecodeLinear,
    kernel_level,
    kernels_available,
    quantize_int4,
    quantize_int8,
)

SHAPES = {  # name: (N, K) of CodeGen2-1B's linears
    "qkv": (6144, 2048),
    "out": (2048, 2048),
    "fc_in": (8192, 2048),
    "fc_out": (2048, 8192),
    "lm_head": (51200, 2048),
}
LAYERS = 16
ROTATION_BYTES = 256 << 20


def read_bandwidth(rounds: int) -> float:
    a = torch.ones(1 << 28)  # 1 GiB of fp32
    a.sum()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / min(times) / 1e9


def time_interleaved(fns: dict, rounds: int, calls: int) -> dict[str, float]:
    """Seconds per call of each fn in its fastest round; fns take the call index (to rotate weights)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: first touch, thread pool start
        for i in range(2):
            fn(i)
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for i in range(calls):
                fn(i)
            samples[name].append((time.perf_counter() - t) / calls)
    return {k: min(v) for k, v in samples.items()}


@torch.no_grad()
def bench_shape(N: int, K: int, Ms: list[int], rounds: int, native: bool, groups: list[int]) -> dict:
    copies = max(2, -(-ROTATION_BYTES // (N * K * 2)))
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16) for _ in range(copies)]
    ours_bf16 = [DecodeLinear(w) for w in ws]  # the same tensors, no copy
    ours_int8 = [DecodeLinear(q, None, s) for q, s in map(quantize_int8, ws)]
    ours_int4 = {G: [DecodeLinear(q, None, s, G) for q, s in (quantize_int4(w, G) for w in ws)] for G in groups}
    nbytes = {"torch_bf16": 2 * N * K, "ours_bf16": 2 * N * K, "ours_int8": N * K}
    nbytes |= {f"ours_int4_g{G}": N * K // 2 + 2 * N * K // G for G in groups}
    out = {}
    for M in Ms:
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        fns = {"torch_bf16": lambda i: F.linear(x, ws[i % copies])}
        if native:
            fns["ours_bf16"] = lambda i: ours_bf16[i % copies](x)
            fns["ours_int8"] = lambda i: ours_int8[i % copies](x)
            for G, layers in ours_int4.items():
                fns[f"ours_int4_g{G}"] = lambda i, layers=layers, x=x: layers[i % copies](x)
        calls = max(1, min(copies, int(0.005 / (N * K * 2 / 40e9))))  # ~5 ms per round at 40 GB/s
        if M > 16:
            calls = 1
        t = time_interleaved(fns, rounds, calls)
        out[M] = {k: {"ms": v * 1e3, "gbps": nbytes[k] / v / 1e9} for k, v in t.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--prefill", action="store_true", help="also time M=1024 on the 'out' shape (slow with torch)")
    ap.add_argument("--int4-groups", default="32", help="comma-separated int4 group sizes to time (32 .. 256)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    native = kernels_available()
    groups = [int(g) for g in args.int4_groups.split(",")] if native else []
    bw = read_bandwidth(args.rounds)
    print(f"threads {torch.get_num_threads()}, native kernels {native} (level {kernel_level()}), "
          f"read bandwidth (torch sum over 1 GiB) {bw:.1f} GB/s")
    results = {}
    for name, (N, K) in SHAPES.items():
        Ms = [1, 16] + ([1024] if args.prefill and name == "out" else [])
        results[name] = bench_shape(N, K, Ms, args.rounds, native, groups)

    methods = ["torch_bf16", "ours_bf16", "ours_int8", *(f"ours_int4_g{G}" for G in groups)] if native \
        else ["torch_bf16"]
    print(f"\n{'layer':8} {'N x K':>12} {'M':>5} " + " ".join(f"{m + ' GB/s':>16}" for m in methods)
          + "   bf16 speedup  int8/bf16(ours)")
    for name, per_m in results.items():
        N, K = SHAPES[name]
        for M, r in per_m.items():
            if M <= 16:
                cells = " ".join(f"{r[m]['gbps']:16.1f}" for m in methods)
            else:  # prefill-sized: compute-bound, so time says more than GB/s
                cells = " ".join(f"{r[m]['ms']:13.1f} ms" for m in methods)
            extra = ""
            if native:
                extra = f"   {r['torch_bf16']['ms'] / r['ours_bf16']['ms']:12.2f}x" \
                        f"  {r['ours_bf16']['ms'] / r['ours_int8']['ms']:14.2f}x"
            print(f"{name:8} {f'{N}x{K}':>12} {M:5d} {cells}{extra}")

    # One decode step's linears: 16 blocks of (qkv, out, fc_in, fc_out) plus the lm_head.
    step = {}
    for M in (1, 16):
        for m in methods:
            ms = sum(results[n][M][m]["ms"] * (1 if n == "lm_head" else LAYERS) for n in SHAPES)
            step[f"M{M}_{m}_ms"] = ms
    print("\n1B decode step, linears only (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in step.items()))
    print(json.dumps({"bench": "kernels", "threads": torch.get_num_threads(), "native": native,
                      "level": kernel_level(),
                      "read_bandwidth_gbps": round(bw, 2), "step_ms": {k: round(v, 2) for k, v in step.items()},
                      "results": {n: {str(M): {m: round(v["gbps"], 2) for m, v in r.items()} for M, r in per_m.items()}
                                  for n, per_m in results.items()}}))


if __name__ == "__main__":
    main()
