"""Decode on a busy machine: batch-1 greedy tokens/s with 0, 1 and 2 other busy processes (`while True: pass`,
started here at the same niceness and killed by pid afterwards), for given thread counts and OpenMP waiting
policies, each configuration in a fresh process (OMP_* settings are read when torch starts).

    python benchmarks/busy.py [--preset codegen2-1B] [--quant int8] [--threads 2] [--adapt off,on]
                              [--wait-policy default,passive]

A random model of the preset's shape (bf16, then the weight format --quant). --adapt on is the engine's own
thread governor (codegen2/engine/threads.py: fewer threads while other processes keep cores busy), off a fixed
count. Prints one table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = """
import json, sys, time, torch
from codegen2.engine.engine import Engine
from codegen2.engine.sampling import SamplingParams
from codegen2.kernels import prepare_for_inference
from codegen2.models import build, preset_config
from codegen2.tokenizer import CodeGen2Tokenizer, CodeGen25Tokenizer

preset, quant, threads, tokens, adapt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
cfg = preset_config(preset)
torch.manual_seed(0)
with torch.device("meta"):
    model = build(cfg)
model = model.to_empty(device="cpu").to(torch.bfloat16)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.reset_rotary()
model = prepare_for_inference(model.eval().requires_grad_(False), quant)
tok = CodeGen2Tokenizer() if cfg.family == "codegen2" else CodeGen25Tokenizer()
engine = Engine(model, tok, max_batch=1, max_seq_len=256, adapt_threads=adapt == "on")
params = SamplingParams(max_tokens=tokens, ignore_eos=True)
prompt = list(range(100, 116))
engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
print("READY", flush=True)
sys.stdin.readline()  # the parent starts the busy processes, then says go
engine.add_request(prompt, params)
t0, first, n = time.perf_counter(), None, 0
while engine.has_unfinished():
    for out in engine.step():
        n += len(out.outputs[0].token_ids)
        if first is None and n:
            first = time.perf_counter()
print(json.dumps({"tps": (n - 1) / (time.perf_counter() - first), "threads_at_end": torch.get_num_threads()}))
"""


def run(preset: str, quant: str, threads: str, adapt: str, policy: str, busy: int, tokens: int) -> dict:
    env = dict(os.environ)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    child = subprocess.Popen([sys.executable, "-c", CHILD, preset, quant, threads, str(tokens), adapt], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "READY"
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)  # let the scheduler see them
        child.stdin.write("go\n")
        child.stdin.flush()
        out = json.loads(child.stdout.readline())
    finally:
        for s in spinners:  # ours only, by pid
            s.kill()
            s.wait()
    child.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="codegen2-1B")
    ap.add_argument("--quant", default="int8")
    ap.add_argument("--threads", default="2", help="comma-separated thread counts (the governor's ceiling)")
    ap.add_argument("--adapt", default="off,on", help="comma-separated: off (fixed count), on (the governor)")
    ap.add_argument("--wait-policy", default="default", help="comma-separated OMP_WAIT_POLICY: default, active, "
                    "passive")
    ap.add_argument("--busy", default="0,1,2", help="comma-separated numbers of competing busy processes")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    rows = []
    print(f"{args.preset} {args.quant}, cores {len(os.sched_getaffinity(0))}, load before "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'threads':>8}{'adapt':>7}{'wait policy':>13}{'busy':>6}{'tok/s':>9}{'x quiet':>9}{'threads at end':>16}")
    for threads in args.threads.split(","):
        for adapt in args.adapt.split(","):
            for policy in args.wait_policy.split(","):
                quiet = None
                for busy in map(int, args.busy.split(",")):
                    r = run(args.preset, args.quant, threads, adapt, policy, busy, args.tokens)
                    quiet = quiet or r["tps"]
                    rows.append({"threads": threads, "adapt": adapt, "wait_policy": policy, "busy": busy, **r})
                    print(f"{threads:>8}{adapt:>7}{policy:>13}{busy:6d}{r['tps']:9.2f}{r['tps'] / quiet:9.2f}"
                          f"{r['threads_at_end']:16d}", flush=True)
    print(json.dumps({"bench": "busy", "preset": args.preset, "quant": args.quant, "results": rows}))


if __name__ == "__main__":
    main()
