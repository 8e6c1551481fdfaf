"""Speculative decoding (prompt lookup), measured where it can be and projected where it cannot.

    python benchmarks/speculative.py                          # everything: ~25-40 min on a 2-core CPU
    python benchmarks/speculative.py --model runs/spec/model  # reuse a trained small model (skip training)
    python benchmarks/speculative.py --shapes codegen2-1B     # verification cost on the 1B shape only

Random weights agree with nothing, so acceptance is measured on a model that has learned to copy, and the cost
of verification, which does not depend on the weights' values, on the real shapes:

1. **Verification cost** on the CodeGen2-1B and CodeGen2.5-7B shapes (random bf16 weights, native kernels,
   batch 1, after a 512-token prompt): the time of one forward pass over k + 1 tokens against one over 1 token,
   for k = 1..K. A 7B model needs ~14 GB: with less memory free, fewer of its 32 blocks are built (printed; the
   blocks are identical, so the ratio is the per-block one, with the full-size embedding and output layer).
2. **A small model meant to copy**, trained here by ``codegen2 train`` for --train-steps steps: CodeGen2.5
   architecture (--layers x --dim, --heads, tied embeddings; bf16 autocast unless --train-dtype fp32), on real
   code, this Python's standard library cut into pieces of ~--piece-chars characters, each followed by a copy
   of itself with one line edited, so that copying what came before is what there is to learn. Files held out
   by name (~10%) are only in the workloads. (Runs of 250 x 4 x 1,024, 600 x 8 x 512 and 800 x 4 x 1,024
   tokens, 20-50 min here, did not learn to copy: see the README.)
3. **Acceptance and end-to-end speed** of that model, batch 1, greedy, with and without ``--speculative ngram``
   (outputs checked identical), on
   - HumanEval-Infill single-line and multi-line (the first --problems problems of each; infill format);
   - editing: a piece of a held-out standard-library file as an editor's context (the version before the
     edit), then the piece again up to a line just edited, and the model asked for the next --edit-tokens
     tokens (the rest).
   Reported: tokens/s with and without, the speedup, drafts proposed and accepted, tokens per forward pass, and
   for editing the share of the output that is the true rest of the file (whether the model really copies).
4. **Projection** for the 1B and 7B shapes, labelled as one: the measured draft lengths of every decode step of
   workload 3, each costed by step 1's ratio for its length, against one pass per token.

Prints a table per part and one JSON line. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from codegen2.engine.engine import Engine
from codegen2.engine.runner import ModelRunner
from codegen2.engine.sampling import SamplingParams
from codegen2.engine.speculative import SpeculativeConfig
from codegen2.infill import Infill
from codegen2.kernels import prepare_for_inference
from codegen2.models import build, preset_config
from codegen2.models.checkpoint import load_model
from codegen2.tokenizer import load_tokenizer

PIECE_CHARS = 1500  # a piece and its edited copy fit one 1,024-token training row
DATA = Path(__file__).resolve().parents[1] / "codegen2" / "data" / "eval" / "humaneval-infill"


def mem_available() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))


# --- 1. verification cost on the real shapes ------------------------------------------------------------------

def verify_cost(preset: str, max_k: int, repeats: int) -> dict:
    cfg = preset_config(preset)
    bytes_needed = 2.3 * 12 * cfg.n_layers * cfg.dim ** 2  # bf16 blocks (~12 d^2 weights each) + headroom
    n_layers = cfg.n_layers
    while n_layers > 2 and bytes_needed * n_layers / cfg.n_layers > 0.7 * mem_available():
        n_layers //= 2
    cfg = preset_config(preset, n_layers=n_layers, max_seq_len=1024)
    with torch.device("meta"):
        model = build(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = prepare_for_inference(model.eval())
    runner = ModelRunner(model, 1, 1024)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (512,), generator=g).tolist()
    runner.prefill(0, prompt, 0)

    def timed(row: list[int]) -> float:
        best = float("inf")
        for _ in range(repeats):  # the best of `repeats`: the machine's noise only ever adds time
            t = time.perf_counter()
            runner.verify([0], [row], [512])
            best = min(best, time.perf_counter() - t)
        return best

    timed(prompt[:1])  # warm-up
    one = timed(prompt[:1])
    ratios = {k: timed(prompt[:k + 1]) / one for k in range(1, max_k + 1)}
    return {"preset": preset, "n_layers": n_layers, "of_layers": preset_config(preset).n_layers,
            "one_token_ms": one * 1e3, "ratio": ratios}


# --- 2. a small model that copies ------------------------------------------------------------------------------

def held_out(path: Path) -> bool:
    return hashlib.sha256(path.name.encode()).digest()[0] < 26  # ~10% of the files, by name


def edit(text: str, rng: random.Random) -> tuple[str, int] | None:
    """The file with one line edited (a name renamed, or a line added after it) and that line's index."""
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines[: len(lines) * 2 // 3]) if len(line.strip()) > 12
                  and not line.lstrip().startswith(("#", '"', "'"))]
    if len(lines) < 12 or not candidates:
        return None
    i = rng.choice(candidates)
    words = [w for w in lines[i].replace("(", " ").replace(")", " ").replace(".", " ").split() if w.isidentifier()]
    if words and rng.random() < 0.5:
        w = rng.choice(words)
        lines[i] = lines[i].replace(w, w + "_new", 1)
    else:
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        lines.insert(i + 1, f"{indent}pass  # edited")
        i += 1
    return "\n".join(lines), i


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """The text cut at line ends into pieces of about ``size`` characters (~400 tokens of Python)."""
    out, cur = [], ""
    for line in text.split("\n"):
        cur += line + "\n"
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    return out


