// CPU linear layers for inference: y = x @ W.T (+ b) in bf16, int8 and int4 weights.
//
// Decode reads every weight once per step, so the small-M kernels have one goal: stream W at memory speed and do
// as little work per byte as possible: each weight chunk is converted once per pair of tokens and the row block
// stays in L1/L2 for the next pair. That caps them at ~80-110 GFLOP/s (2 threads, Zen 3) for prompt-sized M, so
// from 32 (bf16) / 16 (int4) rows, products take a register-blocked GEMM instead (section "Batched and
// prefill-sized products" below). Where the CPU has native bf16 (AVX512-BF16, AMX) the Python side routes bf16
// prefill to oneDNN.
//
// Compiled once per CPU level (native.py: LEVELS), each build its own op namespace, torch.ops.<CG2_OPS>.*, so
// that several levels can be loaded side by side and compared. Every level needs AVX2 + FMA; the Python loader
// checks the CPU's flags before loading a build. What a higher level changes here: with AVX512-VNNI (and VL),
// the int16 dot products of the int8 and int4 kernels use vpdpwssd (multiply, add pairs and accumulate in one
// instruction) instead of vpmaddwd + vpaddd; the integer results are identical (no lane can overflow, see the
// bounds below). The "avx512" level only lets the compiler use AVX-512 encodings and registers for the same
// 256-bit code: no hand-written 512-bit kernels yet. Three ops:
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
//                                   columns: W[n, k] ~= q[n, k] * scale[n, k / G]. x is quantised to int16 as for
//                                   int8; each group's exact integer dot product is scaled in fp32.
//
// x is (M, K) bf16 or fp32, contiguous; the output is (M, N) in x's dtype. Threads split the output rows into
// contiguous slabs (at::parallel_for).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int kRows = 4;     // output rows per block: 4 weight streams (bf16) / the int8 packing factor
constexpr int kTok = 2;      // tokens per micro-kernel pass (measured best; 3 runs out of the 16 ymm registers)
constexpr int kChunk = 16;   // K elements per vector step
constexpr int kFlush = 128;  // int8: chunks summed in int32 before moving to fp32 (overflow note at int8_block)
constexpr int kPrefetch = 1024;  // int8: software prefetch distance in bytes (+~10% measured; bf16 does not gain)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc + the pairwise int16 products of a and b, summed per int32 lane. Same integers on every level (our
// operands never reach -32768 * -32768, the one case where vpmaddwd and vpdpwssd differ).
inline __m256i dot_add(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Eight consecutive activations as fp32 (bf16 -> fp32 is a 16-bit shift).
inline __m256 load8(const at::BFloat16* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// ---------------------------------------------------------------------------------------------------------
// bf16 weights. A 32-byte load holds 16 bf16 as 8 int32 lanes: lane i = (w[2i+1] << 16) | w[2i]. Shifting a
// lane left by 16 gives w[2i] as an fp32, masking the low half gives w[2i+1]: two ops per 16 weights and no
// shuffles. x is stored once per call in the matching order, each 16-chunk as [x0 x2 .. x14 | x1 x3 .. x15].

inline int eo_pos(int j) { return (j & 1) * 8 + (j >> 1); }  // where element j of a chunk goes

template <typename T>
void pack_x_bf16(const T* x, int64_t M, int64_t K, int64_t Kp, float* xf) {
  const int64_t nc = K / kChunk;
  constexpr int order = _MM_SHUFFLE(3, 1, 2, 0);
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * K;
    float* dst = xf + m * Kp;
    for (int64_t c = 0; c < nc; ++c) {
      const __m256 lo = load8(src + c * kChunk), hi = load8(src + c * kChunk + 8);
      // The shuffles give [x0 x2 x8 x10 | x4 x6 x12 x14] (and odd); the 64-bit permute puts the quarters in order.
      const __m256 even = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 odd = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
      _mm256_storeu_ps(dst + c * kChunk, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), order)));
      _mm256_storeu_ps(dst + c * kChunk + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(odd), order)));
    }
    if (nc * kChunk < K) {  // ragged last chunk, zero padded
      float* tail = dst + nc * kChunk;
      std::fill(tail, tail + kChunk, 0.0f);
      for (int j = 0; j < K - nc * kChunk; ++j) tail[eo_pos(j)] = static_cast<float>(src[nc * kChunk + j]);
    }
  }
}

