"""The native CPU kernels (``csrc/decode_linear.cpp``): which CPUs can run them, building and loading them once
per CPU level, and the int8 / int4 weight layouts they read.

Levels (``LEVELS``, lowest first): the one source is compiled once per level with that level's compiler flags,
into its own op namespace (``torch.ops.codegen2_kernels_<level>``), on first use with ``torch.utils.cpp_extension``
(needs a C++ compiler and ninja), cached under ``~/.cache/codegen2/kernels``. The level used is the highest one
whose flags the CPU has (``/proc/cpuinfo``): avx2, avx_vnni, avx512, avx512_vnni, avx512_bf16;
``CODEGEN2_KERNEL_LEVEL=<level>`` forces a lower one (a level the CPU lacks is refused with a ValueError naming the
missing flags), so one machine can test every level it has.
A failed build warns once and ``kernels_available()`` answers False, so callers fall back to PyTorch. Set
``CODEGEN2_KERNELS=torch`` to force that fallback (for comparisons and debugging).

What this is not: the layers that use the kernels (``linear.py``) or the choice of which layers do.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ENV_VAR = "CODEGEN2_KERNELS"  # "torch" forces the pure-PyTorch path
LEVEL_VAR = "CODEGEN2_KERNEL_LEVEL"  # forces a level (at most what the CPU has)
# One library per level from the three sources: the linear layers, the attention products and the pointwise
# steps (each a fragment of the same op namespace).
_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("decode_linear.cpp", "decode_attention.cpp", "decode_pointwise.cpp")]
_CFLAGS = ["-O3", "-fopenmp"]
# level -> (the /proc/cpuinfo flags it needs, its compiler flags). Every level needs AVX2 + FMA; the one used is
# the last in this order whose flags the CPU has (avx_vnni is not part of the AVX-512 levels: CPUs with AVX-512
# take those). What a level changes in the code is said at the top of decode_linear.cpp.
_AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"})
_AVX512_CFLAGS = ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
LEVELS: dict[str, tuple[frozenset[str], list[str]]] = {
    "avx2": (frozenset({"avx2", "fma"}), ["-mavx2", "-mfma"]),
    "avx_vnni": (frozenset({"avx2", "fma", "avx_vnni"}), ["-mavx2", "-mfma", "-mavxvnni"]),
    "avx512": (_AVX512, _AVX512_CFLAGS),
    "avx512_vnni": (_AVX512 | {"avx512_vnni"}, [*_AVX512_CFLAGS, "-mavx512vnni"]),
    "avx512_bf16": (_AVX512 | {"avx512_vnni", "avx512_bf16"}, [*_AVX512_CFLAGS, "-mavx512vnni", "-mavx512bf16"]),
}
PACK_ROWS, PACK_COLS = 4, 16  # the int8 layout of csrc/decode_linear.cpp
INT4_CHUNK = 32  # int4: columns per packed chunk (two nibbles of 16 bytes per row)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo), e.g. {'avx2', 'fma', 'avx512_bf16', ...}."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    # No /proc (not Linux): trust torch's own dispatch level, which implies AVX2 + FMA.
    cap = torch.backends.cpu.get_cpu_capability()
    return frozenset({"avx2", "fma"}) if cap in ("AVX2", "AVX512") else frozenset()


def cpu_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and LEVELS["avx2"][0] <= cpu_flags()


def supported_levels() -> list[str]:
    """The levels this CPU can run, lowest first (empty off x86-64 or without AVX2 + FMA)."""
    if not cpu_supported():
        return []
    return [name for name, (flags, _) in LEVELS.items() if flags <= cpu_flags()]


def kernel_level() -> str | None:
    """The level the native kernels use here: CODEGEN2_KERNEL_LEVEL if set, else the highest the CPU has (None:
    no level runs here). Raises ValueError for an unknown level or one the CPU lacks, naming the missing flags."""
    forced = os.environ.get(LEVEL_VAR, "").strip().lower()
    if not forced:
        levels = supported_levels()
        return levels[-1] if levels else None
    if forced not in LEVELS:
        raise ValueError(f"{LEVEL_VAR}={forced!r}: unknown level; use one of {', '.join(LEVELS)}")
    missing = sorted(LEVELS[forced][0] - cpu_flags())
    if missing or not cpu_supported():
        raise ValueError(f"{LEVEL_VAR}={forced!r}: this CPU lacks {', '.join(missing) or 'x86-64'}; it supports "
                         f"{', '.join(supported_levels()) or 'no native level'}")
    return forced


def ops(level: str):
    """The op namespace of a level's build, torch.ops.codegen2_kernels_<level> (load it first: load_level)."""
    return getattr(torch.ops, f"codegen2_kernels_{level}")


