"""LoRA fine-tuning's training side: a frozen base model, stored as compactly as the run allows, under trainable
adapters (models/lora.py).

The base keeps no fp32 master copy and gets no gradients: in a bf16 run its weights are stored in bf16, in an
fp32 run in fp32, and with ``lora.quant = "int8"`` (QLoRA-style, with int8 where QLoRA has 4-bit NF4) the blocks'
linear layers are stored as weight-only int8 with one scale per output row, the scheme of kernels/linear.py.
Each block linear becomes a ``FrozenLinear``, whose backward pass forms only the input's gradient, for the
layers below, with ``models.loss.grad_input`` (torch's CPU bf16 ``g @ W`` is a slow fallback on CPUs without
native bf16: 0.06 GMAC/s against 3.4 that way, 16 x 11008 @ 11008 x 4096 on an AVX2 EPYC). An int8 weight is
dequantized a block of rows at a time, in plain PyTorch, in both passes. (kernels/' ``DecodeLinear`` has no
autograd and its native kernels are CPU-only; inference with an adapter uses them, training does not.)
Embeddings, norms and the output layer stay in the run's dtype.

What this is not: the adapters themselves or their files (models/lora.py), checkpoints (checkpoint.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codegen2.models.lora import TARGETS, add_lora
from codegen2.models.loss import grad_input

_BLOCK_BYTES = 16 << 20  # int8: the dequantized weight held at once, 16 MiB of fp32 rows


class _FrozenMatmul(torch.autograd.Function):
    """x (M, K) @ W^T -> (M, N) for a frozen W, float or int8 rows q with W = q * scale[:, None]; the backward
    pass returns x's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        # Under autocast, compute in its dtype (as F.linear would).
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.save_for_backward(w, scale)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        x = x.to(dtype)
        if scale is None:
            return F.linear(x, w.to(dtype))
        return torch.cat([F.linear(x, rows) for _, rows in _blocks(w, scale, dtype)], dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, scale = ctx.saved_tensors
        grad = grad.to(ctx.dtype)  # (M, N)
        if scale is None:
            return grad_input(grad, w.to(ctx.dtype)).to(ctx.x_dtype), None, None
        dx = torch.zeros(grad.shape[0], w.shape[1], dtype=torch.float32, device=grad.device)  # (M, K)
        for sl, rows in _blocks(w, scale, ctx.dtype):
            dx += grad_input(grad[:, sl], rows).float()  # summed over row blocks in fp32
        return dx.to(ctx.x_dtype), None, None


def _blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """(row slice, dequantized rows (n, K) in dtype) over an int8 weight, about _BLOCK_BYTES at a time."""
    step = max(1, _BLOCK_BYTES // (4 * q.shape[1]))
    for n0 in range(0, q.shape[0], step):
        sl = slice(n0, n0 + step)
        yield sl, (q[sl].float() * scale[sl, None]).to(dtype)


class FrozenLinear(nn.Module):
    """A frozen linear layer: weight (N, K) as it was (a parameter without gradient), or with quant="int8" an
    int8 buffer and scale (N,) fp32 (|W - q s| <= s / 2), not saved in state dicts (a LoRA run re-reads its
    base); bias as it was."""

    def __init__(self, linear: nn.Linear, quant: str = "none") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if quant == "int8":
            scale = w.float().abs().amax(dim=1) / 127.0  # (N,)
            q = torch.round(w.float() / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127)
            self.register_buffer("weight", q.to(torch.int8), persistent=False)
            self.register_buffer("scale", scale, persistent=False)
        else:
            self.weight = nn.Parameter(w, requires_grad=False)
            self.scale = None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"int8={self.scale is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenMatmul.apply(x.reshape(-1, self.in_features), self.weight, self.scale)  # (M, N)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def prepare_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None, quant: str,
                 dtype: torch.dtype) -> nn.Module:
    """Freeze ``model`` in ``dtype``, make its blocks' linear layers FrozenLinear (int8 with quant="int8"), and
    add trainable fp32 adapters on ``targets``; in place."""
    if quant not in ("none", "int8"):
        raise ValueError(f"lora.quant must be none or int8, got {quant!r}")
    model.requires_grad_(False).to(dtype)
    linears = TARGETS[model.config.family]
    for block in model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if name in linears and isinstance(child, nn.Linear):
                    setattr(parent, name, FrozenLinear(child, quant))  # int8: the float weight is freed here
    return add_lora(model, rank, alpha, targets)
