// CPU linear layers for inference: y = x @ W.T (+ b) in bf16, int8 and int4 weights.
//
// Decode reads every weight once per step, so the small-M kernels have one goal: stream W at memory speed and do
// as little work per byte as possible: each weight chunk is converted once per pair of tokens and the row block
// stays in L1/L2 for the next pair. That caps them at ~80-110 GFLOP/s (2 threads, Zen 3) for prompt-sized M, so
// from 32 rows (bf16, int4), products take a register-blocked GEMM instead (section "Batched and
// prefill-sized products" below). Where the CPU has native bf16 (AVX512-BF16, AMX) the Python side routes bf16
// prefill to oneDNN.
//
// Compiled once per CPU level (native.py: LEVELS), each build its own op namespace, torch.ops.<CG2_OPS>.*, so
// that several levels can be loaded side by side and compared. Every level needs AVX2 + FMA; the Python loader
// checks the CPU's flags before loading a build. What the higher levels change here:
// - avx_vnni (AVX2 CPUs with the VEX VNNI, e.g. Alder Lake, Zen 5) and avx512_vnni: the int16 dot products of the
//   int8 kernel use vpdpwssd (multiply, add pairs and accumulate in one instruction) instead of vpmaddwd +
//   vpaddd; the integer results are identical (no lane can overflow, see the bounds below).
// - avx512 and up (CG2_ZMM): the small-M bf16 kernels work on 64-byte loads in 512-bit registers (32 weights per
//   step), half the instructions per byte of weight. Measured on Zen 5 (2 threads, 8192 x 2048, M = 1, the same
//   process): 26-29 GB/s (avx2) -> 29-46 GB/s. The int8 and int4 kernels also take 512-bit registers there
//   (a chunk's 4 rows per load) and 8 tokens per pass instead of 2: at M = 1 they stream about as fast as the
//   256-bit code (both near the read bandwidth), at M = 4-16 (batched decode, speculative verification) 1.4-2.3x
//   faster (int4 M = 16: 3.4-3.9 -> 7.2-8.3 GB/s, int8 7-8 -> 11-13 GB/s; Zen 5, 2 threads). The integer dot
//   products are the same in every lane, so int8 and int4 results are bit-identical at every level.
// - avx_vnni / avx512_vnni also do the int4 kernel's unsigned x signed byte products in vpdpbusd (4 products
//   summed into int32 in one instruction) instead of vpmaddubsw + vpaddw + vpmaddwd + vpaddd; same integers.
// - avx512_bf16: bf16 products with bf16 x use vdpbf16ps (bf16_tile_dp): 33-44 GB/s against 29-34 for the
//   512-bit FMA kernel, interleaved in one process on Zen 5; also ahead of oneDNN up to 16 rows (M = 16: 17-20
//   against 15-19 GB/s). Three products and two dequantizations:
//
//   linear_bf16(x, w, bias?)        w (N, K) bf16, row-major (the model's own tensor). bf16 x bf16 products are
//                                   exact in fp32; sums are fp32; the result is rounded once.
//   linear_int8(x, w, scale, bias?) w int8 packed by pack_int8() in kernels.py: (ceil(N/4), ceil(K/16), 4, 16),
//                                   w[b, c, r, j] = W[4b + r, 16c + j], zero padded, so that each thread's share
//                                   is one sequential stream (row-major int8 rows are too short, 2 KiB for K =
//                                   2048, for the prefetchers: measured ~20% slower). scale (N,): W ~= q * scale.
//                                   x is quantised per row to int16 (|err| <= max|x_row| / 65534, finer than its
//                                   bf16 rounding for all but the smallest elements), so the inner loop is an
//                                   exact integer dot product (vpmaddwd: 16 multiply-adds per instruction, twice an
//                                   fp32 FMA) with no int -> float conversion per weight.
//   linear_int4(x, w, scale, bias?, N) w uint8 packed by pack_int4(): (ceil(N/4), Kp/32, 4, 16), byte
//                                   w[b, c, r, j] = (q[4b+r, 32c+j] + 8) | (q[4b+r, 32c+16+j] + 8) << 4 with q in
//                                   [-8, 7]; scale (ceil(N/4), Kp/G, 4) bf16, one per row and group of G = 32 .. 256
//                                   columns: W[n, k] ~= q[n, k] * scale[n, k / G]. x is quantised to int8 per
//                                   group of G (|err| <= max|x_group| / 254, as llama.cpp's q8_0 for q4_0); each
//                                   group's exact integer dot product is scaled in fp32. From 32 rows: an fp32 GEMM.
//
//   dequant_int8 / dequant_int4(w, scale, b0, b1, N, K) the bf16 weight rows of packed blocks b0 .. b1 - 1, for
//                                   oneDNN's bf16 GEMM on prompt-sized products (linear.py decides when).
//
// x is (M, K) bf16 or fp32, contiguous; the output is (M, N) in x's dtype. Threads split the output rows into
// contiguous slabs (at::parallel_for).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int kRows = 4;     // output rows per block: 4 weight streams (bf16) / the int8 packing factor
constexpr int kTok = 2;      // tokens per micro-kernel pass (measured best; 3 runs out of the 16 ymm registers)
constexpr int kChunk = 16;   // K elements per vector step
constexpr int kFlush = 128;  // int8: chunks summed in int32 before moving to fp32 (overflow note at int8_block)
constexpr int kPrefetch = 1024;  // int8 / int4: software prefetch distance in bytes (int8 +~10% measured)

// acc + the pairwise int16 products of a and b, summed per int32 lane. Same integers on every level (our
// operands never reach -32768 * -32768, the one case where vpmaddwd and vpdpwssd differ).
inline __m256i dot_add(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}


// ---------------------------------------------------------------------------------------------------------
// bf16 weights. A 32-byte load holds 16 bf16 as 8 int32 lanes: lane i = (w[2i+1] << 16) | w[2i]. Shifting a
// lane left by 16 gives w[2i] as an fp32, masking the low half gives w[2i+1]: two ops per 16 weights and no
// shuffles. x is stored once per call in the matching order, each 16-chunk as [x0 x2 .. x14 | x1 x3 .. x15].

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define CG2_ZMM 1  // 512-bit bf16 kernels: 64-byte loads, 32 weights per step
constexpr int kBf16Chunk = 32;
#else
constexpr int kBf16Chunk = kChunk;
#endif

// int8 / int4: tokens per pass. With 512-bit registers (32 of them) 8; measured on Zen 5 (2 threads, GB/s of
// weights, 1B shapes, interleaved in one process), 2 / 4 / 8 tokens: int4 M = 4 20.7 / 28.1 / 28.1, M = 16 6.4 /
// 6.8 / 8.2; int8 M = 4 24.7 / 34.4 / 33.8, M = 16 9.7 / 11.0 / 12.1; M = 1 and 2 unchanged.
#ifdef CG2_ZMM
constexpr int kTokInt = 8;
#else
constexpr int kTokInt = kTok;
#endif

inline int eo_pos(int j) { return (j & 1) * (kBf16Chunk / 2) + (j >> 1); }  // where element j of a chunk goes