def native_bf16_max_m() -> int | None:
    """The most rows a bf16 product may have to take our native kernel rather than torch's F.linear; None: any M.

    Where oneDNN has native bf16 matmul, torch beats our fp32-accumulating kernels once a product has a few rows:
    - AMX (amx_bf16): from 4 rows. Measured on an AMX Xeon (2 threads, quiet; ms ours / torch, 1B shapes):
      6144x2048 M=2 0.97/1.61, M=4 2.54/1.78, M=16 8.76/2.10; 8192x2048 M=2 2.45/3.19, M=4 3.12/2.68, M=16
      13.0/2.97; 2048x8192 M=2 2.18/2.85, M=4 3.90/3.23; M=3 is a tie. So up to 2 rows.
    - AVX512-BF16 without AMX: up to 16 rows. Our vdpbf16ps kernel (level avx512_bf16) against oneDNN on Zen 5
      (2 threads, 8192x2048, GB/s, interleaved): M=1 33-44 / 15-22, M=4 27-31 / 19-28, M=16 17-20 / 15-19;
      for 64-row products oneDNN reached 260-360 GFLOP/s on a Zen 4 against ~90 for our GEMM.
    - Neither (AVX2 CPUs): torch's bf16 F.linear runs at ~5 GMAC/s, so always ours.
    """
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return 2
    if "avx512_bf16" in flags:
        return 16
    return None


def native_dequant_min_m() -> int | None:
    """From how many rows an int8 / int4 product dequantizes its weight to bf16 (a few MiB of rows at a time, our
    dequant ops) and calls torch's F.linear; None: never, every M takes our integer / fp32 kernels.

    Only where oneDNN has native bf16 (AVX512-BF16 or AMX). Measured on Zen 5 (AVX512-BF16, 2 threads, 6144x2048,
    ms ours / dequantize + oneDNN): int8 M=16 1.58/2.25, M=32 2.90/2.82, M=64 5.39/3.62, M=256 21.2/8.8; int4
    M=16 2.46/2.96, M=32 4.92/3.38, M=256 31.5/9.2. So from 32 rows: prompts (prefill chunks) take this path,
    16 concurrent decodes do not.
    """
    return 32 if native_bf16_max_m() is not None else None


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "codegen2" / "kernels"
    return Path(root) / f"torch-{torch.__version__}"


def _clear_stale_lock(build_dir: Path, max_age_s: float = 600.0) -> None:
    # cpp_extension guards a build with a lock file and waits forever on one left by a killed process.
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
    except OSError:
        pass


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> (ceil(N/4), ceil(K/16), 4, 16) with w[b, c, r, j] = q[4b + r, 16c + j], zero padded.

    Each block of 4 rows is stored chunk by chunk, so the kernel reads a thread's rows as one sequential stream.
    """
    N, K = q.shape
    Np, Kp = -(-N // PACK_ROWS) * PACK_ROWS, -(-K // PACK_COLS) * PACK_COLS
    padded = torch.zeros(Np, Kp, dtype=torch.int8, device=q.device)
    padded[:N, :K] = q
    return padded.view(Np // PACK_ROWS, PACK_ROWS, Kp // PACK_COLS, PACK_COLS).transpose(1, 2).contiguous()


def unpack_int8(w: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of pack_int8 (a strided view where possible): (Nb, Kc, 4, 16) -> (N, K)."""
    Nb, Kc = w.shape[:2]
    return w.transpose(1, 2).reshape(Nb * PACK_ROWS, Kc * PACK_COLS)[:N, :K]


