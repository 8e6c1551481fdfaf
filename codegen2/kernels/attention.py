"""Attention for decode-sized passes on native kernels, wrapped around a model's own attention module.

A decode step has one query per head per sequence (speculative verify a few); reading the bf16 KV cache is then
the whole cost of attention, and torch's CPU SDPA is far from it with one query. Measured on Zen 4, 2 threads,
16 heads of 128, ms per layer, these kernels / the model's own module (LLaMA: SDPA; CodeGen2: fp32 matmuls):
1,024 keys, 1 query 0.59 / 2.53 (SDPA), 0.61 / 1.16 (fp32); 256 keys 0.21 / 0.64, 0.25 / 0.39. At 2-4 queries
per head they are about even with SDPA (1,024 keys, 4 queries: 1.08 / 1.15) and still ahead of the fp32 path
(1.21 / 1.66); from 6 SDPA is faster (1.61 / 1.32). So passes of more than ``MAX_QUERIES`` queries per head
(prompts, and verify passes of more than 3 drafts) keep the model's own module. The kernels
(csrc/decode_attention.cpp) compute q . k and p . v in fp32 straight from the cache; the scaling, the masked
softmax and the rounding of the probabilities to bf16 are the reference's own, in torch (models/attention.py).
For CodeGen2 that is the reference's math in another summation order; for the LLaMA family it is fp32 where SDPA
works in bf16 (closer to the exact value).
"""

from __future__ import annotations

import torch
from torch import nn

MAX_QUERIES = 4  # queries per head (tokens per sequence) up to which a pass takes the kernels; measured above


class NativeAttention(nn.Module):
    """Stands in for a model's attention module; same arguments and result. What it needs of that module (the
    contract with codegen2.models.attention): forward(q, k, v, allowed) -> (B, H, T, D) in v's dtype, with q
    (B, H, T, D), k and v (B, G, S, D), query head h reading K/V head h // (H / G), allowed (B, 1, T, S) bool;
    scale_scores(fp32 q . k) -> the family's scaled scores; probabilities(scaled scores (B, G, H / G * T, S),
    allowed) -> fp32 probabilities (the masked softmax)."""

    def __init__(self, reference: nn.Module, ops) -> None:
        super().__init__()
        self.reference = reference
        self._ops = ops  # torch.ops.codegen2_kernels_<level>

    def uses_kernels(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether a pass with these tensors takes the kernels (else the reference module)."""
        return (q.shape[2] <= MAX_QUERIES and k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"
                and k.device.type == "cpu" and k.stride(-1) == 1 and v.stride(-1) == 1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernels(q, k, v):
            return self.reference(q, k, v, allowed)
        B, H, T, D = q.shape
        G = k.shape[1]
        qg = q.float().reshape(B, G, H // G * T, D).contiguous()  # the query heads of each K/V head as rows
        scores = self.reference.scale_scores(self._ops.attn_scores(qg, k, 1.0))  # (B, G, rep * T, S) fp32
        # Rounded to bf16 as the reference rounds them to v's dtype; held in fp32 for the kernel.
        probs = self.reference.probabilities(scores, allowed).to(torch.bfloat16).float()
        return self._ops.attn_mix(probs, v).to(v.dtype).view(B, H, T, D)  # fp32 sums, rounded once


def swap_attention(model: nn.Module, ops) -> nn.Module:
    """Wrap every attention module of ``model`` that offers the contract above (scale_scores and probabilities)
    in NativeAttention, in place; return the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, NativeAttention) and all(
                    callable(getattr(child, f, None)) for f in ("scale_scores", "probabilities")):
                setattr(parent, name, NativeAttention(child, ops))
    return model
