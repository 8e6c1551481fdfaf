"""Attention of an inference pass (its mask given) over the keys it may see, one module per family's numerics.

Both modules take the same arguments: q (B, H, T, D); k, v (B, G, S, D) with G K/V heads, query head h reading
K/V head h // (H / G) (grouped-query attention; G = H otherwise); allowed (B, 1, T, S) bool, which keys each
query sees. They return (B, H, T, D) in v's dtype. They are modules so that what runs them can be swapped from
outside the model: ``codegen2.kernels.prepare_for_inference`` wraps them in native kernels for passes with few
queries (decode), and leaves everything else (prompts, training, other devices) to the code here. What the
kernels use of them is the contract of ``codegen2.kernels.attention``: ``score_scaling`` (how the family scales
q . k: multiplied or divided, by what); the rest of the numerics is common to both families and written once
here (masked_softmax, the probabilities rounded to v's dtype) and once in the kernel.

The training path (no mask: plain causal attention over the call's tokens) stays in each model, on SDPA's fused
causal kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """fp32 scores (B, G, rep * T, S), the rows of K/V head g's query heads one after another, and allowed
    (B, 1, T, S) -> fp32 probabilities of the same shape. Keys not allowed get the fp32 minimum (finite, so a
    padding query that sees nothing gets a uniform row instead of NaN; its output is never used)."""
    B, G, Q, S = scores.shape
    T = allowed.shape[2]
    s = scores.view(B, G, Q // T, T, S).masked_fill(~allowed[:, :, None], torch.finfo(torch.float32).min)
    return torch.softmax(s, dim=-1).view(B, G, Q, S)


def grouped(q: torch.Tensor, G: int) -> torch.Tensor:
    """q (B, H, T, D) -> (B, G, H / G * T, D): the query heads of each K/V head as one block of rows."""
    B, H, T, D = q.shape
    return q.reshape(B, G, H // G * T, D)


class _MaskedAttention(nn.Module):
    def score_scaling(self) -> tuple[float, bool]:
        """(c, divide): the family's scores are fp32 q . k divided by c if divide, else multiplied by c."""
        raise NotImplementedError

    def scale_scores(self, scores: torch.Tensor) -> torch.Tensor:
        c, divide = self.score_scaling()
        return scores / c if divide else scores * c


class Fp32Attention(_MaskedAttention):
    """CodeGen2's reference numerics (Salesforce's ``_attn``): q . k in fp32 divided by ``divisor``
    (sqrt(head_dim); divided, not multiplied, as the reference does), masked with the fp32 minimum, fp32
    softmax, the probabilities rounded to v's dtype, their product with v in fp32, rounded once to v's dtype."""

    def __init__(self, divisor: float) -> None:
        super().__init__()
        self.divisor = divisor

    def score_scaling(self) -> tuple[float, bool]:
        return self.divisor, True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        scores = self.scale_scores(torch.matmul(grouped(q.float(), k.shape[1]), k.float().transpose(-1, -2)))
        probs = masked_softmax(scores, allowed).to(v.dtype)
        # The product runs in fp32 and is rounded once, which is what a half-precision matmul computes too, but
        # torch's CPU bf16 batched matmul is a slow element-by-element loop.
        return torch.matmul(probs.float(), v.float()).to(v.dtype).view(B, H, T, D)


class SdpaAttention(_MaskedAttention):
    """The LLaMA family's numerics (Hugging Face's Llama with SDPA): torch's scaled_dot_product_attention in the
    activations' dtype, scores multiplied by ``scale`` (1 / sqrt(head_dim)), an additive mask with the dtype's
    finite minimum."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def score_scaling(self) -> tuple[float, bool]:
        return self.scale, False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        H, G = q.shape[1], k.shape[1]
        if G != H:  # grouped-query attention: kv head j serves query heads j*rep .. (j+1)*rep - 1
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        mask.masked_fill_(~allowed, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).to(v.dtype)