def pack_int4(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) int8 in [-8, 7] and (N, ceil(K/G)) scales -> the kernel's layout:

    weight (ceil(N/4), Kp/32, 4, 16) uint8, w[b, c, r, j] = (q[4b+r, 32c+j] + 8) | (q[4b+r, 32c+16+j] + 8) << 4,
    with K zero padded to Kp = a multiple of G (a padded q of 0 is stored as 8); scale (ceil(N/4), Kp/G, 4) bf16,
    s[b, g, r] = scale[4b + r, g] (0 in padded rows). Like int8, each thread's rows are one sequential stream.
    """
    N, K = q.shape
    Np, Kp = -(-N // PACK_ROWS) * PACK_ROWS, -(-K // group_size) * group_size
    padded = torch.zeros(Np, Kp, dtype=torch.uint8, device=q.device)
    padded[:N, :K] = (q + 8).to(torch.uint8)
    padded[:N, K:] = 8
    chunks = padded.view(Np // PACK_ROWS, PACK_ROWS, Kp // INT4_CHUNK, 2, 16)  # (Nb, 4, Kc, lo/hi, 16)
    w = (chunks[:, :, :, 0] | (chunks[:, :, :, 1] << 4)).transpose(1, 2).contiguous()  # (Nb, Kc, 4, 16)
    s = torch.zeros(Np, Kp // group_size, dtype=torch.bfloat16, device=q.device)
    s[:N] = scale
    return w, s.view(Np // PACK_ROWS, PACK_ROWS, -1).transpose(1, 2).contiguous()


def unpack_int4(w: torch.Tensor, scale: torch.Tensor, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_int4: -> (N, K) int8 in [-8, 7] and (N, Kp/G) bf16 scales."""
    Nb, Kc = w.shape[:2]
    nib = torch.stack([w & 0x0F, w >> 4], dim=3)  # (Nb, Kc, 4, lo/hi, 16)
    q = nib.permute(0, 2, 1, 3, 4).reshape(Nb * PACK_ROWS, Kc * INT4_CHUNK)[:N, :K].to(torch.int8) - 8
    return q, scale.transpose(1, 2).reshape(Nb * PACK_ROWS, -1)[:N]