#ifdef CG2_ZMM
inline __m512 load16(const at::BFloat16* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
#endif

template <typename T>
void pack_x_bf16(const T* x, int64_t M, int64_t K, int64_t Kp, float* xf) {
  const int64_t nc = K / kBf16Chunk;
#ifdef CG2_ZMM
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  constexpr int order = _MM_SHUFFLE(3, 1, 2, 0);
#endif
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * K;
    float* dst = xf + m * Kp;
    for (int64_t c = 0; c < nc; ++c) {
#ifdef CG2_ZMM
      const __m512 lo = load16(src + c * kBf16Chunk), hi = load16(src + c * kBf16Chunk + 16);
      _mm512_storeu_ps(dst + c * kBf16Chunk, _mm512_permutex2var_ps(lo, even, hi));
      _mm512_storeu_ps(dst + c * kBf16Chunk + 16, _mm512_permutex2var_ps(lo, odd, hi));
#else
      const __m256 lo = load8(src + c * kChunk), hi = load8(src + c * kChunk + 8);
      // The shuffles give [x0 x2 x8 x10 | x4 x6 x12 x14] (and odd); the 64-bit permute puts the quarters in order.
      const __m256 e = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 o = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
      _mm256_storeu_ps(dst + c * kChunk, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), order)));
      _mm256_storeu_ps(dst + c * kChunk + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), order)));
#endif
    }
    if (nc * kBf16Chunk < K) {  // ragged last chunk, zero padded
      float* tail = dst + nc * kBf16Chunk;
      std::fill(tail, tail + kBf16Chunk, 0.0f);
      for (int j = 0; j < K - nc * kBf16Chunk; ++j) tail[eo_pos(j)] = static_cast<float>(src[nc * kBf16Chunk + j]);
    }
  }
}

// The vector width of the bf16 FMA kernel: one chunk of kBf16Chunk weights is one load, split into its even
// and odd halves (512-bit on the avx512 levels, else 256-bit).
struct Bf16Vec {
#ifdef CG2_ZMM
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void split(const uint16_t* p, F& even, F& odd) {
    const __m512i v = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float sum(F a) { return _mm512_reduce_add_ps(a); }
#else
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void split(const uint16_t* p, F& even, F& odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float sum(F a) { return hsum(a); }
#endif
};

// Prefetch into L2 the bytes at p of the next block's row (R rows further on) while this block streams: a bf16
// row of a 2048-wide layer is 4 KiB, one page, and the hardware prefetchers start over at every page, so without
// this each block's rows start cold. Measured on Zen 4 (M = 1, 2 threads, GB/s, same process): 6144x2048 25.1 ->
// 31.9, 2048x2048 25.2 -> 30.4, 51200x2048 22.1 -> 28.7; into L1 (T0) it gained less or lost. On Zen 3 (avx2):
// 6144x2048 23.5-26.2 -> 28.0-28.4, 51200x2048 27.3-27.7 -> 30.2-30.3; two blocks ahead was no better. One per 64-byte
// line. Past the last row it names memory that may not be ours, which a prefetch may: it cannot fault.
template <int R>
inline void prefetch_next_rows(const uint16_t* p, int64_t K, int64_t c) {
  if (R != kRows || (kBf16Chunk * 2 < 64 && (c & 1))) return;
  for (int r = 0; r < R; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(p + (R + r) * K + c * kBf16Chunk), _MM_HINT_T1);
}

// out[m * kRows + r] = dot(row r of w, token m) for MB tokens and R rows; w points at the first row.
template <int MB, int R>
inline void bf16_tile(const uint16_t* w, int64_t K, const float* xf, int64_t Kp, float* out) {
  using V = Bf16Vec;
  constexpr int S = MB == 1 ? 2 : 1;  // one token: separate even/odd sums for 8 independent FMA chains
  constexpr int half = kBf16Chunk / 2;
  V::F acc[MB][R][S];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s) acc[m][r][s] = V::zero();
  const int64_t nc = K / kBf16Chunk;
  for (int64_t c = 0; c < nc; ++c) {
    prefetch_next_rows<R>(w, K, c);
    V::F xe[MB], xo[MB];
    for (int m = 0; m < MB; ++m) {
      xe[m] = V::load(xf + m * Kp + c * kBf16Chunk);
      xo[m] = V::load(xf + m * Kp + c * kBf16Chunk + half);
    }
    for (int r = 0; r < R; ++r) {
      V::F we, wo;
      V::split(w + r * K + c * kBf16Chunk, we, wo);
      for (int m = 0; m < MB; ++m) {
        acc[m][r][0] = V::fma(we, xe[m], acc[m][r][0]);
        acc[m][r][S - 1] = V::fma(wo, xo[m], acc[m][r][S - 1]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      V::F a = acc[m][r][0];
      if (S == 2) a = V::add(a, acc[m][r][S - 1]);
      float sum = V::sum(a);
      for (int j = 0; j < K - nc * kBf16Chunk; ++j)
        sum += bf16_to_float(w[r * K + nc * kBf16Chunk + j]) * xf[m * Kp + nc * kBf16Chunk + eo_pos(j)];
      out[m * kRows + r] = sum;
    }
  }
}

#if defined(__AVX512BF16__) && defined(CG2_ZMM)
#define CG2_DPBF16 1
// bf16 x with AVX512-BF16: vdpbf16ps multiplies 16 pairs of bf16 and adds both products to 16 fp32 sums, the
// shift, mask and two FMAs above in one instruction, and x is read as it is (no fp32 copy). Products of two bf16
// are exact in fp32, so the numbers differ from the FMA path only in the order of the fp32 sums, with one
// exception: the instruction treats subnormal inputs as 0 and flushes subnormal sums (|v| < 2^-126) to 0.
// Two sums per row and token (even and odd chunks) keep 8-16 instructions in flight.
template <int MB, int R>
inline void bf16_tile_dp(const uint16_t* w, int64_t K, const uint16_t* x, float* out) {
  __m512 acc[MB][R][2];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  const int64_t nc = K / kBf16Chunk;
  // The sum index must be a compile-time constant: a runtime one (c & 1) keeps acc on the stack.
  auto step = [&](int64_t c, auto s) {
    prefetch_next_rows<R>(w, K, c);
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + c * kBf16Chunk);
    for (int r = 0; r < R; ++r) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(w + r * K + c * kBf16Chunk);
      for (int m = 0; m < MB; ++m) acc[m][r][s] = _mm512_dpbf16_ps(acc[m][r][s], v, xv[m]);
    }
  };
  int64_t c = 0;
  for (; c + 2 <= nc; c += 2) {
    step(c, std::integral_constant<int, 0>{});
    step(c + 1, std::integral_constant<int, 1>{});
  }
  if (c < nc) step(c, std::integral_constant<int, 0>{});
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][r][0], acc[m][r][1]));
      for (int64_t k = nc * kBf16Chunk; k < K; ++k) sum += bf16_to_float(w[r * K + k]) * bf16_to_float(x[m * K + k]);
      out[m * kRows + r] = sum;
    }
  }
}
#endif

