"""A static, preallocated key/value cache written by position.

The cache holds one (B, H_kv, S + 1, D) buffer for keys and one for values per layer. Row b of a forward pass
writes the K/V of its token t at index ``input_pos[b, t]``; a padding token (``input_pos == -1``) writes into the
extra last index S, a scratch column that attention never reads. Shapes never change after construction, so the
same cache serves prefill, decode and padded batches without reallocation.

The engine gives each running sequence one row (a slot) and runs forward passes over any subset of slots through
``SlotView``; a finished sequence's slot keeps its K/V so a later prompt with the same prefix can reuse it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
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

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at input_pos (B, T); return the first kv_len positions (B, H_kv, kv_len, D).

        Row b of the batch is cache row ``slots[b]`` (default: row b).
        """
        B = k.shape[0]
        if slots is None and B != self.batch_size:
            raise ValueError(f"batch of {B} rows does not match the cache's {self.batch_size} rows")
        pos = torch.where(input_pos < 0, self.max_seq_len, input_pos)  # (B, T); pads -> scratch column
        rows = (torch.arange(B, device=pos.device) if slots is None else slots)[:, None].expand_as(pos)
        k_l, v_l = self.k[layer], self.v[layer]
        # Advanced indices on dims 0 and 2 put (B, T) first: the written values are (B, T, H_kv, D).
        k_l[rows, :, pos] = k.transpose(1, 2).to(k_l.dtype)
        v_l[rows, :, pos] = v.transpose(1, 2).to(v_l.dtype)
        if slots is None:
            return k_l[:, :, :kv_len], v_l[:, :, :kv_len]
        first = int(slots[0])
        if B == 1 or torch.equal(slots, torch.arange(first, first + B, device=slots.device)):
            return k_l[first:first + B, :, :kv_len], v_l[first:first + B, :, :kv_len]  # a view, no copy
        return k_l[slots, :, :kv_len], v_l[slots, :, :kv_len]  # gather (B, H_kv, kv_len, D)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (a shared prompt prefix)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def slots(self, slots: list[int]) -> SlotView:
        return SlotView(self, slots)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class SlotView:
    """The cache as a model sees it when the rows of a forward pass live in the given cache rows (slots)."""

    def __init__(self, cache: KVCache, slots: list[int]) -> None:
        self.cache = cache
        self.max_seq_len = cache.max_seq_len
        self._slots = torch.tensor(slots, device=cache.k.device)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(layer, input_pos, k, v, kv_len, self._slots)


def attention_mask(input_pos: torch.Tensor, cache: KVCache | SlotView | None) -> tuple[torch.Tensor, int]:
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