// out[m * kRows + r] = dot(row r of w, token m) for MB tokens and R rows; w points at the first row.
template <int MB, int R>
inline void bf16_tile(const uint16_t* w, int64_t K, const float* xf, int64_t Kp, float* out) {
  constexpr int S = MB == 1 ? 2 : 1;  // one token: separate even/odd sums for 8 independent FMA chains
  __m256 acc[MB][R][S];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s) acc[m][r][s] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t nc = K / kChunk;
  for (int64_t c = 0; c < nc; ++c) {
    __m256 xe[MB], xo[MB];
    for (int m = 0; m < MB; ++m) {
      xe[m] = _mm256_loadu_ps(xf + m * Kp + c * kChunk);
      xo[m] = _mm256_loadu_ps(xf + m * Kp + c * kChunk + 8);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + c * kChunk));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
      for (int m = 0; m < MB; ++m) {
        acc[m][r][0] = _mm256_fmadd_ps(we, xe[m], acc[m][r][0]);
        acc[m][r][S - 1] = _mm256_fmadd_ps(wo, xo[m], acc[m][r][S - 1]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      __m256 a = acc[m][r][0];
      if (S == 2) a = _mm256_add_ps(a, acc[m][r][S - 1]);
      float sum = hsum(a);
      for (int j = 0; j < K - nc * kChunk; ++j)
        sum += bf16_to_float(w[r * K + nc * kChunk + j]) * xf[m * Kp + nc * kChunk + eo_pos(j)];
      out[m * kRows + r] = sum;
    }
  }
}

struct Bf16Kernel {
  const uint16_t* w;  // (N, K) row-major
  const float* xf;    // (M, Kp) in even/odd chunk order
  int64_t N, K, Kp;

  template <int MB>
  void block(int64_t b, int64_t m0, float* out) const {
    const int64_t n0 = b * kRows;
    const float* x = xf + m0 * Kp;
    if (n0 + kRows <= N) {
      bf16_tile<MB, kRows>(w + n0 * K, K, x, Kp, out);
    } else {  // the ragged last block, one row at a time
      for (int64_t r = 0; n0 + r < N; ++r) bf16_tile<MB, 1>(w + (n0 + r) * K, K, x, Kp, out + r);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// int8 weights against int16 activations: vpmovsxbw widens 16 weights, vpmaddwd multiplies and adds pairs into
// 8 int32 lanes.

template <typename T>
void pack_x_int16(const T* x, int64_t M, int64_t K, int64_t Kp, int16_t* xq, float* xscale) {
  const int64_t K8 = K / 8 * 8;
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * K;
    __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 a = _mm256_andnot_ps(sign, load8(src + k));
      vmax = _mm256_max_ps(vmax, a);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float amax = *std::max_element(lanes, lanes + 8);
    bool finite = _mm256_movemask_ps(bad) == 0;
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

struct Int8Kernel {
  const int8_t* w;     // packed (Nb, Kp / 16, 4, 16)
  const int16_t* xq;   // (M, Kp)
  int64_t Kp;

  template <int MB>
  void block(int64_t b, int64_t m0, float* out) const {
    int8_block<MB>(w + b * kRows * Kp, Kp / kChunk, xq + m0 * Kp, Kp, out);
  }
};

// ---------------------------------------------------------------------------------------------------------
// int4 weights, group-wise scales, against the same int16 activations. One 64-byte line holds a 32-column
// chunk of a 4-row block. A byte's two nibbles are widened to int16 with a mask and a shift (no shuffles), the
// +8 offset is removed with one subtraction, and vpmaddwd does the rest. A group's int32 sums are converted and
// scaled once per group: the only float work, 1 FMA per 8 lanes of G / 2 multiply-adds.
// Overflow: a lane gains at most 2 * 8 * 32767 < 2^20 per chunk, and a group has at most 8 chunks (G <= 256).
// One token: all 4 rows per pass. Two tokens: 2 rows at a time, so that 2 x 2 int32 and fp32 sums, the 4
// activation vectors and the unpacked weights fit the 16 registers, and each unpacked chunk serves both tokens.

constexpr int kGroupChunk = 32;  // int4: columns per packed chunk

inline void int4_block(const uint8_t* w, const uint16_t* scale, int64_t ngroups, int64_t cpg, const int16_t* xq,
                       float* out) {
  const __m256i low = _mm256_set1_epi16(0x0F), eight = _mm256_set1_epi16(8);
  __m256 facc[kRows];
  for (int r = 0; r < kRows; ++r) facc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256i iacc[kRows];
    for (int r = 0; r < kRows; ++r) iacc[r] = _mm256_setzero_si256();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* wc = w + c * kRows * 16;
      _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetch), _MM_HINT_T0);
      const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * kGroupChunk));
      const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * kGroupChunk + 16));
      for (int r = 0; r < kRows; ++r) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wc + r * 16)));
        const __m256i lo = _mm256_sub_epi16(_mm256_and_si256(v, low), eight);  // columns 32c + 0..15
        const __m256i hi = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), eight);   // columns 32c + 16..31
        iacc[r] = dot_add(dot_add(iacc[r], lo, xlo), hi, xhi);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const __m256 s = _mm256_set1_ps(bf16_to_float(scale[g * kRows + r]));
      facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), s, facc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = hsum(facc[r]);
}

