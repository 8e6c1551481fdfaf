"""Peak memory of loading a 7B-shape checkpoint: writes random bf16 weights of a real shape, then loads them
with codegen2 in a fresh process per weight format and reports peak RSS against the size of the weights.

    python benchmarks/load_memory.py --preset codegen25-7b-multi --dir /tmp/cg25-7b [--quant none,int8,int4]

int8 / int4 are quantized block by block while loading (codegen2.kernels.quantizer), as Engine.from_pretrained
does. Needs ~14 GB of disk for a 7B model (32 GB for codegen2-16B). Prints a line per format and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def write_random_checkpoint(preset: str, directory: Path, shard_bytes: int = 2 << 30) -> int:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from codegen2.models import build, preset_config
    from codegen2.models.convert import config_to_hf, name_map

    cfg = preset_config(preset)
    with torch.device("meta"):
        model = build(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # Meta tensors with the Hugging Face names let huggingface_hub plan the shards without allocating anything.
    meta = {hf: torch.empty(shapes[ours], dtype=torch.bfloat16, device="meta") for hf, ours in name_map(cfg).items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=shard_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(hf))
    g = torch.Generator().manual_seed(0)
    for filename, names in split.filename_to_tensors.items():
        shard = {n: (torch.randn(meta[n].shape, generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        print(f"wrote {filename}", flush=True)
    if split.is_sharded:
        index = {"metadata": {}, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(t.numel() * 2 for t in meta.values())


LOAD = """
import sys, time, torch
from codegen2.kernels import prepare_for_inference, quantizer
from codegen2.models.checkpoint import load_model

def hwm():  # peak RSS of this process (VmHWM starts afresh at exec, unlike getrusage's ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
t = time.perf_counter()
quant = sys.argv[2]
model = prepare_for_inference(load_model(sys.argv[1], dtype="bf16", on_block=quantizer(quant)), quant)
seconds = time.perf_counter() - t
after_load = hwm()
with torch.inference_mode():  # a forward pass touches every weight page
    logits = model(torch.tensor([[1, 2, 3]]))
assert torch.isfinite(logits).all()
print(base, after_load, hwm(), seconds)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="codegen25-7b-multi")
    ap.add_argument("--dir", type=Path, required=True, help="where the random checkpoint is (or will be) written")
    ap.add_argument("--quant", default="none", help="comma-separated weight formats: none, int8, int4")
    args = ap.parse_args()
    weights = None
    if not (args.dir / "config.json").exists():
        weights = write_random_checkpoint(args.preset, args.dir)
    weights = weights or sum(p.stat().st_size for p in args.dir.glob("*.safetensors"))
    gib = 1 << 30
    print(f"preset {args.preset}: weights {weights / gib:.2f} GiB bf16")
    results = {}
    for quant in args.quant.split(","):
        out = subprocess.run([sys.executable, "-c", LOAD, str(args.dir), quant], capture_output=True, text=True,
                             check=True)
        base, after_load, peak, seconds = out.stdout.split()
        base, after_load, peak, seconds = int(base), int(after_load), int(peak), float(seconds)
        print(f"{quant:5}: load {seconds:.1f} s, peak RSS {after_load / gib:.2f} GiB after loading, "
              f"{peak / gib:.2f} GiB after a forward pass (process before loading: {base / gib:.2f} GiB); "
              f"peak / bf16 weights = {peak / weights:.2f}", flush=True)
        results[quant] = {"peak_rss_after_load_bytes": after_load, "peak_rss_after_forward_bytes": peak,
                          "base_rss_bytes": base, "load_seconds": seconds,
                          "peak_over_weights": round(peak / weights, 3)}
    print(json.dumps({"bench": "load_memory", "preset": args.preset, "weights_bytes": weights, "results": results}))


if __name__ == "__main__":
    main()
