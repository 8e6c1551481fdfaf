// CPU attention products for passes with few queries per head: decode (one token per sequence) and
// speculative verify (k + 1 tokens), against a bf16 KV cache.
//
// Why by hand: torch's SDPA on CPU (its flash kernel) costs far more than reading K and V for such passes.
// Measured on Zen 4, 1 thread, 16 heads of 128, one query per head (ms per call, SDPA / fp32 matmuls as the
// CodeGen2 reference does them): 40 keys 0.23 / 0.14, 512 keys 2.7 / 0.36, 2,048 keys 9.5 / 2.2; 16 sequences
// of 512 keys 33 / 9.1. Reading K and V of 2,048 keys (16.8 MB) takes ~0.6 ms at this machine's bandwidth. So
// at editor-sized contexts attention, not the weights, was most of a decode step. These two ops read the cache
// once each, in place (any row / head strides, unit stride in D), convert bf16 to fp32 in registers and never
// materialize an fp32 copy of the cache; the masked softmax between them stays in torch (kernels/attention.py).
//
//   attn_scores(q, k, scale)  q (B, G, Q, D) fp32, contiguous; k (B, G, S, D) bf16 -> (B, G, Q, S) fp32,
//                             scale * (q . k) summed in fp32.
//   attn_mix(p, v)            p (B, G, Q, S) fp32, contiguous (the probabilities, already rounded to bf16 as
//                             the reference does, held in fp32 so that a broadcast is one load); v (B, G, S, D)
//                             bf16 -> (B, G, Q, D) fp32, sum_s p * v in fp32.
//
// Threads split each head's keys into blocks of 256 (scores write their own columns; mix adds the blocks'
// partial sums afterwards, in block order, so no result depends on the thread count): every task reads one
// sequential stream of the cache, which measured faster than splitting D (mix, 1,024 keys, 2 threads: 231 vs
// 300 us per layer). Two queries at a time share each bf16 -> fp32 conversion of K or V (verify passes: scores
// at 6 queries 435 -> 369 us).
//
// G is the number of K/V heads; grouped-query attention passes its query heads of one K/V head as Q = rep * T
// rows. Only AVX2 + FMA are used (every level has them): these loops are bound by memory, not by instructions.
// Compiled into the same library as decode_linear.cpp (a fragment of its op namespace).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd_common.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// The four sums of a0..a3's lanes, in order.
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s01 = _mm256_hadd_ps(a0, a1);   // a0 pairs | a1 pairs, per 128-bit half
  const __m256 s23 = _mm256_hadd_ps(a2, a3);
  const __m256 s = _mm256_hadd_ps(s01, s23);   // per half: sum0 sum1 sum2 sum3 (partial)
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

constexpr int64_t kKeyBlock = 256;  // keys per parallel task: keeps 2 threads busy when B * G is small (GQA)

struct View4 {  // a (B, G, S, D) bf16 tensor with unit stride in D
  const uint16_t* p;
  int64_t sb, sg, ss;
  const uint16_t* row(int64_t b, int64_t g, int64_t s) const { return p + b * sb + g * sg + s * ss; }
};

View4 view_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 4 && t.stride(3) == 1,
              "codegen2_kernels.attention: ", what, " must be a bf16 CPU tensor (B, G, S, D) with unit stride in D");
  return View4{reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()), t.stride(0), t.stride(1),
               t.stride(2)};
}

