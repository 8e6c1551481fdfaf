"""A static, preallocated key/value cache written by position, and the attention mask that reads it.

The cache holds one (B, H_kv, S + 1, D) buffer for keys and one for values per layer. Row b of a forward pass
writes the K/V of its token t at index ``input_pos[b, t]``; a padding token (``input_pos == -1``) writes into the
extra last index S, a scratch column that attention never reads. Shapes never change after construction, so the
same cache serves prefill, decode and padded batches without reallocation.

A forward pass sees the cache through ``rows(slots)`` (which batch rows live in which cache rows) and hands each
layer its own ``LayerCache``: the layer writes its new K/V and gets back what attention reads, without knowing its
index or the cache's layout. Who owns the cache and which sequence lives in which row is the caller's business
(the engine's runner); the model only reads and writes what it is given.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.max_seq_len = max_seq_len
        # (L, B, H_kv, S + 1, D); index S is the scratch column for padding tokens.
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @staticmethod
    def bytes_per_slot(n_layers: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one batch row (slot) of the cache takes, keys and values."""
        return 2 * n_layers * n_kv_heads * (max_seq_len + 1) * head_dim * torch.finfo(dtype).bits // 8

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst`` (a shared prompt prefix)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def rows(self, slots: list[int] | None = None) -> CacheRows:
        """The cache as a forward pass sees it when its batch row b lives in cache row ``slots[b]`` (default:
        batch row b is cache row b, for a batch as large as the cache)."""
        return CacheRows(self, slots)


class CacheRows:
    """The cache rows one forward pass reads and writes."""

    def __init__(self, cache: KVCache, slots: list[int] | None) -> None:
        self.cache, self.max_seq_len = cache, cache.max_seq_len
        self.slots = None if slots is None else torch.tensor(slots, device=cache.k.device)
        # Consecutive rows are read as a view (no copy); others are gathered per layer.
        self.first = None if slots is None or slots != list(range(slots[0], slots[0] + len(slots))) else slots[0]

    def layers(self, input_pos: torch.Tensor, kv_len: int) -> list[LayerCache]:
        """One LayerCache per layer for a pass at positions input_pos (B, T) reading positions 0..kv_len-1."""
        B = input_pos.shape[0]
        if self.slots is None and B != self.cache.batch_size:
            raise ValueError(f"batch of {B} rows does not match the cache's {self.cache.batch_size} rows")
        if self.slots is not None and len(self.slots) != B:
            raise ValueError(f"batch of {B} rows but {len(self.slots)} cache slots")
        pos = torch.where(input_pos < 0, self.max_seq_len, input_pos)  # (B, T); pads -> scratch column
        rows = torch.arange(B, device=pos.device) if self.slots is None else self.slots
        if self.slots is None:
            read = slice(None)
        elif self.first is not None:
            read = slice(self.first, self.first + B)
        else:
            read = self.slots
        rows = rows[:, None].expand_as(pos)  # (B, T)
        return [LayerCache(k, v, rows, pos, read, kv_len) for k, v in zip(self.cache.k, self.cache.v)]


class LayerCache:
    """One layer's keys and values for one forward pass."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                 read: slice | torch.Tensor, kv_len: int) -> None:
        self.k, self.v, self.rows, self.pos, self.read, self.kv_len = k, v, rows, pos, read, kv_len

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at this pass's positions; return positions 0..kv_len-1 (B, H_kv, kv_len, D)."""
        # Advanced indices on dims 0 and 2 put (B, T) first: the written values are (B, T, H_kv, D).
        self.k[self.rows, :, self.pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[self.rows, :, self.pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[self.read, :, :self.kv_len], self.v[self.read, :, :self.kv_len]  # a slice is a view


def attention_mask(input_pos: torch.Tensor, cache: KVCache | CacheRows | None) -> tuple[torch.Tensor, int]:
    """Which keys each query may see, as a bool (B, 1, T, S) tensor, and S.

    With a cache, the keys are cache positions 0..S-1 where S = max(input_pos) + 1, and query (b, t) sees every
    position <= input_pos[b, t]. Without one, the keys are the T tokens of this call, and query (b, t) sees token
    t' when 0 <= input_pos[b, t'] <= input_pos[b, t]. Padding queries (-1) see nothing; callers fill with a finite
    minimum rather than -inf so their (ignored) rows never turn into NaN.
    """
    q_pos = input_pos[:, None, :, None]  # (B, 1, T, 1)
    if cache is None:
        k_pos = input_pos[:, None, None, :]  # (B, 1, 1, T)
        return (k_pos >= 0) & (k_pos <= q_pos), input_pos.shape[1]
    kv_len = int(input_pos.max()) + 1
    if kv_len > cache.max_seq_len:
        raise ValueError(f"position {kv_len - 1} is past the cache's {cache.max_seq_len} positions")
    k_pos = torch.arange(kv_len, device=input_pos.device)[None, None, None, :]  # (1, 1, 1, S)
    return k_pos <= q_pos, kv_len