struct Bf16Kernel {
  static constexpr int kTokens = kTok;
  const uint16_t* w;  // (N, K) row-major
  const float* xf;    // (M, Kp) in even/odd chunk order (FMA path)
  const uint16_t* xb; // (M, K) bf16 as given (vdpbf16ps path), else null
  int64_t N, K, Kp;

  template <int MB, int R>
  void tile(const uint16_t* wr, int64_t m0, float* out) const {
#ifdef CG2_DPBF16
    if (xb) return bf16_tile_dp<MB, R>(wr, K, xb + m0 * K, out);
#endif
    bf16_tile<MB, R>(wr, K, xf + m0 * Kp, Kp, out);
  }

  template <int MB>
  void block(int64_t b, int64_t m0, float* out) const {
    const int64_t n0 = b * kRows;
    if (n0 + kRows <= N) {
      tile<MB, kRows>(w + n0 * K, m0, out);
    } else {  // the ragged last block, one row at a time
      for (int64_t r = 0; n0 + r < N; ++r) tile<MB, 1>(w + (n0 + r) * K, m0, out + r);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// int8 weights against int16 activations: vpmovsxbw widens 16 weights, vpmaddwd multiplies and adds pairs into
// 8 int32 lanes.

// max |p[k]| over k < n (a multiple of 8); clears `finite` if any of them is inf or NaN.
template <typename T>
inline float abs_max8(const T* p, int64_t n, bool& finite) {
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, load8(p + k));
    vmax = _mm256_max_ps(vmax, a);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  finite &= _mm256_movemask_ps(bad) == 0;
  return *std::max_element(lanes, lanes + 8);
}

template <typename T>
void pack_x_int16(const T* x, int64_t M, int64_t K, int64_t Kp, int16_t* xq, float* xscale) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * K;
    bool finite = true;
    float amax = abs_max8(src, K8, finite);
    for (int64_t k = K8; k < K; ++k) {
      const float v = static_cast<float>(src[k]);
      finite &= std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    // A non-finite input poisons its whole output row, as it would in an fp32 matmul.
    xscale[m] = finite ? amax / 32767.0f : NAN;
    const float inv = (finite && amax > 0.0f) ? 32767.0f / amax : 0.0f;
    const __m256 vinv = _mm256_set1_ps(inv);
    int16_t* dst = xq + m * Kp;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      // Round to nearest even (the default MXCSR mode), saturate to int16, undo packs' lane interleave.
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(load8(src + k), vinv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(load8(src + k + 8), vinv));
      const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), q);
    }
    for (; k < K; ++k) {
      const float q = std::nearbyint(static_cast<float>(src[k]) * inv);
      dst[k] = static_cast<int16_t>(std::min(32767.0f, std::max(-32767.0f, q)));
    }
    std::fill(dst + K, dst + Kp, int16_t(0));
  }
}

#ifdef CG2_ZMM
inline __m512i dot_add(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// 512-bit: rows r and r + 1 of a chunk are 32 contiguous bytes, widened into one register (lanes 0-7 row r, 8-15
// row r + 1) against the token's 16 int16 x in both halves: half the loads, widenings and dot products per byte of
// the 256-bit code below. Lane for lane the same integers, the same fp32 flushes and the same final sums (hsum
// of each half), so the same bits at every level. Overflow as below.
template <int MB>
inline void int8_block(const int8_t* w, int64_t nc, const int16_t* xq, int64_t Kp, float* out) {
  __m512 facc[MB][2];
  for (int m = 0; m < MB; ++m) facc[m][0] = facc[m][1] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < nc; c0 += kFlush) {
    const int64_t c1 = std::min(nc, c0 + kFlush);
    __m512i iacc[MB][2];
    for (int m = 0; m < MB; ++m) iacc[m][0] = iacc[m][1] = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * kRows * kChunk + kPrefetch), _MM_HINT_T0);
      __m512i v[2];
      for (int h = 0; h < 2; ++h)
        v[h] = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (c * kRows + 2 * h) * kChunk)));
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + c * kChunk)));
        for (int h = 0; h < 2; ++h) iacc[m][h] = dot_add(iacc[m][h], v[h], xv);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int h = 0; h < 2; ++h) facc[m][h] = _mm512_add_ps(facc[m][h], _mm512_cvtepi32_ps(iacc[m][h]));
  }
  for (int m = 0; m < MB; ++m)
    for (int h = 0; h < 2; ++h) {
      out[m * kRows + 2 * h] = hsum(_mm512_castps512_ps256(facc[m][h]));
      out[m * kRows + 2 * h + 1] = hsum(_mm512_extractf32x8_ps(facc[m][h], 1));
    }
}
#else
// out[m * kRows + r] for one packed block of 4 rows (zero padded, so no tails). Overflow: a vpmaddwd lane is at
// most 2 * 127 * 32768 < 2^23, so kFlush = 128 chunks stay below 2^30 before moving into fp32.
template <int MB>
inline void int8_block(const int8_t* w, int64_t nc, const int16_t* xq, int64_t Kp, float* out) {
  __m256 facc[MB][kRows];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kRows; ++r) facc[m][r] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < nc; c0 += kFlush) {
    const int64_t c1 = std::min(nc, c0 + kFlush);
    __m256i iacc[MB][kRows];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kRows; ++r) iacc[m][r] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; ++c) {
      // One 64-byte line per chunk. A prefetch past the end of the tensor is harmless: it cannot fault.
      _mm_prefetch(reinterpret_cast<const char*>(w + c * kRows * kChunk + kPrefetch), _MM_HINT_T0);
      __m256i xv[MB];
      for (int m = 0; m < MB; ++m)
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + c * kChunk));
      for (int r = 0; r < kRows; ++r) {
        const __m256i v = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (c * kRows + r) * kChunk)));
        for (int m = 0; m < MB; ++m) iacc[m][r] = dot_add(iacc[m][r], v, xv[m]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kRows; ++r) facc[m][r] = _mm256_add_ps(facc[m][r], _mm256_cvtepi32_ps(iacc[m][r]));
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kRows; ++r) out[m * kRows + r] = hsum(facc[m][r]);
}
#endif  // CG2_ZMM

struct Int8Kernel {
  static constexpr int kTokens = kTokInt;
  const int8_t* w;     // packed (Nb, Kp / 16, 4, 16)
  const int16_t* xq;   // (M, Kp)
  int64_t Kp;

  template <int MB>
  void block(int64_t b, int64_t m0, float* out) const {
    int8_block<MB>(w + b * kRows * Kp, Kp / kChunk, xq + m0 * Kp, Kp, out);
  }
};

