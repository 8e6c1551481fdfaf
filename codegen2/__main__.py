"""The ``codegen2`` command line: complete | infill | serve | eval | train | data | convert.

    codegen2 complete --model DIR_OR_HUB_ID "def fib(n):"
    codegen2 infill --model M --prefix "def f(x):\n    " --suffix "\n    return y\n"
    codegen2 infill --model M --file x.py --line 12        # the hole is at the start of line 12
    codegen2 convert SRC DST --dtype bf16
    codegen2 data build --source DIR --out corpus/    # license-filtered, deduplicated token shards
    codegen2 train --config run.toml optim.lr=1e-3    # see codegen2/train/cli.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codegen2.engine.options import add_load_args, load_kwargs


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"error: {path} is not UTF-8 text") from None


def split_at(text: str, line: int, column: int = 1) -> tuple[str, str]:
    """Split a file's text at a 1-based line and column: the hole goes right before that character."""
    lines = text.splitlines(keepends=True)
    if not 1 <= line <= len(lines) + 1:
        raise SystemExit(f"error: --line {line} is outside the file, which has {len(lines)} lines")
    current = lines[line - 1] if line <= len(lines) else ""
    width = len(current.rstrip("\r\n"))
    if not 1 <= column <= width + 1:
        raise SystemExit(f"error: --column {column} is outside line {line}, which has {width} characters")
    offset = sum(len(x) for x in lines[: line - 1]) + column - 1
    return text[:offset], text[offset:]


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or Hugging Face hub id (downloaded on first use)")
    add_load_args(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _run(args: argparse.Namespace, prompt_kind: str) -> None:
    from codegen2.engine.engine import Engine
    from codegen2.engine.sampling import SamplingParams
    from codegen2.infill import Infill

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop=args.stop)
    if prompt_kind == "complete":
        prompt = _read(args.file) if args.file else args.prompt
        if prompt is None:
            raise SystemExit("error: give a prompt, or --file PATH (- for stdin)")
    elif args.file:
        if args.prefix is not None or args.suffix is not None:
            raise SystemExit("error: use either --file/--line or --prefix/--suffix, not both")
        if args.line is None:
            raise SystemExit("error: --file needs --line (1-based) to place the hole")
        prompt = Infill(*split_at(_read(args.file), args.line, args.column))
    else:
        prompt = Infill(_read(args.prefix_file) if args.prefix_file else (args.prefix or ""),
                        _read(args.suffix_file) if args.suffix_file else (args.suffix or ""))
    engine = Engine.from_pretrained(args.model, **load_kwargs(args), max_batch=1)
    engine.add_request(prompt, params)
    n_tokens, reason = 0, None
    while engine.has_unfinished():
        for out in engine.step():
            for delta in out.outputs:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                n_tokens, reason = n_tokens + len(delta.token_ids), delta.finish_reason
    sys.stdout.write("\n")
    print(f"[{n_tokens} tokens, finish_reason={reason}]", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="codegen2", description="CodeGen2 / CodeGen2.5 code models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("complete", help="continue code left to right")
    _sampling_args(p)
    p.add_argument("prompt", nargs="?", help="the code to continue")
    p.add_argument("--file", help="read the prompt from this file (- for stdin)")

    p = sub.add_parser("infill", help="fill the middle between a prefix and a suffix")
    _sampling_args(p)
    p.add_argument("--prefix", help="text before the hole")
    p.add_argument("--suffix", help="text after the hole")
    p.add_argument("--prefix-file", help="read the prefix from a file (- for stdin)")
    p.add_argument("--suffix-file", help="read the suffix from a file (- for stdin)")
    p.add_argument("--file", help="a source file with the hole at --line/--column (- for stdin)")
    p.add_argument("--line", type=int, help="1-based line of the hole in --file")
    p.add_argument("--column", type=int, default=1, help="1-based column of the hole (default 1)")

    p = sub.add_parser("convert", help="convert a checkpoint to a Hugging Face safetensors directory")
    p.add_argument("src", help="model directory or hub id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: as stored)")
    p.add_argument("--mp-num", type=int, choices=[4, 8], help="override CodeGen2's detected qkv layout")

    from codegen2.eval import cli as eval_cli
    from codegen2.server import cli as serve_cli
    from codegen2.train import cli as train_cli

    serve_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    train_cli.add_parsers(sub)

    args = parser.parse_args(argv)
    from codegen2.models.checkpoint import CheckpointError

    try:
        if args.command == "serve":
            serve_cli.run(args)
        elif args.command == "eval":
            eval_cli.run(args)
        elif args.command in ("train", "data"):
            train_cli.run(args)
        elif args.command == "convert":
            from codegen2.models.checkpoint import load_model, resolve, save_model

            src = resolve(args.src)
            out = save_model(load_model(src, dtype=args.dtype, mp_num=args.mp_num), args.dst, tokenizer_dir=src)
            print(f"wrote {out}")
        else:
            _run(args, args.command)
    except (CheckpointError, ValueError) as e:  # bad input of any kind: one line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
