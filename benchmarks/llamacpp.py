"""codegen2 against llama.cpp (and transformers) on the SAME random weights, same thread count.

    pip install -e ".[bench]"                  # llama-cpp-python (built from source, 5-15 min), gguf, sentencepiece
    python benchmarks/llamacpp.py              # LLaMA / CodeGen2.5 architecture, 1B shape
    python benchmarks/llamacpp.py --shape 7b   # the CodeGen2.5-7B shape (~30 GB of disk for the four files)
    python benchmarks/llamacpp.py --llama-cpp-src DIR   # an unpacked llama-cpp-python sdist (else downloaded)

What it does:
1. writes one random checkpoint of the LLaMA architecture (1B shape: hidden 2048, 16 layers, 16 heads, FFN 5632,
   vocab 51200; 7B: CodeGen2.5-7B's) in Hugging Face's format, with a tiny sentencepiece tokenizer trained on the
   spot, because llama.cpp's converter needs one (it pads the vocabulary to the config's 51,200; the token ids the
   benchmark feeds are ids, so which tokenizer it is does not matter);
2. converts it with ``convert_hf_to_gguf.py`` from llama-cpp-python's sdist (``vendor/llama.cpp/``) to GGUF f16
   and q8_0, and quantizes the f16 file to q4_0 with llama.cpp's own ``llama_model_quantize``;
3. runs, each in its own process, with the same thread count (torch's, 2 on the project's machines):
   transformers bf16, codegen2 bf16 / int8 / int4 (through benchmarks/generate.py, so both benchmarks measure the
   same way) and llama.cpp f16 / q8_0 / q4_0:
   - batch-1 greedy decode tokens/s after a 16-token prompt (64 tokens, the first one not counted), also as % of
     the read-bandwidth bound for that weight format (bytes of weights read per token / torch's read bandwidth);
     and after a 1,024-token prompt, where attention reads the cached context every token;
   - time to first token for a 1,024-token prompt;
   - 16 concurrent requests of 128 tokens: codegen2 batches them; transformers and llama.cpp (whose Python API
     holds one sequence) run them one after another, 2 of the 16 timed and scaled to 16.
Prints one table and one JSON line. Run it on a quiet machine: a second busy process halves everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import generate  # the shared measurement: prompts, read bandwidth, codegen2's and transformers' runs

SHAPES = {"1b": {"n_layers": 16, "dim": 2048, "n_heads": 16, "intermediate_size": 5632},
          "7b": {"n_layers": 32, "dim": 4096, "n_heads": 32, "intermediate_size": 11008},
          "tiny": {"n_layers": 2, "dim": 256, "n_heads": 4, "intermediate_size": 512}}  # checks the script in seconds
# Bytes read per weight: f16/bf16 2; int8 1 plus a bf16 scale per row (negligible); llama.cpp's q8_0 blocks are
# 32 int8 + one fp16 scale (34 bytes), q4_0 32 nibbles + one fp16 scale (18 bytes); our int4 is 32 nibbles + one
# bf16 scale per group of 32 (18 bytes).
BYTES_PER_WEIGHT = {"bf16": 2.0, "f16": 2.0, "int8": 1.0, "q8_0": 34 / 32, "int4": 18 / 32, "q4_0": 18 / 32}
LLAMA_FTYPE_MOSTLY_Q4_0 = 2  # llama.h's enum llama_ftype


def make_checkpoint(shape: str, directory: Path) -> None:
    import sentencepiece as spm

    from codegen2.models.llama import LlamaConfig

    generate.random_checkpoint(LlamaConfig(**SHAPES[shape], vocab_size=51200, max_seq_len=2048), directory)
    # Any text will do: the converter reads the vocabulary, the benchmark feeds ids.
    text = Path(__file__).read_text().splitlines() * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(directory / "tokenizer"),
                                   vocab_size=400, model_type="bpe", minloglevel=2)


def llama_cpp_source(given: Path | None) -> Path:
    """The vendor/llama.cpp folder of the installed llama-cpp-python's sdist (unpacked into a cache if needed)."""
    if given is not None:
        root = given / "vendor" / "llama.cpp" if (given / "vendor").is_dir() else given
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise SystemExit(f"--llama-cpp-src {given}: no convert_hf_to_gguf.py in it or in its vendor/llama.cpp")
        return root
    import llama_cpp

    cache = Path(tempfile.gettempdir()) / f"llama-cpp-python-{llama_cpp.__version__}"
    root = cache / f"llama_cpp_python-{llama_cpp.__version__}" / "vendor" / "llama.cpp"
    if not root.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d",
                        str(cache), f"llama-cpp-python=={llama_cpp.__version__}"], check=True)
        import tarfile

        with tarfile.open(next(cache.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(cache, filter="data")
    return root


def convert(directory: Path, src: Path) -> dict[str, Path]:
    """GGUF f16, q8_0 (the converter) and q4_0 (llama.cpp's quantizer from f16) beside the checkpoint."""
    files = {q: directory / f"model-{q}.gguf" for q in ("f16", "q8_0", "q4_0")}
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    for q in ("f16", "q8_0"):
        if not files[q].exists():
            print(f"converting to {q}", flush=True)
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(directory), "--outtype", q,
                            "--outfile", str(files[q])], check=True, env=env, capture_output=True)
    if not files["q4_0"].exists():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = torch.get_num_threads()
        if llama_cpp.llama_model_quantize(str(files["f16"]).encode(), str(files["q4_0"]).encode(), params) != 0:
            raise RuntimeError("llama_model_quantize to q4_0 failed")
    return files


