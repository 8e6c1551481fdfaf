"""Attention for decode-sized passes on a native kernel, wrapped around a model's own attention module.

A decode step has one query per head per sequence (speculative verify a few); reading the bf16 KV cache is then
the whole cost of attention, and torch's CPU SDPA is far from it with one query. The kernel
(csrc/decode_attention.cpp, attn_decode) does scores, masked softmax and mix for each head in one pass over K
and V, with the numerics of models/attention.py. Measured on Zen 4, 2 threads, 16 heads of 128, us per layer,
the kernel / the model's own module (LLaMA: SDPA in bf16; CodeGen2: its fp32 matmuls), 1,024 keys: 1 query
231 / 2,156 (SDPA), 166 / 1,004 (fp32); 2 queries 377 / 814, 282 / 1,805; 4 queries 650 / 665, 618 / 1,584;
6 queries 863 / 891, 814 / 1,171; 8 queries 1,262 / 1,125, 1,487 / 1,791; 12 queries 2,499 / 1,467 (256 keys:
1 query 50 / 538, 63 / 272; 6 queries 231 / 222). So passes of more than ``MAX_QUERIES`` queries per head
(prompts, verify passes of more than 5 drafts) keep the model's own module. For CodeGen2 the kernel is the
reference's math in another summation order; for the LLaMA family it is fp32 where SDPA works in bf16 (closer
to the exact value).
"""

from __future__ import annotations

import torch
from torch import nn

MAX_QUERIES = 6  # queries per head (tokens per sequence) up to which a pass takes the kernel; measured above


class NativeAttention(nn.Module):
    """Stands in for a model's attention module; same arguments and result. What it needs of that module (the
    contract with codegen2.models.attention): forward(q, k, v, allowed) -> (B, H, T, D) in v's dtype, with q
    (B, H, T, D), k and v (B, G, S, D), query head h reading K/V head h // (H / G), allowed (B, 1, T, S) bool;
    score_scaling() -> (c, divide): scores are fp32 q . k divided by c if divide, else times c; then the masked
    softmax of models.attention.masked_softmax, the probabilities rounded to bf16 (v's dtype), their fp32 sum
    with v rounded once to bf16."""

    def __init__(self, reference: nn.Module, ops) -> None:
        super().__init__()
        self.reference = reference
        self._ops = ops  # torch.ops.codegen2_kernels_<level>

    def uses_kernels(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether a pass with these tensors takes the kernels (else the reference module)."""
        return (q.shape[2] <= MAX_QUERIES and q.dtype in (torch.float32, torch.bfloat16)
                and k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"
                and k.device.type == "cpu" and k.stride(-1) == 1 and v.stride(-1) == 1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernels(q, k, v):
            return self.reference(q, k, v, allowed)
        c, divide = self.reference.score_scaling()
        return self._ops.attn_decode(q, k, v, allowed, c, divide)  # (B, H, T, D) bf16


def swap_attention(model: nn.Module, ops) -> nn.Module:
    """Wrap every attention module of ``model`` that offers the contract above (score_scaling) in
    NativeAttention, in place; return the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, NativeAttention) and callable(getattr(child, "score_scaling", None)):
                setattr(parent, name, NativeAttention(child, ops))
    return model