at::Tensor attn_scores(const at::Tensor& q, const at::Tensor& k, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 4 && q.is_contiguous(),
              "codegen2_kernels.attn_scores: q must be a contiguous fp32 CPU tensor (B, G, Q, D)");
  const View4 kv = view_of(k, "k");
  const int64_t B = q.size(0), G = q.size(1), Q = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == G && k.size(3) == D,
              "codegen2_kernels.attn_scores: k must be (B, G, S, D) matching q (B, G, Q, D)");
  at::Tensor out = at::empty({B, G, Q, S}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t blocks = (S + kKeyBlock - 1) / kKeyBlock, D8 = D / 8 * 8;
  at::parallel_for(0, B * G * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bg = t / blocks, b = bg / G, g = bg % G;
      const int64_t s0 = (t % blocks) * kKeyBlock, s1 = std::min(S, s0 + kKeyBlock);
      const float* qbg = qp + bg * Q * D;
      float* obg = op + bg * Q * S;
      int64_t s = s0;
      for (; s + 4 <= s1; s += 4) {  // four keys at a time, for every query: the four rows stay in L1
        const uint16_t* r[4] = {kv.row(b, g, s), kv.row(b, g, s + 1), kv.row(b, g, s + 2), kv.row(b, g, s + 3)};
        int64_t i = 0;
        for (; i + 2 <= Q; i += 2) {  // two queries share each conversion of the keys: 8 accumulators
          const float* qi = qbg + i * D;
          const float* qj = qi + D;
          __m256 a[2][4];
          for (int j = 0; j < 4; ++j) a[0][j] = a[1][j] = _mm256_setzero_ps();
          for (int64_t d = 0; d < D8; d += 8) {
            const __m256 x0 = _mm256_loadu_ps(qi + d), x1 = _mm256_loadu_ps(qj + d);
            for (int j = 0; j < 4; ++j) {
              const __m256 kj = load8(r[j] + d);
              a[0][j] = _mm256_fmadd_ps(x0, kj, a[0][j]);
              a[1][j] = _mm256_fmadd_ps(x1, kj, a[1][j]);
            }
          }
          alignas(16) float sums[2][4];
          _mm_store_ps(sums[0], hsum4(a[0][0], a[0][1], a[0][2], a[0][3]));
          _mm_store_ps(sums[1], hsum4(a[1][0], a[1][1], a[1][2], a[1][3]));
          for (int64_t d = D8; d < D; ++d)
            for (int j = 0; j < 4; ++j) {
              sums[0][j] += qi[d] * bf16_to_float(r[j][d]);
              sums[1][j] += qj[d] * bf16_to_float(r[j][d]);
            }
          for (int j = 0; j < 4; ++j) {
            obg[i * S + s + j] = sc * sums[0][j];
            obg[(i + 1) * S + s + j] = sc * sums[1][j];
          }
        }
        for (; i < Q; ++i) {
          const float* qi = qbg + i * D;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t d = 0; d < D8; d += 8) {
            const __m256 x = _mm256_loadu_ps(qi + d);
            a0 = _mm256_fmadd_ps(x, load8(r[0] + d), a0);
            a1 = _mm256_fmadd_ps(x, load8(r[1] + d), a1);
            a2 = _mm256_fmadd_ps(x, load8(r[2] + d), a2);
            a3 = _mm256_fmadd_ps(x, load8(r[3] + d), a3);
          }
          alignas(16) float sums[4];
          _mm_store_ps(sums, hsum4(a0, a1, a2, a3));
          for (int64_t d = D8; d < D; ++d)
            for (int j = 0; j < 4; ++j) sums[j] += qi[d] * bf16_to_float(r[j][d]);
          for (int j = 0; j < 4; ++j) obg[i * S + s + j] = sc * sums[j];
        }
      }
      for (; s < s1; ++s) {
        const uint16_t* r = kv.row(b, g, s);
        for (int64_t i = 0; i < Q; ++i) {
          const float* qi = qbg + i * D;
          __m256 a = _mm256_setzero_ps();
          for (int64_t d = 0; d < D8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), load8(r + d), a);
          float sum = hsum(a);
          for (int64_t d = D8; d < D; ++d) sum += qi[d] * bf16_to_float(r[d]);
          obg[i * S + s] = sc * sum;
        }
      }
    }
  });
  return out;
}

