"""Runs the model for the engine: owns the static KV cache and turns scheduled work into forward passes.

The runner knows slots, positions and tensors, nothing of requests, sampling or text. Decode rows are one token
each at their own position, in their own slot; a prefill chunk is one row of up to ``prefill_chunk`` tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from codegen2.models.kv_cache import KVCache


class ModelRunner:
    def __init__(self, model: nn.Module, n_slots: int, max_seq_len: int) -> None:
        self.model = model
        cfg = model.config
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache = KVCache(cfg.n_layers, n_slots, cfg.n_kv_heads, max_seq_len, cfg.head_dim, self.dtype,
                             self.device)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per slot -> fp32 logits (B, V), row b for slots[b]."""
        # The pass runs in slot order: consecutive slots are read as a view of the cache, any other order is
        # gathered per layer (16 sequences, 1B bf16, Zen 5: 29 ms of ~240 ms per step).
        order = _slot_order(slots)
        x = torch.tensor([tokens[i] for i in order], device=self.device)[:, None]  # (B, 1)
        pos = torch.tensor([positions[i] for i in order], device=self.device)[:, None]  # (B, 1)
        logits = self.model(x, pos, self.cache.rows([slots[i] for i in order]), last_only=True)[:, -1]
        return _in_caller_order(logits, order)

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        """A chunk of one prompt at positions start.. -> fp32 logits (1, V) of its last token."""
        x = torch.tensor(tokens, device=self.device)[None]  # (1, T)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]  # (1, T)
        return self.model(x, pos, self.cache.rows([slot]), last_only=True)[:, -1]

    @torch.inference_mode()
    def verify(self, slots: list[int], rows: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Row b's tokens at positions starts[b].. in slot b, rows padded to the longest -> fp32 logits
        (B, T, V) of every position (a padded position's are garbage: position -1 writes the scratch column)."""
        T = max(map(len, rows))
        order = _slot_order(slots)  # as in decode
        x = torch.zeros(len(rows), T, dtype=torch.long)
        pos = torch.full((len(rows), T), -1, dtype=torch.long)
        for b, i in enumerate(order):
            x[b, :len(rows[i])] = torch.tensor(rows[i])
            pos[b, :len(rows[i])] = torch.arange(starts[i], starts[i] + len(rows[i]))
        logits = self.model(x.to(self.device), pos.to(self.device), self.cache.rows([slots[i] for i in order]))
        return _in_caller_order(logits, order)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_prefix(src, dst, length)


def _slot_order(slots: list[int]) -> list[int]:
    """The batch rows' indices sorted by their slots."""
    return sorted(range(len(slots)), key=slots.__getitem__)


def _in_caller_order(logits: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Rows computed in ``order`` (row b is the caller's row order[b]) put back in the caller's order."""
    if order == list(range(len(order))):
        return logits
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    return logits[inv.to(logits.device)]
