"""Training and fine-tuning CodeGen2-family models with the CodeGen2 objective.

    data.py         ``codegen2 data build``: source trees -> license-filtered, deduplicated token shards
    licenses.py     license names, texts and SPDX expressions -> allowed or not
    objective.py    causal LM mixed with file-level span corruption, packed into context-length rows
    config.py       the run config (TOML or YAML, typed command-line overrides)
    loop.py         ``codegen2 train``: optimizer, schedule, evaluation, checkpoints, exact resume, export
    parallelize.py  activation checkpointing, torch.compile and FSDP2, applied from outside the model

Only the command line imports this package; it depends on ``models``, ``tokenizer`` and ``infill``.
"""
