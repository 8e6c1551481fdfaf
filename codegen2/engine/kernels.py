"""Linear layers for CPU decode: a native weight-streaming kernel, with a pure-PyTorch fallback.

Batch-1 decode reads every weight once per token, so a linear layer can be no faster than memory can stream its
weight. torch's bf16 ``F.linear`` with a few rows falls well short of that on our CPUs (and is slower still for
M > 1), so ``DecodeLinear`` routes those calls to ``csrc/decode_linear.cpp`` (AVX2 + FMA, compiled on first use with
``torch.utils.cpp_extension`` and cached under ``~/.cache/codegen2/kernels``). Two weight formats:

- ``"bf16"``: the model's own bf16 weight, used in place (no copy); fp32 accumulation.
- ``"int8"``: weight-only int8, symmetric, one scale per output row (``scale = max|w_row| / 127``): half the bytes.
  The kernel quantises each activation row to int16 on the fly (finer than bf16 itself) and runs an exact
  integer dot product; the result is scaled back in fp32.

What this is not: a training layer (no autograd), a GPU path (non-CPU tensors take the torch path), or a
general GEMM library. On CPUs without a native bf16 GEMM (AVX2-only: torch's bf16 ``F.linear`` runs at ~5 GMAC/s
there, 5x slower than this kernel even at M = 1024) the kernel also serves prefill; where oneDNN has AVX512-BF16
or AMX, prefill (M > 16) goes to oneDNN (assumed faster there, not measured: no such CPU was at hand).

The native path is chosen automatically: x86-64 CPU with AVX2 and FMA, a working C++ compiler and ninja. Set
``CODEGEN2_KERNELS=torch`` to force the fallback. A failed build warns once and falls back; it never raises.
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
from torch import nn

log = logging.getLogger(__name__)

ENV_VAR = "CODEGEN2_KERNELS"  # "torch" forces the pure-PyTorch path
MAX_DECODE_M = 16  # rows of x up to which the native kernel is always used
_SOURCE = Path(__file__).parent / "csrc" / "decode_linear.cpp"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
_DEQUANT_CHUNK_BYTES = 16 << 20  # the int8 fallback dequantizes this many bf16 bytes of weight at a time


# ----------------------------------------------------------------------------------------------------------------
# Loading the native kernels


@functools.cache
def _cpu_flags() -> frozenset[str]:
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


def _cpu_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= _cpu_flags()


def _has_fast_bf16_gemm() -> bool:
    """Whether oneDNN has native bf16 matmul here, which beats our kernel for prefill-sized M."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


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
    if not _cpu_supported():
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


# ----------------------------------------------------------------------------------------------------------------
# Quantization


