"""The native CPU kernels (``csrc/decode_linear.cpp``): which CPUs can run them, building and loading them once,
and the int8 weight layout they read.

The library is compiled on first use with ``torch.utils.cpp_extension`` (needs a C++ compiler and ninja) and
cached under ``~/.cache/codegen2/kernels``; it needs x86-64 with AVX2 + FMA. A failed build warns once and
``kernels_available()`` answers False, so callers fall back to PyTorch; it never raises. Set
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
_SOURCE = Path(__file__).parent / "csrc" / "decode_linear.cpp"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
PACK_ROWS, PACK_COLS = 4, 16  # the int8 layout of csrc/decode_linear.cpp


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
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu_flags()


def has_fast_bf16_gemm() -> bool:
    """Whether oneDNN has native bf16 matmul here (AVX512-BF16 or AMX), which beats our kernel for prefill-sized
    products: 260-360 GFLOP/s for 64-row bf16 products was measured through torch on a Zen 4 with AVX512-BF16."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


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


def _self_test() -> bool:
    """A tiny product against fp32 torch: catches a miscompiled or mismatched library before it is used."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g).bfloat16()
    w = torch.randn(5, 40, generator=g).bfloat16()
    ref = F.linear(x.float(), w.float())
    y = torch.ops.codegen2_kernels.linear_bf16(x, w, None).float()
    q = torch.randint(-127, 128, (5, 40), generator=g, dtype=torch.int8)
    s = torch.rand(5, generator=g)
    ref8 = F.linear(x.float(), q.float() * s[:, None])
    y8 = torch.ops.codegen2_kernels.linear_int8(x, pack_int8(q), s, None).float()
    return torch.allclose(y, ref, rtol=1e-2, atol=1e-2) and torch.allclose(y8, ref8, rtol=1e-2, atol=1e-2)


def _register_fake() -> None:
    # Shapes for torch.compile / meta tensors; the ops themselves are CPU-only.
    @torch.library.register_fake("codegen2_kernels::linear_bf16")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("codegen2_kernels::linear_int8")
    def _(x, w, scale, bias):
        return x.new_empty(x.shape[0], scale.shape[0])  # w is packed; scale has one entry per output


@functools.cache
def _load_native() -> bool:
    """Build (once, cached on disk) and load the kernels; False, with one warning, if that fails."""
    if not cpu_supported():
        log.info("codegen2 kernels: CPU lacks AVX2/FMA or is not x86-64; using the PyTorch fallback")
        return False
    try:
        if not hasattr(torch.ops.codegen2_kernels, "linear_bf16"):  # not already loaded in this process
            from torch.utils import cpp_extension

            build_dir = _build_dir()
            build_dir.mkdir(parents=True, exist_ok=True)
            _clear_stale_lock(build_dir)
            t0 = time.perf_counter()
            cpp_extension.load(name="codegen2_kernels", sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False,
                               verbose=False)
            log.info("codegen2 kernels: loaded from %s in %.1f s", build_dir, time.perf_counter() - t0)
            _register_fake()
        if not _self_test():
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
    """Whether the native fast path is active (builds it on the first call unless CODEGEN2_KERNELS=torch)."""
    if os.environ.get(ENV_VAR, "").strip().lower() == "torch":
        return False
    return _load_native()