// acc[i][c0 .. c0 + 8 * nvec) += sum over keys s0 .. s1 - 1 of p[i][s] * v[s][same columns], for queries i and
// i + 1 (pair) or i alone; the accumulators stay in registers over the keys and go back to acc after.
template <int NQ, int NV>
inline void mix_columns(const float* const* p, const View4& vv, int64_t b, int64_t g, int64_t s0, int64_t s1,
                        int64_t c0, int nvec, float* const* acc) {
  __m256 a[NQ][NV];
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < nvec; ++c) a[i][c] = _mm256_loadu_ps(acc[i] + c0 + 8 * c);
  for (int64_t s = s0; s < s1; ++s) {
    bool any = false;
    for (int i = 0; i < NQ; ++i) any |= p[i][s] != 0.0f;
    if (!any) continue;  // +0.0 probabilities (masked keys) add nothing
    __m256 w[NQ];
    for (int i = 0; i < NQ; ++i) w[i] = _mm256_broadcast_ss(p[i] + s);
    const uint16_t* r = vv.row(b, g, s) + c0;
    for (int c = 0; c < nvec; ++c) {
      const __m256 x = load8(r + 8 * c);
      for (int i = 0; i < NQ; ++i) a[i][c] = _mm256_fmadd_ps(w[i], x, a[i][c]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < nvec; ++c) _mm256_storeu_ps(acc[i] + c0 + 8 * c, a[i][c]);
}

constexpr int64_t kMixKeys = 16;  // keys per pass over the columns: their rows stay in L1 for the next columns

at::Tensor attn_mix(const at::Tensor& p, const at::Tensor& v) {
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 4 && p.is_contiguous(),
              "codegen2_kernels.attn_mix: p must be a contiguous fp32 CPU tensor (B, G, Q, S)");
  const View4 vv = view_of(v, "v");
  const int64_t B = p.size(0), G = p.size(1), Q = p.size(2), S = p.size(3), D = v.size(3);
  TORCH_CHECK(v.size(0) == B && v.size(1) == G && v.size(2) == S,
              "codegen2_kernels.attn_mix: v must be (B, G, S, D) matching p (B, G, Q, S)");
  at::Tensor out = at::zeros({B, G, Q, D}, p.options().dtype(at::kFloat));
  const float* pp = p.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Threads split the keys (each task one block of kKeyBlock keys, read as one sequential stream, all D columns)
  // into partial sums, added up afterwards in block order, so the result does not depend on the thread count.
  const int64_t blocks = (S + kKeyBlock - 1) / kKeyBlock, D8 = D / 8 * 8;
  std::vector<float> part(blocks > 1 ? B * G * blocks * Q * D : 0, 0.0f);
  at::parallel_for(0, B * G * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bg = t / blocks, b = bg / G, g = bg % G, blk = t % blocks;
      const int64_t s0 = blk * kKeyBlock, s1 = std::min(S, s0 + kKeyBlock);
      float* acc = blocks > 1 ? part.data() + t * Q * D : op + bg * Q * D;  // (Q, D)
      for (int64_t sb = s0; sb < s1; sb += kMixKeys) {
        const int64_t se = std::min(s1, sb + kMixKeys);
        int64_t i = 0;
        for (; i + 2 <= Q; i += 2) {  // two queries share each conversion of v: 2 x 4 accumulators
          const float* pr[2] = {pp + (bg * Q + i) * S, pp + (bg * Q + i + 1) * S};
          float* ar[2] = {acc + i * D, acc + (i + 1) * D};
          for (int64_t c0 = 0; c0 < D8; c0 += 32)
            mix_columns<2, 4>(pr, vv, b, g, sb, se, c0, static_cast<int>(std::min<int64_t>(4, (D8 - c0) / 8)), ar);
        }
        for (; i < Q; ++i) {
          const float* pr[1] = {pp + (bg * Q + i) * S};
          float* ar[1] = {acc + i * D};
          for (int64_t c0 = 0; c0 < D8; c0 += 64)
            mix_columns<1, 8>(pr, vv, b, g, sb, se, c0, static_cast<int>(std::min<int64_t>(8, (D8 - c0) / 8)), ar);
        }
        for (int64_t d = D8; d < D; ++d)  // the last D % 8 columns
          for (int64_t q = 0; q < Q; ++q)
            for (int64_t s = sb; s < se; ++s)
              acc[q * D + d] += pp[(bg * Q + q) * S + s] * bf16_to_float(vv.row(b, g, s)[d]);
      }
    }
  });
  if (blocks > 1)
    at::parallel_for(0, B * G, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t bg = g0; bg < g1; ++bg)
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const float* src = part.data() + (bg * blocks + blk) * Q * D;
          float* dst = op + bg * Q * D;
          for (int64_t j = 0; j < Q * D; ++j) dst[j] += src[j];
        }
    });
  return out;
}

}  // namespace

#ifndef CG2_OPS
#define CG2_OPS codegen2_kernels_avx2
#endif
#define CG2_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define CG2_FRAGMENT_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

CG2_FRAGMENT(CG2_OPS, m) {
  m.def("attn_scores(Tensor q, Tensor k, float scale) -> Tensor");
  m.def("attn_mix(Tensor p, Tensor v) -> Tensor");
}

CG2_FRAGMENT_IMPL(CG2_OPS, CPU, m) {
  m.impl("attn_scores", &attn_scores);
  m.impl("attn_mix", &attn_mix);
}
