"""What int8 and int4 weights do to a model that has learned something: a tiny CodeGen2 trained by our own trainer
(``codegen2 train``) on Python from the standard library, then evaluated in bf16, int8 and int4.

    python benchmarks/quant_greedy.py [--work /tmp/cg2-quant] [--steps 250] [--dim 128]

Measured on held-out rows (the trainer's validation split) and on greedy continuations of prompts cut from
them, decoding over a KV cache as generation does (so int8 / int4 products take the decode kernels, not the
prompt-sized GEMM): the next-token loss teacher-forced (and its change against bf16), top-1 agreement with bf16
over every position, and for greedy decoding of --new-tokens tokens the fraction of tokens equal to bf16's before the first
difference and the fraction of prompts whose whole continuation is identical. The trained model is kept in
--work and reused. Prints one table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import build_stdlib_corpus  # benchmarks/train.py: the same corpus


def train_model(work: Path, steps: int, dim: int) -> Path:
    from codegen2.train.config import load_config
    from codegen2.train.loop import train

    model_dir = work / "run" / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    corpus = build_stdlib_corpus(work, 400)
    cfg = load_config(None, [
        "model.family=codegen2", "model.shape.n_layers=4", f"model.shape.dim={dim}", "model.shape.n_heads=4",
        "model.shape.rotary_dim=16", "model.shape.max_seq_len=512", f"data.corpus={corpus}", "data.seq_len=128",
        "optim.batch_size=8", "optim.micro_batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=20",
        f"optim.max_steps={steps}", f"run.out_dir={work / 'run'}", "run.eval_every=0",
        f"run.checkpoint_every={steps}", "run.export_dtype=fp32"])
    train(cfg)
    return model_dir


def held_out(work: Path, n: int, length: int) -> torch.Tensor:
    """n rows of `length` tokens from the validation split (files the model never trained on)."""
    from codegen2.train.corpus import TokenCorpus

    corpus = TokenCorpus(work / "corpus", "val")
    docs = [torch.from_numpy(corpus.tokens(i).astype("int64")) for i in range(len(corpus))]
    rows = [d[j:j + length] for d in docs for j in range(0, len(d) - length + 1, length)]  # from the files' starts
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} held-out rows of {length} tokens; use a bigger corpus or fewer --rows")
    return torch.stack(rows[:n])


@torch.no_grad()
def evaluate(model_dir: Path, quant: str, rows: torch.Tensor, prompt_len: int, new_tokens: int) -> dict:
    """Decoded the way generation runs, over a KV cache, so that the products take the kernels decode takes: the
    held-out rows are fed one position at a time, all rows together (products of len(rows) < 32 rows: the
    small-M integer kernels), for the loss and top-1; greedy continuations run one prompt at a time (the prompt in
    one pass, then one token per step: M = 1)."""
    from codegen2.kernels import prepare_for_inference, quantizer
    from codegen2.models.checkpoint import load_model
    from codegen2.models.kv_cache import KVCache

    model = prepare_for_inference(load_model(model_dir, dtype="bf16", on_block=quantizer(quant)), quant)
    cfg = model.config

    def cache(batch: int, length: int) -> KVCache:
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim, torch.bfloat16)

    B, T = rows.shape
    kv = cache(B, T)
    logits = torch.cat([model(rows[:, t:t + 1], torch.full((B, 1), t), kv) for t in range(T)], 1).float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten()).item()
    greedy = []
    for row in rows:
        kv = cache(1, prompt_len + new_tokens)
        out = model(row[None, :prompt_len], torch.arange(prompt_len)[None], kv)
        seq = [int(out[0, -1].argmax())]
        for t in range(prompt_len, prompt_len + new_tokens - 1):
            seq.append(int(model(torch.tensor([[seq[-1]]]), torch.tensor([[t]]), kv)[0, -1].argmax()))
        greedy.append(seq)
    return {"loss": loss, "top1": logits.argmax(-1), "greedy": greedy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cg2-quant"))
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    model_dir = train_model(args.work, args.steps, args.dim)
    rows = held_out(args.work, args.rows, 128)
    res = {q: evaluate(model_dir, q, rows, args.prompt_len, args.new_tokens) for q in ("none", "int8", "int4")}
    base = res["none"]
    table = {}
    print(f"tiny CodeGen2 (4 layers x {args.dim}, {args.steps} steps), {len(rows)} held-out rows of 128 tokens; "
          f"greedy: {args.new_tokens} tokens after {args.prompt_len}")
    print(f"{'':6}{'val loss':>10}{'d loss':>9}{'top-1 = bf16':>14}{'greedy prefix = bf16':>22}{'identical':>11}")
    for q, r in res.items():
        prefix = []
        for a, b in zip(r["greedy"], base["greedy"]):
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            prefix.append(same / len(a))
        row = {"loss": r["loss"], "d_loss": r["loss"] - base["loss"],
               "top1_agree": float((r["top1"] == base["top1"]).float().mean()),
               "greedy_prefix_agree": sum(prefix) / len(prefix),
               "greedy_identical": sum(p == 1.0 for p in prefix) / len(prefix)}
        table[q] = row
        print(f"{q:6}{row['loss']:10.4f}{row['d_loss']:+9.4f}{row['top1_agree']:14.3f}"
              f"{row['greedy_prefix_agree']:22.3f}{row['greedy_identical']:11.3f}")
    print(json.dumps({"bench": "quant_greedy", "dim": args.dim, "steps": args.steps, "results": table}))


if __name__ == "__main__":
    main()
