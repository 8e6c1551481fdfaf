"""LoRA fine-tuning's training side: a frozen base model, stored as compactly as the run allows, under trainable
adapters (models/lora.py).

The base keeps no fp32 master copy and gets no gradients: in a bf16 run its weights are stored in bf16, in an
fp32 run in fp32, and with ``lora.quant = "int8"`` (QLoRA-style, with int8 where QLoRA has 4-bit NF4) the blocks'
linear layers are stored as weight-only int8 with one scale per output row, the scheme of kernels/linear.py.
``Int8Linear`` computes in plain PyTorch under autograd: the weight is dequantized a block of rows at a time, in
the forward pass and again in the backward pass for the input's gradient, so the adapters below it still learn.
(kernels/' ``DecodeLinear`` has no autograd and its native kernels are CPU-only; inference with an adapter uses
them, training does not.) Embeddings, norms and the output layer stay in the run's dtype.

What this is not: the adapters themselves or their files (models/lora.py), checkpoints (checkpoint.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codegen2.models.lora import TARGETS, add_lora

_BLOCK_BYTES = 16 << 20  # dequantized weight held at once by Int8Linear: 16 MiB of rows


class _Int8Matmul(torch.autograd.Function):
    """x (M, K) @ W^T -> (M, N) with W = q * scale[:, None]; the backward pass returns x's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # Under autocast, compute in its dtype (as F.linear would); autocast itself is off inside.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.save_for_backward(q, scale)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        x = x.to(dtype)
        return torch.cat([F.linear(x, w) for _, w in _blocks(q, scale, dtype)], dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scale = ctx.saved_tensors
        grad = grad.to(ctx.dtype)  # (M, N)
        dx = torch.zeros(grad.shape[0], q.shape[1], dtype=torch.float32, device=grad.device)  # (M, K)
        for rows, w in _blocks(q, scale, ctx.dtype):
            dx += (grad[:, rows] @ w).float()  # summed over row blocks in fp32
        return dx.to(ctx.x_dtype), None, None


def _blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """(row slice, dequantized rows (n, K) in dtype) over the weight, about _BLOCK_BYTES at a time."""
    step = max(1, _BLOCK_BYTES // (4 * q.shape[1]))
    for n0 in range(0, q.shape[0], step):
        rows = slice(n0, n0 + step)
        yield rows, (q[rows].float() * scale[rows, None]).to(dtype)


class Int8Linear(nn.Module):
    """A frozen linear layer as weight-only int8: weight (N, K) int8, scale (N,) fp32 (|W - q s| <= s / 2), bias
    as it was. Not saved in state dicts: a LoRA run's checkpoints hold the adapters, the base is re-read."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.float().abs().amax(dim=1) / 127.0  # (N,)
        q = torch.round(w.float() / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8Matmul.apply(x.reshape(-1, self.in_features), self.weight, self.scale)  # (M, N)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def prepare_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None, quant: str,
                 dtype: torch.dtype) -> nn.Module:
    """Freeze ``model`` in ``dtype``, quantize its blocks' linear layers with quant="int8", and add trainable
    fp32 adapters on ``targets``; in place."""
    if quant not in ("none", "int8"):
        raise ValueError(f"lora.quant must be none or int8, got {quant!r}")
    model.requires_grad_(False).to(dtype)
    if quant == "int8":
        linears = TARGETS[model.config.family]
        for block in model.layers:
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    if name in linears and isinstance(child, nn.Linear):
                        setattr(parent, name, Int8Linear(child))  # the bf16 / fp32 weight is freed here
    return add_lora(model, rank, alpha, targets)
