"""Model math against transformers' CodeGenForCausalLM / LlamaForCausalLM, and the cache / padding invariants."""

from __future__ import annotations

import pytest
import torch

from codegen2.models import build, preset_config
from codegen2.models.checkpoint import load_model
from codegen2.models.kv_cache import KVCache


def _tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 51200, (B, T), generator=torch.Generator().manual_seed(seed))


FAMILIES = ["codegen2", "llama", "llama-gqa"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, checkpoints):
    """(transformers model, our model loaded from the directory transformers saved)."""
    return checkpoints.reference(request.param), load_model(checkpoints(request.param))


@torch.no_grad()
def test_fp32_logits_match_transformers(pair):
    hf, ours = pair
    x = _tokens(2, 33)
    ref = hf(x).logits.float()
    got = ours(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


@torch.no_grad()
def test_bf16_logits_close_to_transformers_bf16(pair):
    """Both sides in bf16. They round at the same points except that transformers rounds keys to bf16 (ours keep
    the fp32 rotary output, as the original CodeGen2 code does) and kernels block differently. Measured: 0.02-0.04
    on logits of magnitude ~3, the same order as bf16's own error against fp32 (0.03-0.05)."""
    hf, ours = pair
    x = _tokens(2, 33)
    ref32 = hf(x).logits.float()
    hf16 = hf.to(torch.bfloat16)
    ours16 = ours.to(torch.bfloat16)
    try:
        ref16 = hf16(x).logits.float()
        got16 = ours16(x)
    finally:
        hf.float(), ours.float()
    bf16_error = (ref16 - ref32).abs().max().item()
    assert (got16 - ref16).abs().max().item() <= 0.1
    assert (got16 - ref32).abs().max().item() <= 2 * bf16_error + 1e-3


@torch.no_grad()
def test_kv_cached_decoding_equals_full_recomputation(pair):
    _, ours = pair
    cfg = ours.config
    x = _tokens(2, 24, seed=3)
    full = ours(x)
    cache = KVCache(cfg.n_layers, 2, cfg.n_kv_heads, 32, cfg.head_dim, torch.float32)
    pos = torch.arange(24).expand(2, 24)
    steps = [ours(x[:, :10], pos[:, :10], cache)]  # prefill 10, then one token at a time
    steps += [ours(x[:, t:t + 1], pos[:, t:t + 1], cache) for t in range(10, 24)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_left_padded_batch_row_equals_row_alone(pair):
    _, ours = pair
    cfg = ours.config
    lengths = [5, 13, 9]
    T = max(lengths)
    rows = [_tokens(1, n, seed=10 + n)[0] for n in lengths]
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.full((len(rows), T), -1)
    for b, r in enumerate(rows):
        tokens[b, T - len(r):] = r
        pos[b, T - len(r):] = torch.arange(len(r))
    # With a cache: padded prefill, then two decode steps for the whole batch.
    cache = KVCache(cfg.n_layers, len(rows), cfg.n_kv_heads, 32, cfg.head_dim, torch.float32)
    batch = [ours(tokens, pos, cache)[:, -1]]
    nxt = _tokens(len(rows), 2, seed=99)
    for t in range(2):
        batch.append(ours(nxt[:, t:t + 1], pos[:, -1:] + 1 + t, cache)[:, -1])
    # Without a cache: the same padded prompt in one call.
    uncached = ours(tokens, pos)[:, -1]
    for b, r in enumerate(rows):
        alone = ours(torch.cat([r, nxt[b]])[None])[0]  # (n + 2, V)
        n = len(r)
        assert (batch[0][b] - alone[n - 1]).abs().max() <= 1e-5
        assert (uncached[b] - alone[n - 1]).abs().max() <= 1e-5
        for t in range(2):
            assert (batch[1 + t][b] - alone[n + t]).abs().max() <= 1e-5


def _param_count(name: str) -> int:
    with torch.device("meta"):
        model = build(preset_config(name))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [
    ("codegen2-1B", 1.015e9), ("codegen2-3_7B", 3.64e9), ("codegen2-7B", 6.86e9), ("codegen2-16B", 16.03e9),
    ("codegen25-7b-multi", 6.90e9), ("codegen25-7b-mono", 6.90e9), ("codegen25-7b-instruct", 6.90e9),
])
def test_presets_have_the_official_parameter_counts(name, expected):
    assert abs(_param_count(name) - expected) / expected < 0.005


def test_preset_shapes():
    cfg = preset_config("codegen2-1B")
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.head_dim, cfg.rotary_dim, cfg.intermediate_size) == \
        (16, 2048, 16, 128, 64, 8192)
    cfg = preset_config("codegen25-7b-mono")
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (32, 4096, 32, 32, 128)
    custom = preset_config("codegen2-1B", n_layers=2)
    assert custom.n_layers == 2
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("codegen3")


def test_position_past_context_is_a_clear_error(pair):
    _, ours = pair
    x = _tokens(1, 2)
    with pytest.raises(ValueError, match="past the model's"):
        ours(x, torch.tensor([[0, ours.config.max_seq_len]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_fused_attention_matches_transformers_and_its_gradients(family, checkpoints):
    """Training mode (no positions, no cache) takes the fused causal SDPA path: same logits as transformers,
    and the same gradients as the reference path of eval mode."""
    hf = checkpoints.reference(family)  # fresh: the shared pair has been through bf16 and back
    ours = load_model(checkpoints(family))
    x = _tokens(2, 40, seed=3)
    with torch.no_grad():
        ref = hf(x).logits.float()
    ours.requires_grad_(True)
    try:
        ours.train()
        got = ours(x)
        assert (got - ref).abs().max().item() <= 1e-5
        got.logsumexp(-1).mean().backward()
        fused = {n: p.grad.clone() for n, p in ours.named_parameters()}
        ours.zero_grad()
        ours.eval()
        ours(x).logsumexp(-1).mean().backward()
        for n, p in ours.named_parameters():
            assert torch.allclose(fused[n], p.grad, atol=1e-6, rtol=1e-4), n
        ours.train()
        with pytest.raises(ValueError, match="more than the model's"):
            ours(_tokens(1, ours.config.max_seq_len + 1))
    finally:
        ours.eval().requires_grad_(False).zero_grad(set_to_none=True)
