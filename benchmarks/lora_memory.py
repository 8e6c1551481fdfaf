"""Peak memory of one LoRA training step at a real model's shape, on CPU, against a full fine-tune's estimate.

    python benchmarks/lora_memory.py                          # CodeGen2.5-7B shape, bf16 base, 64 tokens, rank 16
    python benchmarks/lora_memory.py --quant int8             # the frozen base as weight-only int8
    python benchmarks/lora_memory.py --layers 2 --seq-len 16  # a quick look (2 of the 32 blocks)

The model is built on the meta device, materialised in bf16 and filled with random weights (no checkpoint is
read: the weights' values do not change the memory), then set up exactly as ``codegen2 train`` sets up a LoRA
run (train/lora.py ``prepare_lora``: base frozen in bf16, or int8; fp32 adapters on every block linear) with the
Trainer's AdamW. One step: forward and backward under CPU bf16 autocast on one row of --seq-len tokens (the
chunked output-layer loss), gradient clipping, the optimizer step. Measured: resident memory after set-up, and
the peak during the step (Linux VmHWM, reset after set-up through /proc/self/clear_refs). The full fine-tune
figure is an estimate, not a measurement: parameters x 16 bytes (fp32 weights, gradients and AdamW's two
moments), activations not counted. Run it alone: it needs ~15 GB free for the 7B shape. Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from codegen2.models import build, preset_config
from codegen2.train.lora import prepare_lora

GiB = 2**30


def rss(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="codegen25-7b-mono")
    p.add_argument("--layers", type=int, help="build only this many blocks (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--quant", default="none", choices=["none", "int8"])
    args = p.parse_args()

    cfg = preset_config(args.preset, **({"n_layers": args.layers} if args.layers else {}))
    with torch.device("meta"):
        model = build(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    tick = time.perf_counter()
    with torch.no_grad():
        for name, t in model.named_parameters():  # random bf16 weights; norms at 1
            t.fill_(1.0) if t.ndim == 1 else t.normal_(0.0, 0.02)
    model.reset_rotary()
    n_params = sum(t.numel() for t in model.parameters())
    torch.manual_seed(0)
    model = prepare_lora(model, args.rank, args.alpha, None, args.quant, torch.bfloat16).train()
    trained = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    setup_s = time.perf_counter() - tick
    after_setup = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the step's peak, not the set-up's
        f.write("5")

    rows = torch.randint(0, 50000, (1, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    tick = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(rows[:, :-1], targets=rows[:, 1:])  # summed over the targets
    (loss / args.seq_len).backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - tick
    peak = rss("VmHWM")

    n_trained = sum(t.numel() for t in trained)
    result = {
        "shape": args.preset, "n_layers": cfg.n_layers, "parameters": n_params, "quant": args.quant,
        "rank": args.rank, "trained_parameters": n_trained, "seq_len": args.seq_len,
        "rss_after_setup_gib": round(after_setup / GiB, 2), "peak_rss_step_gib": round(peak / GiB, 2),
        "full_finetune_estimate_gib": round(16 * n_params / GiB, 1),
        "loss": round(loss.item() / args.seq_len, 4), "setup_s": round(setup_s, 1), "step_s": round(step_s, 1),
    }
    assert math.isfinite(result["loss"])
    base = "int8" if args.quant == "int8" else "bf16"
    print(f"{args.preset} shape ({cfg.n_layers} blocks, {n_params / 1e9:.2f}B parameters), LoRA rank {args.rank} on "
          f"every block linear ({n_trained / 1e6:.1f}M trained), base {base}, "
          f"1 x {args.seq_len} tokens, CPU bf16 autocast:\n"
          f"  resident after set-up {after_setup / GiB:.2f} GiB, peak during the step {peak / GiB:.2f} GiB "
          f"(step {step_s:.0f} s)\n"
          f"  full fine-tune, estimated: {n_params / 1e9:.2f}B x 16 bytes (fp32 weights, grads, 2 AdamW moments) "
          f"= {16 * n_params / GiB:.0f} GiB before activations")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
