"""Training and fine-tuning CodeGen2-family models with the CodeGen2 objective.

    cli.py          ``codegen2 train`` and ``codegen2 data``: the commands' arguments
    data.py         building a corpus: source trees -> license-filtered, deduplicated token shards
    licenses.py     license names, texts and SPDX expressions -> allowed or not
    corpus.py       reading a built corpus: manifest and token ids
    objective.py    causal LM mixed with file-level span corruption, packed into context-length rows
    config.py       the run config (TOML or YAML, typed command-line overrides)
    loop.py         model, optimizer, schedule, the step and the run
    evaluate.py     validation loss and held-out infill exact match during the run
    checkpoint.py   atomic checkpoints, exact resume, Hugging Face export
    metrics.py      metrics.jsonl, MFU's peak rate, the loss plot
    parallelize.py  activation checkpointing, torch.compile and FSDP2, applied from outside the model

Only the command line imports this package; it depends on ``models``, ``tokenizer`` and ``infill``.
"""
