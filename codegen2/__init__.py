"""codegen2: fast, self-contained inference, serving, evaluation and training for CodeGen2 and CodeGen2.5.

The public names are imported on first use, so ``codegen2 --help`` starts without importing torch.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "SamplingParams": "codegen2.engine.sampling",
    "Engine": "codegen2.engine.engine",
    "AsyncEngine": "codegen2.engine.async_engine",
    "RequestOutput": "codegen2.engine.engine",
    "CompletionOutput": "codegen2.engine.engine",
    "InvalidRequest": "codegen2.engine.errors",
    "SpeculativeConfig": "codegen2.engine.speculative",
    "prepare_for_inference": "codegen2.kernels",
    "Infill": "codegen2.infill",
    "infill_prompt": "codegen2.infill",
    "extract_middles": "codegen2.infill",
    "CheckpointError": "codegen2.models.checkpoint",
    "load_model": "codegen2.models.checkpoint",
    "save_model": "codegen2.models.checkpoint",
    "Tokenizer": "codegen2.tokenizer",
    "load_tokenizer": "codegen2.tokenizer",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'codegen2' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
