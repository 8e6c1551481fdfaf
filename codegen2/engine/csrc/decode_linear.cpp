// Weight-streaming linear layers for small-batch CPU decode: y = x @ W.T (+ b) for x of M <= ~16 rows.
//
// Decode is bound by reading W once per step, so these kernels are built around one goal: stream the (N, K)
// row-major weight at memory speed and do as little per byte as possible. They are NOT general GEMMs: every
// weight chunk is converted once per group of <= 3 tokens, so large M (prefill) belongs to oneDNN (the Python
// side routes it there).
//
// Needs AVX2 + FMA only (the Python loader checks the CPU before it loads this file; the whole file is compiled
// with -mavx2 -mfma). Two ops, registered as torch.ops.codegen2_kernels.*:
//
//   linear_bf16(x, w, bias?)        w (N, K) bf16. Products of bf16 values are exact in fp32; sums are fp32.
//   linear_int8(x, w, scale, bias?) w (N, K) int8 in [-127, 127], scale (N,): W ~= w * scale[:, None].
//                                   x is quantised per row to int16 (|err| <= max|x_row| / 65534, finer than
//                                   bf16's own rounding for all but tiny elements) so that the inner loop is an
//                                   exact integer dot product (vpmaddwd), i.e. twice the work per instruction
//                                   of an fp32 FMA and no int->float conversion per weight.
//
// x is (M, K) bf16 or fp32, contiguous; the output is (M, N) in x's dtype. Threads split the output rows
// (at::parallel_for), so each thread streams one contiguous slab of W.

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

constexpr int kRows = 4;        // weight rows per micro-kernel: 4 parallel streams per thread
constexpr int kTok = 3;         // tokens per micro-kernel pass (3 x 4 accumulators fit the 16 ymm registers)
constexpr int kChunk = 16;      // K elements per vector step
constexpr int kFlush = 128;     // int8: chunks summed in int32 before moving to fp32 (see overflow note below)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Position of element k inside the [even 8 | odd 8] reordering of its 16-chunk (see pack_x_bf16).
inline int64_t eo_index(int64_t k) {
  const int64_t j = k % kChunk;
  return k - j + (j & 1) * 8 + (j >> 1);
}

// ---------------------------------------------------------------------------------------------------------
// bf16 weights. A 32-byte load holds 16 bf16 as 8 int32 lanes: lane i = (w[2i+1] << 16) | w[2i]. Shifting a
// lane left by 16 gives w[2i] as an fp32, masking the low half gives w[2i+1]: two ops per 16 weights, no
// shuffles. x is stored once per call in the matching order, each 16-chunk as [x0 x2 .. x14 | x1 x3 .. x15].

template <typename T>
void pack_x_bf16(const T* x, int64_t M, int64_t K, int64_t Kp, float* xf) {
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xf + m * Kp;
    std::fill(dst, dst + Kp, 0.0f);
    for (int64_t k = 0; k < K; ++k) dst[eo_index(k)] = static_cast<float>(x[m * K + k]);
  }
}

// out[m * R + r] = dot(w row r, x row m) for MB tokens and R rows; w points at row 0 of the block.
template <int MB, int R>
inline void bf16_tile(const uint16_t* w, int64_t K, const float* xf, int64_t Kp, float* out) {
  constexpr int S = MB == 1 ? 2 : 1;  // one token: split even/odd sums to get 8 independent FMA chains
  __m256 acc[MB][R][S];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s) acc[m][r][s] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t nc = K / kChunk;
  for (int64_t c = 0; c < nc; ++c) {
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + c * kChunk));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
      for (int m = 0; m < MB; ++m) {
        const float* xp = xf + m * Kp + c * kChunk;
        acc[m][r][0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xp), acc[m][r][0]);
        acc[m][r][S - 1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xp + 8), acc[m][r][S - 1]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      __m256 a = acc[m][r][0];
      if (S == 2) a = _mm256_add_ps(a, acc[m][r][S - 1]);
      float sum = hsum(a);
      for (int64_t k = nc * kChunk; k < K; ++k) sum += bf16_to_float(w[r * K + k]) * xf[m * Kp + eo_index(k)];
      out[m * R + r] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// int8 weights against int16 activations: vpmovsxbw widens 16 weights, vpmaddwd multiplies and adds pairs into
