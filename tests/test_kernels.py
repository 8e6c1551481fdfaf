"""DecodeLinear and prepare_for_inference: native kernels and the PyTorch fallback against fp32 references.

The native tests run once per CPU level (native.LEVELS), forced with CODEGEN2_KERNEL_LEVEL; a level the CPU
lacks is skipped with the flags it misses, and all of them where the kernels cannot be built (no AVX2/FMA, no
compiler); the fallback tests always run. The first run in a fresh cache compiles the extension once (~15-20 s), shared by the whole session.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codegen2 import kernels
from codegen2.kernels import (LEVELS, DecodeLinear, kernels_available, pack_int4, pack_int8, prepare_for_inference,
                              quantize_int4, quantize_int8, swap_linears, unpack_int4, unpack_int8)
from codegen2.kernels import linear as linear_module
from codegen2.kernels import native as native_module
from codegen2.models.codegen2 import CodeGen2, CodeGen2Config
from codegen2.models.llama import Llama, LlamaConfig

SHAPES = [(1000, 2048), (51200, 64), (37, 69), (6, 200)]  # (N, K): odd K, ragged N, K % 16 != 0
MS = [1, 2, 5, 16, 40, 67]  # the GEMM from 32 rows (bf16, int4); 40 and 67 leave ragged 16-token tiles
U = 2.0**-8  # bf16 unit roundoff: rounding a value to bf16 changes it by at most U times its size


@pytest.fixture(scope="module")
def native() -> bool:
    return kernels_available()


@pytest.fixture(params=[*LEVELS, "torch"])
def path(request, native, monkeypatch) -> str:
    """Each test runs on every native level the CPU has and on the fallback; the layer reads the choice when it is
    built. Returns "native" or "torch"."""
    if request.param == "torch":
        monkeypatch.setenv(kernels.ENV_VAR, "torch")
        return "torch"
    if not native:
        pytest.skip("native kernels unavailable on this machine")
    missing = sorted(LEVELS[request.param][0] - native_module.cpu_flags())
    if missing:
        pytest.skip(f"CPU lacks {', '.join(missing)}: level {request.param} not run here")
    monkeypatch.setenv(kernels.LEVEL_VAR, request.param)
    assert kernels_available()
    return "native"


def test_kernels_load_wherever_they_can():
    """Every level this CPU has builds and passes its load-time self-test. A failure there falls back to PyTorch
    with a warning, and turns every native test in this file into a skip: without this test a kernel broken
    badly enough for the self-test to notice would leave the suite green."""
    if os.environ.get(kernels.ENV_VAR, "").strip().lower() == "torch":
        pytest.skip(f"{kernels.ENV_VAR}=torch: the native kernels are switched off")
    if not native_module.cpu_supported():
        pytest.skip("CPU lacks AVX2 + FMA: no native level to build")
    if not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("ninja"):
        pytest.skip("no C++ compiler or ninja on PATH: the kernels cannot be built here")
    levels = native_module.supported_levels()
    assert levels
    failed = [level for level in levels if not native_module.load_level(level)]
    assert not failed, f"levels {failed} did not build or failed their self-test (see the warning)"


def make_linear(N: int, K: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0.0, 1.0)
        if bias:
            lin.bias.normal_(0.0, 1.0)
    return lin.to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# bf16


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_matches_fp32_reference(path, N, K, bias):
    lin = make_linear(N, K, bias)
    ref_w, ref_b = lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach().float()
    layer = DecodeLinear.from_linear(lin, "bf16")
    assert layer.native == (path == "native")
    for M in MS:
        x = torch.randn(M, K).bfloat16()
        ref = F.linear(x.float(), ref_w, ref_b)
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (M, N)
        # Either path (native, or torch where oneDNN has native bf16 and M > 16): one rounding of an
        # fp32-accumulated result, plus fp32 summation-order noise.
        torch.testing.assert_close(y.float(), ref, rtol=U, atol=1e-3, msg=f"M={M}, {layer.path(M, x)}")


def test_bf16_shapes_dtypes_and_layouts(path):
    lin = make_linear(48, 96, bias=True)
    layer = DecodeLinear.from_linear(lin, "bf16")
    x = torch.randn(2, 3, 192).bfloat16()[..., ::2]  # (B, T, K), non-contiguous
    ref = F.linear(x.float(), lin.weight.detach().float(), lin.bias.detach().float())
    torch.testing.assert_close(layer(x).float(), ref, rtol=U, atol=1e-3)
    y32 = layer(x.float())  # fp32 in, fp32 out
    assert y32.dtype == torch.float32 and y32.shape == (2, 3, 48)
    torch.testing.assert_close(y32, ref, rtol=U, atol=1e-3)
    assert layer(torch.zeros(0, 96, dtype=torch.bfloat16)).shape == (0, 48)


def test_bf16_uses_the_weight_in_place():
    lin = make_linear(64, 32, bias=False)
    ptr = lin.weight.data_ptr()
    layer = DecodeLinear.from_linear(lin, "bf16")
    assert layer.weight.data_ptr() == ptr


# ----------------------------------------------------------------------------------------------------------------
# int8


def test_quantize_int8_error_bound():
    torch.manual_seed(0)
    w = torch.randn(300, 77).bfloat16()
    w[5] = 0  # an all-zero row
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (300,)
    assert int(q.abs().max()) <= 127
    assert s[5] == 0 and not q[5].any()
    nonzero = s > 0
    # The largest entry of each row maps to exactly +-127.
    assert bool((q[nonzero].abs().amax(1) == 127).all())
    # Round to nearest: |w - q s| <= s / 2 (plus fp32 rounding of the division).
    err = (w.float() - q.float() * s[:, None]).abs()
    assert bool((err <= s[:, None] * (0.5 + 1e-5)).all())


@pytest.mark.parametrize("N,K", SHAPES)
def test_pack_int8_layout(N, K):
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w = pack_int8(q)
    assert w.shape == (-(-N // 4), -(-K // 16), 4, 16)
    assert torch.equal(w[0, 0, 1, :3], q[1, :3]) and torch.equal(w[-1, -1, (N - 1) % 4, (K - 1) % 16], q[-1, -1])
    assert torch.equal(unpack_int8(w, N, K), q)
    assert int(w.abs().sum()) == int(q.abs().sum())  # the padding is zeros


def test_quantize_int4_error_bound():
    torch.manual_seed(0)
    w = torch.randn(300, 77).bfloat16()  # 3 groups of 32, the last one 13 columns
    w[5] = 0  # all-zero groups
    w[6, 32:64] = 1e-30  # a tiny group: its scale must not underflow to a wrong q
    q, s = quantize_int4(w, 32)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.shape == (300, 77) and s.shape == (300, 3)
    assert int(q.abs().max()) <= 7
    assert not s[5].any() and not q[5].any()
    s_full = s.float().repeat_interleave(32, dim=1)[:, :77]  # (N, K): each weight's scale
    # The largest entry of each group maps to +-7 (nothing is clipped).
    amax_q = F.pad(q.abs(), (0, 19)).view(300, 3, 32).amax(2)
    assert bool((amax_q[s > 0] == 7).all())
    # Round to nearest: |w - q s| <= s / 2 (plus fp32 rounding of the division).
    err = (w.float() - q.float() * s_full).abs()
    assert bool((err <= s_full * (0.5 + 1e-5)).all())
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(w, 48)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("G", [32, 128])
def test_pack_int4_layout(N, K, G):
    q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
    s = torch.rand(N, -(-K // G)).bfloat16()
    w, sp = pack_int4(q, s, G)
    Kp = -(-K // G) * G
    assert w.dtype == torch.uint8 and w.shape == (-(-N // 4), Kp // 32, 4, 16)
    assert sp.shape == (-(-N // 4), Kp // G, 4)
    # Spot checks of the documented layout: low nibble column 32c + j, high nibble 32c + 16 + j, offset 8.
    if K > 18 and N > 1:
        assert int(w[0, 0, 1, 2]) == (int(q[1, 2]) + 8) | ((int(q[1, 18]) + 8) << 4)
        assert float(sp[0, 0, 1]) == float(s[1, 0])
    q2, s2 = unpack_int4(w, sp, N, K)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def quantized(lin: nn.Linear, mode: str) -> tuple[DecodeLinear, torch.Tensor]:
    """The layer and, independently, its weight quantized here and dequantized in fp32 (N, K)."""
    layer = DecodeLinear.from_linear(lin, mode)
    N, K = lin.weight.shape
    if mode == "int8":
        assert layer.weight.dtype == torch.int8 and layer.scale.dtype == torch.float32
        q, s = quantize_int8(lin.weight.detach())
        assert torch.equal(unpack_int8(layer.weight, N, K), q) and torch.equal(layer.scale, s)
        return layer, q.float() * s[:, None]
    assert layer.weight.dtype == torch.uint8 and layer.scale.dtype == torch.bfloat16 and layer.group_size == 32
    q, s = quantize_int4(lin.weight.detach(), 32)
    q2, s2 = unpack_int4(layer.weight, layer.scale, N, K)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    return layer, q.float() * s.float().repeat_interleave(32, dim=1)[:, :K]


def x_rounding_bound(mode: str, x: torch.Tensor, w_deq: torch.Tensor, group: int = 32) -> torch.Tensor:
    """(M, N): the most the integer kernels' rounding of x (M, K) can move x @ w_deq.T (w_deq (N, K)): half a
    step per element times |w|. int8 weights: int16 x, a step of max|x_row| / 32767. int4 weights: int8 x, a
    step of max|x_group| / 127 per group of the weight's ``group`` columns, as llama.cpp's q8_0."""
    xa, wa = x.float().abs(), w_deq.abs()
    if mode == "int8":
        return 0.5 * xa.amax(1, keepdim=True) / 32767 * wa.sum(1)
    K = x.shape[1]
    pad = -K % group
    step = F.pad(xa, (0, pad)).view(x.shape[0], -1, group).amax(2) / 127  # (M, groups)
    return 0.5 * step @ F.pad(wa, (0, pad)).view(w_deq.shape[0], -1, group).sum(2).T


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_matches_dequantized_reference(path, mode, N, K, bias, monkeypatch):
    # The integer kernels for every M, also where prompts would take the "dequant" path (tested below).
    monkeypatch.setattr(linear_module, "native_dequant_min_m", lambda: None)
    lin = make_linear(N, K, bias, seed=1)
    layer, w_deq = quantized(lin, mode)
    b = None if lin.bias is None else lin.bias.detach().float()
    for M in MS:
        x = torch.randn(M, K).bfloat16()
        ref = F.linear(x.float(), w_deq, b)
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (M, N)
        # Hand-computed bound per output, for the path this product takes. Native: x is rounded to steps of
        # max|x_row| / 32767 (int8 weights: int16 x) or max|x_group| / 127 per group of the weight's 32 columns
        # (int4 weights: int8 x), so each product is off by at most half a step times |w|. Fallback: the
        # dequantized weight is rounded to bf16 (U of each |w x|). Both: one final bf16 rounding and fp32
        # summation noise.
        abs_wx = F.linear(x.float().abs(), w_deq.abs())  # (M, N): sum_k |w_nk x_mk|
        assert layer.path(M, x) == path  # without "dequant", int8 / int4 take one path for every M
        if layer.path(M, x) == "native":
            input_err = x_rounding_bound(mode, x, w_deq)
        else:
            input_err = U * abs_wx
        bound = input_err + U * ref.abs() + 1e-5 * abs_wx + 1e-4
        err = (y.float() - ref).abs()
        assert bool((err <= bound).all()), f"M={M}: worst excess {float((err - bound).max())}"


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("N,K", [(1000, 2048), (37, 69), (6, 200)])
def test_quantized_prompt_products_dequantize_to_bf16(path, mode, N, K, monkeypatch):
    """Where oneDNN has native bf16, int8 / int4 products of >= 32 bf16 rows dequantize the weight with our ops
    and multiply in torch: exactly the fallback's numbers (its PyTorch dequantization rounds q * scale to bf16
    the same way), within its bound of the fp32 reference; fewer rows, and fp32 x, keep the integer kernels."""
    monkeypatch.setattr(linear_module, "native_dequant_min_m", lambda: 32)
    lin = make_linear(N, K, bias=True, seed=2)
    layer, w_deq = quantized(lin, mode)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    fallback = DecodeLinear.from_linear(lin, mode)
    assert not fallback.native
    for M in (31, 32, 67):
        x = torch.randn(M, K).bfloat16()
        want = "torch" if path == "torch" else "native" if M < 32 else "dequant"
        assert layer.path(M, x) == want and layer.path(M, x.float()) == path
        y = layer(x)
        if want != "native":
            assert torch.equal(y, fallback(x)), f"M={M}"
        ref = F.linear(x.float(), w_deq, lin.bias.detach().float())
        abs_wx = F.linear(x.float().abs(), w_deq.abs())
        bound = U * abs_wx + U * ref.abs() + 1e-5 * abs_wx + 1e-4 + x_rounding_bound(mode, x, w_deq)
        assert bool(((y.float() - ref).abs() <= bound).all()), f"M={M}"


def test_dequant_threshold_follows_the_cpu_flags(monkeypatch):
    base = frozenset({"avx2", "fma", "avx512f"})
    for extra, want in (({"amx_bf16", "avx512_bf16"}, 32), ({"avx512_bf16"}, 32), (set(), None)):
        monkeypatch.setattr(native_module, "cpu_flags", lambda extra=extra: base | extra)
        assert native_module.native_dequant_min_m() == want


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_fp32_input_and_nonfinite(path, mode):
    lin = make_linear(20, 64, bias=True)
    layer, w_deq = quantized(lin, mode)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = F.linear(x, w_deq, lin.bias.detach().float())
    # fp32 out: no bf16 rounding, only the integer kernels' rounding of x and fp32 summation noise.
    bound = x_rounding_bound(mode, x, w_deq) + 1e-5 * F.linear(x.abs(), w_deq.abs()) + 1e-5
    assert bool(((y - ref).abs() <= bound).all())
    x[1, 7] = float("nan")
    y = layer(x)
    assert bool(y[1].isnan().all()) and bool(y[[0, 2]].isfinite().all())


def test_int4_native_equals_fallback_on_exact_inputs(native, monkeypatch):
    """Inputs on which the fallback is exact and the kernel's only error is its fp32 summation: x in {-1, 0, 1}
    (so its int8 quantization per group, to 0 and +-127, is exact), q in [-8, 7], scales powers of two (every
    dequantized weight exact in bf16, every product exact). Any layout, nibble or group slip shows as an error
    of at least one scale step, ~1e5 times the bound."""
    if not native:
        pytest.skip("native kernels unavailable on this machine")
    g = torch.Generator().manual_seed(0)
    N, K, G = 37, 200, 64  # ragged rows, a short last group
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    s = (2.0 ** torch.randint(-6, 3, (N, -(-K // G)), generator=g)).bfloat16()
    x = torch.randint(-1, 2, (5, K), generator=g).float()
    x[:, 0] = 1.0
    nat = DecodeLinear(q, None, s, G)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    fallback = DecodeLinear(q, None, s, G)
    assert nat.native and not fallback.native
    w = q.double() * s.double().repeat_interleave(G, dim=1)[:, :K]
    exact = F.linear(x.double(), w)
    assert torch.equal(fallback(x).double(), exact)  # sums of these small dyadic numbers are exact in fp32
    # Native: each group's integer dot (times 127, exact in int32 and in fp32 below 2^24) is scaled by the fp32
    # product of the group's scales (w's a power of two, x's fl(1 / 127): one rounding) and summed in fp32
    # lanes: 4 group FMAs and 2 lane additions, each rounding by at most 2^-24 of the running sum of |terms|:
    # |err| <= 8 * 2^-24 * sum_k |w x|.
    bound = 8 * 2.0**-24 * F.linear(x.double().abs(), w.abs())
    err = (nat(x).double() - exact).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("mode", ["bf16", "int4"])
def test_prefill_gemm_is_exact_on_dyadic_inputs(path, mode):
    """The GEMM (from 32 rows) on inputs where every product and partial sum is exact in fp32: x in {-1, 0, 1},
    weights small multiples of powers of two (sums below 2^13 in steps of 2^-6 need 19 bits). So the result must
    equal the fp64 product bit for bit: any tile, panel, K-block or tail slip (M = 133 is 8 tiles of 16 tokens
    and one of 5; M = 50 three of 16 and one of 2; N = 200 is 4 tasks of 48 rows and a ragged one of 8; K = 600
    is 2 blocks of 256 and one of 88) shows as a whole-term error. The small-M paths (M = 5 and 20) are checked
    on the same inputs, and so is torch's path where the CPU sends a bf16 M there."""
    if path == "torch":
        pytest.skip("the fallback computes a bf16 weight's product in bf16 (torch's F.linear), not exactly")
    g = torch.Generator().manual_seed(0)
    N, K, G = 200, 600, 64  # int4: 10 groups, the last one short (600 = 9 * 64 + 24)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    if mode == "bf16":
        w = (q.float() * 2.0 ** torch.randint(-6, 3, (N, 1), generator=g)).bfloat16()
        layer, w64 = DecodeLinear(w, None), w.double()
    else:
        s = (2.0 ** torch.randint(-6, 3, (N, -(-K // G)), generator=g)).bfloat16()
        layer = DecodeLinear(q, None, s, G)
        w64 = q.double() * s.double().repeat_interleave(G, dim=1)[:, :K]
    for M in (5, 20, 50, 133):
        x = torch.randint(-1, 2, (M, K), generator=g).float()
        x[:, 0] = 1.0  # max|x| = 1: the small-M int4 path's int8 rounding of x (to 0, +-127) is exact too
        exact = F.linear(x.double(), w64)
        y = layer(x).double()
        if layer.path(M, x) == "torch":
            # CPUs where oneDNN has native bf16 send this M to torch (native_bf16_max_m): it accumulates the exact
            # terms in fp32 too and rounds the result once, to bf16.
            assert torch.equal(y, exact.bfloat16().double()), f"M={M}: torch's path not rounded once"
        elif mode == "int4" and M < 32:
            # Small-M int4: group sums scaled in fp32 lanes (see test_int4_native_equals_fallback_on_exact_inputs).
            assert bool(((y - exact).abs() <= 8 * 2.0**-24 * F.linear(x.double().abs(), w64.abs())).all())
        else:
            assert torch.equal(y, exact), f"M={M}: worst error {float((y - exact).abs().max())}"


# ----------------------------------------------------------------------------------------------------------------
# Attention of decode-sized passes (kernels/attention.py, csrc/decode_attention.cpp)


def cache_views(B: int, G: int, S: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, G, S, D) bf16 read as the engine reads them: views of a larger (B + 1, G, 2 S + 3, D) cache."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, B + 1, G, 2 * S + 3, D, generator=g).bfloat16()
    return cache[0, 1:, :, :S], cache[1, 1:, :, :S]


def pipeline_attention(q, k, v, allowed, c, divide):
    """The kernel's math in fp64: scores scaled by c, softmax over the allowed keys, the probabilities rounded
    to bf16 as the reference rounds them, their sum with v. -> (out (B, H, T, D), sum_s p |v| of the same shape)."""
    H, G = q.shape[1], k.shape[1]
    k, v = k.double().repeat_interleave(H // G, dim=1), v.double().repeat_interleave(H // G, dim=1)
    s = q.double() @ k.transpose(-1, -2)
    s = (s / c if divide else s * c).masked_fill(~allowed, float("-inf"))
    p = s.softmax(-1).float().bfloat16().double()
    return p @ v, p @ v.abs()


@pytest.mark.parametrize("B,H,G,T,S,D", [(1, 16, 16, 1, 40, 128), (2, 6, 3, 2, 37, 12), (3, 4, 2, 4, 600, 256),
                                         (2, 2, 2, 3, 45, 72), (1, 1, 1, 1, 1, 8), (1, 16, 16, 1, 1030, 128)])
@pytest.mark.parametrize("divide", [False, True])
def test_attn_decode_matches_the_exact_pipeline(path, B, H, G, T, S, D, divide):
    """attn_decode against its own math done in fp64 (pipeline_attention). Each output is rounded once to bf16
    (<= U of itself) after an fp32 sum (<= S * 2^-24 of sum p |v|, with room for the blocked order); the fp32
    softmax lands on the other side of a bf16 rounding boundary from the fp64 one only rarely, so 99% of the
    outputs must be within those two terms and all within one bf16 step of a probability more. Strided q (the
    models' transposed heads) in fp32 and bf16, grouped K/V heads, strided cache views, D not a multiple of 8, S
    not of 8 or of the key blocks, a padding query that sees nothing (its row is uniform, and never used), both
    families' scalings (multiply: LLaMA; divide: CodeGen2)."""
    if path == "torch":
        pytest.skip("attn_decode exists only as a native kernel")
    ops = native_module.ops(native_module.kernel_level())
    k, v = cache_views(B, G, S, D, seed=S + T)
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # (B, H, T, D), strided
    pos = torch.randint(0, S, (B, T), generator=g)
    pos[0, -1] = S - 1
    if B > 1:
        pos[-1, 0] = -1  # a padding query
    allowed = torch.arange(S)[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, S)
    c = D**0.5 if divide else D**-0.5
    seen = pos >= 0
    for qq in (q, q.bfloat16()):
        out = ops.attn_decode(qq, k, v, allowed, c, divide)
        assert out.shape == (B, H, T, D) and out.dtype == torch.bfloat16 and bool(out.isfinite().all())
        ref, mag = pipeline_attention(qq.float(), k, v, allowed, c, divide)
        err = (out.double() - ref).transpose(1, 2)[seen]
        ref, mag = ref.transpose(1, 2)[seen], mag.transpose(1, 2)[seen]
        tight = U * ref.abs() + 2 * S * 2.0**-24 * mag
        assert float((err.abs() <= tight).double().mean()) >= 0.99, float((err.abs() / mag).max())
        assert bool((err.abs() <= tight + 2 * U * mag.amax(-1, keepdim=True)).all())


def test_attn_decode_rejects_bad_inputs(path):
    if path == "torch":
        pytest.skip("attn_decode exists only as a native kernel")
    ops = native_module.ops(native_module.kernel_level())
    k, v = cache_views(1, 2, 8, 16, seed=0)
    q, ok = torch.randn(1, 4, 1, 16), torch.ones(1, 1, 1, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="q must be an fp32 or bf16"):
        ops.attn_decode(q.half(), k, v, ok, 1.0, False)
    with pytest.raises(RuntimeError, match="k must be a bf16 CPU tensor"):
        ops.attn_decode(q, k.float(), v, ok, 1.0, False)
    with pytest.raises(RuntimeError, match="unit stride in D"):
        ops.attn_decode(q, k, v.transpose(2, 3), ok, 1.0, False)
    with pytest.raises(RuntimeError, match="G dividing q's H"):
        ops.attn_decode(torch.randn(1, 3, 1, 16), k, v, ok, 1.0, False)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        ops.attn_decode(q, k, v[:, :, :4], ok, 1.0, False)
    with pytest.raises(RuntimeError, match="allowed must be a bool"):
        ops.attn_decode(q, k, v, ok[..., :4], 1.0, False)
    with pytest.raises(RuntimeError, match="allowed must be a bool"):
        ops.attn_decode(q, k, v, ok.float(), 1.0, False)


# ----------------------------------------------------------------------------------------------------------------
# The LLaMA family's RMSNorm and rotary (kernels/pointwise.py, csrc/decode_pointwise.cpp)


@pytest.mark.parametrize("B,H,G,T,D", [(1, 16, 16, 1, 128), (2, 4, 2, 5, 64), (1, 3, 1, 2, 12), (2, 2, 2, 3, 20)])
def test_rope_is_bit_identical_to_the_module(path, B, H, G, T, D):
    """Rotary on the kernel against models.llama.Rotary (torch's bf16 ops, each product and the sum rounded):
    the same bits, for q and k laid out as the model makes them (transposed views of the projections), cos and
    sin from the model's own tables at scattered positions; D = 12 and 20 run the kernel's scalar tail."""
    from codegen2.kernels.pointwise import NativeRotary
    from codegen2.models.llama import Rotary, rotary_table

    if path == "torch":
        pytest.skip("rope exists only as a native kernel")
    g = torch.Generator().manual_seed(D + T)
    q = (3 * torch.randn(B, T, H, D, generator=g)).bfloat16().transpose(1, 2)  # (B, H, T, D), strided
    k = (3 * torch.randn(B, T, G, D, generator=g)).bfloat16().transpose(1, 2)
    sin, cos = rotary_table(4096, D, 10000.0)
    pos = torch.randint(0, 4096, (B, T), generator=g)
    sin, cos = sin[pos][:, None].bfloat16(), cos[pos][:, None].bfloat16()  # (B, 1, T, D), as Llama.forward
    ref = Rotary()
    mod = NativeRotary(ref, native_module.ops(native_module.kernel_level()))
    for got, want in zip(mod(q, k, cos, sin), ref(q, k, cos, sin)):
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert torch.equal(got, want)
    # What the kernel does not take goes to the module: fp32 tensors, the training path's (T, D) tables.
    for args in ((q.float(), k.float(), cos.float(), sin.float()), (q, k, cos[0, 0], sin[0, 0])):
        for got, want in zip(mod(*args), ref(*args)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("N,D", [(1, 2048), (3, 100), (5, 7), (300, 64)])
def test_rms_norm_matches_the_module(path, N, D):
    """RMSNorm on the kernel against models.llama.RMSNorm in bf16: the same steps in fp32 (sum of squares, 1 /
    sqrt(mean + eps), x * r rounded to bf16, times the weight rounded to bf16); only the sum's order differs, so
    r can differ in its last bit and a result by one bf16 step where x * r falls within ~2^-23 of a rounding tie:
    every result within one step of the module's, all but a few in a thousand identical. Both within two bf16
    roundings of the exact value."""
    from codegen2.kernels.pointwise import NativeRMSNorm
    from codegen2.models.llama import RMSNorm

    if path == "torch":
        pytest.skip("rms_norm exists only as a native kernel")
    g = torch.Generator().manual_seed(N * D)
    ref = RMSNorm(D, 1e-5).bfloat16()
    with torch.no_grad():
        ref.weight.copy_(1 + 0.5 * torch.randn(D, generator=g))
    mod = NativeRMSNorm(ref, native_module.ops(native_module.kernel_level()))
    x = (4 * torch.randn(2, N, D, generator=g)).bfloat16()  # (B, T, D): the wrapper flattens and restores
    with torch.no_grad():
        got, want = mod(x), ref(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    step = torch.where(want == 0, torch.zeros_like(want.float()), 2.0 * U * want.float().abs())
    assert bool(((got.float() - want.float()).abs() <= step).all())
    assert float((got == want).float().mean()) >= 0.995
    xd = x.double()
    exact = ref.weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert bool(((got.double() - exact).abs() <= 2.5 * U * exact.abs() + 1e-30).all())
    # fp32 activations, and autograd (a weight that requires grad, grad mode on), go to the module.
    with torch.no_grad():
        assert torch.equal(mod(x.float()), ref(x.float()))
    assert ref.weight.requires_grad and mod(x).grad_fn is not None


def test_pointwise_ops_reject_bad_inputs(path):
    if path == "torch":
        pytest.skip("rms_norm and rope exist only as native kernels")
    ops = native_module.ops(native_module.kernel_level())
    x, w = torch.randn(2, 8).bfloat16(), torch.ones(8).bfloat16()
    with pytest.raises(RuntimeError, match="rms_norm: x must be a 2-d bf16"):
        ops.rms_norm(x.float(), w, 1e-5)
    with pytest.raises(RuntimeError, match="agree in D"):
        ops.rms_norm(x, w[:4], 1e-5)
    q, c = torch.randn(1, 2, 3, 8).bfloat16(), torch.randn(1, 1, 3, 8).bfloat16()
    with pytest.raises(RuntimeError, match="even D"):
        ops.rope(q[..., :7], q[..., :7], c[..., :7], c[..., :7])
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        ops.rope(q, q, c[:, :, :2], c[:, :, :2])
    with pytest.raises(RuntimeError, match="rope: cos must be a 4-d bf16"):
        ops.rope(q, q, c.float(), c)


def test_prepare_swaps_llama_norms_and_rotary(path):
    """prepare_for_inference wraps the LLaMA family's RMSNorms and rotary where the kernels build (never
    CodeGen2's LayerNorm), and leaves their weights in place."""
    from codegen2.kernels.pointwise import NativeRMSNorm, NativeRotary

    model = tiny_llama()
    norms = [m.weight for m in model.modules() if type(m).__name__ == "RMSNorm"]
    prepare_for_inference(model, None)
    wrapped = [m for m in model.modules() if isinstance(m, NativeRMSNorm | NativeRotary)]
    n = len(model.layers)
    assert len(wrapped) == (3 * n + 1 if path == "native" else 0)  # 2 norms + rotary per layer, the final norm
    if path == "native":
        kept = [m.reference.weight for m in wrapped if isinstance(m, NativeRMSNorm)]
        assert len(kept) == len(norms) and all(a is b for a, b in zip(kept, norms))
    cg = tiny_codegen2()
    prepare_for_inference(cg, None)
    assert not any(isinstance(m, NativeRMSNorm | NativeRotary) for m in cg.modules())


def exact_attention(q, k, v, allowed, scale):
    """fp64 attention with grouped K/V heads: the value both paths approximate."""
    H, G = q.shape[1], k.shape[1]
    k, v = k.double().repeat_interleave(H // G, dim=1), v.double().repeat_interleave(H // G, dim=1)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("family", ["codegen2", "llama"])
@pytest.mark.parametrize("T", [1, 3, 6, 7])
def test_native_attention_matches_the_reference(path, family, T):
    """NativeAttention against the family's own module on decode- and verify-sized passes over a cache view.
    Both round the probabilities to bf16 (each off by <= U of itself) and the output once (U), so against exact
    attention |err| <= U * max|v| + U * |exact| (+ fp32 sums); the native path must meet that bound, and for
    CodeGen2 (the same math in another summation order) agree with the reference to within two such roundings.
    Past MAX_QUERIES queries per head, and for an fp32 cache, the reference itself runs."""
    from codegen2.kernels.attention import MAX_QUERIES, NativeAttention
    from codegen2.models.attention import Fp32Attention, SdpaAttention

    if path == "torch":
        pytest.skip("NativeAttention is only used with the native kernels")
    B, H, G, S, D = 3, 8, (8 if family == "codegen2" else 2), 70, 64
    ref_mod = Fp32Attention(D**0.5) if family == "codegen2" else SdpaAttention(D**-0.5)
    mod = NativeAttention(ref_mod, native_module.ops(native_module.kernel_level()))
    k, v = cache_views(B, G, S, D, seed=T)
    q = torch.randn(B, H, T, D)
    q = q if family == "codegen2" else q.bfloat16()  # CodeGen2's rotary output is fp32, LLaMA's bf16
    pos = torch.tensor([[S - T + t for t in range(T)], [20 + t for t in range(T)], [-1] + [30] * (T - 1)])
    allowed = torch.arange(S)[None, None, None, :] <= pos[:, None, :, None]  # row 2 starts with a padding query
    out, ref = mod(q, k, v, allowed), ref_mod(q, k, v, allowed)
    assert mod.uses_kernels(q, k, v) == (T <= MAX_QUERIES)
    assert out.shape == (B, H, T, D) and out.dtype == torch.bfloat16 and bool(out.isfinite().all())
    if T > MAX_QUERIES:
        assert torch.equal(out, ref)
        return
    seen = pos >= 0  # the padding query's output is never used
    exact = exact_attention(q, k, v, allowed, D**-0.5).transpose(1, 2)[seen]  # (n, H, D)
    vmax = float(v.abs().max())
    err = (out.transpose(1, 2)[seen].double() - exact).abs()
    assert bool((err <= 1.05 * U * vmax + 1.05 * U * exact.abs() + 1e-6).all()), float(err.max())
    if family == "codegen2":
        diff = (out.float() - ref.float()).transpose(1, 2)[seen].abs()
        assert bool((diff <= 2.1 * U * vmax).all()), float(diff.max())
    fp32 = mod(q.float(), k.float(), v.float(), allowed)
    assert torch.equal(fp32, ref_mod(q.float(), k.float(), v.float(), allowed))


def test_prepare_wraps_attention_only_with_the_kernels(path):
    from codegen2.kernels.attention import NativeAttention
    from codegen2.models.attention import Fp32Attention, SdpaAttention

    for model, ref_type in ((tiny_codegen2(), Fp32Attention), (tiny_llama(), SdpaAttention)):
        n = len(model.layers)
        prepare_for_inference(model, "int8")
        wrapped = [m for m in model.modules() if isinstance(m, NativeAttention)]
        assert len(wrapped) == (n if path == "native" else 0)
        assert all(type(m.reference) is ref_type for m in wrapped)
        assert all(type(layer.attention.attend) is (NativeAttention if path == "native" else ref_type)
                   for layer in model.layers)


@pytest.mark.parametrize("family", ["codegen2", "llama"])
def test_prepared_model_decodes_like_the_reference(path, family):
    """A bf16 model decoding token by token over a KV cache, prepared (native linears and attention) and
    unprepared (torch's bf16 ops), each against the same weights in fp32: the prepared model is no farther from
    the fp32 logits than the unprepared one (both are bf16 pipelines; their noise depends on the CPU's torch
    kernels, so a fixed tolerance between the two failed on Zen 3), and it picks the fp32 model's greedy token
    wherever the fp32 top-2 margin is wider than twice that noise."""
    from codegen2.models.kv_cache import KVCache

    make = tiny_codegen2 if family == "codegen2" else tiny_llama
    model, ref, exact = make(), make(), make().float()
    prepare_for_inference(model, None)
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    outs = []
    for m, dtype in ((ref, torch.bfloat16), (model, torch.bfloat16), (exact, torch.float32)):
        cache = KVCache(cfg.n_layers, 2, cfg.n_kv_heads, 64, cfg.head_dim, dtype)
        with torch.inference_mode():
            m(tokens[:, :30], torch.arange(30).expand(2, 30), cache)
            steps = [m(tokens[:, t:t + 1], torch.full((2, 1), t), cache) for t in range(30, 40)]
        outs.append(torch.cat(steps, 1).float())
    ref_out, out, want = outs
    noise = float((ref_out - want).abs().max())
    assert 0 < noise < 0.05 * float(want.abs().max())  # a bf16 pipeline's noise, not a broken reference
    assert float((out - want).abs().max()) <= 1.5 * noise
    assert float((out - want).pow(2).mean()) <= 1.5**2 * float((ref_out - want).pow(2).mean())
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * 1.5 * noise
    assert bool(clear.any())
    assert torch.equal(out.argmax(-1)[clear], want.argmax(-1)[clear])


# ----------------------------------------------------------------------------------------------------------------
# Whole models


def tiny_codegen2() -> CodeGen2:
    torch.manual_seed(0)
    model = CodeGen2(CodeGen2Config(n_layers=2, dim=64, n_heads=4, rotary_dim=8, vocab_size=51200, max_seq_len=256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.to(torch.bfloat16).eval()


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=176, vocab_size=512,
                              max_seq_len=256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.08)
    return model.to(torch.bfloat16).eval()


@pytest.mark.parametrize("T", [9, 40])  # decode-sized and prefill-sized M
def test_prepare_bf16_model_matches(path, T):
    model = tiny_codegen2()
    tokens = torch.randint(0, 51200, (1, T))
    with torch.no_grad():
        ref = model(tokens)
        swap_linears(model, "bf16")
        assert not any(type(m) is nn.Linear for m in model.modules())
        out = model(tokens)
    # Same weights, fp32 accumulation on both sides: only rounding-order differences, amplified a little by 2
    # layers. Logits are O(1) here.
    torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
    assert bool((out.argmax(-1) == ref.argmax(-1)).all())


def test_prepare_int8_model_greedy(path):
    model = tiny_codegen2()
    tokens = torch.randint(0, 51200, (2, 16))
    wqkv = weakref.ref(model.layers[0].attention.wqkv.weight)
    with torch.no_grad():
        ref = model(tokens)
        prepare_for_inference(model, "int8")
        out = model(tokens)
    gc.collect()
    assert wqkv() is None, "the bf16 weight of a quantized Linear must be freed"
    assert all(m.weight.dtype == torch.int8 for m in model.modules() if isinstance(m, DecodeLinear))
    # Rule: greedy argmax equal on >= 90% of positions, and where it differs the reference's choice is within
    # 0.1 (a few quantization steps of these ~N(0, 1) logits) of the top logit.
    agree = out.argmax(-1) == ref.argmax(-1)
    assert float(agree.float().mean()) >= 0.9
    picked = out.gather(-1, ref.argmax(-1, keepdim=True)).squeeze(-1)
    assert bool((out.amax(-1) - picked)[~agree].le(0.1).all())
    assert float((out - ref).abs().max()) < 0.25


def test_prepare_int4_model_error(path):
    """int4 on a random model: argmax is no useful rule (these logits are nearly tied; benchmarks/quant_greedy.py
    measures greedy output on a trained model), so the bound is on the relative RMS error of the logits.
    Per weight: |err| <= step / 2 with step = max|w_group| / 7, RMS step / sqrt(12); the largest of 32 N(0, s)
    weights stays below ~3 s, so each product's relative RMS error is <= 3 / 7 / 3.46 = 0.124. Five products in
    a chain (qkv, out, two FFN, output), errors adding in quadrature: sqrt(5) * 0.124 = 0.28 -> bound 0.3.
    Measured 0.19; a nibble, group or scale slip gives ~1."""
    model = tiny_codegen2()
    tokens = torch.randint(0, 51200, (2, 16))
    with torch.no_grad():
        ref = model(tokens).float()
        prepare_for_inference(model, "int4")
        out = model(tokens).float()
    layers = [m for m in model.modules() if isinstance(m, DecodeLinear)]
    assert layers and all(m.mode == "int4" and m.weight.dtype == torch.uint8 for m in layers)
    rel = float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert rel <= 0.3, rel


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_prepare_tied_embeddings(path, mode):
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layers=1, dim=64, n_heads=4, intermediate_size=176, vocab_size=51200, max_seq_len=64,
                      tie_word_embeddings=True)
    model = Llama(cfg).to(torch.bfloat16).eval()
    emb = model.tok_embeddings.weight
    emb_before = emb.detach().clone()
    tokens = torch.randint(0, 51200, (1, 5))
    with torch.no_grad():
        ref = model(tokens)
        swap_linears(model, mode)
        out = model(tokens)
    assert model.tok_embeddings.weight is emb and torch.equal(emb.detach(), emb_before)  # embedding untouched
    if mode == "bf16":
        assert model.output.weight is emb  # still tied: one copy
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
    elif mode == "int8":
        assert model.output.weight.dtype == torch.int8
        # Logits reach ~60 here (unit-variance embeddings); int8 rows carry ~0.5% error.
        assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max())
    else:
        assert model.output.weight.dtype == torch.uint8
        # int4 groups: relative RMS error per product <= 0.124 (test_prepare_int4_model_error), two products.
        rel = float((out - ref).float().pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt())
        assert rel <= 0.2, rel


@pytest.mark.parametrize("family", ["codegen2", "llama"])
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_fused_products_give_the_same_numbers(path, family, mode):
    """Layers that take one input, computed as one product (LLaMA: q/k/v and gate/up; CodeGen2: qkv with fc_in),
    give bit-identical logits to the same layers called one by one: decode over a KV cache (1 and 3 rows) and a
    prompt of 2 x 40 rows (the GEMM). The members become ProductSlices over one DecodeLinear per group, and the
    separate weights are freed. (Where a prompt-sized product goes to torch instead, on CPUs with a native
    bf16 matmul, the logits need only agree within bf16 rounding: oneDNN may block the rows differently.)"""
    from codegen2.kernels import ProductSlice
    from codegen2.models.kv_cache import KVCache

    make = tiny_codegen2 if family == "codegen2" else tiny_llama
    quant = None if mode == "bf16" else mode
    plain, fused = prepare_for_inference(make(), quant, fuse=False), make()
    old = weakref.ref(fused.layers[0].feed_forward.w1.weight)
    prepare_for_inference(fused, quant)
    slices = [m for m in fused.modules() if isinstance(m, ProductSlice)]
    if path == "torch":  # nothing native: nothing fused
        assert not slices
        return
    groups = {"codegen2": 1, "llama": 2}[family] * fused.config.n_layers
    assert len(slices) == {"codegen2": 2, "llama": 5}[family] * fused.config.n_layers
    assert len({id(m.product) for m in slices}) == groups and all(m.product.mode == mode for m in slices)
    gc.collect()
    assert old() is None, "a fused layer's separate weight must be freed"
    cfg = fused.config
    tokens = torch.randint(0, cfg.vocab_size, (2, 44), generator=torch.Generator().manual_seed(3))
    outs = []
    for m in (plain, fused):
        cache = KVCache(cfg.n_layers, 2, cfg.n_kv_heads, 64, cfg.head_dim, torch.bfloat16)
        with torch.inference_mode():
            steps = [m(tokens[:, :40], torch.arange(40).expand(2, 40), cache)]
            steps.append(m(tokens[:, 40:41], torch.full((2, 1), 40), cache))
            steps.append(m(tokens[:, 41:44], torch.arange(41, 44).expand(2, 3), cache))
        outs.append(torch.cat(steps, 1))
    if all(m.product.path(80) == "native" for m in slices):
        assert torch.equal(outs[0], outs[1])
    else:
        torch.testing.assert_close(outs[1], outs[0], rtol=0.02, atol=0.02)


def test_product_slices_are_right_in_any_order_and_thread():
    """A member called alone, out of order, or with another input than the one its group last saw computes its
    own columns correctly (the group's product is keyed by the input tensor, per thread)."""
    import threading

    from codegen2.kernels import ProductSlice, fuse_shared_input_linears

    if not kernels_available():
        pytest.skip("native kernels unavailable on this machine")
    model = tiny_llama()
    attn = model.layers[0].attention
    want = [lin.weight.detach().float() for lin in (attn.wq, attn.wk, attn.wv)]
    swap_linears(model, "bf16")
    assert fuse_shared_input_linears(model) == 2 * model.config.n_layers
    assert fuse_shared_input_linears(model) == 0  # already fused: nothing left to do
    members = [attn.wq, attn.wk, attn.wv]
    assert all(isinstance(m, ProductSlice) for m in members)
    x1, x2 = (torch.randn(3, 64, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (1, 2))

    def check(member: int, x: torch.Tensor) -> None:
        ref = x.float() @ want[member].T
        assert float((members[member](x).float() - ref).abs().max()) <= 0.02 * float(ref.abs().max())

    with torch.inference_mode():
        for member, x in ((2, x1), (0, x2), (0, x1), (1, x1), (2, x2), (1, x2), (1, x2)):
            check(member, x)
        errors = []

        def worker(x: torch.Tensor) -> None:
            try:
                for _ in range(50):
                    for member in (0, 1, 2):
                        check(member, x)
            except AssertionError as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(x,)) for x in (x1, x2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_fusion_keeps_adapted_and_mixed_groups_apart():
    """A group with a LoRA-wrapped member, or with members of different formats, stays as separate layers."""
    from codegen2.kernels import ProductSlice, fuse_shared_input_linears
    from codegen2.models.lora import add_lora

    if not kernels_available():
        pytest.skip("native kernels unavailable on this machine")
    model = add_lora(tiny_llama(), rank=2, alpha=2.0, targets=["wq"])
    swap_linears(model, "bf16")
    ffn = model.layers[0].feed_forward
    ffn.w3 = DecodeLinear.from_linear(nn.Linear(64, 176).bfloat16(), "int8")
    assert fuse_shared_input_linears(model) == 1  # layer 1's gate/up only
    assert not any(isinstance(m, ProductSlice) for m in model.layers[0].modules())
    assert isinstance(model.layers[1].feed_forward.w1, ProductSlice)
    with pytest.raises(ValueError, match="multiple of 4"):
        DecodeLinear.cat([DecodeLinear.from_linear(nn.Linear(8, 6).bfloat16()),
                          DecodeLinear.from_linear(nn.Linear(8, 4).bfloat16())])


def test_prepare_rejects_unknown_formats_and_a_second_preparation():
    with pytest.raises(ValueError, match="quant must be one of none, int8, int4"):
        prepare_for_inference(tiny_codegen2(), "int3")
    with pytest.raises(ValueError, match="mode must be"):
        swap_linears(nn.Sequential(nn.Linear(4, 4)), "int3")
    model = prepare_for_inference(tiny_codegen2(), "int8")
    with pytest.raises(ValueError, match="already prepared"):
        prepare_for_inference(model, "int8")


def test_prepare_picks_the_kernels_by_weights_and_availability(path):
    """quant=None: a bf16 CPU model gets the native bf16 layers when they exist, anything else stays plain;
    int8 always quantizes (with the fallback where there is no native kernel)."""
    bf16 = prepare_for_inference(tiny_codegen2(), None)
    swapped = [m for m in bf16.modules() if isinstance(m, DecodeLinear)]
    assert bool(swapped) == (path == "native") and all(m.mode == "bf16" and m.native for m in swapped)
    fp32 = prepare_for_inference(tiny_codegen2().float(), "none")
    assert not any(isinstance(m, DecodeLinear) for m in fp32.modules())
    int8 = prepare_for_inference(tiny_codegen2().float(), "int8")
    layers = [m for m in int8.modules() if isinstance(m, DecodeLinear)]
    assert layers and all(m.mode == "int8" and m.native == (path == "native") for m in layers)


@pytest.mark.parametrize("max_m,dequant", [(16, 32), (2, 32), (None, None)])
def test_path_by_rows_and_cpu(path, monkeypatch, max_m, dequant):
    """Where oneDNN has native bf16, bf16 products of more than 16 rows (AVX512-BF16) or 2 rows (AMX) go to
    torch and int8 / int4 products of 32 rows or more to "dequant"; so int8 / int4 decode (fewer than 32 rows)
    computes the same numbers on every x86 CPU. Elsewhere (None) every M takes our kernels."""
    monkeypatch.setattr(linear_module, "native_bf16_max_m", lambda: max_m)
    monkeypatch.setattr(linear_module, "native_dequant_min_m", lambda: dequant)
    bf16 = DecodeLinear.from_linear(make_linear(8, 32, bias=False), "bf16")
    int8 = DecodeLinear.from_linear(make_linear(8, 32, bias=False), "int8")
    int4 = DecodeLinear.from_linear(make_linear(8, 32, bias=False), "int4")
    x = torch.randn(40, 32).bfloat16()
    if max_m is None:
        assert [bf16.path(m, x) for m in (1, 16, 17, 40, 1024)] == [path] * 5
    else:
        assert [bf16.path(m, x) for m in (1, max_m, max_m + 1, 40)] == [path, path, "torch", "torch"]
    prompt = "dequant" if path == "native" and dequant else path
    for layer in (int8, int4):
        assert [layer.path(m, x) for m in (1, 16, 31, 32, 1024)] == [path] * 3 + [prompt] * 2


def test_bf16_crossover_follows_the_cpu_flags(monkeypatch):
    """The bf16 crossover comes from the flags: AMX 2 rows, AVX512-BF16 alone 16, neither any M."""
    base = frozenset({"avx2", "fma", "avx512f"})
    for extra, want in (({"amx_bf16", "avx512_bf16"}, 2), ({"avx512_bf16"}, 16), (set(), None)):
        monkeypatch.setattr(native_module, "cpu_flags", lambda extra=extra: base | extra)
        assert native_module.native_bf16_max_m() == want


# ----------------------------------------------------------------------------------------------------------------
# Selection of the path


def test_level_detection_and_override(monkeypatch):
    """The highest level whose flags the CPU has; CODEGEN2_KERNEL_LEVEL forces a lower one and refuses one the CPU
    lacks, naming the missing flags (checked against made-up flag sets, so it runs on any machine)."""
    avx2_only = frozenset({"avx2", "fma", "sse4_2"})
    zen5 = avx2_only | LEVELS["avx512_vnni"][0] | {"avx512_bf16", "avx_vnni"}
    monkeypatch.setattr(native_module, "cpu_supported", lambda: True)
    monkeypatch.delenv(kernels.LEVEL_VAR, raising=False)
    monkeypatch.setattr(native_module, "cpu_flags", lambda: zen5)
    assert native_module.supported_levels() == list(LEVELS) and native_module.kernel_level() == "avx512_bf16"
    monkeypatch.setenv(kernels.LEVEL_VAR, "avx2")
    assert native_module.kernel_level() == "avx2"
    monkeypatch.delenv(kernels.LEVEL_VAR)
    # AVX-VNNI without AVX-512 (e.g. Alder Lake) and AVX-512 without VNNI (Skylake-SP) each get their own level.
    monkeypatch.setattr(native_module, "cpu_flags", lambda: avx2_only | {"avx_vnni"})
    assert native_module.supported_levels() == ["avx2", "avx_vnni"] and native_module.kernel_level() == "avx_vnni"
    monkeypatch.setattr(native_module, "cpu_flags", lambda: avx2_only | {"avx512f", "avx512bw", "avx512vl", "avx512dq"})
    assert native_module.supported_levels() == ["avx2", "avx512"] and native_module.kernel_level() == "avx512"
    monkeypatch.setattr(native_module, "cpu_flags", lambda: avx2_only)
    assert native_module.supported_levels() == ["avx2"] and native_module.kernel_level() == "avx2"
    monkeypatch.setenv(kernels.LEVEL_VAR, "avx512_vnni")
    with pytest.raises(ValueError, match="lacks avx512_vnni, avx512bw, avx512dq, avx512f, avx512vl; it supports avx2"):
        native_module.kernel_level()
    monkeypatch.setenv(kernels.LEVEL_VAR, "sse2")
    with pytest.raises(ValueError, match="unknown level"):
        native_module.kernel_level()


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_every_level_computes_the_same_numbers(native, monkeypatch, mode):
    """Dispatch: a layer built under each level the CPU has (forced with CODEGEN2_KERNEL_LEVEL) records that level
    and gives the same output as the highest level; int8 / int4 bit for bit (identical integer dots, the same
    fp32 steps), bf16 within fp32 summation noise (the compiler may contract differently per level). Each level
    is also held to the fp32 bounds above by the `path` fixture."""
    levels = native_module.supported_levels()
    if not native or not levels:
        pytest.skip("native kernels unavailable on this machine")
    lin = make_linear(300, 200, bias=True, seed=3)
    x = torch.randn(5, 200).bfloat16()
    outs = {}
    for level in levels:
        monkeypatch.setenv(kernels.LEVEL_VAR, level)
        layer = DecodeLinear.from_linear(lin, mode)
        assert layer.native and layer.level == level
        outs[level] = layer(x).float()
    top = outs[levels[-1]]
    for level, y in outs.items():
        if mode == "bf16":
            torch.testing.assert_close(y, top, rtol=U, atol=1e-3, msg=level)
        else:
            assert torch.equal(y, top), level


def test_env_var_forces_fallback(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert not kernels_available()
    assert not DecodeLinear.from_linear(make_linear(8, 16, bias=False)).native


def test_failed_build_warns_once_and_falls_back(tmp_path):
    """A fresh process with a broken source file: one warning, no exception, a working fallback layer."""
    if not native_module.cpu_supported():
        pytest.skip("no build is attempted on this CPU")
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    code = f"""
import warnings, torch
from pathlib import Path
from codegen2.kernels import native, DecodeLinear
native._SOURCES = [Path({str(bad)!r})]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok = [native.kernels_available() for _ in range(3)]
    layer = DecodeLinear.from_linear(torch.nn.Linear(16, 8).bfloat16(), "int8")
    y = layer(torch.randn(2, 16).bfloat16())
assert ok == [False] * 3, ok
assert not layer.native and y.shape == (2, 8)
mine = [w for w in caught if "codegen2 kernels unavailable" in str(w.message)]
assert len(mine) == 1, [str(w.message) for w in caught]
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != kernels.ENV_VAR}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
