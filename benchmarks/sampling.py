"""Sampling cost per row of 51,200 logits: ours (engine/sampling.py) against transformers' logits processors.

    python benchmarks/sampling.py [--rows 1] [--repeats 200] [--threads 2]

For each setting, the time to turn one row of fp32 logits into a token: penalties, temperature, top-k, top-p,
min-p and the draw. The reference is transformers' own processors for the same settings (RepetitionPenalty,
Temperature, TopK, TopP, MinP) followed by ``torch.multinomial``, as ``generate(do_sample=True)`` runs them.
Both sides get the same logits and a 1,000-token history. Two kinds of logits: "peaked", where a few dozen
tokens hold most of the mass (p_i ~ 1 / i^1.5 over a random order: what a trained code model mostly looks
like), and "flat", standard normal logits (a random model: the worst case for top-p, whose kept set is then
thousands of tokens). Prints a table of ms per row and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

V, HISTORY = 51200, 1000
SETTINGS = {  # name: SamplingParams fields
    "greedy": dict(temperature=0.0),
    "temperature 0.8": dict(temperature=0.8),
    "top_k 40": dict(temperature=0.8, top_k=40),
    "top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "top_p 0.99": dict(temperature=0.8, top_p=0.99),
    "min_p 0.05": dict(temperature=0.8, min_p=0.05),
    "llama.cpp default (top_k 40, top_p 0.95, min_p 0.05, temp 0.8)": dict(temperature=0.8, top_k=40, top_p=0.95,
                                                                          min_p=0.05),
    "repetition_penalty 1.1 + top_p 0.95": dict(temperature=0.8, top_p=0.95, repetition_penalty=1.1),
    "presence + frequency penalties": dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5),
}


def ours(params, logits: torch.Tensor, history: list[int], gen: torch.Generator) -> None:
    from codegen2.engine.sampling import sample_batch

    sample_batch(logits, [params] * len(logits), [gen] * len(logits), [(history[:500], history[500:])] * len(logits))


def reference(fields: dict, logits: torch.Tensor, history: torch.Tensor, gen: torch.Generator) -> None:
    from transformers.generation import logits_process as lp

    if not fields.get("temperature"):
        logits.argmax(-1).tolist()
        return
    procs = []
    if fields.get("repetition_penalty"):
        procs.append(lp.RepetitionPenaltyLogitsProcessor(fields["repetition_penalty"]))
    procs.append(lp.TemperatureLogitsWarper(fields["temperature"]))
    if fields.get("top_k"):
        procs.append(lp.TopKLogitsWarper(fields["top_k"]))
    if fields.get("top_p"):
        procs.append(lp.TopPLogitsWarper(fields["top_p"]))
    if fields.get("min_p"):
        procs.append(lp.MinPLogitsWarper(fields["min_p"]))
    scores = logits
    ids = history.expand(len(logits), -1)
    for p in procs:
        scores = p(ids, scores)
    torch.multinomial(torch.softmax(scores, -1), 1, generator=gen).tolist()


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="rows sampled per call (a decode step's batch)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from codegen2.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(0)
    zipf = -1.5 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    kinds = {"peaked": torch.stack([zipf[torch.randperm(V, generator=g)] for _ in range(args.rows)]),
             "flat": torch.randn(args.rows, V, generator=g)}
    history = torch.randint(0, V, (HISTORY,), generator=g)
    rows = {}
    for kind, logits in kinds.items():
        for name, fields in SETTINGS.items():
            params = SamplingParams(**fields, seed=0)
            t_ours = timed(lambda: ours(params, logits, history.tolist(), g), args.repeats) / args.rows
            t_ref = timed(lambda: reference(fields, logits, history, g), args.repeats) / args.rows
            rows[f"{kind}: {name}"] = {"ours_ms": 1e3 * t_ours, "transformers_ms": 1e3 * t_ref}
    width = max(map(len, rows))
    print(f"{'logits: setting':<{width}}  ours ms/row  transformers ms/row  ratio")
    for name, r in rows.items():
        print(f"{name:<{width}}  {r['ours_ms']:11.3f}  {r['transformers_ms']:19.3f}  "
              f"{r['transformers_ms'] / r['ours_ms']:5.1f}x")
    print(json.dumps({"bench": "sampling", "rows": args.rows, "threads": args.threads, "vocab": V, "settings": rows}))


if __name__ == "__main__":
    main()