// 8 int32 lanes. Overflow: a pair is at most 2 * 127 * 32767 < 2^23, so 128 chunks stay below 2^30 before the
// int32 sums move into fp32 accumulators.

template <typename T>
void pack_x_int16(const T* x, int64_t M, int64_t K, int64_t Kp, int16_t* xq, float* xscale) {
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * K;
    float amax = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float v = static_cast<float>(src[k]);
      finite &= std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    // A non-finite input poisons its whole output row, as it would in an fp32 matmul.
    xscale[m] = finite ? amax / 32767.0f : NAN;
    const float inv = (finite && amax > 0.0f) ? 32767.0f / amax : 0.0f;
    int16_t* dst = xq + m * Kp;
    for (int64_t k = 0; k < K; ++k) {
      const float q = std::nearbyint(static_cast<float>(src[k]) * inv);
      dst[k] = static_cast<int16_t>(std::min(32767.0f, std::max(-32767.0f, q)));
    }
    std::fill(dst + K, dst + Kp, int16_t(0));
  }
}

template <int MB, int R>
inline void int8_tile(const int8_t* w, int64_t K, const int16_t* xq, int64_t Kp, float* out) {
  __m256 facc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) facc[m][r] = _mm256_setzero_ps();
  const int64_t nc = K / kChunk;
  for (int64_t c0 = 0; c0 < nc; c0 += kFlush) {
    const int64_t c1 = std::min(nc, c0 + kFlush);
    __m256i iacc[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) iacc[m][r] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; ++c) {
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + c * kChunk)));
        for (int m = 0; m < MB; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + c * kChunk));
          iacc[m][r] = _mm256_add_epi32(iacc[m][r], _mm256_madd_epi16(v, xv));
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) facc[m][r] = _mm256_add_ps(facc[m][r], _mm256_cvtepi32_ps(iacc[m][r]));
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      int64_t tail = 0;
      for (int64_t k = nc * kChunk; k < K; ++k) tail += int64_t(w[r * K + k]) * xq[m * Kp + k];
      out[m * R + r] = hsum(facc[m][r]) + static_cast<float>(tail);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Driver shared by both weight types: split the rows over threads, run each row block for groups of <= kTok
// tokens (the block's weights stay in L1/L2 between groups), then scale, add the bias and store.

template <int R, typename Tile>
inline void run_tile(const Tile& tile, int mb, int64_t n, int64_t m0, float* out) {
  switch (mb) {
    case 1: tile.template run<1, R>(n, m0, out); break;
    case 2: tile.template run<2, R>(n, m0, out); break;
    default: tile.template run<kTok, R>(n, m0, out); break;
  }
}

// out holds [mb][R] dot products for rows n.. n+R-1 and tokens m0.. m0+mb-1.
template <typename OutT>
inline void store(const float* out, int mb, int R, int64_t n, int64_t m0, int64_t N, OutT* y, const float* bias,
                  const float* row_scale, const float* tok_scale) {
  for (int m = 0; m < mb; ++m) {
    for (int r = 0; r < R; ++r) {
      float v = out[m * R + r];
      if (row_scale) v *= row_scale[n + r] * tok_scale[m0 + m];
      if (bias) v += bias[n + r];
      y[(m0 + m) * N + n + r] = static_cast<OutT>(v);
    }
  }
}

