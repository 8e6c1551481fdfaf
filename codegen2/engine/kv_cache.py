"""A static, preallocated key/value cache written by position.

The cache holds one (B, H_kv, S + 1, D) buffer for keys and one for values per layer. Row b of a forward pass
writes the K/V of its token t at index ``input_pos[b, t]``; a padding token (``input_pos == -1``) writes into the
extra last index S, a scratch column that attention never reads. Shapes never change after construction, so the
same cache serves prefill, decode and padded batches without reallocation.

What it is not: a paged or slot-mapped cache shared between requests; the batched engine builds that on top.
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

    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at input_pos (B, T); return the first kv_len positions (B, H_kv, kv_len, D)."""
        B = k.shape[0]
        if B != self.batch_size:
            raise ValueError(f"batch of {B} rows does not match the cache's {self.batch_size} rows")
        pos = torch.where(input_pos < 0, self.max_seq_len, input_pos)  # (B, T); pads -> scratch column
        rows = torch.arange(B, device=pos.device)[:, None].expand_as(pos)
        # Advanced indices on dims 0 and 2 put (B, T) first: the written values are (B, T, H_kv, D).
        k_l, v_l = self.k[layer], self.v[layer]
        k_l[rows, :, pos] = k.transpose(1, 2).to(k_l.dtype)
        v_l[rows, :, pos] = v.transpose(1, 2).to(v_l.dtype)
        return k_l[:, :, :kv_len], v_l[:, :, :kv_len]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


def attention_mask(input_pos: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, int]:
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