// Two tokens, rows r0 and r0 + 1 of the block; out[m * kRows + r].
inline void int4_pair(const uint8_t* w, const uint16_t* scale, int64_t ngroups, int64_t cpg, const int16_t* xq,
                      int64_t Kp, int r0, float* out) {
  const __m256i low = _mm256_set1_epi16(0x0F), eight = _mm256_set1_epi16(8);
  __m256 facc[2][2];
  for (int m = 0; m < 2; ++m)
    for (int r = 0; r < 2; ++r) facc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256i iacc[2][2];
    for (int m = 0; m < 2; ++m)
      for (int r = 0; r < 2; ++r) iacc[m][r] = _mm256_setzero_si256();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* wc = w + c * kRows * 16;
      _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetch), _MM_HINT_T0);
      __m256i xlo[2], xhi[2];
      for (int m = 0; m < 2; ++m) {
        xlo[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + c * kGroupChunk));
        xhi[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + c * kGroupChunk + 16));
      }
      for (int r = 0; r < 2; ++r) {
        const __m256i v =
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wc + (r0 + r) * 16)));
        const __m256i lo = _mm256_sub_epi16(_mm256_and_si256(v, low), eight);
        const __m256i hi = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), eight);
        for (int m = 0; m < 2; ++m) iacc[m][r] = dot_add(dot_add(iacc[m][r], lo, xlo[m]), hi, xhi[m]);
      }
    }
    for (int r = 0; r < 2; ++r) {
      const __m256 s = _mm256_set1_ps(bf16_to_float(scale[g * kRows + r0 + r]));
      for (int m = 0; m < 2; ++m) facc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][r]), s, facc[m][r]);
    }
  }
  for (int m = 0; m < 2; ++m)
    for (int r = 0; r < 2; ++r) out[m * kRows + r0 + r] = hsum(facc[m][r]);
}

struct Int4Kernel {
  const uint8_t* w;        // packed (Nb, Kp / 32, 4, 16)
  const uint16_t* scale;   // bf16 (Nb, ngroups, 4)
  const int16_t* xq;       // (M, Kp)
  int64_t Kp, ngroups;

  template <int MB>
  void block(int64_t b, int64_t m0, float* out) const {
    static_assert(MB == 1 || MB == 2, "int4: one or two tokens per pass");
    const int64_t cpg = Kp / kGroupChunk / ngroups;
    const uint8_t* wb = w + b * kRows * Kp / 2;
    const uint16_t* sb = scale + b * ngroups * kRows;
    if (MB == 1) {
      int4_block(wb, sb, ngroups, cpg, xq + m0 * Kp, out);
    } else {
      for (int r0 = 0; r0 < kRows; r0 += 2) int4_pair(wb, sb, ngroups, cpg, xq + m0 * Kp, Kp, r0, out);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Driver shared by all weight types: split the row blocks over threads; for each block run the tokens in
// pairs (the block's weights stay in L1/L2 between pairs), then scale, add the bias and store.

template <typename OutT, typename Kernel>
void run_blocks(const Kernel& kernel, int64_t M, int64_t N, int64_t K, int64_t weight_bytes, OutT* y,
                const float* bias, const float* row_scale, const float* tok_scale) {
  const int64_t nblocks = (N + kRows - 1) / kRows;
  // At least ~64 KiB of weights per task, so that tiny layers are not split across threads.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, kRows * K * weight_bytes));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    float out[kTok * kRows];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kTok) {
        const int mb = static_cast<int>(std::min<int64_t>(kTok, M - m0));
        if (mb == 1) {
          kernel.template block<1>(b, m0, out);
        } else {
          kernel.template block<kTok>(b, m0, out);
        }
        for (int m = 0; m < mb; ++m) {
          for (int r = 0; r < rows; ++r) {
            const int64_t n = n0 + r;
            float v = out[m * kRows + r];
            if (row_scale) {
              v *= row_scale[n] * tok_scale[m0 + m];
            } else if (tok_scale) {  // int4: the row's scales are applied per group inside the kernel
              v *= tok_scale[m0 + m];
            }
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
// 113-141 vs 69-106.
constexpr int64_t kGemmMinRowsBf16 = 32;
constexpr int64_t kGemmMinRowsInt4 = 16;

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
  const int64_t Kp = (K + kChunk - 1) / kChunk * kChunk;
  std::vector<float> xf(M * Kp);
  pack_x_bf16(x.data_ptr<T>(), M, K, Kp, xf.data());
  const Bf16Kernel kernel{wp, xf.data(), N, K, Kp};
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
  std::vector<int16_t> xq(M * Kp);
  std::vector<float> xscale(M);
  pack_x_int16(x.data_ptr<T>(), M, K, Kp, xq.data(), xscale.data());
  const Int4Kernel kernel{w.data_ptr<uint8_t>(), sp, xq.data(), Kp, scale.size(1)};
  // weight_bytes = 1 for the grain: half a byte per weight, plus scales, rounds up to about a byte's work.
  run_blocks(kernel, M, N, K, 1, y.data_ptr<T>(), ptr_or_null(bias), nullptr, xscale.data());
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

// TORCH_LIBRARY pastes its namespace argument into identifiers; one more macro level expands CG2_OPS first.
#ifndef CG2_OPS
#define CG2_OPS codegen2_kernels_avx2
#endif
#define CG2_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define CG2_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

CG2_LIBRARY(CG2_OPS, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scale, Tensor? bias, int N) -> Tensor");
}

CG2_LIBRARY_IMPL(CG2_OPS, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
}