// ---------------------------------------------------------------------------------------------------------
// int4 weights, group-wise scales, against int8 activations quantized per group (like llama.cpp's q8_0 for
// its q4_0 products). One 64-byte line holds a 32-column chunk of a 4-row block: rows 0-1 in its first 32
// bytes, rows 2-3 in the last 32. The nibbles stay unsigned (u = q + 8 in [0, 15]) and are taken out with a
// shift and a mask, 64 weights per 2 ops; vpmaddubsw multiplies them with the signed int8 x and adds pairs into
// int16 (|u0 x0 + u1 x1| <= 2 * 15 * 127 = 3810, and the low and high nibbles' sums together <= 7620: no
// saturation), vpmaddwd by ones widens pairs to int32, and each group's sum of u x becomes the sum of q x by
// subtracting 8 * sum(x) (xc below, once per group and token). So a 64-byte line costs ~20 ops where the int16
// activations needed ~36 (two widenings, a subtraction of 8 per 16 weights and 4 vpmaddwd). Measured on Zen 3
// (AVX2, 2 threads, M = 1, GB/s of packed int4, in alternate processes): see kGemmMinRowsInt4 and the README.
// Numbers: the integer group sums are exact (|sum| <= 256 * 15 * 127 < 2^24, so also exact in fp32); per group
// and token they are scaled by fp32(w_scale * x_scale) with one FMA into fp32 lanes; the same fp32
// steps in every lane at every level (the 512-bit version below keeps the lanes of this one; dot_u4 gives the
// same integers with or without VNNI), so every level gives bit-identical results.
//
// x per token (pack_x_int8): the int8 values of chunk c as 64 bytes [x0..15 | x0..15 | x16..31 | x16..31], so
// that each 32-byte half lines up with a 32-byte load of two rows' bytes (row r's low nibbles are columns 0-15,
// its high nibbles 16-31); one fp32 scale and one 8 * sum(q) per group.

constexpr int kGroupChunk = 32;  // int4: columns per packed chunk

// Quantize each row of x to int8 per group of G columns (max|x_group| / 127, round to nearest even): xq (M,
// 2 Kp) bytes in the layout above, xs (M, Kp / G) scales, xc (M, Kp / G) = 8 * sum of the group's int8 values.
// Columns K .. Kp are 0. A non-finite value makes all of its row's scales NaN, which poisons the output row as an
// fp32 matmul would.
template <typename T>
void pack_x_int8(const T* x, int64_t M, int64_t K, int64_t Kp, int64_t G, int8_t* xq, float* xs, int32_t* xc) {
  const int64_t ng = Kp / G;
  const __m256i ones16 = _mm256_set1_epi16(1);
  std::vector<float> row(Kp);
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(row.data() + k, load8(src + k));
    for (; k < K; ++k) row[k] = static_cast<float>(src[k]);
    std::fill(row.begin() + K, row.end(), 0.0f);
    bool finite = true;
    for (int64_t g = 0; g < ng; ++g) {
      const float* rg = row.data() + g * G;
      const float amax = abs_max8(rg, G, finite);
      // |x * inv| <= 127 (+ rounding), so the int16 and int8 packs below never saturate finite inputs.
      const __m256 vinv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t j = 0; j < G; j += kGroupChunk) {
        __m256i h[2];  // the chunk's columns 0-15 and 16-31 as int16, in order
        for (int p = 0; p < 2; ++p) {
          const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(rg + j + 16 * p), vinv));
          const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(rg + j + 16 * p + 8), vinv));
          h[p] = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
          sum = _mm256_add_epi32(sum, _mm256_madd_epi16(h[p], ones16));
        }
        const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi16(h[0], h[1]), _MM_SHUFFLE(3, 1, 2, 0));
        int8_t* dst = xq + m * 2 * Kp + (g * G + j) * 2;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(q, q, 0x00));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), _mm256_permute2x128_si256(q, q, 0x11));
      }
      int32_t s[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(s), sum);
      xc[m * ng + g] = 8 * (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
      xs[m * ng + g] = amax / 127.0f;
    }
    if (!finite) std::fill(xs + m * ng, xs + (m + 1) * ng, NAN);
  }
}

// Each 32-bit lane: acc + the sum of the 4 products of its unsigned bytes of lo with the signed bytes of xl, plus
// the same of hi and xh. The VNNI levels do it in two vpdpbusd; the others in vpmaddubsw (pairs into int16; our
// sums stay below 7620, no saturation), an int16 add and vpmaddwd by ones. The integers are the same either way
// (exact, no lane can overflow), so every level gives bit-identical results.
#ifdef CG2_ZMM
inline __m512i dot_u4(__m512i acc, __m512i lo, __m512i xl, __m512i hi, __m512i xh) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, xl), hi, xh);
#else
  const __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(lo, xl), _mm512_maddubs_epi16(hi, xh));
  return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
#endif
}

// out[m * kRows + r] for one packed block of 4 rows and MB tokens, 512-bit: one load holds a chunk's 4 rows,
// lanes 4r .. 4r + 3 are row r, lane l of a row sums the products of the row's bytes 4l .. 4l + 3 (with the
// 16-byte x halves broadcast to the 4 rows): the same integers in the same lanes as the 256-bit code below, and
// the same fp32 steps per lane and the same final sums, so the same bits. Measured: the top of this file.
template <int MB>
inline void int4_block(const uint8_t* w, const uint16_t* scale, int64_t ngroups, int64_t cpg, const int8_t* xq,
                       int64_t xstride, const float* xs, const int32_t* xc, int64_t sstride, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __mmask16 lane0 = 0x1111;  // where each row's 8 * sum(x) comes off
  const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i four = _mm512_set1_epi32(4);
  __m512 facc[MB];
  for (int m = 0; m < MB; ++m) facc[m] = _mm512_setzero_ps();
  // The scales of 4 groups at a time (16 bf16, contiguous: (groups, 4 rows)) become fp32 in one step; each
  // group takes its row's scale into the row's 4 lanes with one permute. At G = 32 (a group per chunk) the
  // per-group steps are most of the work (cache-resident 1024 x 2048, 1 thread, Zen 5: 3.1 -> 1.8 ns per chunk).
  // Only a short last load is masked: a masked load every 4 groups cost ~15% streaming from memory there.
  __m512 s16 = _mm512_setzero_ps();
  __m512i sel = pick;
  for (int64_t g = 0; g < ngroups; ++g) {
    if (g % 4 == 0) {
      const __m256i raw = ngroups - g >= 4
          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + g * kRows))
          : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << (4 * (ngroups - g))) - 1), scale + g * kRows);
      s16 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      sel = pick;
    }
    const __m512 sw = _mm512_permutexvar_ps(sel, s16);
    sel = _mm512_add_epi32(sel, four);
    // Each row's integer sum starts at -8 * sum(x) of the group (in its first lane): the sum of q x, exactly.
    __m512i iacc[MB];
    for (int m = 0; m < MB; ++m) iacc[m] = _mm512_maskz_set1_epi32(lane0, -xc[m * sstride + g]);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* wc = w + c * kRows * 16;
      _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetch), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(wc);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xm = xq + m * xstride + c * 64;
        const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xm)));
        const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xm + 32)));
        iacc[m] = dot_u4(iacc[m], lo, xl, hi, xh);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 sx = _mm512_set1_ps(xs[m * sstride + g]);
      facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]), _mm512_mul_ps(sw, sx), facc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float a[16];
    _mm512_storeu_ps(a, facc[m]);
    for (int r = 0; r < kRows; ++r) out[m * kRows + r] = (a[4 * r] + a[4 * r + 1]) + (a[4 * r + 2] + a[4 * r + 3]);
  }
}
#else
inline __m256i dot_u4(__m256i acc, __m256i lo, __m256i xl, __m256i hi, __m256i xh) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, lo, xl), hi, xh);
#else
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