def stdlib_files(held: bool, limit: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 60_000 and held_out(p) == held)
    return files[:limit]


def train_model(out: Path, steps: int, layers: int, dim: int, piece_chars: int, seq_len: int, batch: int,
                lr: float, dtype: str = "fp32", heads: int | None = None) -> Path:
    from codegen2.train.config import load_config
    from codegen2.train.data import build_corpus
    from codegen2.train.loop import train

    rng = random.Random(0)
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    for f in stdlib_files(held=False, limit=10_000):
        for j, piece in enumerate(pieces(f.read_text(errors="replace"), piece_chars)):
            if (e := edit(piece, rng)) is not None:  # a piece, then its edited copy: what an editor's prompt holds
                (src / f"{f.stem}_{j}.py").write_text(piece + "\n\n" + e[0])
    # The standard library is under the PSF license (its LICENSE file sits above these copies).
    build_corpus([src], out / "corpus", val_fraction=0.02, workers=2, progress=False, tokenizer_kind="codegen25",
                 declared_licenses={src: "PSF-2.0"})
    heads = heads or max(1, dim // 64)
    # Tied embeddings: an attention head that copies a token's embedding forward then raises that same token's
    # logit, so copying is there to find from the first step (untied, 250 steps of 4 x 1,024 tokens did not
    # learn to copy at all: 0.5% of its editing output was the true rest of the file).
    config = out / "train.toml"
    config.write_text(f"""[model]
family = "llama"
shape = {{ n_layers = {layers}, dim = {dim}, n_heads = {heads}, intermediate_size = {dim * 8 // 3 // 64 * 64}, max_seq_len = 2048, tie_word_embeddings = true }}
[data]
corpus = "{out / 'corpus'}"
seq_len = {seq_len}
[objective]
causal_prob = 1.0
[optim]
lr = {lr}
min_lr = {lr / 10}
warmup_steps = 30
max_steps = {steps}
batch_size = {batch}
micro_batch_size = {batch}
[run]
out_dir = "{out / 'run'}"
log_every = 25
eval_every = 0
checkpoint_every = 100000
export_dtype = "fp32"
dtype = "{dtype}"
""")
    t = time.perf_counter()
    model_dir = train(load_config(config))
    print(f"trained {steps} steps in {time.perf_counter() - t:.0f} s -> {model_dir}", file=sys.stderr)
    return model_dir


# --- 3. acceptance and end-to-end speed ------------------------------------------------------------------------

def workloads(n_problems: int, n_edits: int, piece_chars: int = PIECE_CHARS) -> dict[str, list]:
    def infill(name: str) -> list[Infill]:
        with gzip.open(DATA / f"HumanEval-{name}Infilling.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f][:n_problems]
        return [Infill(r["prompt"], r["suffix"]) for r in rows]

    rng = random.Random(1)
    edits = []
    for f in stdlib_files(held=True, limit=10_000):
        for piece in pieces(f.read_text(errors="replace"), piece_chars)[:2]:
            if (e := edit(piece, rng)) is None:
                continue
            new, i = e
            # The piece as it was (the editor's context), then the piece up to and including the edited line.
            lines = new.split("\n")
            edits.append((piece + "\n\n" + "\n".join(lines[: i + 1]) + "\n", "\n".join(lines[i + 1:])))
        if len(edits) >= n_edits:
            break
    edits = edits[:n_edits]
    return {"humaneval-infill-single-line": [(x, None) for x in infill("SingleLine")],
            "humaneval-infill-multi-line": [(x, None) for x in infill("MultiLine")], "editing": edits}


def copied(texts: list[str], truths: list[str]) -> float:
    """The share of the generated characters that are the true rest of the file (the common prefix of each
    output and its truth): whether the model copies, which acceptance alone does not show (a model that loops
    on one line is predictable too)."""
    same = sum(len(os.path.commonprefix([t, want])) for t, want in zip(texts, truths))
    return same / max(1, sum(len(t) for t in texts))


def run(engine: Engine, prompts: list, max_tokens: int) -> dict:
    """Each prompt alone (batch 1), greedy: wall time, tokens, and the draft length of every decode pass (0: a
    plain one-token pass), recorded by wrapping the engine's model runner."""
    passes: list[int] = []
    decode, verify = engine.runner.decode, engine.runner.verify

    def counted_decode(slots, tokens, positions):
        passes.extend([0] * len(slots))
        return decode(slots, tokens, positions)

    def counted_verify(slots, rows, starts):
        passes.extend(len(row) - 1 for row in rows)  # a row: the last token, then its drafts
        return verify(slots, rows, starts)

    engine.runner.decode, engine.runner.verify = counted_decode, counted_verify
    texts, tokens, wall = [], 0, 0.0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for prompt in prompts:
        t = time.perf_counter()
        engine.add_request(prompt, params)
        text = ""
        while engine.has_unfinished():
            for o in engine.step():  # deltas: the new text and tokens of this step
                for c in o.outputs:
                    text += c.text
                    tokens += len(c.token_ids)
        wall += time.perf_counter() - t
        texts.append(text)
    s = engine.stats()
    return {"texts": texts, "tokens": tokens, "wall": wall, "passes": passes, "drafted": s.draft_tokens,
            "accepted": s.accepted_draft_tokens}


def measure(model_dir: Path, k: int, n_problems: int, n_edits: int, edit_tokens: int, piece_chars: int) -> dict:
    tok = load_tokenizer(model_dir)
    model = prepare_for_inference(load_model(model_dir, dtype="fp32").eval())
    results = {}
    for name, cases in workloads(n_problems, n_edits, piece_chars).items():
        prompts, truths = [p for p, _ in cases], [t for _, t in cases]
        max_tokens = edit_tokens if name == "editing" else 128
        plain = run(Engine(model, tok, max_batch=1), prompts, max_tokens)
        spec = run(Engine(model, tok, max_batch=1, speculative=SpeculativeConfig("ngram", k)), prompts, max_tokens)
        if plain["texts"] != spec["texts"]:
            raise SystemExit(f"{name}: speculative output differs from plain greedy output")
        results[name] = {"prompts": len(prompts), "tokens": plain["tokens"],
                         "plain_tok_s": plain["tokens"] / plain["wall"], "spec_tok_s": spec["tokens"] / spec["wall"],
                         "speedup": plain["wall"] / spec["wall"], "drafted": spec["drafted"],
                         "accepted": spec["accepted"],
                         "acceptance": spec["accepted"] / max(1, spec["drafted"]),
                         # decode tokens (the prefill's first one excluded) per forward pass of the model
                         "tokens_per_pass": (spec["tokens"] - len(prompts)) / max(1, len(spec["passes"])),
                         "copied": copied(plain["texts"], truths) if truths[0] is not None else None,
                         "draft_lengths": spec["passes"]}
    return results


def project(draft_lengths: list[int], n_prompts: int, tokens: int, ratio: dict[int, float]) -> float:
    """Decode speedup if each step cost what step 1 measured for its length: tokens (one pass each, plain)
    against the passes speculation made (the prefill's token excluded from both)."""
    decode_tokens = tokens - n_prompts
    cost = sum(ratio[n] if n else 1.0 for n in draft_lengths)
    return decode_tokens / cost if cost else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a trained small model directory (default: train one)")
    p.add_argument("--out", type=Path, help="where to train (default: a temporary directory)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--piece-chars", type=int, default=PIECE_CHARS, help="characters of a piece of file (training "
                   "and editing workload): the piece and its edited copy must fit --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--heads", type=int, help="attention heads (default: one per 64 of --dim)")
    p.add_argument("--train-dtype", choices=("fp32", "bf16"), default="bf16", help="bf16 autocast: 1.5x the "
                   "tokens/s of fp32 on an AVX512-BF16 CPU (2,840 against 1,872, 2 x 128 model)")
    p.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    p.add_argument("--problems", type=int, default=40, help="HumanEval-Infill problems per split")
    p.add_argument("--edits", type=int, default=20)
    p.add_argument("--edit-tokens", type=int, default=128)
    p.add_argument("--shapes", default="codegen2-1B,codegen25-7b-mono")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    threads = torch.get_num_threads()

    costs = {}
    for preset in filter(None, args.shapes.split(",")):
        c = costs[preset] = verify_cost(preset, args.k, args.repeats)
        layers = f"{c['n_layers']} of {c['of_layers']} blocks" if c["n_layers"] < c["of_layers"] else "all blocks"
        print(f"verification cost, {preset} ({layers}), one token {c['one_token_ms']:.1f} ms: "
              + ", ".join(f"k={k}: {r:.2f}x" for k, r in c["ratio"].items()))

    model_dir = args.model
    if model_dir is None:
        out = args.out or Path(tempfile.mkdtemp(prefix="codegen2-spec-"))
        model_dir = train_model(out, args.train_steps, args.layers, args.dim, args.piece_chars, args.seq_len,
                                args.batch_size, args.lr, args.train_dtype, args.heads)
    results = measure(model_dir, args.k, args.problems, args.edits, args.edit_tokens, args.piece_chars)

    print(f"\nprompt lookup (k={args.k}) on the trained small model, batch 1, greedy, {threads} threads")
    print(f"{'workload':30} {'prompts':>7} {'tokens':>7} {'plain tok/s':>11} {'ngram tok/s':>11} {'speedup':>8} "
          f"{'accepted':>14} {'tok/pass':>8} {'true rest':>9}")
    for name, r in results.items():
        true_rest = f"{100 * r['copied']:8.0f}%" if r["copied"] is not None else f"{'-':>9}"
        print(f"{name:30} {r['prompts']:7} {r['tokens']:7} {r['plain_tok_s']:11.1f} {r['spec_tok_s']:11.1f} "
              f"{r['speedup']:7.2f}x {r['accepted']:6}/{r['drafted']:<7} {r['tokens_per_pass']:8.2f} {true_rest}")

    projection = {}
    for preset, c in costs.items():
        projection[preset] = {name: project(r["draft_lengths"], r["prompts"], r["tokens"], c["ratio"])
                              for name, r in results.items()}
        print(f"PROJECTION for {preset} (decode, measured acceptance x measured verification cost): "
              + ", ".join(f"{n} {s:.2f}x" for n, s in projection[preset].items()))
    for r in results.values():
        del r["draft_lengths"]
    print(json.dumps({"benchmark": "speculative", "threads": threads, "k": args.k, "model": str(model_dir),
                      "verification_cost": costs, "measured": results, "projection": projection}))


if __name__ == "__main__":
    main()
