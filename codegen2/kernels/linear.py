"""Linear layers for CPU inference: the native weight-streaming kernels, with a pure-PyTorch fallback.

Batch-1 decode reads every weight once per token, so a linear layer can be no faster than memory can stream its
weight. torch's bf16 ``F.linear`` with a few rows falls well short of that on our CPUs (and is slower still for
M > 1), so ``DecodeLinear`` routes those calls to the native kernels (``native.py``). Three weight formats:

- ``"bf16"``: the model's own bf16 weight, used in place (no copy); fp32 accumulation.
- ``"int8"``: weight-only int8, symmetric, one scale per output row (``scale = max|w_row| / 127``): half the bytes.
  The kernel quantises each activation row to int16 on the fly (finer than bf16 itself) and runs an exact
  integer dot product; the result is scaled back in fp32.
- ``"int4"``: weight-only int4, symmetric, one bf16 scale per output row and group of ``INT4_GROUP`` = 32 columns
  (``scale = max|w_group| / 7``, q in [-7, 7]; the layout also holds -8): 4.5 bits per weight, like llama.cpp's
  Q4_0 (which reaches -8 by clamping and so bounds its error less tightly). The kernel quantises activations
  to int8 per group of G, as llama.cpp's q8_0 beside Q4_0 (relative RMS error of a product ~0.006, against
  ~0.12 from the int4 weights), so that its inner loop multiplies bytes (vpmaddubsw): about half the
  instructions of int16 activations.

Which path a product takes, by its number of rows M (``DecodeLinear.path``):
- int8 and int4: the native kernels when they are available, whatever the CPU level, so decode (and any product
  of fewer than 32 rows) gives the same numbers on every x86 CPU. Inside, int4 products of 32 rows or more take
  the native fp32 GEMM (decode_linear.cpp). Where oneDNN has native bf16 (AVX512-BF16, AMX), products of 32
  rows or more (prompts) of bf16 x take path "dequant" instead: our ops dequantize a few MiB of weight rows at a time to
  bf16 and torch's F.linear multiplies, 2.4-3.4x faster at 256 rows (``native_dequant_min_m`` has the
  measurements); the weight is then rounded to bf16, as in the fallback, so those products differ from the
  integer kernels' by that rounding.
- bf16: the native kernels (the GEMM from 32 rows), except where oneDNN has a native bf16 GEMM: there products
  of more than 16 rows (AVX512-BF16) or 2 rows (AMX) go to torch, which is faster (``native_bf16_max_m`` gives
  the measurements); all accumulate in fp32 and round once (torch's path to bf16, also for fp32 x). On
  AVX2-only CPUs torch's bf16 ``F.linear`` runs at ~5 GMAC/s, ~12x slower than the native GEMM.

What this is not: a training layer (no autograd), a GPU path (non-CPU tensors take the torch path), or a
general GEMM library.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from codegen2.kernels.native import (
    PACK_ROWS,
    kernel_level,
    kernels_available,
    native_bf16_max_m,
    native_dequant_min_m,
    ops,
    pack_int4,
    pack_int8,
    unpack_int4,
    unpack_int8,
)

INT4_GROUP = 32  # int4: columns per scale (benchmarks/kernels.py --int4-groups measures 32 / 64 / 128)
MODES = ("bf16", "int8", "int4")
_DEQUANT_CHUNK_BYTES = 16 << 20  # the quantized fallbacks dequantize this many bf16 bytes of weight at a time


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


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP,
                  chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 in [-7, 7] and (N, ceil(K/G)) bf16 scales, symmetric per row and group
    of G columns (the last group may be short).

    W ~= q * scale[:, k // G] with |W - q * scale| <= scale / 2: the scale is max|w| / 7 rounded to bf16, which
    moves it by at most 2^-9 of itself, so max|w| / scale <= 7.02 still rounds to 7 and nothing is clipped.
    """
    if group_size % 32 or not 32 <= group_size <= 256:
        raise ValueError(f"group_size must be 32, 64, ..., 256, got {group_size}")
    N, K = weight.shape
    G, ng = group_size, -(-K // group_size)
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, ng, dtype=torch.bfloat16, device=weight.device)
    for i in range(0, N, chunk_rows):
        w = F.pad(weight[i : i + chunk_rows].float(), (0, ng * G - K)).view(-1, ng, G)  # (n, groups, G)
        s = (w.abs().amax(dim=2) / 7.0).to(torch.bfloat16)  # (n, groups)
        safe = torch.where(s > 0, s.float(), torch.ones_like(s, dtype=torch.float32))  # zero groups: q = 0
        q[i : i + chunk_rows] = torch.round(w / safe[..., None]).clamp_(-8, 7).view(-1, ng * G)[:, :K]
        scale[i : i + chunk_rows] = s
    return q, scale