// out[m * kRows + r] for one packed block of 4 rows and MB tokens. Lanes: acc[m][0] holds rows 0 (lanes 0-3)
// and 1 (lanes 4-7), acc[m][1] rows 2 and 3; lane l of a row sums the products of the row's bytes 4l .. 4l + 3.
template <int MB>
inline void int4_block(const uint8_t* w, const uint16_t* scale, int64_t ngroups, int64_t cpg, const int8_t* xq,
                       int64_t xstride, const float* xs, const int32_t* xc, int64_t sstride, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i lane0 = _mm256_setr_epi32(-1, 0, 0, 0, -1, 0, 0, 0);  // where each row's 8 * sum(x) comes off
  const __m256i pick0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), pick1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  __m256 facc[MB][2];
  for (int m = 0; m < MB; ++m) facc[m][0] = facc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256i iacc[MB][2];
    for (int m = 0; m < MB; ++m) iacc[m][0] = iacc[m][1] = _mm256_setzero_si256();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* wc = w + c * kRows * 16;
      _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetch), _MM_HINT_T0);
      __m256i lo[2], hi[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + 32 * h));
        lo[h] = _mm256_and_si256(v, low);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
      for (int m = 0; m < MB; ++m) {
        const int8_t* xm = xq + m * xstride + c * 64;
        const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm));
        const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + 32));
        for (int h = 0; h < 2; ++h) iacc[m][h] = dot_u4(iacc[m][h], lo[h], xl, hi[h], xh);
      }
    }
    // The block's 4 scales of this group as fp32, then [s0 x 4 | s1 x 4] and [s2 x 4 | s3 x 4].
    const __m128i s16 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scale + g * kRows));
    const __m256 s4 = _mm256_castps128_ps256(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(s16), 16)));
    const __m256 sw[2] = {_mm256_permutevar8x32_ps(s4, pick0), _mm256_permutevar8x32_ps(s4, pick1)};
    for (int m = 0; m < MB; ++m) {
      const __m256 sx = _mm256_set1_ps(xs[m * sstride + g]);
      const __m256i corr = _mm256_and_si256(_mm256_set1_epi32(xc[m * sstride + g]), lane0);
      for (int h = 0; h < 2; ++h) {
        const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(iacc[m][h], corr));
        facc[m][h] = _mm256_fmadd_ps(d, _mm256_mul_ps(sw[h], sx), facc[m][h]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int h = 0; h < 2; ++h) {
      float a[8];
      _mm256_storeu_ps(a, facc[m][h]);
      out[m * kRows + 2 * h] = (a[0] + a[1]) + (a[2] + a[3]);
      out[m * kRows + 2 * h + 1] = (a[4] + a[5]) + (a[6] + a[7]);
    }
}

#endif  // CG2_ZMM

struct Int4Kernel {
  static constexpr int kTokens = kTokInt;
  const uint8_t* w;        // packed (Nb, Kp / 32, 4, 16)
  const uint16_t* scale;   // bf16 (Nb, ngroups, 4)
  const int8_t* xq;        // (M, 2 Kp), see pack_x_int8
  const float* xs;         // (M, ngroups)
  const int32_t* xc;       // (M, ngroups)
  int64_t Kp, ngroups;