@torch.no_grad()
def quantize_int8(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 in [-127, 127] and (N,) fp32 scale, symmetric per output row.

    W ~= q * scale[:, None] with |W - q * scale| <= scale / 2. Rows are done in chunks to bound the fp32 temporary.
    """
    N = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    for i in range(0, N, chunk_rows):
        w = weight[i : i + chunk_rows].float()
        s = w.abs().amax(dim=1) / 127.0
        safe = torch.where(s > 0, s, torch.ones_like(s))  # all-zero rows: q = 0, scale = 0
        q[i : i + chunk_rows] = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[i : i + chunk_rows] = s
    return q, scale


PACK_ROWS, PACK_COLS = 4, 16  # the int8 layout of csrc/decode_linear.cpp


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


# ----------------------------------------------------------------------------------------------------------------
# The layer


class DecodeLinear(nn.Module):
    """Replacement for an nn.Linear in inference; native kernel where it wins, a PyTorch fallback otherwise.

    weight: (N, K) bf16 (used as is: mode "bf16") or int8 with ``scale`` (N,) fp32 (mode "int8"; stored packed,
    see pack_int8); bias: (N,) or None. Parameters are frozen: this is an inference layer. Whether the native
    kernel is used is decided when the layer is built, so set CODEGEN2_KERNELS before converting a model.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> None:
        super().__init__()
        if (weight.dtype == torch.int8) != (scale is not None):
            raise ValueError("an int8 weight needs a per-row scale, and only an int8 weight takes one")
        self.out_features, self.in_features = weight.shape
        self.mode = "int8" if scale is not None else "bf16"
        if scale is not None:
            weight = pack_int8(weight)
            scale = scale.float().contiguous()
        elif not weight.is_contiguous():  # the kernel streams rows; a transposed view would need a copy per call
            weight = weight.contiguous()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("scale", scale)
        # The path is fixed here, as plain attributes, so forward stays free of lookups (and torch.compile-able).
        self.native = weight.dtype in (torch.bfloat16, torch.int8) and kernels_available()
        self.native_max_m = MAX_DECODE_M if _has_fast_bf16_gemm() else None  # None: native for every M

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "bf16") -> DecodeLinear:
        """Take over ``linear``'s weight: used in place for "bf16" (cast if it is not bf16), quantized for "int8"."""
        bias = None if linear.bias is None else linear.bias.detach()
        if mode == "bf16":
            w = linear.weight
            if w.dtype != torch.bfloat16:
                w = w.detach().to(torch.bfloat16)
                bias = None if bias is None else bias.to(torch.bfloat16)
            return cls(w, bias)
        if mode == "int8":
            q, scale = quantize_int8(linear.weight.detach())
            return cls(q, bias, scale)
        raise ValueError(f"mode must be 'bf16' or 'int8', got {mode!r}")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, " \
               f"bias={self.bias is not None}, native={self.native}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) bf16 or fp32 -> (..., N) in x's dtype; F.linear(x, W, b) semantics."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        M = x2.shape[0]
        if (self.native and x2.device.type == "cpu" and x2.dtype in (torch.bfloat16, torch.float32) and M > 0
                and (self.native_max_m is None or M <= self.native_max_m)):
            x2 = x2.contiguous()
            if self.scale is None:
                y = torch.ops.codegen2_kernels.linear_bf16(x2, self.weight, self.bias)
            else:
                y = torch.ops.codegen2_kernels.linear_int8(x2, self.weight, self.scale, self.bias)
        else:
            y = self._torch_forward(x2)
        return y.reshape(*lead, self.out_features)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pure-PyTorch path: F.linear in the weight's dtype; int8 is dequantized a few MiB of rows at a time."""
        if self.scale is None:
            w = self.weight
            b = None if self.bias is None else self.bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, b).to(x.dtype)
        dtype = x.dtype if x.dtype in (torch.float16, torch.float32) else torch.bfloat16
        xc = x.to(dtype)
        N, K = self.out_features, self.in_features
        blocks = max(1, _DEQUANT_CHUNK_BYTES // (2 * PACK_ROWS * K))
        outs = []
        for b0 in range(0, self.weight.shape[0], blocks):
            n0, n1 = b0 * PACK_ROWS, min(N, (b0 + blocks) * PACK_ROWS)
            q = unpack_int8(self.weight[b0 : b0 + blocks], n1 - n0, K)
            w = (q.float() * self.scale[n0:n1, None]).to(dtype)
            b = None if self.bias is None else self.bias[n0:n1].to(dtype)
            outs.append(F.linear(xc, w, b))
        return torch.cat(outs, dim=-1).to(x.dtype)


def prepare_for_decode(model: nn.Module, mode: str = "bf16") -> nn.Module:
    """Swap every nn.Linear in ``model`` (in place) for a DecodeLinear and return the model.

    "bf16" expects a bf16 model and reuses each weight tensor (no copy, so tied weights stay tied); "int8"
    quantizes, and the Linear's weight is freed once nothing else holds it. A weight shared with an embedding
    (tied output) stays as it is for the embedding and the output gets its own int8 copy; two distinct Linears
    sharing one weight would each get a copy in int8 (no model here does that).
    """
    if mode not in ("bf16", "int8"):
        raise ValueError(f"mode must be 'bf16' or 'int8', got {mode!r}")
    done: dict[int, DecodeLinear] = {}  # id(Linear) -> its replacement, for a Linear used in several places
    # Only the parents are listed up front: a list holding every Linear would keep all the bf16 weights alive
    # until the end, doubling peak memory in int8 mode.
    parents = [m for m in model.modules() if type(m) is not nn.Linear]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # subclasses (e.g. attention's out_proj) may be read directly
                continue
            # Keying by id is safe: all the Linears are alive when the loop starts, so no two share an id.
            if id(child) not in done:
                done[id(child)] = DecodeLinear.from_linear(child, mode)
            setattr(parent, name, done[id(child)])
    return model
