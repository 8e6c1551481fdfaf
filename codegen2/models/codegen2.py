"""CodeGen2 (1B, 3.7B, 7B, 16B) in plain PyTorch.

The architecture is GPT-J's: one LayerNorm per block feeding attention and MLP in parallel, interleaved (GPT-J)
rotary embeddings on the first ``rotary_dim`` dims of each head, ``gelu_new``, and an output layer with a bias
(untied in the official checkpoints; small models of our own tie its weight to the embedding). The reference
(Salesforce's remote ``modeling_codegen.py``) computes rotary, attention scores and softmax in fp32 even for half
models, divides the scores by sqrt(head_dim) rather than multiplying, masks with the fp32 minimum, and adds
attention and MLP before the residual; each of these is kept here because it changes half-precision results.

This file is pure math: token ids, explicit positions and an optional KV cache in, fp32 logits out. It knows
nothing of checkpoints: the fused, mp_num-interleaved ``qkv_proj`` of the official weights is turned into the
plain ``[q; k; v]`` layout used here by ``models/convert.py``, once, at load time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from codegen2.models.attention import Fp32Attention
from codegen2.models.kv_cache import CacheRows, KVCache, LayerCache, attention_mask
from codegen2.models.loss import linear_cross_entropy


@dataclass
class CodeGen2Config:
    # The field names are shared with LlamaConfig (llama.py); convert.py maps Hugging Face's names to them.
    n_layers: int
    dim: int
    n_heads: int
    rotary_dim: int = 64
    intermediate_size: int | None = None  # None -> 4 * dim, as in the official configs
    vocab_size: int = 51200
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False  # the output layer's weight is the embedding (its bias stays its own)

    family: ClassVar[str] = "codegen2"

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.dim
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:  # no grouped-query attention in CodeGen2
        return self.n_heads

    def to_dict(self) -> dict:
        return {"family": self.family, **asdict(self)}


# Shapes of the official checkpoints, from their config.json files (rotary_dim 64, intermediate_size 4 * dim,
# 2048 positions and a vocabulary of 51,200 in all four).
PRESETS: dict[str, dict] = {
    "codegen2-1B": dict(n_layers=16, dim=2048, n_heads=16),
    "codegen2-3_7B": dict(n_layers=16, dim=4096, n_heads=16),
    "codegen2-7B": dict(n_layers=32, dim=4096, n_heads=16),
    "codegen2-16B": dict(n_layers=34, dim=6144, n_heads=24),
}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # Written out rather than F.gelu(approximate="tanh") because the reference evaluates exactly this
    # expression, and the fused kernel rounds differently.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def rotary_table(max_seq_len: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (S, R) sin and cos with each frequency repeated for an interleaved pair [f0, f0, f1, f1, ...].

    Computed on the CPU as the reference does, so every device sees the same bits.
    """
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim))
    angles = torch.einsum("i,j->ij", torch.arange(max_seq_len, dtype=torch.float, device="cpu"), inv_freq).float()
    return (torch.repeat_interleave(torch.sin(angles), 2, dim=-1),
            torch.repeat_interleave(torch.cos(angles), 2, dim=-1))


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """GPT-J rotary on (B, T, H, R) with sin/cos (B, T, 1, R): pairs (x[2j], x[2j+1]) rotate together."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # rot(x)[2j] = -x[2j+1], rot(x)[2j+1] = x[2j]
    return (x * cos) + (rotated * sin)


class Attention(nn.Module):
    def __init__(self, cfg: CodeGen2Config) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rotary_dim = cfg.n_heads, cfg.head_dim, cfg.rotary_dim
        # Plain head-major [q; k; v] rows; the checkpoint's interleaved layout is undone by the converter.
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        # A Python float: the reference's sqrt(head_dim) as an fp32 model computes it. (A 1B model built by
        # from_pretrained(torch_dtype=half) rounds it to 11.3125 instead of 11.3137; a model loaded in fp32 and
        # then cast keeps this value, which is the one used here.)
        self.scale = math.sqrt(cfg.head_dim)
        self.attend = Fp32Attention(self.scale)  # the masked (inference) path: the reference's fp32 attention

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerCache | None) -> torch.Tensor:
        """x (B, T, E); sin, cos (B, T, 1, R) or (T, 1, R); mask (B, 1, T, S) bool, or None for plain causal
        attention over this call's tokens (training); cache: this layer's K/V, or None."""
        B, T, E = x.shape
        H, D, R = self.n_heads, self.head_dim, self.rotary_dim
        q, k, v = self.wqkv(x).view(B, T, 3, H, D).unbind(2)  # each (B, T, H, D)
        # Rotary in fp32 (the reference's fp32 cos/sin promote half inputs), on the first R dims only.
        q = torch.cat([apply_rotary(q[..., :R].float(), sin, cos), q[..., R:].float()], dim=-1)
        k = torch.cat([apply_rotary(k[..., :R].float(), sin, cos), k[..., R:].float()], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if mask is None:  # training: plain causal attention over this call's tokens, fused kernel
            out = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, is_causal=True,
                                                 scale=1.0 / self.scale)
            return self.wo(out.transpose(1, 2).reshape(B, T, E))
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, S, D)
        out = self.attend(q, k, v, mask)  # (B, H, T, D) in v's dtype
        return self.wo(out.transpose(1, 2).reshape(B, T, E))


class FeedForward(nn.Module):
    def __init__(self, cfg: CodeGen2Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size)  # fc_in
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim)  # fc_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(gelu_new(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: CodeGen2Config) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)

    def shared_input_linears(self) -> tuple[tuple[str, ...], ...]:
        """For a runtime that may compute them as one product (codegen2.kernels.linear): forward applies the
        attention's wqkv and the MLP's w1 (fc_in) to the same LayerNorm output, unchanged."""
        return (("attention.wqkv", "feed_forward.w1"),)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerCache | None) -> torch.Tensor:
        h = self.norm(x)
        # (attention + mlp) first, then the residual: the order matters in half precision.
        return (self.attention(h, sin, cos, mask, cache) + self.feed_forward(h)) + x


class CodeGen2(nn.Module):
    def __init__(self, cfg: CodeGen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=True)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_rotary()

    def reset_rotary(self) -> None:
        """(Re)build the rotary tables; needed after the model was built on the meta device."""
        sin, cos = rotary_table(self.config.max_seq_len, self.config.rotary_dim)
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

        In training mode, a call without positions or cache (the training step) uses the fused causal SDPA
        kernel instead of the reference's explicit fp32 softmax: same math, not bit-identical, much less memory.
        """
        B, T = tokens.shape
        caches: list[LayerCache | None] = [None] * len(self.layers)
        if self.training and input_pos is None and cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"{T} tokens are more than the model's {self.config.max_seq_len} positions")
            mask = None
            sin, cos = self.rope_sin[:T, None], self.rope_cos[:T, None]  # (T, 1, R), broadcast over B
        else:
            if input_pos is None:
                input_pos = torch.arange(T, device=tokens.device).expand(B, T)
            if int(input_pos.max()) >= self.config.max_seq_len:
                raise ValueError(f"position {int(input_pos.max())} is past the model's {self.config.max_seq_len}")
            mask, kv_len = attention_mask(input_pos, cache)
            if cache is not None:
                caches = (cache.rows() if isinstance(cache, KVCache) else cache).layers(input_pos, kv_len)
            rope_pos = input_pos.clamp(min=0)
            sin, cos = self.rope_sin[rope_pos][:, :, None], self.rope_cos[rope_pos][:, :, None]  # (B, T, 1, R)
        x = self.tok_embeddings(tokens)
        for layer, layer_cache in zip(self.layers, caches):
            x = layer(x, sin, cos, mask, layer_cache)
        if targets is not None:
            return linear_cross_entropy(self.norm(x), self.output.weight, self.output.bias, targets)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()