template <typename OutT, typename Tile>
void run_blocks(const Tile& tile, int64_t M, int64_t N, int64_t K, int64_t weight_bytes, OutT* y,
                const float* bias, const float* row_scale, const float* tok_scale) {
  const int64_t nblocks = (N + kRows - 1) / kRows;
  // At least ~64 KiB of weights per task, so tiny layers are not split across threads.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, kRows * K * weight_bytes));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    float out[kTok * kRows];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kTok) {
        const int mb = static_cast<int>(std::min<int64_t>(kTok, M - m0));
        if (rows == kRows) {
          run_tile<kRows>(tile, mb, n0, m0, out);
          store(out, mb, kRows, n0, m0, N, y, bias, row_scale, tok_scale);
        } else {  // the ragged last block, one row at a time
          for (int r = 0; r < rows; ++r) {
            run_tile<1>(tile, mb, n0 + r, m0, out);
            store(out, mb, 1, n0 + r, m0, N, y, bias, row_scale, tok_scale);
          }
        }
      }
    }
  });
}

struct Bf16Tile {
  const uint16_t* w;
  const float* xf;
  int64_t K, Kp;
  template <int MB, int R>
  void run(int64_t n, int64_t m0, float* out) const { bf16_tile<MB, R>(w + n * K, K, xf + m0 * Kp, Kp, out); }
};

struct Int8Tile {
  const int8_t* w;
  const int16_t* xq;
  int64_t K, Kp;
  template <int MB, int R>
  void run(int64_t n, int64_t m0, float* out) const { int8_tile<MB, R>(w + n * K, K, xq + m0 * Kp, Kp, out); }
};

void check_x(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "codegen2_kernels: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "codegen2_kernels: x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "codegen2_kernels: x must be bf16 or fp32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "codegen2_kernels: w must be a contiguous (N, K) matrix matching x");
}

std::vector<float> to_float_vector(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->numel() == n, "codegen2_kernels: ", what, " must have ", n, " elements");
  at::Tensor f = t->to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + n);
}

template <typename T>
at::Tensor linear_bf16_impl(const at::Tensor& x, const at::Tensor& w, const std::vector<float>& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t Kp = (K + kChunk - 1) / kChunk * kChunk;
  std::vector<float> xf(M * Kp);
  pack_x_bf16(x.data_ptr<T>(), M, K, Kp, xf.data());
  at::Tensor y = at::empty({M, N}, x.options());
  const Bf16Tile tile{reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), xf.data(), K, Kp};
  run_blocks(tile, M, N, K, 2, y.data_ptr<T>(), bias.empty() ? nullptr : bias.data(), nullptr, nullptr);
  return y;
}

template <typename T>
at::Tensor linear_int8_impl(const at::Tensor& x, const at::Tensor& w, const std::vector<float>& scale,
                            const std::vector<float>& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t Kp = (K + kChunk - 1) / kChunk * kChunk;
  std::vector<int16_t> xq(M * Kp);
  std::vector<float> xscale(M);
  pack_x_int16(x.data_ptr<T>(), M, K, Kp, xq.data(), xscale.data());
  at::Tensor y = at::empty({M, N}, x.options());
  const Int8Tile tile{w.data_ptr<int8_t>(), xq.data(), K, Kp};
  run_blocks(tile, M, N, K, 1, y.data_ptr<T>(), bias.empty() ? nullptr : bias.data(), scale.data(),
             xscale.data());
  return y;
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_x(x, w);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "codegen2_kernels.linear_bf16: w must be bf16");
  const std::vector<float> b = to_float_vector(bias, w.size(0), "bias");
  if (x.scalar_type() == at::kBFloat16) return linear_bf16_impl<at::BFloat16>(x, w, b);
  return linear_bf16_impl<float>(x, w, b);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  check_x(x, w);
  TORCH_CHECK(w.scalar_type() == at::kChar, "codegen2_kernels.linear_int8: w must be int8");
  const std::vector<float> s = to_float_vector(scale, w.size(0), "scale");
  const std::vector<float> b = to_float_vector(bias, w.size(0), "bias");
  if (x.scalar_type() == at::kBFloat16) return linear_int8_impl<at::BFloat16>(x, w, s, b);
  return linear_int8_impl<float>(x, w, s, b);
}

}  // namespace

TORCH_LIBRARY(codegen2_kernels, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(codegen2_kernels, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
}
