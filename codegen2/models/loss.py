"""Cross-entropy of the output layer, computed in row chunks without ever holding the (N, V) logits.

The training loss is the last thing a forward pass computes, so its gradients can be formed during the forward
pass itself, chunk by chunk (the approach of Liger-Kernel's fused linear cross-entropy, written here in plain
PyTorch). With V = 51,200 the full fp32 logits of one micro-batch are 200 KiB per token: 1.6 GB for 8 x 1024
tokens, written and read again by log-softmax and its backward. Chunks of a few dozen rows stay in cache, and
rows without a target (padding) never reach the output layer at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target value of positions that are not predicted (padding), as in F.cross_entropy


def _chunk_rows(h: torch.Tensor, vocab: int) -> int:
    # CPU: ~16 MB of fp32 logits per chunk (81 rows at V = 51,200; 32 to 128 rows measured alike on AVX2, all
    # ~1.4x faster than whole logits); GPU: large chunks keep the matmuls efficient, bounded at ~0.5 GB.
    return max(16, (2**24 if h.device.type == "cpu" else 2**29) // (4 * vocab))


def grad_input(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g (M, N) @ w (N, K) -> (M, K). In bf16 on CPU formed as (w^T g^T)^T: the same product, but torch's CPU
    bf16 ``g @ w`` is a slow fallback on CPUs without native bf16 (0.08 GMAC/s against 5.6 this way, AVX2 EPYC,
    81 x 51200 @ 51200 x 1024). Otherwise (fp32: as fast both ways) the plain product, so an fp32 run's numbers
    are those of ``g @ w``."""
    if g.dtype == torch.bfloat16 and g.device.type == "cpu":
        return torch.mm(w.t(), g.t().contiguous()).t()
    return g @ w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        # h (N, E), weight (V, E), bias (V,) or None, targets (N,) all valid -> summed loss, fp32 scalar.
        n, chunk = h.shape[0], _chunk_rows(h, weight.shape[0])
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        # A frozen output layer (LoRA) gets no gradient: for a 7B model that is 840 MB of fp32 not formed.
        _, want_w, want_b, _ = ctx.needs_input_grad
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if want_b else None
        for start in range(0, n, chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]  # (c, E), (c,)
            z = F.linear(hc, weight, bias).float()  # (c, V)
            picked = z.gather(1, tc[:, None])[:, 0]  # (c,) the targets' logits
            top = z.amax(dim=-1, keepdim=True)  # (c, 1)
            g = z.sub_(top).exp_()  # one exp pass, in place of the logits; logsumexp would take another
            total = g.sum(dim=-1, keepdim=True)  # (c, 1)
            loss += (top[:, 0] + total[:, 0].log() - picked).sum()
            g.div_(total)  # softmax
            g[torch.arange(len(tc), device=g.device), tc] -= 1  # d(loss)/d(logits) = softmax - one_hot
            grad_h[start:start + chunk] = grad_input(g.to(weight.dtype), weight).to(h.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc.float())  # (V, E) accumulated in fp32
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (grad_h * grad_out.to(grad_h.dtype), None if grad_w is None else (grad_w * grad_out).to(w_dtype),
                None if grad_b is None else (grad_b * grad_out).to(b_dtype), None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """sum over positions with targets != -100 of cross_entropy(h @ weight.T + bias, targets), in fp32.

    h (..., E) final hidden states, weight (V, E), bias (V,) or None, targets (...) token ids or -100.
    Equal to ``F.cross_entropy(F.linear(h, weight, bias).float().flatten(0, -2), targets.flatten(),
    ignore_index=-100, reduction="sum")`` in value and gradients, up to float rounding.
    """
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match hidden states {tuple(h.shape)}")
    keep = targets != IGNORE
    h, targets = h[keep], targets[keep]  # (N, E), (N,)
    if h.shape[0] == 0:
        return h.sum() * 0.0  # no targets: zero, still connected to the graph
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        chunk = _chunk_rows(h, weight.shape[0])
        return sum((F.cross_entropy(F.linear(h[s:s + chunk], weight, bias).float(), targets[s:s + chunk],
                                    reduction="sum") for s in range(0, h.shape[0], chunk)),
                   torch.zeros((), dtype=torch.float32, device=h.device))
    return _LinearCrossEntropy.apply(h, weight, bias, targets)
