"""Inference kernels, applied to a loaded model from outside it: the one place that decides a model's weight
format and which of its layers run on native kernels.

    model = load_model(path, dtype="bf16")
    prepare_for_inference(model, quant="int8")      # or quant=None: weights as loaded

    # or quantized while loading, one block at a time (peak memory: the quantized model plus one bf16 block)
    model = prepare_for_inference(load_model(path, dtype="bf16", on_block=quantizer("int4")), "int4")

``quant`` is the weight format, the one name for this choice in the Python API, the CLI (``--quant``) and the
server: ``None`` (or ``"none"``) keeps the weights as loaded, ``"int8"`` / ``"int4"`` quantize them to weight-only
int8 (per row) or int4 (per group of 32 columns; see linear.py).
With weights as loaded, a bf16 model on a CPU whose native kernels build gets them (same math, faster); anything
else stays plain PyTorch. Where the kernels build, attention passes of a few queries per head over a bf16 cache
(decode) take them too, whatever the weight format (attention.py), and so do the LLaMA family's RMSNorm and
rotary embedding in bf16 (pointwise.py). Native layers that read one input (LLaMA's q/k/v and gate/up, CodeGen2's
qkv with fc_in) then run as one product each, with the same numbers (linear.py: fuse_shared_input_linears). ``CODEGEN2_KERNELS=torch`` turns the native
kernels off; ``CODEGEN2_KERNEL_LEVEL`` forces a lower CPU level than the one detected (native.py).

The model files never import this package; ``Engine`` never changes the model it is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from codegen2.kernels.attention import NativeAttention, swap_attention
from codegen2.kernels.linear import (
    DecodeLinear,
    ProductSlice,
    fuse_shared_input_linears,
    quantize_int4,
    quantize_int8,
    swap_linears,
)
from codegen2.kernels.native import (
    ENV_VAR,
    LEVEL_VAR,
    LEVELS,
    kernel_level,
    kernels_available,
    ops,
    pack_int4,
    pack_int8,
    supported_levels,
    unpack_int4,
    unpack_int8,
)
from codegen2.kernels.pointwise import NativeRMSNorm, NativeRotary, swap_pointwise

QUANTS = ("none", "int8", "int4")


def _check(quant: str | None) -> str:
    quant = quant or "none"
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    return quant


def quantizer(quant: str | None) -> Callable[[nn.Module], nn.Module] | None:
    """What load_model's ``on_block`` takes to quantize each block as it is read (None: nothing to do while
    loading). Finish with prepare_for_inference(model, quant), which does the layers outside the blocks."""
    quant = _check(quant)
    return None if quant == "none" else functools.partial(swap_linears, mode=quant)


def prepare_for_inference(model: nn.Module, quant: str | None = None, fuse: bool = True) -> nn.Module:
    """Apply the weight format ``quant`` (None / "none", "int8" or "int4") and the native kernels to ``model`` in
    place; return it. A model already prepared is refused, so weights are never quantized twice; blocks already
    quantized to ``quant`` while loading (``quantizer``) are kept. ``fuse``: native layers that take one input
    become one product (fuse_shared_input_linears: same numbers, fewer calls; off only to measure it)."""
    quant = _check(quant)
    if getattr(model, "_prepared_for_inference", False):
        raise ValueError("this model was already prepared for inference")
    done = {m.mode for m in model.modules() if isinstance(m, DecodeLinear)}
    if done - {quant}:
        raise ValueError(f"this model's layers are already {', '.join(sorted(done))}, not {quant}")
    model._prepared_for_inference = True
    weight = model.tok_embeddings.weight
    if weight.device.type == "cpu" and kernels_available():
        # Decode-sized attention passes over a bf16 cache, and the LLaMA family's RMSNorm and rotary in bf16; the
        # rest stays on the model's own modules.
        swap_attention(model, ops(kernel_level()))
        swap_pointwise(model, ops(kernel_level()))
    if quant in ("int8", "int4"):
        swap_linears(model, quant)
    elif weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and kernels_available():
        swap_linears(model, "bf16")
    if fuse:
        fuse_shared_input_linears(model)  # only native layers; after any adapter (it keeps a wrapped group)
    return model


__all__ = [
    "ENV_VAR",
    "LEVELS",
    "LEVEL_VAR",
    "QUANTS",
    "DecodeLinear",
    "NativeAttention",
    "NativeRMSNorm",
    "NativeRotary",
    "ProductSlice",
    "fuse_shared_input_linears",
    "kernel_level",
    "kernels_available",
    "pack_int4",
    "pack_int8",
    "prepare_for_inference",
    "quantizer",
    "quantize_int4",
    "quantize_int8",
    "supported_levels",
    "swap_linears",
    "unpack_int4",
    "unpack_int8",
]