  template <int MB>
  void block(int64_t b, int64_t m0, float* out) const {
    const int64_t cpg = Kp / kGroupChunk / ngroups;
    int4_block<MB>(w + b * kRows * Kp / 2, scale + b * ngroups * kRows, ngroups, cpg, xq + m0 * 2 * Kp, 2 * Kp,
                   xs + m0 * ngroups, xc + m0 * ngroups, ngroups, out);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Driver shared by all weight types: split the row blocks over threads; for each block run the tokens in
// pairs (the block's weights stay in L1/L2 between pairs), then scale, add the bias and store.

// kernel.block<mb> for a pass of 1 <= mb <= T tokens.
template <int T, typename Kernel>
inline void block_of(const Kernel& kernel, int mb, int64_t b, int64_t m0, float* out) {
  if constexpr (T > 1) {
    if (mb < T) return block_of<T - 1>(kernel, mb, b, m0, out);
  }
  kernel.template block<T>(b, m0, out);
}

template <typename OutT, typename Kernel>
void run_blocks(const Kernel& kernel, int64_t M, int64_t N, int64_t K, int64_t weight_bytes, OutT* y,
                const float* bias, const float* row_scale, const float* tok_scale) {
  const int64_t nblocks = (N + kRows - 1) / kRows;
  // At least ~64 KiB of weights per task, so that tiny layers are not split across threads.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, kRows * K * weight_bytes));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    constexpr int T = Kernel::kTokens;
    float out[T * kRows];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += T) {
        const int mb = static_cast<int>(std::min<int64_t>(T, M - m0));
        block_of<T>(kernel, mb, b, m0, out);
        for (int m = 0; m < mb; ++m) {
          for (int r = 0; r < rows; ++r) {
            const int64_t n = n0 + r;
            float v = out[m * kRows + r];
            if (row_scale) v *= row_scale[n] * tok_scale[m0 + m];  // int8 (int4 scales inside its kernel)
            if (bias) v += bias[n];
            y[(m0 + m) * N + n] = static_cast<OutT>(v);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Batched and prefill-sized products (from kGemmMinRows* rows) of bf16 and int4 weights: a register-blocked fp32
// GEMM. The pair kernels above convert every weight again for each pair of tokens and cap at ~70-110 GFLOP/s
// (2 threads, Zen 3); MKL's fp32 GEMM reached ~80 there and torch's bf16 matmul ~10 on AVX2, so this is written
// by hand. Each weight is converted (bf16) or dequantized (int4) once per call into an fp32 panel, row-major, so
// the conversion is a few vector ops per 8 weights with no transpose; x is transposed once per call into tiles of
// 16 tokens, xt[k][16]. The 6 x 16 micro-kernel (the BLIS shape for 16 ymm registers) holds 6 weight rows x 16
// tokens in 12 accumulators; per k it loads 2 vectors of 8 tokens, broadcasts 6 weights and does 12 FMAs, so it
// runs at FMA speed whenever M >= 16 (with few tokens the weight stream is the limit: see the prefetch in
// gemm_run). Blocking: a task is kNC = 48 weight rows; K is taken kKC = 256 at a time, so
// the task's panel (48 KiB fp32) sits in L2 while each 16-token tile of x (16 KiB) stays in L1 across it;
// partial sums live in a per-task buffer (48, M rounded up to 16) between K blocks.
// Numbers: fp32 products and sums of x and the (dequantized) weight, rounded once at the end; for int4 this skips
// the int16 rounding of x, so it is at least as accurate as the small-M path (tests/test_kernels.py holds both to
// the same bounds). int8 keeps its integer kernel for every M: it already runs at ~95-130 GFLOP/s for M = 16
// to 256 (vpmaddwd does 16 multiply-adds per instruction), and it keeps each row's result independent of the
// other rows in the call.

constexpr int kMR = 6;     // weight rows per micro-kernel
constexpr int kTT = 16;    // tokens per x tile (two 8-lane vectors)
constexpr int kKC = 256;   // K per block
constexpr int kNC = 48;    // weight rows per task: 8 micro-panels
// From how many rows the GEMM is used (measured, 2 threads, Zen 3, the 1B shape's linears, best of 15 rounds
// interleaved, three runs; GFLOP/s GEMM vs pair kernel): bf16 M = 16: 74-98 vs 80-114 (pair wins), M = 32: 94-98
// vs 87-104, M = 64: 108-114 vs 87-100, M = 256: 113-137 vs 71-98; int4 M = 16: 77-100 vs 64-69, M = 256:
// 113-141 vs 69-106. int4 with the int8-activation kernel (2026-12-04, Zen 3, GB/s of packed int4, two runs
// each, separate processes): M = 16 1.9-2.9 vs 1.6-2.2 for the GEMM, M = 32 0.9-1.4 vs 0.9-1.3, M = 64 equal
// (0.5-0.7), so int4 switches where bf16 does; the GEMM keeps x in fp32, more accurate, for prompts.
constexpr int64_t kGemmMinRowsBf16 = 32;
constexpr int64_t kGemmMinRowsInt4 = 32;

// c[i * ldc + t] (+)= sum_k a[i * kKC + k] * bt[k * 16 + t] for i < R, t < 8 * NV. The accumulators are named
// variables, not an array: with an array GCC 12 kept a copy of each on the stack and stored all 12 every step
// (half speed, seen in the disassembly).
template <int NV>
inline void micro_6x16(int64_t kc, const float* a, const float* bt, float* c, int64_t ldc, bool first) {
  __m256 c0a = _mm256_setzero_ps(), c0b = c0a, c1a = c0a, c1b = c0a, c2a = c0a, c2b = c0a;
  __m256 c3a = c0a, c3b = c0a, c4a = c0a, c4b = c0a, c5a = c0a, c5b = c0a;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bt + k * kTT);  // xt is a std::vector: 16-byte aligned only
    const __m256 b1 = NV == 2 ? _mm256_loadu_ps(bt + k * kTT + 8) : b0;
#define CG2_ROW(i)                                              \
    {                                                           \
      const __m256 w = _mm256_broadcast_ss(a + i * kKC + k);    \
      c##i##a = _mm256_fmadd_ps(w, b0, c##i##a);                \
      if constexpr (NV == 2) c##i##b = _mm256_fmadd_ps(w, b1, c##i##b); \
    }
    CG2_ROW(0) CG2_ROW(1) CG2_ROW(2) CG2_ROW(3) CG2_ROW(4) CG2_ROW(5)
#undef CG2_ROW
  }
#define CG2_STORE(i, v, off)                                                        \
  if (!first) v = _mm256_add_ps(v, _mm256_loadu_ps(c + i * ldc + off));             \
  _mm256_storeu_ps(c + i * ldc + off, v);
#define CG2_STORE_ROW(i) { CG2_STORE(i, c##i##a, 0) if constexpr (NV == 2) { CG2_STORE(i, c##i##b, 8) } }
  CG2_STORE_ROW(0) CG2_STORE_ROW(1) CG2_STORE_ROW(2) CG2_STORE_ROW(3) CG2_STORE_ROW(4) CG2_STORE_ROW(5)
#undef CG2_STORE_ROW
#undef CG2_STORE
}

// Panel writers: panel[r * kKC + k] = W[n0 + r, k0 + k] as fp32 for r < rows, k < kc (the caller zero fills rows
// rows .. up to a multiple of 6; a writer may write past kc within the row, never past kKC).
struct Bf16Panel {
  const uint16_t* w;  // (N, K) row-major
  int64_t K;
  void operator()(int64_t n0, int rows, int64_t k0, int64_t kc, float* panel) const {
    for (int r = 0; r < rows; ++r) {
      const uint16_t* src = w + (n0 + r) * K + k0;
      float* dst = panel + r * kKC;
      int64_t k = 0;
      for (; k + 8 <= kc; k += 8) {  // bf16 -> fp32 is a 16-bit shift
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
        _mm256_store_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
      }
      for (; k < kc; ++k) dst[k] = bf16_to_float(src[k]);
    }
  }
  // Asks for rows n0 .. n0 + rows - 1 of the K block at k0 (see gemm_run: prefetch).
  void prefetch(int64_t n0, int rows, int64_t k0) const {
    for (int r = 0; r < rows; ++r)
      for (int64_t k = k0; k < std::min(K, k0 + kKC); k += 32)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + r) * K + k), _MM_HINT_T0);
  }
};

struct Int4Panel {
  const uint8_t* w;       // packed (Nb, Kp / 32, 4, 16), K zero padded to Kp (a multiple of the group size)
  const uint16_t* scale;  // bf16 (Nb, ngroups, 4); a group (>= 32 columns) never splits a 32-column chunk
  int64_t Kp, ngroups;
  void operator()(int64_t n0, int rows, int64_t k0, int64_t kc, float* panel) const {
    const int64_t G = Kp / ngroups;
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m256i eight = _mm256_set1_epi32(8);
    for (int r = 0; r < rows; ++r) {
      const int64_t n = n0 + r, b = n / kRows, rr = n % kRows;
      const uint8_t* src = w + b * kRows * Kp / 2 + rr * 16 + (k0 / kGroupChunk) * kRows * 16;
      const uint16_t* sc = scale + b * ngroups * kRows + rr;
      float* dst = panel + r * kKC;
      // Whole 32-column chunks up to kc rounded up (kc < kKC only in the last block, where Kp covers the rest).
      for (int64_t c = 0; c * kGroupChunk < kc; ++c, src += kRows * 16) {
        const __m256 s = _mm256_set1_ps(bf16_to_float(sc[((k0 + c * kGroupChunk) / G) * kRows]));
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
        const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};  // columns 0-7 .. 24-31
        for (int j = 0; j < 4; ++j) {
          const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[j]), eight);
          _mm256_store_ps(dst + c * kGroupChunk + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
        }
      }
    }
  }
  void prefetch(int64_t n0, int rows, int64_t k0) const {  // whole 4-row blocks: 64 bytes per 32 columns
    for (int64_t b = n0 / kRows; b * kRows < n0 + rows; ++b)
      for (int64_t c = k0 / kGroupChunk; c * kGroupChunk < std::min(Kp, k0 + kKC); ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w + b * kRows * Kp / 2 + c * kRows * 16), _MM_HINT_T0);
  }
};

