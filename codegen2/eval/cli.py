"""``codegen2 eval TASK``: generate with a model and score, or score samples made elsewhere (``--samples``).

    codegen2 eval humaneval --model Salesforce/codegen2-1B_P --n-samples 20 --temperature 0.2 --top-p 0.95
    codegen2 eval humaneval-infill-single-line --model DIR --out runs/single-line
    codegen2 eval mbpp --samples completions.jsonl --k 1,5  # JSON lines with task_id and completion, as given

Also runnable on its own: ``python -m codegen2.eval.cli TASK ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codegen2.eval import tasks


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="pass@k on HumanEval, HumanEval-Infill, MBPP or HumanEval+",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=tasks.TASKS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory or Hugging Face hub id")
    src.add_argument("--samples", help="score these completions (JSON lines: task_id, completion); no model")
    p.add_argument("--n-samples", type=int, default=20, help="samples per problem (default 20)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--workers", type=int, help="programs executed at once (default: CPU count)")
    p.add_argument("--postprocess", action="store_true", help="cut --samples completions as our generations are "
                   "cut (stop strings; single-line infill: first line) before scoring; default: score them as given")
    p.add_argument("--k", type=_ks, default=[1, 10, 100], help="pass@k for these k, e.g. 1,5,10,100 (default "
                   "1,10,100); a k is reported when every problem has at least k samples")
    p.add_argument("--timeout", type=float, help=f"seconds per program (default {tasks.TIMEOUT:g}); humaneval-plus "
                   "uses EvalPlus's per-input limits instead")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--data", help="data file, or a directory holding it (default: bundled copy, else download)")
    p.add_argument("--out", help="output directory (default eval-results/TASK); a re-run resumes it")


def run(args: argparse.Namespace) -> None:
    from codegen2.eval import run as ev
    from codegen2.eval.datasets import DatasetError, load

    try:
        if args.timeout is not None and (args.task == "humaneval-plus" or args.timeout <= 0):
            raise ValueError("--timeout must be positive, and humaneval-plus takes none (EvalPlus's per-input limits: "
                             "max(1 s, 4 x the reference solution's time))")
        if args.postprocess and not args.samples:
            raise ValueError("--postprocess applies to --samples; our own generations are always post-processed")
        problems = load(args.task, args.data)[: args.limit]
        out = Path(args.out or Path("eval-results") / args.task)
        if args.samples:
            path = Path(args.samples)
            ev.check_config(out, {"task": args.task, "samples": str(path.resolve()), "limit": args.limit,
                                  "samples_sha256": ev.file_sha256(path), "postprocess": args.postprocess})
            samples = ev.read_samples(args.task, path, problems, args.postprocess)
            settings = {"samples_file": str(path), "postprocess": args.postprocess}
        else:
            settings = {"model": args.model, "n_samples": args.n_samples, "temperature": args.temperature,
                        "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed, "dtype": args.dtype}
            ev.check_config(out, {"task": args.task, **settings})
            samples = ev.generate(args.task, problems, _engine(args), out, args.n_samples, args.max_tokens,
                                  args.temperature, args.top_p, args.seed)
        results, mode = ev.execute(args.task, problems, samples, out, args.workers, args.timeout)
        timeout = "EvalPlus per-input" if args.task == "humaneval-plus" else args.timeout or tasks.TIMEOUT
        summary = ev.summarize(args.task, problems, results, out, {**settings, "timeout": timeout, "sandbox": mode},
                               args.k)
    except (DatasetError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None
    print((out / "summary.md").read_text(), end="")
    print(json.dumps({k: v for k, v in summary.items() if "pass@" in k}), f"-> {out}")


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers")
    return sorted(set(ks))


def _engine(args: argparse.Namespace):
    import torch

    from codegen2.engine.engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Engine.from_pretrained(args.model, dtype=args.dtype, device=device, max_batch=args.max_batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="codegen2")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main(["eval", *__import__("sys").argv[1:]])
