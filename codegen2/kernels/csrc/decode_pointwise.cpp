// The LLaMA family's per-layer pointwise steps in one op each: RMSNorm and rotary embedding, with the numerics of
// models/llama.py (RMSNorm.forward, Rotary.forward) step for step.
//
// Why by hand: in eager PyTorch each is a chain of small ops (RMSNorm 8: float, pow, mean, add, rsqrt, mul, to,
// mul; rotary 12 for q and k: mul, chunk, neg, cat, mul, add each), and at decode sizes (a few thousand elements)
// every op costs its dispatch, not its arithmetic. Measured on Zen 3 (2 threads): a 16-layer LLaMA decode step
// whose matrices are tiny (so that what is left is the per-op cost) takes 6.5 ms, against ~18 ms for the int4
// linears of the 1B shape.
//
//   rms_norm(x, w, eps)  x (N, D) bf16 contiguous, w (D,) bf16 -> (N, D) bf16:
//                        bf16(w * bf16(x * r)) with r = 1 / sqrt(sum(x^2) / D + eps), all in fp32. The sum runs
//                        in another order than torch's mean (8 lanes, then the lanes), so r can differ from the
//                        module's in its last bit, and a result then by one bf16 step (rarely: a tie within 2^-24).
//   rope(q, k, cos, sin) q (B, H, T, D), k (B, G, T, D) bf16 with unit stride in D; cos, sin (B, 1, T, D) bf16
//                        -> (q', k') laid out as q and k: x' = bf16(bf16(x * cos) + bf16(rot(x) * sin)) with
//                        rot(x) = (-x[D/2:], x[:D/2]): torch's bf16 ops round each product and the sum exactly so,
//                        so the results are bit-identical to the module's.
//
// AVX2 + FMA only (every level has them); compiled into the same library as decode_linear.cpp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd_common.h"

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

// fp32 value of a bf16 rounding, 8 at a time: what torch hands to the next op.
inline __m256 through_bf16(__m256 f) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(round_bf16x8(f)), 16));
}

inline float round_bf16(float f) { return static_cast<float>(c10::BFloat16(f)); }

void check_bf16(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == dim,
              "codegen2_kernels: ", name, " must be a ", dim, "-d bf16 CPU tensor, got ", t.scalar_type(), " of ",
              t.dim(), " dims");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_bf16(x, "rms_norm: x", 2);
  check_bf16(w, "rms_norm: w", 1);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.size(0) == x.size(1),
              "codegen2_kernels.rms_norm: x (N, D) and w (D,) must be contiguous and agree in D");
  const int64_t N = x.size(0), D = x.size(1), D8 = D / 8 * 8;
  at::Tensor out = at::empty({N, D}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float e = static_cast<float>(eps);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* src = xp + n * D;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D8; d += 8) {
        const __m256 h = load8(src + d);
        acc = _mm256_fmadd_ps(h, h, acc);
      }
      float sum = hsum(acc);
      for (int64_t d = D8; d < D; ++d) sum += bf16_to_float(src[d]) * bf16_to_float(src[d]);
      const float r = 1.0f / std::sqrt(sum / static_cast<float>(D) + e);  // torch: rsqrt(mean + eps)
      const __m256 vr = _mm256_set1_ps(r);
      uint16_t* dst = op + n * D;
      for (int64_t d = 0; d < D8; d += 8) {
        const __m256 y = through_bf16(_mm256_mul_ps(load8(src + d), vr));  // h * r, then .to(bf16)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), round_bf16x8(_mm256_mul_ps(load8(wp + d), y)));
      }
      for (int64_t d = D8; d < D; ++d) {
        const float y = round_bf16(bf16_to_float(src[d]) * r);
        dst[d] = c10::BFloat16(bf16_to_float(wp[d]) * y).x;
      }
    }
  });
  return out;
}

// x' = bf16(bf16(x * c) + bf16(rot(x) * s)) over one row of D (D even); the row's halves swap in rot.
void rope_row(const uint16_t* x, const uint16_t* c, const uint16_t* s, int64_t D, uint16_t* out) {
  const int64_t half = D / 2;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t d = 0;
  for (; d + 8 <= half; d += 8) {
    const __m256 lo = load8(x + d), hi = load8(x + half + d);
    const __m256 a = through_bf16(_mm256_mul_ps(lo, load8(c + d)));
    const __m256 b = through_bf16(_mm256_mul_ps(_mm256_xor_ps(hi, sign), load8(s + d)));  // -x[half + d]
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d), round_bf16x8(_mm256_add_ps(a, b)));
    const __m256 a2 = through_bf16(_mm256_mul_ps(hi, load8(c + half + d)));
    const __m256 b2 = through_bf16(_mm256_mul_ps(lo, load8(s + half + d)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + half + d), round_bf16x8(_mm256_add_ps(a2, b2)));
  }
  for (; d < half; ++d) {
    const float lo = bf16_to_float(x[d]), hi = bf16_to_float(x[half + d]);
    out[d] = c10::BFloat16(round_bf16(lo * bf16_to_float(c[d])) + round_bf16(-hi * bf16_to_float(s[d]))).x;
    out[half + d] = c10::BFloat16(round_bf16(hi * bf16_to_float(c[half + d])) +
                                  round_bf16(lo * bf16_to_float(s[half + d]))).x;
  }
}

at::Tensor rope_one(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  at::Tensor out = at::empty_like(x);  // the same layout as x (torch's pointwise ops keep it too)
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cos.data_ptr<at::BFloat16>());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sin.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * H * T, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * T), h = r / T % H, t = r % T;
      rope_row(xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2),
               cp + b * cos.stride(0) + t * cos.stride(2), sp + b * sin.stride(0) + t * sin.stride(2), D,
               op + b * out.stride(0) + h * out.stride(1) + t * out.stride(2));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin) {
  check_bf16(q, "rope: q", 4);
  check_bf16(k, "rope: k", 4);
  check_bf16(cos, "rope: cos", 4);
  check_bf16(sin, "rope: sin", 4);
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  for (const at::Tensor* t : {&q, &k})
    TORCH_CHECK(t->size(0) == B && t->size(2) == T && t->size(3) == D && t->stride(3) == 1 && D % 2 == 0,
                "codegen2_kernels.rope: q and k must be (B, heads, T, D) with the same B, T and even D, unit stride "
                "in D");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->size(0) == B && t->size(1) == 1 && t->size(2) == T && t->size(3) == D && t->stride(3) == 1,
                "codegen2_kernels.rope: cos and sin must be (B, 1, T, D) with unit stride in D");
  return {rope_one(q, cos, sin), rope_one(k, cos, sin)};
}

}  // namespace

CG2_FRAGMENT(CG2_OPS, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

CG2_LIBRARY_IMPL(CG2_OPS, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
}
