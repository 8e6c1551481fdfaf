"""Generation speed: codegen2's engine against transformers `generate`, same random weights, same prompts.

    python benchmarks/generate.py                       # CodeGen2-1B shape, bf16
    python benchmarks/generate.py --preset codegen25-7b-multi --skip-reference-concurrent
    python benchmarks/generate.py --modes bf16,int8,int4   # also our int8 / int4 weight-only modes

Measures, each side in its own process (so peak memory is its own):
- batch-1 decode tokens/s (greedy, eos ignored) after a 16-token prompt, also as % of the machine's
  read-bandwidth bound (bytes of weights read per token / measured read bandwidth), and after a 1,024-token
  prompt (an editor's context: attention then reads ~1k cached positions per layer and token);
- time to first token for a 1,024-token prompt, and (ours) for the same file re-sent with a few more tokens,
  which reuses the cached prefix;
- aggregate tokens/s for 16 concurrent requests of 128 new tokens each; transformers runs them one after
  another (by default 2 of them are run and the time is scaled to 16: the runs are independent and identical in
  shape; --full-reference runs all 16);
- peak RSS.
Prints one table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN, NEW_TOKENS, CONCURRENT = 1024, 128, 16


def read_bandwidth() -> float:
    """Bytes/s that torch's sum reads from a 1 GiB tensor, best of 5."""
    x = torch.ones(1 << 28, dtype=torch.float32)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    return best


def peak_rss() -> int:
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n, length), generator=g).tolist()


def make_checkpoint(preset: str, directory: Path) -> None:
    from codegen2.models import preset_config

    random_checkpoint(preset_config(preset), directory)


def random_checkpoint(cfg, directory: Path) -> None:
    """A model of config ``cfg`` with N(0, 0.02) bf16 weights (seed 0), saved in Hugging Face's format."""
    from codegen2.models import build
    from codegen2.models.checkpoint import save_model

    torch.manual_seed(0)
    model = build(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model, directory)


