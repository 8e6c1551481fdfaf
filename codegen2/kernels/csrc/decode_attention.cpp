// CPU attention for passes with few queries per head: decode (one token per sequence) and speculative verify
// (k + 1 tokens), against a bf16 KV cache, in one op per layer.
//
// Why by hand: torch's SDPA on CPU (its flash kernel) costs far more than reading K and V for such passes.
// Measured on Zen 4, 1 thread, 16 heads of 128, one query per head (ms per call, SDPA / fp32 matmuls as the
// CodeGen2 reference does them): 40 keys 0.23 / 0.14, 512 keys 2.7 / 0.36, 2,048 keys 9.5 / 2.2; 16 sequences
// of 512 keys 33 / 9.1. Reading K and V of 2,048 keys (16.8 MB) takes ~0.6 ms at this machine's bandwidth. So
// at editor-sized contexts attention, not the weights, was most of a decode step.
//
//   attn_decode(q, k, v, allowed, c, divide)
//     q (B, H, T, D) fp32 or bf16, any strides; k, v (B, G, S, D) bf16, any row / head strides, unit stride in D
//     (views of the cache, read in place); allowed (B, 1, T, S) bool -> (B, H, T, D) bf16. Query head h reads
//     K/V head h / (H / G) (grouped-query attention). The numerics of models/attention.py: scores q . k summed
//     in fp32, divided by c (divide: CodeGen2) or multiplied by it (LLaMA); keys not allowed set to the fp32
//     minimum; softmax as exp(x - max) times 1 / sum; the probabilities rounded to bf16 (the reference rounds
//     them to v's dtype); their sum with v in fp32, rounded once to bf16. A query that sees no key gets the
//     uniform row the reference gives it.
//
// One task per (sequence, K/V head): its scores, softmax and mix run back to back on one thread, the scores in
// a buffer that stays in L1 / L2, K and V each read once as one sequential stream. An earlier version was two
// ops (scores, then mix) with torch's masked softmax between: Zen 4, 2 threads, 16 heads of 128, 1,024 keys,
// one query, us per layer: scores 70-85 + softmax and its glue 55-80 + mix 115-155 against 180-210 fused (the
// cache read at ~45 GB/s, this machine's measured bandwidth). Threads split over (sequence, head) only, so no
// result depends on the thread count; a model with fewer K/V heads than threads leaves threads idle at batch 1
// (none of the CodeGen2 / CodeGen2.5 checkpoints: 16-32 heads). Two queries at a time share each bf16 -> fp32
// conversion of K or V (verify passes). With more queries per head the products become compute-bound and
// SDPA's blocked matmuls win (LLaMA, 1,024 keys: 6 queries 0.86 / 0.89 ms, 8 queries 1.26 / 1.13), which is
// why kernels/attention.py sends passes of more than 6 tokens to the model's own module.
//
// Only AVX2 + FMA are used (every level has them): at decode sizes these loops are bound by memory. Compiled
// into the same library as decode_linear.cpp (a fragment of its op namespace).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd_common.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// The four sums of a0..a3's lanes, in order.
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s01 = _mm256_hadd_ps(a0, a1);   // a0 pairs | a1 pairs, per 128-bit half
  const __m256 s23 = _mm256_hadd_ps(a2, a3);
  const __m256 s = _mm256_hadd_ps(s01, s23);   // per half: sum0 sum1 sum2 sum3 (partial)
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

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

// Scores of Q fp32 query rows (qbg, D each, contiguous) against keys s0 .. s1 - 1 of head (b, g):
// obg[i * S + s] = q_i . k_s, summed in fp32.
void score_keys(const float* qbg, int64_t Q, int64_t D, const View4& kv, int64_t b, int64_t g, int64_t s0,
                int64_t s1, float* obg, int64_t S) {
  const int64_t D8 = D / 8 * 8;
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
        obg[i * S + s + j] = sums[0][j];
        obg[(i + 1) * S + s + j] = sums[1][j];
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
      for (int j = 0; j < 4; ++j) obg[i * S + s + j] = sums[j];
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
      obg[i * S + s] = sum;
    }
  }
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

// acc[i][:] += sum over keys s0 .. s1 - 1 of p[i][s] * v[s][:] for the Q probability rows of head (b, g)
// (pbg, rows of S), acc (Q, D) fp32; kMixKeys keys at a time so that their rows stay in L1 for every column.
void mix_keys(const float* pbg, int64_t S, int64_t Q, const View4& vv, int64_t b, int64_t g, int64_t s0,
              int64_t s1, int64_t D, float* acc) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t sb = s0; sb < s1; sb += kMixKeys) {
    const int64_t se = std::min(s1, sb + kMixKeys);
    int64_t i = 0;
    for (; i + 2 <= Q; i += 2) {  // two queries share each conversion of v: 2 x 4 accumulators
      const float* pr[2] = {pbg + i * S, pbg + (i + 1) * S};
      float* ar[2] = {acc + i * D, acc + (i + 1) * D};
      for (int64_t c0 = 0; c0 < D8; c0 += 32)
        mix_columns<2, 4>(pr, vv, b, g, sb, se, c0, static_cast<int>(std::min<int64_t>(4, (D8 - c0) / 8)), ar);
    }
    for (; i < Q; ++i) {
      const float* pr[1] = {pbg + i * S};
      float* ar[1] = {acc + i * D};
      for (int64_t c0 = 0; c0 < D8; c0 += 64)
        mix_columns<1, 8>(pr, vv, b, g, sb, se, c0, static_cast<int>(std::min<int64_t>(8, (D8 - c0) / 8)), ar);
    }
    for (int64_t d = D8; d < D; ++d)  // the last D % 8 columns
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t s = sb; s < se; ++s)
          acc[q * D + d] += pbg[q * S + s] * bf16_to_float(vv.row(b, g, s)[d]);
  }
}