def _self_test(level: str) -> bool:
    """A tiny product per op against fp32 torch: catches a miscompiled or mismatched library before it is used."""
    g = torch.Generator().manual_seed(0)
    lib = ops(level)
    x = torch.randn(3, 40, generator=g).bfloat16()
    w = torch.randn(5, 40, generator=g).bfloat16()
    ref = F.linear(x.float(), w.float())
    y = lib.linear_bf16(x, w, None).float()
    q = torch.randint(-127, 128, (5, 40), generator=g, dtype=torch.int8)
    s = torch.rand(5, generator=g)
    ref8 = F.linear(x.float(), q.float() * s[:, None])
    y8 = lib.linear_int8(x, pack_int8(q), s, None).float()
    q4 = torch.randint(-8, 8, (5, 40), generator=g, dtype=torch.int8)
    s4 = torch.rand(5, 2, generator=g).bfloat16()
    # int4 quantizes x to int8 per group of 32: integers with a group maximum of 127 quantize exactly.
    x4 = torch.randint(-127, 128, (3, 40), generator=g).float()
    x4[:, [0, 32]] = 127.0
    ref4 = F.linear(x4, q4.float() * s4.float().repeat_interleave(32, dim=1)[:, :40])
    y4 = lib.linear_int4(x4.bfloat16(), *pack_int4(q4, s4, 32), None, 5).float()
    close = all(torch.allclose(a, b, rtol=1e-2, atol=1e-2) for a, b in ((y, ref), (y8, ref8), (y4, ref4)))
    d8 = lib.dequant_int8(pack_int8(q), s, 0, 2, 5, 40)  # blocks 0..1 hold rows 0..4
    d4 = lib.dequant_int4(*pack_int4(q4, s4, 32), 1, 2, 5, 40)  # block 1 holds row 4
    exact = torch.equal(d8, (q.float() * s[:, None]).bfloat16()) and torch.equal(
        d4, (q4[4:].float() * s4[4:].float().repeat_interleave(32, dim=1)[:, :40]).bfloat16())
    qa = torch.randn(1, 4, 3, 12, generator=g)  # (B, H, T, D): D not a multiple of 8, S not of 4, 2 K/V heads
    ka, va = torch.randn(2, 1, 2, 11, 12, generator=g).bfloat16()
    ok = torch.arange(11)[None, None, None, :] <= torch.tensor([4, 9, 10])[None, None, :, None]  # (1, 1, 3, 11)
    att = lib.attn_decode(qa, ka, va, ok, 2.0, True).float()
    s = (qa @ ka.float().repeat_interleave(2, 1).transpose(-1, -2) / 2.0).masked_fill(~ok, float("-inf"))
    ref = s.softmax(-1) @ va.float().repeat_interleave(2, 1)
    close = close and torch.allclose(att, ref, rtol=2e-2, atol=2e-2)
    xn, wn = torch.randn(2, 20, generator=g).bfloat16(), torch.randn(20, generator=g).bfloat16()
    hn = xn.float() * torch.rsqrt(xn.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    close = close and torch.allclose(lib.rms_norm(xn, wn, 1e-5).float(), (wn * hn.bfloat16()).float(), rtol=2e-2,
                                     atol=2e-2)
    qr, kr = torch.randn(1, 3, 2, 20, generator=g).bfloat16(), torch.randn(1, 1, 2, 20, generator=g).bfloat16()
    cr, sr = torch.randn(2, 1, 1, 2, 20, generator=g).bfloat16()
    rot = [x * cr + torch.cat((-x[..., 10:], x[..., :10]), -1) * sr for x in (qr, kr)]
    exact = exact and all(torch.equal(a, b) for a, b in zip(lib.rope(qr, kr, cr, sr), rot))
    return close and exact


def _register_fake(level: str) -> None:
    # Shapes for torch.compile / meta tensors; the ops themselves are CPU-only.
    ns = f"codegen2_kernels_{level}"

    @torch.library.register_fake(f"{ns}::linear_bf16")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake(f"{ns}::linear_int8")
    def _(x, w, scale, bias):
        return x.new_empty(x.shape[0], scale.shape[0])  # w is packed; scale has one entry per output

    @torch.library.register_fake(f"{ns}::linear_int4")
    def _(x, w, scale, bias, N):
        return x.new_empty(x.shape[0], N)

    @torch.library.register_fake(f"{ns}::attn_decode")
    def _(q, k, v, allowed, scale, divide):
        return q.new_empty(q.shape, dtype=torch.bfloat16)

    @torch.library.register_fake(f"{ns}::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake(f"{ns}::rope")
    def _(q, k, cos, sin):
        return torch.empty_like(q), torch.empty_like(k)

    for op in ("dequant_int8", "dequant_int4"):
        @torch.library.register_fake(f"{ns}::{op}")
        def _(w, scale, b0, b1, N, K):
            return w.new_empty(max(0, min(N, 4 * b1) - 4 * b0), K, dtype=torch.bfloat16)


@functools.cache
def load_level(level: str) -> bool:
    """Build (once, cached on disk) and load one level's kernels; False, with one warning, if that fails.
    The caller checks that the CPU has the level (kernel_level, supported_levels)."""
    try:
        if not hasattr(ops(level), "linear_bf16"):  # not already loaded in this process
            from torch.utils import cpp_extension

            build_dir = _build_dir() / level
            build_dir.mkdir(parents=True, exist_ok=True)
            _clear_stale_lock(build_dir)
            t0 = time.perf_counter()
            cpp_extension.load(name=f"codegen2_kernels_{level}", sources=[str(p) for p in _SOURCES],
                               extra_cflags=_CFLAGS + LEVELS[level][1] + [f"-DCG2_OPS=codegen2_kernels_{level}"],
                               extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False,
                               verbose=False)
            log.info("codegen2 kernels: level %s loaded from %s in %.1f s", level, build_dir,
                     time.perf_counter() - t0)
            _register_fake(level)
        if not _self_test(level):
            raise RuntimeError("self-test mismatch against torch")
        return True
    except Exception as e:  # noqa: BLE001 - any failure (no compiler, no ninja, bad build) means: fall back
        detail = str(e).strip()
        if len(detail) > 600:  # a compiler log; its end says what went wrong
            detail = "..." + detail[-600:]
        warnings.warn(f"codegen2 kernels unavailable, using the PyTorch fallback: {type(e).__name__}: {detail}",
                      RuntimeWarning, stacklevel=2)
        return False


def kernels_available() -> bool:
    """Whether the native fast path is active (builds it on the first call unless CODEGEN2_KERNELS=torch).
    Raises ValueError where CODEGEN2_KERNEL_LEVEL names a level this CPU cannot run."""
    if os.environ.get(ENV_VAR, "").strip().lower() == "torch":
        return False
    level = kernel_level()
    if level is None:
        log.info("codegen2 kernels: CPU lacks AVX2/FMA or is not x86-64; using the PyTorch fallback")
        return False
    return load_level(level)
