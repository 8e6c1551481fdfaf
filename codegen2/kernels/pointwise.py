"""The LLaMA family's RMSNorm and rotary embedding on native kernels, wrapped around the model's own modules.

In eager PyTorch each is a chain of small ops (RMSNorm 8, rotary of q and k 12), and at decode sizes every op
costs its dispatch, not its arithmetic: a 16-layer LLaMA decode step whose matrices are tiny takes 6.5 ms on a
Zen 3 (2 threads), against ~18 ms for the int4 linears of the 1B shape. The kernels (csrc/decode_pointwise.cpp)
do each in one op with the modules' numerics: rotary bit for bit, RMSNorm up to its sum's order (a result can
move by one bf16 step where h * r falls within 2^-24 of a rounding tie). Anything the kernels do not take (fp32
models, other devices, autograd) goes to the model's own module. CodeGen2's LayerNorm is one torch op already.

What the kernels need of the modules (the contract with codegen2.models.llama, which this package does not
import): an RMSNorm offers ``rms_norm_eps()`` and ``weight`` (D,), and computes weight * bf16(x * rsqrt(mean(x^2)
+ eps)) in fp32; a rotary module offers ``rotary_pairing() == "halves"`` and forward(q, k, cos, sin) -> (q * cos
+ rot(q) * sin, the same for k) with rot(x) = (-x[D/2:], x[:D/2]), in the tensors' dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def _plain_bf16_cpu(*ts: torch.Tensor) -> bool:
    """bf16 CPU tensors outside autograd (the kernels have no backward)."""
    grad = torch.is_grad_enabled()
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and not (grad and t.requires_grad) for t in ts)


class NativeRMSNorm(nn.Module):
    """Stands in for an RMSNorm module (kept as ``reference``; its weight is used in place)."""

    def __init__(self, reference: nn.Module, ops) -> None:
        super().__init__()
        self.reference = reference
        self._ops = ops  # torch.ops.codegen2_kernels_<level>

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.reference.weight
        if not _plain_bf16_cpu(x, w):
            return self.reference(x)
        D = x.shape[-1]
        return self._ops.rms_norm(x.reshape(-1, D).contiguous(), w, self.reference.rms_norm_eps()).view(x.shape)


class NativeRotary(nn.Module):
    """Stands in for a rotary module: q (B, H, T, D), k (B, G, T, D), cos, sin (B, 1, T, D)."""

    def __init__(self, reference: nn.Module, ops) -> None:
        super().__init__()
        self.reference = reference
        self._ops = ops

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (_plain_bf16_cpu(q, k, cos, sin) and q.dim() == k.dim() == cos.dim() == sin.dim() == 4
                and cos.shape[1] == sin.shape[1] == 1 and q.stride(-1) == k.stride(-1) == 1
                and cos.stride(-1) == sin.stride(-1) == 1):
            return self.reference(q, k, cos, sin)
        return self._ops.rope(q, k, cos, sin)


def swap_pointwise(model: nn.Module, ops) -> nn.Module:
    """Wrap every module of ``model`` that offers one of the contracts above in its native stand-in, in place;
    return the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NativeRMSNorm | NativeRotary):
                continue
            if callable(getattr(child, "rms_norm_eps", None)):
                setattr(parent, name, NativeRMSNorm(child, ops))
            elif callable(getattr(child, "rotary_pairing", None)) and child.rotary_pairing() == "halves":
                setattr(parent, name, NativeRotary(child, ops))
    return model