// exp(x) for x <= 0 (scores minus their row's maximum), 8 lanes: x = n ln2 + r with n = round(x log2 e) and
// ln2 in two parts (Cody-Waite, Cephes' constants), e^r by its Taylor polynomial to r^7 (|r| <= ln2 / 2, so the
// truncation is < 1e-8 relative: within an ulp or two of torch's Sleef exp), times 2^n built in the exponent
// bits. Below -87 (e^x under FLT_MIN: masked keys, whose score is the fp32 minimum) the result is 0, as torch's
// exp underflows there to 0 or to a denormal that no fp32 sum with the row's maximum term (1) can see.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), y);
}

// Non-negative finite fp32 lanes rounded to the nearest bf16 (ties to even), kept as fp32: what torch's
// .to(torch.bfloat16) gives them.
inline __m256 round_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// One row of scores (n keys) -> its probabilities in place, as models/attention.py's masked_softmax followed by
// the reference's rounding to bf16: scaled (multiplied by c, or divided by it where the family divides), keys
// not allowed set to the fp32 minimum, exp(x - max), times 1 / sum, rounded to bf16.
void softmax_row(float* x, const bool* ok, int64_t ok_stride, int64_t n, float c, bool divide) {
  const float lowest = std::numeric_limits<float>::lowest();
  float top = lowest;
  for (int64_t s = 0; s < n; ++s) {
    const float y = ok[s * ok_stride] ? (divide ? x[s] / c : x[s] * c) : lowest;
    x[s] = y;
    top = std::max(top, y);
  }
  const __m256 m = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + s), m));
    _mm256_storeu_ps(x + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = hsum(acc);
  if (s < n) {  // the last n % 8 keys through the same vector exp (padded with the maximum: e^0, not summed)
    alignas(32) float tail[8];
    for (int j = 0; j < 8; ++j) tail[j] = s + j < n ? x[s + j] : top;
    _mm256_store_ps(tail, exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(tail), m)));
    for (int64_t j = 0; s + j < n; ++j) {
      x[s + j] = tail[j];
      total += tail[j];
    }
  }
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (s = 0; s + 8 <= n; s += 8) _mm256_storeu_ps(x + s, round_bf16(_mm256_mul_ps(_mm256_loadu_ps(x + s), inv)));
  for (; s < n; ++s) x[s] = c10::BFloat16(x[s] * (1.0f / total));
}

at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed,
                       double scale, bool divide) {
  TORCH_CHECK(q.device().is_cpu() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  q.dim() == 4,
              "codegen2_kernels.attn_decode: q must be an fp32 or bf16 CPU tensor (B, H, T, D)");
  const View4 kv = view_of(k, "k"), vv = view_of(v, "v");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), G = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && G > 0 && H % G == 0 && S > 0,
              "codegen2_kernels.attn_decode: k must be (B, G, S, D) with S > 0 and G dividing q's H, q (B, H, T, D)");
  TORCH_CHECK(v.sizes() == k.sizes(), "codegen2_kernels.attn_decode: v must have k's shape (B, G, S, D)");
  TORCH_CHECK(allowed.device().is_cpu() && allowed.scalar_type() == at::kBool && allowed.dim() == 4 &&
                  allowed.size(0) == B && allowed.size(1) == 1 && allowed.size(2) == T && allowed.size(3) == S,
              "codegen2_kernels.attn_decode: allowed must be a bool CPU tensor (B, 1, T, S)");
  const int64_t rep = H / G, Q = rep * T;
  // q is read in place, in its own dtype, into each task's fp32 rows.
  const bool q_bf16 = q.scalar_type() == at::kBFloat16;
  const float* qp32 = q_bf16 ? nullptr : q.data_ptr<float>();
  const uint16_t* qp16 = q_bf16 ? reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()) : nullptr;
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qst = q.stride(2), qsd = q.stride(3);
  const bool* ap = allowed.data_ptr<bool>();
  const int64_t asb = allowed.stride(0), ast = allowed.stride(2), ass = allowed.stride(3);
  at::Tensor out = at::empty({B, H, T, D}, q.options().dtype(at::kBFloat16));
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const float c = static_cast<float>(scale);
  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qbuf(Q * D), p(Q * S), acc(Q * D);
    for (int64_t bg = t0; bg < t1; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      for (int64_t r = 0; r < Q; ++r) {  // row r: query head g * rep + r / T at token r % T
        const int64_t at = b * qsb + (g * rep + r / T) * qsh + (r % T) * qst;
        for (int64_t d = 0; d < D; ++d)
          qbuf[r * D + d] = q_bf16 ? bf16_to_float(qp16[at + d * qsd]) : qp32[at + d * qsd];
      }
      score_keys(qbuf.data(), Q, D, kv, b, g, 0, S, p.data(), S);
      for (int64_t r = 0; r < Q; ++r) softmax_row(p.data() + r * S, ap + b * asb + (r % T) * ast, ass, S, c, divide);
      std::fill(acc.begin(), acc.end(), 0.0f);
      mix_keys(p.data(), S, Q, vv, b, g, 0, S, D, acc.data());
      for (int64_t r = 0; r < Q; ++r) {
        c10::BFloat16* dst = op + ((b * H + g * rep + r / T) * T + r % T) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(acc[r * D + d]);  // rounded once, to nearest even
      }
    }
  });
  return out;
}

}  // namespace

CG2_FRAGMENT(CG2_OPS, m) {
  m.def("attn_decode(Tensor q, Tensor k, Tensor v, Tensor allowed, float scale, bool divide) -> Tensor");
}

CG2_LIBRARY_IMPL(CG2_OPS, CPU, m) {
  m.impl("attn_decode", &attn_decode);
}