def run_ours(directory: str, mode: str, decode_tokens: int) -> dict:
    import os

    if mode == "bf16-torch":
        os.environ["CODEGEN2_KERNELS"] = "torch"  # the plain torch path for every layer
    from codegen2.engine.engine import Engine
    from codegen2.engine.sampling import SamplingParams

    engine = Engine.from_pretrained(directory, dtype="bf16", quant=mode if mode in ("int8", "int4") else None,
                                    max_batch=CONCURRENT, max_seq_len=PROMPT_LEN + NEW_TOKENS + 64)
    greedy = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)

    def first_token_and_rest(prompt, params):
        engine.add_request(prompt, params)
        t0, first, n = time.perf_counter(), None, 0
        while engine.has_unfinished():
            for out in engine.step():
                n += len(out.outputs[0].token_ids)  # deltas: the tokens new in this step
                if first is None and n:
                    first = time.perf_counter()
        return first - t0, time.perf_counter() - first, n

    engine.generate([prompts(1, 16, 9)[0]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    _, rest, n = first_token_and_rest(prompts(1, 16, 1)[0], greedy)
    decode = (n - 1) / rest
    _, rest, n = first_token_and_rest(prompts(1, PROMPT_LEN, 5)[0], greedy)
    decode_long = (n - 1) / rest
    long_prompt = prompts(1, PROMPT_LEN, 2)[0]
    ttft, _, _ = first_token_and_rest(long_prompt, SamplingParams(max_tokens=1))
    ttft_reuse, _, _ = first_token_and_rest(long_prompt + prompts(1, 16, 3)[0], SamplingParams(max_tokens=1))
    batch = prompts(CONCURRENT, 32, 4)
    t = time.perf_counter()
    outs = engine.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    elapsed = time.perf_counter() - t
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"decode_tps": decode, "decode_long_tps": decode_long, "ttft_s": ttft, "ttft_reuse_s": ttft_reuse, "concurrent_tps": total / elapsed,
            "peak_rss": peak_rss()}


def run_reference(directory: str, decode_tokens: int, concurrent_runs: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()

    def gen(ids: list[int], n: int) -> float:
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t

    gen(prompts(1, 16, 9)[0], 4)  # warm-up
    short = prompts(1, 16, 1)[0]
    first = gen(short, 1)
    decode = (decode_tokens - 1) / (gen(short, decode_tokens) - first)
    ttft = gen(prompts(1, PROMPT_LEN, 2)[0], 1)
    long = prompts(1, PROMPT_LEN, 5)[0]
    decode_long = (decode_tokens - 1) / (gen(long, decode_tokens) - gen(long, 1))
    result = {"decode_tps": decode, "decode_long_tps": decode_long, "ttft_s": ttft}
    if concurrent_runs:
        batch = prompts(CONCURRENT, 32, 4)[:concurrent_runs]
        elapsed = sum(gen(p, NEW_TOKENS) for p in batch) * CONCURRENT / concurrent_runs
        result["concurrent_tps"] = CONCURRENT * NEW_TOKENS / elapsed
    result["peak_rss"] = peak_rss()
    return result


def child(args: list[str], script: str = __file__) -> dict:
    """Run ``script`` (this file by default) with ``args`` in a fresh process: its last stdout line, as JSON."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="codegen2-1B")
    ap.add_argument("--modes", default="bf16", help="ours: comma-separated of bf16 (fast kernels), int8, int4, "
                    "bf16-torch (plain torch linear)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--full-reference", action="store_true", help="run all 16 reference requests")
    ap.add_argument("--skip-reference-concurrent", action="store_true")
    ap.add_argument("--dir", type=Path, help="checkpoint directory (created if missing; default: a temp dir)")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        kind, directory = args._child[0], args._child[1]
        if kind == "ours":
            print(json.dumps(run_ours(directory, args._child[2], args.decode_tokens)))
        else:
            print(json.dumps(run_reference(directory, args.decode_tokens, int(args._child[2]))))
        return

    from codegen2.models import build, preset_config

    torch.set_num_threads(torch.get_num_threads())
    directory = args.dir or Path(tempfile.mkdtemp(prefix="cg2bench-"))
    if not (directory / "config.json").exists():
        print(f"writing random {args.preset} checkpoint to {directory}", flush=True)
        make_checkpoint(args.preset, directory)
    with torch.device("meta"):
        meta = build(preset_config(args.preset))
    # Weights read per decoded token: everything but the embedding table, of which one row is read.
    bytes_per_token = 2 * sum(p.numel() for n, p in meta.named_parameters() if not n.startswith("tok_embeddings"))
    bandwidth = read_bandwidth()
    bound = bandwidth / bytes_per_token
    common = ["--decode-tokens", str(args.decode_tokens)]
    ref_runs = 0 if args.skip_reference_concurrent else (CONCURRENT if args.full_reference else 2)
    results = {"transformers": child(["--_child", "reference", str(directory), str(ref_runs), *common])}
    for mode in args.modes.split(","):
        results[f"codegen2-{mode}"] = child(["--_child", "ours", str(directory), mode, *common])

    ref = results["transformers"]
    print(f"\n{args.preset}: read bandwidth {bandwidth / 1e9:.1f} GB/s, {bytes_per_token / 1e9:.2f} GB of weights "
          f"per token -> bound {bound:.1f} tokens/s")
    print(f"{'':22}{'decode tok/s':>14}{'% bound':>9}{'x ref':>7}{'@1k tok/s':>10}{'x ref':>7}{'TTFT 1k s':>11}{'x ref':>7}"
          f"{'reuse TTFT s':>14}{'16-conc tok/s':>15}{'x ref':>7}{'peak GiB':>10}")
    for name, r in results.items():
        conc = r.get("concurrent_tps")
        ratio = lambda a, b: f"{a / b:7.2f}" if a and b else f"{'':>7}"
        print(f"{name:22}{r['decode_tps']:14.2f}{100 * r['decode_tps'] / bound:8.0f}%"
              f"{ratio(r['decode_tps'], ref['decode_tps'])}{r['decode_long_tps']:10.2f}"
              f"{ratio(r['decode_long_tps'], ref['decode_long_tps'])}{r['ttft_s']:11.2f}{ratio(ref['ttft_s'], r['ttft_s'])}"
              f"{r.get('ttft_reuse_s', float('nan')):14.3f}{(conc or float('nan')):15.2f}"
              f"{ratio(conc, ref.get('concurrent_tps'))}{r['peak_rss'] / 2**30:10.2f}")
    print(json.dumps({"bench": "generate", "preset": args.preset, "read_bandwidth": bandwidth,
                      "bytes_per_token": bytes_per_token, "bound_tps": bound, "results": results}))


if __name__ == "__main__":
    main()
