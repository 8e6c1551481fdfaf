"""Training and fine-tuning CodeGen2-family models with the CodeGen2 objective.

    data.py         ``codegen2 data build``: source trees -> license-filtered, deduplicated token shards
    objective.py    causal LM mixed with file-level span corruption, packed into context-length rows
    loop.py         ``codegen2 train``: config, optimizer, schedule, evaluation, checkpoints, exact resume, export
    parallelize.py  activation checkpointing, torch.compile and FSDP2, applied from outside the model

Only the command line imports this package; it depends on ``models``, ``tokenizer`` and ``infill``.
"""