class DecodeLinear(nn.Module):
    """Replacement for an nn.Linear in inference; native kernel where it wins, a PyTorch fallback otherwise.

    weight: (N, K) bf16 (used as is: mode "bf16"); or int8 with ``scale`` (N,) fp32 (mode "int8"; stored packed,
    see pack_int8); or int8 in [-8, 7] with ``scale`` (N, ceil(K/G)) and ``group_size`` G (mode "int4"; stored
    packed, see pack_int4). bias: (N,) or None. Parameters are frozen: this is an inference layer. Whether the
    native kernel is used, and which CPU level, is decided when the layer is built, so set CODEGEN2_KERNELS and
    CODEGEN2_KERNEL_LEVEL before converting a model.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, group_size: int | None = None) -> None:
        super().__init__()
        if (weight.dtype == torch.int8) != (scale is not None):
            raise ValueError("an int8/int4 weight needs its scales, and only such a weight takes them")
        N, K = weight.shape
        mode = "bf16" if scale is None else "int8" if group_size is None else "int4"
        if mode == "int8":
            weight = pack_int8(weight)
            scale = scale.float().contiguous()
        elif mode == "int4":
            weight, scale = pack_int4(weight, scale.to(torch.bfloat16), group_size)
        elif not weight.is_contiguous():  # the kernel streams rows; a transposed view would need a copy per call
            weight = weight.contiguous()
        self._set(mode, weight, scale, bias, group_size, N, K)

    def _set(self, mode: str, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
             group_size: int | None, out_features: int, in_features: int) -> None:
        """Take the weight in its kernel layout (bf16 (N, K); int8 / int4 packed, see pack_int8 / pack_int4)."""
        self.out_features, self.in_features = out_features, in_features
        self.mode, self.group_size = mode, group_size
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("scale", scale)
        # The path is fixed here, as plain attributes, so forward stays free of lookups (and torch.compile-able).
        self.native = weight.dtype in (torch.bfloat16, torch.int8, torch.uint8) and kernels_available()
        self.level = kernel_level() if self.native else None  # "avx2", "avx512_vnni", ...: see native.LEVELS
        self._ops = ops(self.level) if self.native else None
        self.native_max_m = native_bf16_max_m() if self.mode == "bf16" else None  # None: any M
        self.dequant_min_m = native_dequant_min_m() if self.mode != "bf16" and self.native else None  # None: never

    @classmethod
    def cat(cls, layers: list[DecodeLinear]) -> DecodeLinear:
        """One layer whose output rows are those of ``layers`` in turn (their weights, scales and biases
        concatenated; the packed formats as they are, so nothing is re-quantized). On our kernels every row is
        then computed as it was: their result for a row depends on its weight row and x only, and the packed
        blocks of 4 rows stay whole because each layer but the last must have a multiple of 4 rows. (Products
        that go to torch's F.linear, prompt-sized ones on CPUs with a native bf16 matmul, see ``path``, may round
        differently as N changes.) A layer without a bias gets -0.0 for it, which leaves every sum as it is
        (v + -0.0 == v, -0.0 included)."""
        first = layers[0]
        for layer in layers:
            if (layer.mode, layer.in_features, layer.group_size, layer.native, layer.level) != (
                    first.mode, first.in_features, first.group_size, first.native, first.level):
                raise ValueError("only layers of one format, input size and kernel can be concatenated")
        if any(layer.out_features % PACK_ROWS for layer in layers[:-1]):
            raise ValueError(f"every layer but the last must have a multiple of {PACK_ROWS} output rows")
        weight = torch.cat([layer.weight.detach() for layer in layers])
        scale = None if first.scale is None else torch.cat([layer.scale for layer in layers])
        bias = None
        if any(layer.bias is not None for layer in layers):
            dtype = next(layer.bias.dtype for layer in layers if layer.bias is not None)
            bias = torch.cat([torch.full((layer.out_features,), -0.0, dtype=dtype, device=weight.device)
                              if layer.bias is None else layer.bias.detach().to(dtype) for layer in layers])
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._set(first.mode, weight, scale, bias, first.group_size, sum(layer.out_features for layer in layers),
                   first.in_features)
        return fused

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "bf16") -> DecodeLinear:
        """Take over ``linear``'s weight: used in place for "bf16" (cast if it is not bf16), quantized for "int8"
        and "int4" (group size INT4_GROUP)."""
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
        if mode == "int4":
            q, scale = quantize_int4(linear.weight.detach())
            return cls(q, bias, scale, INT4_GROUP)
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}, " \
               f"bias={self.bias is not None}, native={self.native}, level={self.level}"

    def path(self, M: int, x: torch.Tensor | None = None) -> str:
        """"native", "dequant" (int8 / int4: our dequantization, torch's product) or "torch": the path a product
        of M rows (of x, if given) takes."""
        ok = x is None or (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32))
        native = self.native and ok and M > 0 and (self.native_max_m is None or M <= self.native_max_m)
        if native and self.dequant_min_m is not None and M >= self.dequant_min_m and (
                x is None or x.dtype == torch.bfloat16):  # fp32 x: the fallback's fp32 weight is not bf16's
            return "dequant"
        return "native" if native else "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) bf16 or fp32 -> (..., N) in x's dtype; F.linear(x, W, b) semantics."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        path = self.path(x2.shape[0], x2)
        if path == "native":
            x2 = x2.contiguous()
            if self.mode == "bf16":
                y = self._ops.linear_bf16(x2, self.weight, self.bias)
            elif self.mode == "int8":
                y = self._ops.linear_int8(x2, self.weight, self.scale, self.bias)
            else:
                y = self._ops.linear_int4(x2, self.weight, self.scale, self.bias, self.out_features)
        else:
            y = self._torch_forward(x2, native_dequant=path == "dequant")
        return y.reshape(*lead, self.out_features)

    def _torch_forward(self, x: torch.Tensor, native_dequant: bool = False) -> torch.Tensor:
        """F.linear in the weight's dtype; int8 / int4 are dequantized to bf16 a few MiB of rows at a time, by our
        ops (``native_dequant``, the same values) or in PyTorch."""
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
            if native_dequant:
                b1 = min(self.weight.shape[0], b0 + blocks)
                op = self._ops.dequant_int8 if self.mode == "int8" else self._ops.dequant_int4
                w = op(self.weight, self.scale, b0, b1, N, K)
                if dtype != torch.bfloat16:
                    w = w.to(dtype)
            elif self.mode == "int8":
                q = unpack_int8(self.weight[b0 : b0 + blocks], n1 - n0, K)
                w = (q.float() * self.scale[n0:n1, None]).to(dtype)
            else:
                q, s = unpack_int4(self.weight[b0 : b0 + blocks], self.scale[b0 : b0 + blocks], n1 - n0, K)
                w = (q.float() * s.float().repeat_interleave(self.group_size, dim=1)[:, :K]).to(dtype)
            b = None if self.bias is None else self.bias[n0:n1].to(dtype)
            outs.append(F.linear(xc, w, b))
        return torch.cat(outs, dim=-1).to(x.dtype)


def swap_linears(model: nn.Module, mode: str) -> nn.Module:
    """Swap every nn.Linear in ``model`` (in place) for a DecodeLinear of ``mode`` and return the model.

    "bf16" reuses each bf16 weight tensor (no copy, so tied weights stay tied); "int8" / "int4" quantize, and the
    Linear's weight is freed once nothing else holds it. A weight shared with an embedding (tied output) stays as it is for
    the embedding and the output gets its own int8 copy; two distinct Linears sharing one weight would each get a
    copy in int8 (no model here does that).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    done: dict[int, DecodeLinear] = {}  # id(Linear) -> its replacement, for a Linear used in several places
    # Only the parents are listed up front: a list holding every Linear would keep all the bf16 weights alive
    # until the end, doubling peak memory when quantizing.
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


class _SharedProduct:
    """The product of a fused group for the last input it was called with, per thread: each member takes its
    columns of it, and the product is dropped once every member has (so it lives from the group's first call to
    its last, e.g. across the attention of a CodeGen2 block)."""

    def __init__(self, layer: DecodeLinear, members: int) -> None:
        self.layer, self.members = layer, members
        self._local = threading.local()  # one request's tensors are never seen by another thread's model call

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        state = self._local
        if getattr(state, "x", None) is not x:  # a new input (or another order of calls): compute it now
            state.x, state.y, state.taken = x, self.layer(x), set()
        y = state.y
        state.taken.add(member)
        if len(state.taken) == self.members:
            state.x = state.y = None
        return y


class ProductSlice(nn.Module):
    """Stands in for one Linear of a fused group: columns start .. stop of the group's one product."""

    def __init__(self, shared: _SharedProduct, member: int, start: int, stop: int) -> None:
        super().__init__()
        self.product = shared.layer  # a submodule of every member; model.modules() lists it once
        self._shared = shared
        self.member, self.start, self.stop = member, start, stop
        self.in_features, self.out_features = shared.layer.in_features, stop - start

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of the product"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., stop - start), a view into the group's product (last dim contiguous)."""
        return self._shared.output(x, self.member)[..., self.start : self.stop]


def fuse_shared_input_linears(model: nn.Module) -> int:
    """Compute each group of layers that take one input as one product, in place; return the number of groups.

    Why: a decode step calls every linear layer once, and each call costs its start (threads woken, the first
    rows' memory latency, the slowest thread's tail) besides streaming its weight. Measured on Zen 3 (2 threads,
    bf16, M = 1, GB/s): 2048x2048 20.6, 6144x2048 22.7; so LLaMA's q, k, v (and gate, up) and CodeGen2's qkv and
    fc_in (both read the block's one LayerNorm output) run faster as one layer, with the same numbers
    (DecodeLinear.cat).

    The contract with the models (which this package does not import): a module offers
    ``shared_input_linears()``, groups of dotted names of its submodules, each applied to the same tensor,
    unchanged, within one forward. A group is fused only when all of its layers are DecodeLinear of one format
    and kernel, native, with row counts DecodeLinear.cat takes (a LoRA-wrapped layer, for one, keeps its group as
    it is). Each member becomes a ProductSlice; the first member called computes the whole product.
    """
    fused = 0
    for module in list(model.modules()):
        groups = getattr(module, "shared_input_linears", None)
        if not callable(groups):
            continue
        for names in groups():
            layers = [module.get_submodule(name) for name in names]
            if len(layers) < 2 or not all(type(m) is DecodeLinear and m.native for m in layers):
                continue
            try:
                layer = DecodeLinear.cat(layers)
            except ValueError:  # mixed formats or row counts: leave the group as it is
                continue
            shared = _SharedProduct(layer, len(layers))
            start = 0
            for member, (name, old) in enumerate(zip(names, layers)):
                parent_name, _, child = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, child, ProductSlice(shared, member, start, start + old.out_features))
                start += old.out_features
            fused += 1
    return fused
