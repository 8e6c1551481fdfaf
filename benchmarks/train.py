"""Training speed: codegen2's Trainer against transformers' CodeGenForCausalLM in a plain PyTorch loop.

    python benchmarks/train.py                                    # 4 x 512 custom shape, CPU, a few minutes
    python benchmarks/train.py --preset codegen2-1B --layers 2    # the 1B's width, 2 of its 16 layers
    python benchmarks/train.py --device cuda --preset codegen2-1B --seq-len 2048 --batch-size 16 \\
        --micro-batch-size 4                                      # on a GPU: also MFU

Both sides train the same config on the same rows (a RowStream with the same seed over a small corpus built from
the Python standard library, PSF-licensed, in --work) from the same initial weights (ours, copied into
transformers' layout by ``convert.to_hf_state_dict``), with the same AdamW hyperparameters, loss normalisation,
micro-batching, gradient clipping and dtype (fp32 on CPU, bf16 autocast on GPU). Each side runs in its own
process, so peak memory is its own. Measured, after --warmup steps: training tokens/s (target tokens, as
``codegen2 train`` logs them; fetching and packing rows is inside the timed step on both sides), seconds per
step, peak RSS (and peak CUDA memory), and on CUDA the MFU with the loop's FLOP count. The first step's losses
must agree (same weights, same rows, no update yet): that shows the comparison is like for like.
Prints one table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from codegen2.models.codegen2 import PRESETS

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo"}


def peak_rss() -> int:
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))


def build_stdlib_corpus(work: Path, n_files: int) -> Path:
    """The first n_files .py files of the stdlib (sorted walk, tests skipped) plus its LICENSE.txt -> a corpus."""
    from codegen2.train.data import build_corpus

    out = work / "corpus"
    if (out / "manifest.json").is_file():
        return out
    stdlib, src = Path(sysconfig.get_paths()["stdlib"]), work / "src"
    files = []
    for d, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        files += [Path(d, n) for n in sorted(names) if n.endswith(".py")]
    shutil.rmtree(src, ignore_errors=True)
    for f in files[:n_files]:
        (src / f.relative_to(stdlib)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, src / f.relative_to(stdlib))
    shutil.copyfile(stdlib / "LICENSE.txt", src / "LICENSE.txt")  # PSF: the license filter keeps the files
    t = time.perf_counter()
    build_corpus([src], out, workers=1, progress=False, val_fraction=0.05)
    print(f"built {out} from {min(n_files, len(files))} stdlib files in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def train_config(args: argparse.Namespace, corpus: Path, device: str):
    from codegen2.train.config import load_config

    if args.preset:
        model = [f"model.preset={args.preset}"] + ([f"model.shape.n_layers={args.layers}"] if args.layers else [])
    else:
        shape = {"n_layers": args.layers or 4, "dim": 512, "n_heads": 8, "rotary_dim": 32}
        model = [f"model.shape.{k}={v}" for k, v in shape.items()]
    return load_config(None, model + [
        f"data.corpus={corpus}", f"data.seq_len={args.seq_len}",
        f"optim.batch_size={args.batch_size}", f"optim.micro_batch_size={args.micro_batch_size}",
        f"optim.max_steps={args.warmup + args.steps}", f"run.device={device}",
        f"run.out_dir={args.work / 'run'}", "run.eval_every=0", "run.checkpoint_every=1000000",
        f"run.compile={str(args.compile).lower()}",
        f"run.activation_checkpointing={str(args.activation_checkpointing).lower()}"])


def timed(step, device: torch.device, warmup: int, steps: int) -> dict:
    """Run warmup + steps calls of ``step() -> (loss, target tokens)``; time the last ``steps`` of them."""
    losses, tokens, times = [], 0, []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss, n = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        losses.append(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            tokens += n
    out = {"tokens_per_s": tokens / sum(times), "step_s": sum(times) / steps, "step_times": times,
           "losses": losses, "peak_rss": peak_rss()}
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    return out


def run_ours(args: argparse.Namespace, corpus: Path, device: str) -> dict:
    from codegen2.train.loop import Trainer

    t = Trainer(train_config(args, corpus, device))
    cfg = t.model_config
    # The loop's count: 6 flops per non-embedding parameter and token, plus attention's scores and mixing.
    flops = 6 * t.n_matmul + 12 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * args.seq_len

    def step():
        r = t.train_step()
        return r["loss"], r["tokens"]

    return {**timed(step, t.device, args.warmup, args.steps), "flops_per_token": flops, "n_params": t.n_params,
            "shape": f"{cfg.n_layers} x {cfg.dim}, {cfg.n_heads} heads", "dtype": t.dtype,
            "device": torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else "cpu"}


def run_reference(args: argparse.Namespace, corpus: Path, device: str) -> dict:
    from transformers import CodeGenConfig, CodeGenForCausalLM

    from codegen2.models.convert import IGNORED, config_to_hf, to_hf_state_dict
    from codegen2.tokenizer import load_tokenizer
    from codegen2.train.corpus import TokenCorpus
    from codegen2.train.loop import build_model, lr_at
    from codegen2.train.objective import RowStream

    cfg = train_config(args, corpus, device)
    dev, o = torch.device(device), cfg.optim
    # Our initial weights, rebuilt as Trainer builds them (same seed, same function; the first-step loss check
    # proves they are the same), in transformers' layout.
    torch.manual_seed(cfg.run.seed)
    ours, _ = build_model(cfg.model)
    hf = CodeGenForCausalLM(CodeGenConfig(**config_to_hf(ours.config), use_cache=False))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), ours.config), strict=False)
    assert not unexpected and all(IGNORED.match(k) or k.endswith("embed_positions") for k in missing), missing
    del ours
    hf = hf.to(dev).train()
    if args.activation_checkpointing:
        if hasattr(hf, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            hf.activation_checkpointing_enable({"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for block in hf.transformer.h:
            block.compile()
    # The Trainer's rule in Hugging Face names: weight decay on matrices except the embedding.
    decay = {n for n, p in hf.named_parameters() if p.ndim >= 2 and "wte" not in n}
    params = list(hf.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in params if n in decay], "weight_decay": o.weight_decay},
                             {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), fused=dev.type == "cuda")
    stream = RowStream(TokenCorpus(corpus, "train"), load_tokenizer(None, kind="codegen2"), cfg.objective,
                       cfg.data.seq_len, cfg.run.seed)
    bf16 = dev.type == "cuda"
    step_no = 0

    def step():
        nonlocal step_no
        rows, valid = stream.next_rows(o.batch_size)  # (B, T + 1) each, the rows the Trainer sees
        total = int(valid[:, 1:].sum())
        for group in opt.param_groups:
            group["lr"] = lr_at(step_no, o)
        loss_sum = torch.zeros((), device=dev)
        for s in range(0, o.batch_size, o.micro_batch_size):
            x, ok = rows[s:s + o.micro_batch_size].to(dev), valid[s:s + o.micro_batch_size, 1:].to(dev)
            labels = x[:, 1:].masked_fill(~ok, -100)  # padding is never a target
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits = hf(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            (loss / total).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_no += 1
        return float(loss_sum) / total, total

    return timed(step, dev, args.warmup, args.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one's loss is compared)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="rows per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=2, help="rows per forward pass")
    ap.add_argument("--preset", choices=list(PRESETS), help="an official CodeGen2 shape (default: 4 x 512, 8 heads)")
    ap.add_argument("--layers", type=int, help="override the number of layers (to shrink a preset for CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block, on both sides")
    ap.add_argument("--activation-checkpointing", action="store_true", help="on both sides")
    ap.add_argument("--peak-tflops", type=float, help="for MFU (default: 989, bf16 dense, on H100/H200)")
    ap.add_argument("--files", type=int, default=300, help="stdlib files in the corpus")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/train"),
                    help="where the corpus is built (reused if there; delete it after changing --files)")
    ap.add_argument("--_child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    corpus = args.work / "corpus"
    if args._child:
        result = (run_ours if args._child == "ours" else run_reference)(args, corpus, device)
        print(json.dumps(result))
        return

    build_stdlib_corpus(args.work, args.files)
    results = {}
    for side in ("ours", "reference"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--_child", side], stdout=subprocess.PIPE,
                             text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"the {side} side failed (exit {out.returncode}); its error is above")
        results["codegen2" if side == "ours" else "transformers"] = json.loads(out.stdout.strip().splitlines()[-1])

    us, ref = results["codegen2"], results["transformers"]
    where = us["device"]
    peak = args.peak_tflops or (989.0 if any(g in where for g in ("H100", "H200")) else None)
    print(f"\n{args.preset or 'custom'} ({us['shape']}): {us['n_params'] / 1e6:.1f}M parameters, {us['dtype']} on "
          f"{where} ({torch.get_num_threads()} threads), {args.batch_size} x {args.seq_len} tokens per step in "
          f"micro-batches of {args.micro_batch_size}, {args.steps} timed steps after {args.warmup}")
    print(f"{'':14}{'tokens/s':>10}{'x ref':>7}{'s/step':>9}{'MFU':>7}{'peak RSS GiB':>14}{'peak CUDA GiB':>15}"
          f"{'first loss':>12}{'last loss':>11}")
    for name, r in results.items():
        if peak:
            r["mfu"] = r["tokens_per_s"] * us["flops_per_token"] / (peak * 1e12)
        mfu = f"{100 * r['mfu']:6.1f}%" if peak else f"{'-':>7}"
        cuda = f"{r['peak_cuda'] / 2**30:15.2f}" if "peak_cuda" in r else f"{'-':>15}"
        print(f"{name:14}{r['tokens_per_s']:10.0f}{r['tokens_per_s'] / ref['tokens_per_s']:7.2f}{r['step_s']:9.2f}"
              f"{mfu}{r['peak_rss'] / 2**30:14.2f}{cuda}{r['losses'][0]:12.5f}{r['losses'][-1]:11.5f}")
    diff = abs(us["losses"][0] - ref["losses"][0])
    tol = 1e-3 if us["dtype"] == "fp32" else 2e-2
    print(f"first-step loss: codegen2 {us['losses'][0]:.6f}, transformers {ref['losses'][0]:.6f}, |diff| {diff:.2e} "
          f"({'agree' if diff <= tol else 'DISAGREE'} within {tol:g})")
    print(json.dumps({"bench": "train", "preset": args.preset, "layers": args.layers, "device": where,
                      "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "micro_batch_size": args.micro_batch_size, "steps": args.steps, "warmup": args.warmup,
                      "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
                      "peak_tflops": peak, "ratio": us["tokens_per_s"] / ref["tokens_per_s"],
                      "first_loss_diff": diff, "losses_agree": diff <= tol, "results": results}))


if __name__ == "__main__":
    main()