// x transposed once per call into tiles of 16 tokens: xt[t * K * 16 + k * 16 + j] = x[16 t + j, k] as fp32
// (tokens past M are 0).
template <typename T>
std::vector<float> pack_x_tiles(const T* x, int64_t M, int64_t K) {
  const int64_t tiles = (M + kTT - 1) / kTT;
  std::vector<float> xt(tiles * kTT * K);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* dst = xt.data() + t * kTT * K;
      for (int j = 0; j < kTT; ++j) {
        const int64_t m = t * kTT + j;
        for (int64_t k = 0; k < K; ++k) dst[k * kTT + j] = m < M ? static_cast<float>(x[m * K + k]) : 0.0f;
      }
    }
  });
  return xt;
}

template <typename OutT, typename Panel>
void gemm_run(const Panel& pack, const float* xt, int64_t M, int64_t N, int64_t K, OutT* y, const float* bias) {
  const int64_t ntasks = (N + kNC - 1) / kNC, tiles = (M + kTT - 1) / kTT, Mp = tiles * kTT;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) static thread_local float panel[kNC * kKC];
    std::vector<float> cbuf(kNC * Mp);  // (rows, Mp): partial sums of this task
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kNC;
      const int rows = static_cast<int>(std::min<int64_t>(kNC, N - n0));
      const int mpanels = (rows + kMR - 1) / kMR;
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min<int64_t>(kKC, K - k0);
        std::fill(panel + rows * kKC, panel + mpanels * kMR * kKC, 0.0f);  // the ragged last micro-panel
        pack(n0, rows, k0, kc, panel);
        for (int64_t tt = 0; tt < tiles; ++tt) {
          const float* bt = xt + tt * kTT * K + k0 * kTT;
          const bool two = M - tt * kTT > 8;
          for (int p = 0; p < mpanels; ++p) {
            // Rows of a block are short streams (512 bytes of each of 48 rows), and with few tokens the multiply
            // is too short to hide their misses: ask for the next block's rows a micro-panel at a time, spread
            // over this block's work. Measured at M = 16 int4: 71-89 -> 77-100 GFLOP/s, near this VM's noise.
            if (tt == 0 && k0 + kKC < K) pack.prefetch(n0 + p * kMR, std::min(kMR, rows - p * kMR), k0 + kKC);
            float* c = cbuf.data() + p * kMR * Mp + tt * kTT;
            if (two) {
              micro_6x16<2>(kc, panel + p * kMR * kKC, bt, c, Mp, k0 == 0);
            } else {
              micro_6x16<1>(kc, panel + p * kMR * kKC, bt, c, Mp, k0 == 0);
            }
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < M; ++m) y[m * N + n] = static_cast<OutT>(cbuf[r * Mp + m] + b);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Dequantization to bf16, for prompt-sized products on CPUs where oneDNN has a native bf16 GEMM (AVX512-BF16,
// AMX): there dequantizing a block of rows and calling oneDNN beats our integer and fp32 kernels (linear.py
// gives the measurements). out[n - 4 * b0, k] = bf16(q[n, k] * scale) for the rows of packed blocks b0 .. b1 - 1
// (at most N) and k < K; q * scale is formed in fp32 (exact for int4: a 4-bit q times a bf16 scale) and rounded
// to nearest even once.

// Rounds 16 fp32 (q * scale of 16 consecutive columns: two vectors of 8, or one of 16) to bf16 and stores the
// first min(n, 16) at dst.
inline void store_bf16x16(uint16_t* dst, __m256 a, __m256 b, int64_t n) {
  if (n >= 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), round_bf16x8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), round_bf16x8(b));
    return;
  }
  alignas(32) uint16_t tmp[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), round_bf16x8(a));
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp + 8), round_bf16x8(b));
  std::memcpy(dst, tmp, std::max<int64_t>(0, n) * sizeof(uint16_t));
}
#ifdef CG2_ZMM
inline void store_bf16x16(uint16_t* dst, __m512 f, int64_t n) {
  const __m256i r = round_bf16x16(f);
  if (n >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), r);
  } else if (n > 0) {
    _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << n) - 1), r);
  }
}
#endif

at::Tensor dequant_int8(const at::Tensor& w, const at::Tensor& scale, int64_t b0, int64_t b1, int64_t N,
                        int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.is_contiguous() && w.size(2) == kRows &&
                  w.size(3) == kChunk && w.size(1) * kChunk >= K && scale.scalar_type() == at::kFloat &&
                  scale.numel() == N && 0 <= b0 && b0 <= b1 && b1 <= w.size(0),
              "codegen2_kernels.dequant_int8: w must be int8 packed as (ceil(N/4), ceil(K/16), 4, 16)");
  const int64_t Kc = w.size(1), n0 = b0 * kRows, n1 = std::min(N, b1 * kRows);
  at::Tensor out = at::empty({std::max<int64_t>(0, n1 - n0), K}, w.options().dtype(at::kBFloat16));
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
#ifndef CG2_ZMM
      const __m256 s = _mm256_set1_ps(sp[n]);
#endif
      const int8_t* src = wp + ((n / kRows) * Kc * kRows + n % kRows) * kChunk;
      uint16_t* dst = op + (n - n0) * K;
      for (int64_t c = 0; c * kChunk < K; ++c, src += kRows * kChunk) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
#ifdef CG2_ZMM
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), _mm512_set1_ps(sp[n]));
        store_bf16x16(dst + c * kChunk, f, K - c * kChunk);
#else
        const __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s);
        const __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), s);
        store_bf16x16(dst + c * kChunk, lo, hi, K - c * kChunk);
#endif
      }
    }
  });
  return out;
}

at::Tensor dequant_int4(const at::Tensor& w, const at::Tensor& scale, int64_t b0, int64_t b1, int64_t N,
                        int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 4 && w.is_contiguous() && w.size(2) == kRows &&
                  w.size(3) == 16 && w.size(1) * kGroupChunk >= K && scale.scalar_type() == at::kBFloat16 &&
                  scale.is_contiguous() && scale.dim() == 3 && scale.size(0) == w.size(0) &&
                  scale.size(2) == kRows && scale.size(1) > 0 && w.size(1) % scale.size(1) == 0 && 0 <= b0 &&
                  b0 <= b1 && b1 <= w.size(0),
              "codegen2_kernels.dequant_int4: w must be uint8 packed as (ceil(N/4), Kp/32, 4, 16), scale bf16 "
              "(ceil(N/4), groups, 4)");
  const int64_t Kc = w.size(1), ngroups = scale.size(1), cpg = Kc / ngroups;
  const int64_t n0 = b0 * kRows, n1 = std::min(N, b1 * kRows);
  at::Tensor out = at::empty({std::max<int64_t>(0, n1 - n0), K}, w.options().dtype(at::kBFloat16));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t n = r0; n < r1; ++n) {
      const int64_t b = n / kRows, r = n % kRows;
      const uint8_t* src = wp + (b * Kc * kRows + r) * 16;
      uint16_t* dst = op + (n - n0) * K;
      for (int64_t c = 0; c * kGroupChunk < K; ++c, src += kRows * 16) {
        const float sf = bf16_to_float(sp[(b * ngroups + c / cpg) * kRows + r]);
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
        const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        const int64_t k = c * kGroupChunk;
#ifdef CG2_ZMM
        const __m512 s16 = _mm512_set1_ps(sf);
        const __m512i eight16 = _mm512_set1_epi32(8);
        const __m128i halves[2] = {lo, hi};  // columns 0-15, 16-31
        for (int j = 0; j < 2; ++j) {
          const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(halves[j]), eight16);
          store_bf16x16(dst + k + 16 * j, _mm512_mul_ps(_mm512_cvtepi32_ps(q), s16), K - k - 16 * j);
        }
#else
        const __m256 s = _mm256_set1_ps(sf);
        const __m256i eight = _mm256_set1_epi32(8);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};  // columns 0-7 .. 24-31
        __m256 f[4];
        for (int j = 0; j < 4; ++j)
          f[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[j]), eight)), s);
        store_bf16x16(dst + k, f[0], f[1], K - k);
        store_bf16x16(dst + k + 16, f[2], f[3], K - k - 16);
