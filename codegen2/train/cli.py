"""``codegen2 train`` and ``codegen2 data``: the training commands' arguments.

    codegen2 data build --source ~/src --source .venv/lib/python3.11/site-packages --out corpus/
    codegen2 data build --source ~/my-repo --source-license ~/my-repo=LicenseRef-Proprietary --out corpus/
    codegen2 data info corpus/
    codegen2 train --config run.toml optim.lr=1e-3 run.out_dir=runs/x        # one process
    torchrun --nproc-per-node 8 -m codegen2.train --config run.toml          # FSDP2 over 8 GPUs (or CPUs)

What this is not: the work itself (data.py builds corpora, loop.py trains, config.py reads run configs).
"""

from __future__ import annotations

import argparse

from codegen2.train.licenses import DEFAULT_LICENSES


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or YAML file with sections model, lora, data, objective, optim, run")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=1e-3 run.out_dir=x")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``data`` verbs."""
    from codegen2.train.data import LANGUAGES

    p = sub.add_parser("train", help="train or fine-tune with causal LM + span corruption",
                       description="Train or fine-tune a CodeGen2-family model; rerun to resume.")
    _train_arguments(p)
    p = sub.add_parser("data", help="build and inspect training corpora", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="data_command", required=True)
    b = verbs.add_parser("build", help="source trees -> filtered, deduplicated token shards")
    b.add_argument("--source", action="append", required=True, metavar="DIR", help="source tree (repeatable)")
    b.add_argument("--source-license", action="append", default=[], metavar="DIR=SPDX",
                   help="declare the license of a --source directory (repeatable); its files are used under it "
                        "unless a nearer LICENSE file, SPDX header or package metadata says otherwise")
    b.add_argument("--out", required=True, metavar="DIR", help="output directory")
    b.add_argument("--language", action="append", choices=list(LANGUAGES), help="repeatable (default python)")
    b.add_argument("--licenses", default=",".join(DEFAULT_LICENSES), help="allowed licenses, comma-separated "
                   "SPDX ids (default %(default)s)")
    b.add_argument("--max-bytes", type=int, default=1_000_000, help="larger files are dropped (default 1000000)")
    b.add_argument("--near-dup-threshold", type=float, default=0.85, help="MinHash Jaccard (default 0.85)")
    b.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in val (default 0.01)")
    b.add_argument("--workers", type=int, help="tokenizer processes (default: CPU count)")
    b.add_argument("--tokenizer", default="codegen2", choices=["codegen2", "codegen25"])
    i = verbs.add_parser("info", help="print a built corpus's summary")
    i.add_argument("dir")


def run(args: argparse.Namespace) -> None:
    """Run a parsed ``train`` or ``data`` command; bad input exits with one line."""
    try:
        if args.command == "train":
            from codegen2.train.config import load_config
            from codegen2.train.loop import train

            train(load_config(args.config, args.overrides))
            return
        from codegen2.train.corpus import read_manifest, summary
        from codegen2.train.data import build_corpus

        if args.data_command == "build":
            declared = {}
            for item in args.source_license:
                directory, eq, lic = item.rpartition("=")
                if not eq or not directory or not lic.strip():
                    raise ValueError(f"--source-license {item!r} is not of the form DIR=SPDX (e.g. src=MIT)")
                declared[directory] = lic
            manifest = build_corpus(args.source, args.out, languages=args.language or ("python",),
                                    declared_licenses=declared,
                                    licenses=[x.strip() for x in args.licenses.split(",") if x.strip()],
                                    max_bytes=args.max_bytes, near_dup_threshold=args.near_dup_threshold,
                                    val_fraction=args.val_fraction, workers=args.workers,
                                    tokenizer_kind=args.tokenizer)
            print(f"wrote {args.out}")
        else:
            manifest = read_manifest(args.dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(summary(manifest))


def main(argv: list[str] | None = None) -> None:
    """``python -m codegen2.train`` / ``torchrun ... -m codegen2.train``: the same as ``codegen2 train``."""
    p = argparse.ArgumentParser(prog="codegen2.train")
    _train_arguments(p)
    args = p.parse_args(argv)
    args.command = "train"
    run(args)