def run_llama_cpp(path: str, threads: int, decode_tokens: int, concurrent_runs: int) -> dict:
    """llama.cpp through llama-cpp-python: greedy tokens, one sequence at a time, ``threads`` for both decode
    and prompt processing."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=generate.PROMPT_LEN + generate.NEW_TOKENS + 64, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)

    def gen(ids: list[int], n: int) -> tuple[float, float]:
        """(seconds to the first new token, seconds for the other n - 1)."""
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        tok = llm.sample(top_k=1, temp=0.0)
        first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = llm.sample(top_k=1, temp=0.0)
        return first - t, time.perf_counter() - first

    gen(generate.prompts(1, 16, 9)[0], 4)  # warm-up
    _, rest = gen(generate.prompts(1, 16, 1)[0], decode_tokens)
    _, rest_long = gen(generate.prompts(1, generate.PROMPT_LEN, 5)[0], decode_tokens)
    ttft, _ = gen(generate.prompts(1, generate.PROMPT_LEN, 2)[0], 1)
    batch = generate.prompts(generate.CONCURRENT, 32, 4)[:concurrent_runs]
    elapsed = sum(sum(gen(p, generate.NEW_TOKENS)) for p in batch) * generate.CONCURRENT / concurrent_runs
    return {"decode_tps": (decode_tokens - 1) / rest, "decode_long_tps": (decode_tokens - 1) / rest_long,
            "ttft_s": ttft,
            "concurrent_tps": generate.CONCURRENT * generate.NEW_TOKENS / elapsed, "peak_rss": generate.peak_rss()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--dir", type=Path, help="checkpoint + GGUF directory (created if missing; default: a temp dir)")
    ap.add_argument("--llama-cpp-src", type=Path, help="unpacked llama-cpp-python sdist (default: pip download)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--concurrent-runs", type=int, default=2, help="sequential requests timed for transformers "
                    "and llama.cpp, scaled to 16")
    ap.add_argument("--ours", default="bf16,int8,int4")
    ap.add_argument("--llama", default="f16,q8_0,q4_0")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    if args._child:
        print(json.dumps(run_llama_cpp(args._child[0], threads, args.decode_tokens, args.concurrent_runs)))
        return

    directory = args.dir or Path(tempfile.mkdtemp(prefix="cg2-llamacpp-"))
    if not (directory / "config.json").exists():
        print(f"writing random LLaMA {args.shape} checkpoint to {directory}", flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        make_checkpoint(args.shape, directory)
    gguf = convert(directory, llama_cpp_source(args.llama_cpp_src))

    from codegen2.models import build
    from codegen2.models.llama import LlamaConfig

    with torch.device("meta"):
        meta = build(LlamaConfig(**SHAPES[args.shape], vocab_size=51200))
    # Weights read per decoded token: everything but the embedding table, of which one row is read.
    n_weights = sum(p.numel() for n, p in meta.named_parameters() if not n.startswith("tok_embeddings"))
    bandwidth = generate.read_bandwidth()
    common = ["--decode-tokens", str(args.decode_tokens)]
    results = {}
    if not args.skip_transformers:
        results["transformers bf16"] = generate.child(["--_child", "reference", str(directory),
                                                       str(args.concurrent_runs), *common])
    for mode in filter(None, args.ours.split(",")):
        results[f"codegen2 {mode}"] = generate.child(["--_child", "ours", str(directory), mode, *common])
    for q in filter(None, args.llama.split(",")):
        results[f"llama.cpp {q}"] = generate.child(["--_child", str(gguf[q]), *common,
                                                    "--concurrent-runs", str(args.concurrent_runs)], __file__)

    # Each of ours against the llama.cpp format of the same size, TTFT against the faster reference.
    pairs = {"codegen2 bf16": "llama.cpp f16", "codegen2 int8": "llama.cpp q8_0", "codegen2 int4": "llama.cpp q4_0"}
    ttft_refs = [r["ttft_s"] for n, r in results.items() if not n.startswith("codegen2")]
    seq_ref = results.get("transformers bf16", {}).get("concurrent_tps")
    print(f"\nLLaMA {args.shape} shape, random weights, {threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{n_weights / 1e9:.2f} G weights read per token")
    print(f"{'':20}{'decode tok/s':>13}{'% bound':>9}{'x llama.cpp':>12}{'@1k tok/s':>10}{'x llama.cpp':>12}"
          f"{'TTFT 1k s':>11}{'x best ref':>11}"
          f"{'16-conc tok/s':>15}{'x tf seq':>9}{'peak GiB':>10}")
    for name, r in results.items():
        fmt = name.split()[-1]
        r["bound_tps"] = bandwidth / (n_weights * BYTES_PER_WEIGHT[fmt])
        r["pct_bound"] = 100 * r["decode_tps"] / r["bound_tps"]
        ref = results.get(pairs.get(name, ""))
        vs = f"{r['decode_tps'] / ref['decode_tps']:12.2f}" if ref else f"{'':12}"
        vs_long = f"{r['decode_long_tps'] / ref['decode_long_tps']:12.2f}" if ref else f"{'':12}"
        best = min(ttft_refs) / r["ttft_s"] if ttft_refs and name.startswith("codegen2") else None
        conc = r["concurrent_tps"] / seq_ref if seq_ref else None
        print(f"{name:20}{r['decode_tps']:13.2f}{r['pct_bound']:8.0f}%{vs}{r['decode_long_tps']:10.2f}{vs_long}"
              f"{r['ttft_s']:11.2f}"
              f"{f'{best:11.2f}' if best else f'{chr(32) * 11}'}{r['concurrent_tps']:15.2f}"
              f"{f'{conc:9.2f}' if conc else f'{chr(32) * 9}'}{r['peak_rss'] / 2**30:10.2f}")
    print(json.dumps({"bench": "llamacpp", "shape": args.shape, "threads": threads, "read_bandwidth": bandwidth,
                      "weights_per_token": n_weights, "results": results}))


if __name__ == "__main__":
    main()