#endif
      }
    }
  });
  return out;
}

void check_x(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "codegen2_kernels: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "codegen2_kernels: x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "codegen2_kernels: x must be bf16 or fp32");
  TORCH_CHECK(w.is_contiguous(), "codegen2_kernels: w must be contiguous");
}

// An optional per-row vector as a contiguous fp32 tensor (undefined if absent).
at::Tensor row_vector(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == n, "codegen2_kernels: ", what, " must have ", n, " elements");
  return t->to(at::kFloat).contiguous();
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

template <typename T>
at::Tensor linear_bf16_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  if (M >= kGemmMinRowsBf16) {
    gemm_run(Bf16Panel{wp, K}, pack_x_tiles(x.data_ptr<T>(), M, K).data(), M, N, K, y.data_ptr<T>(),
             ptr_or_null(bias));
    return y;
  }
  const int64_t Kp = (K + kBf16Chunk - 1) / kBf16Chunk * kBf16Chunk;
  std::vector<float> xf;
  const uint16_t* xb = nullptr;
#ifdef CG2_DPBF16
  if constexpr (std::is_same_v<T, at::BFloat16>) xb = reinterpret_cast<const uint16_t*>(x.data_ptr<T>());
#endif
  if (!xb) {
    xf.resize(M * Kp);
    pack_x_bf16(x.data_ptr<T>(), M, K, Kp, xf.data());
  }
  const Bf16Kernel kernel{wp, xf.data(), xb, N, K, Kp};
  run_blocks(kernel, M, N, K, 2, y.data_ptr<T>(), ptr_or_null(bias), nullptr, nullptr);
  return y;
}

template <typename T>
at::Tensor linear_int8_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const at::Tensor& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = scale.numel();
  const int64_t Kp = w.size(1) * kChunk;
  std::vector<int16_t> xq(M * Kp);
  std::vector<float> xscale(M);
  pack_x_int16(x.data_ptr<T>(), M, K, Kp, xq.data(), xscale.data());
  at::Tensor y = at::empty({M, N}, x.options());
  const Int8Kernel kernel{w.data_ptr<int8_t>(), xq.data(), Kp};
  run_blocks(kernel, M, N, K, 1, y.data_ptr<T>(), ptr_or_null(bias), scale.data_ptr<float>(), xscale.data());
  return y;
}

template <typename T>
at::Tensor linear_int4_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const at::Tensor& bias, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t Kp = w.size(1) * kGroupChunk;
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M >= kGemmMinRowsInt4) {
    gemm_run(Int4Panel{w.data_ptr<uint8_t>(), sp, Kp, scale.size(1)}, pack_x_tiles(x.data_ptr<T>(), M, K).data(),
             M, N, K, y.data_ptr<T>(), ptr_or_null(bias));
    return y;
  }
  const int64_t ngroups = scale.size(1);
  std::vector<int8_t> xq(M * 2 * Kp);
  std::vector<float> xs(M * ngroups);
  std::vector<int32_t> xc(M * ngroups);
  pack_x_int8(x.data_ptr<T>(), M, K, Kp, Kp / ngroups, xq.data(), xs.data(), xc.data());
  const Int4Kernel kernel{w.data_ptr<uint8_t>(), sp, xq.data(), xs.data(), xc.data(), Kp, ngroups};
  // weight_bytes = 1 for the grain: half a byte per weight, plus scales, rounds up to about a byte's work.
  run_blocks(kernel, M, N, K, 1, y.data_ptr<T>(), ptr_or_null(bias), nullptr, nullptr);
  return y;
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_x(x, w);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.size(1) == x.size(1),
              "codegen2_kernels.linear_bf16: w must be a bf16 (N, K) matrix matching x");
  const at::Tensor b = row_vector(bias, w.size(0), "bias");
  if (x.scalar_type() == at::kBFloat16) return linear_bf16_impl<at::BFloat16>(x, w, b);
  return linear_bf16_impl<float>(x, w, b);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  check_x(x, w);
  const int64_t N = scale.numel(), K = x.size(1);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.size(0) == (N + kRows - 1) / kRows &&
                  w.size(1) == (K + kChunk - 1) / kChunk && w.size(2) == kRows && w.size(3) == kChunk,
              "codegen2_kernels.linear_int8: w must be int8 packed as (ceil(N/4), ceil(K/16), 4, 16)");
  const at::Tensor s = row_vector(scale, N, "scale");
  const at::Tensor b = row_vector(bias, N, "bias");
  if (x.scalar_type() == at::kBFloat16) return linear_int8_impl<at::BFloat16>(x, w, s, b);
  return linear_int8_impl<float>(x, w, s, b);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t N) {
  check_x(x, w);
  const int64_t K = x.size(1), Nb = (N + kRows - 1) / kRows;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 4 && w.size(0) == Nb && w.size(1) * kGroupChunk >= K &&
                  w.size(2) == kRows && w.size(3) == 16,
              "codegen2_kernels.linear_int4: w must be uint8 packed as (ceil(N/4), Kp/32, 4, 16)");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.dim() == 3 &&
                  scale.size(0) == Nb && scale.size(2) == kRows && scale.size(1) > 0 &&
                  w.size(1) % scale.size(1) == 0 && w.size(1) / scale.size(1) <= 8,
              "codegen2_kernels.linear_int4: scale must be bf16 (ceil(N/4), groups, 4), groups of 32 to 256");
  const at::Tensor b = row_vector(bias, N, "bias");
  if (x.scalar_type() == at::kBFloat16) return linear_int4_impl<at::BFloat16>(x, w, scale, b, N);
  return linear_int4_impl<float>(x, w, scale, b, N);
}

}  // namespace

CG2_LIBRARY(CG2_OPS, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scale, Tensor? bias, int N) -> Tensor");
  m.def("dequant_int8(Tensor w, Tensor scale, int b0, int b1, int N, int K) -> Tensor");
  m.def("dequant_int4(Tensor w, Tensor scale, int b0, int b1, int N, int K) -> Tensor");
}

CG2_LIBRARY_IMPL(CG2_OPS, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequant_int8", &dequant_int8);
  m.impl("dequant_int4", &dequant_int4);
}
