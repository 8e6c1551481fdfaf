"""Engine.from_pretrained's loading options as command-line flags, in one place for every verb that loads a model
(complete, infill: codegen2/__main__.py; serve: server/cli.py).

    add_load_args(parser)                                   # --dtype --device --mp-num --adapter --quant ...
    Engine.from_pretrained(args.model, **load_kwargs(args), max_batch=1)
"""

from __future__ import annotations

import argparse


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The flags of how a model is loaded: dtype, device, qkv layout, LoRA adapter, weight format, speculation."""
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="compute dtype (default bf16)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--mp-num", type=int, choices=[4, 8], help="override CodeGen2's detected qkv layout")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter for --model (peft's format, e.g. a "
                   "`codegen2 train` run's adapter/), applied without merging")
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                   help="weight format: none = as loaded in --dtype, int8 = weight-only int8 (about 2x faster "
                        "decode on CPU), int4 = weight-only int4 in groups of 32 (a quarter of bf16's memory)")
    p.add_argument("--speculative", metavar="ngram|draft:DIR",
                   help="speculative decoding: prompt lookup (ngram) or a smaller draft model with the same tokenizer")
    p.add_argument("--num-speculative-tokens", type=int, default=5, help="drafts per sequence and step (default 5)")


def load_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of Engine.from_pretrained that add_load_args's flags set."""
    return {"dtype": args.dtype, "device": args.device, "mp_num": args.mp_num, "adapter": args.adapter,
            "quant": args.quant, "speculative": args.speculative,
            "num_speculative_tokens": args.num_speculative_tokens}
