"""CodeGen2.5 (7B multi, mono, instruct): the LLaMA architecture in plain PyTorch.

Pre-norm RMSNorm blocks, NeoX-style ("rotate half") rotary over the whole head, SwiGLU MLP, untied output.
Grouped-query attention works by giving ``n_kv_heads < n_heads``; the cache stores only the K/V heads.

Pure math, like ``codegen2.py``: token ids, explicit positions and an optional KV cache in, fp32 logits out.
Numerics follow Hugging Face's Llama: RMSNorm in fp32 then cast back before the weight, cos/sin computed in fp32
and cast to the activation dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from codegen2.models.attention import SdpaAttention
from codegen2.models.kv_cache import CacheRows, KVCache, LayerCache, attention_mask
from codegen2.models.loss import linear_cross_entropy


@dataclass
class LlamaConfig:
    # The field names are shared with CodeGen2Config (codegen2.py); convert.py maps Hugging Face's names to them.
    n_layers: int
    dim: int
    n_heads: int
    intermediate_size: int
    n_kv_heads: int | None = None  # None -> n_heads (multi-head attention)
    vocab_size: int = 51200
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    family: ClassVar[str] = "llama"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return {"family": self.family, **asdict(self)}


# The three CodeGen2.5 checkpoints share one shape (their config.json: 32 layers, hidden 4096, 32 heads, MLP 11008,
# 2048 positions, rms_norm_eps 1e-6, rope_theta 10000, vocabulary 51,200).
_CODEGEN25 = dict(n_layers=32, dim=4096, n_heads=32, intermediate_size=11008)
PRESETS: dict[str, dict] = {
    "codegen25-7b-multi": _CODEGEN25,
    "codegen25-7b-mono": _CODEGEN25,
    "codegen25-7b-instruct": _CODEGEN25,
}


def rotary_table(max_seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (S, D) sin and cos, the frequencies repeated as two halves [f0..f_{D/2-1}, f0..f_{D/2-1}]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float, device="cpu"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.sin(), angles.cos()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def rms_norm_eps(self) -> float:
        """The numerics, for a runtime that swaps this module (codegen2.kernels.pointwise): y = weight *
        (x * rsqrt(mean(x^2) + eps)) computed in fp32, rounded to x's dtype before the weight."""
        return self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding of q (B, H, T, D) and k (B, G, T, D) with cos, sin broadcast to them (the
    rotate_half convention of Hugging Face's Llama), in their dtype: each product and the sum rounded as torch's
    ops round them. A module, so that an inference runtime can swap it from outside the model
    (codegen2.kernels.pointwise)."""

    def rotary_pairing(self) -> str:
        """Which dims rotate together, for a runtime that swaps this module: "halves", x[d] with x[d + D / 2]."""
        return "halves"

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rotary = Rotary()
        self.attend = SdpaAttention(cfg.head_dim ** -0.5)  # the masked (inference) path

    def shared_input_linears(self) -> tuple[tuple[str, ...], ...]:
        """For a runtime that may compute them as one product (codegen2.kernels.linear): forward applies wq, wk
        and wv to the same x, unchanged."""
        return (("wq", "wk", "wv"),)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerCache | None) -> torch.Tensor:
        """x (B, T, dim); sin, cos (B, 1, T, D) or (T, D); mask (B, 1, T, S) bool, or None for plain causal
        attention over this call's tokens (training); cache: this layer's K/V, or None."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, Hkv, D).transpose(1, 2)
        q, k = self.rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, D)
        if mask is not None:
            out = self.attend(q, k, v, mask)  # (B, H, T, D)
        else:  # training: plain causal attention over this call's tokens, fused kernel
            if Hkv != H:  # grouped-query attention: kv head j serves query heads j*rep .. (j+1)*rep - 1
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * D))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down

    def shared_input_linears(self) -> tuple[tuple[str, ...], ...]:
        """forward applies w1 and w3 to the same x, unchanged (see Attention.shared_input_linears)."""
        return (("w1", "w3"),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerCache | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), sin, cos, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_rotary()

    def reset_rotary(self) -> None:
        """(Re)build the rotary tables; needed after the model was built on the meta device."""
        sin, cos = rotary_table(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta)
        device = self.output.weight.device
        device = "cpu" if device.type == "meta" else device
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | CacheRows | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> fp32 logits (B, T, V), or (B, 1, V) for the last column with last_only.
        With targets (B, T) (token ids, -100 where nothing is predicted): the summed cross-entropy instead, an
        fp32 scalar, computed in chunks without materialising the logits (models/loss.py).

        input_pos (B, T) gives each token's absolute position (-1 marks padding); default 0..T-1 per row.
        With a cache (a KVCache as large as the batch, or ``cache.rows(slots)``), K/V are written at those
        positions and attention reads positions 0..max(input_pos).

        In training mode, a call without positions or cache (the training step) uses SDPA's causal flag
        instead of a materialised (B, 1, T, T) mask.
        """
        B, T = tokens.shape
        x = self.tok_embeddings(tokens)
        caches: list[LayerCache | None] = [None] * len(self.layers)
        if self.training and input_pos is None and cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"{T} tokens are more than the model's {self.config.max_seq_len} positions")
            mask = None
            sin, cos = self.rope_sin[:T].to(x.dtype), self.rope_cos[:T].to(x.dtype)  # (T, D), broadcast
        else:
            if input_pos is None:
                input_pos = torch.arange(T, device=tokens.device).expand(B, T)
            if int(input_pos.max()) >= self.config.max_seq_len:
                raise ValueError(f"position {int(input_pos.max())} is past the model's {self.config.max_seq_len}")
            mask, kv_len = attention_mask(input_pos, cache)
            if cache is not None:
                caches = (cache.rows() if isinstance(cache, KVCache) else cache).layers(input_pos, kv_len)
            rope_pos = input_pos.clamp(min=0)
            sin = self.rope_sin[rope_pos][:, None].to(x.dtype)  # (B, 1, T, D)
            cos = self.rope_cos[rope_pos][:, None].to(x.dtype)
        for layer, layer_cache in zip(self.layers, caches):
            x = layer(x, sin, cos, mask, layer_cache)
        if targets is not None:
            return linear_cross_entropy(self.norm(x), self.output.weight, None, targets)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()
