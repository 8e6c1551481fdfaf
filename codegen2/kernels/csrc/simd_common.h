// Small SIMD helpers shared by decode_linear.cpp and decode_attention.cpp (one library per CPU level; every
// level has AVX2 + FMA). Each source includes this once; the definitions are per translation unit.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Eight consecutive bf16 values as fp32 (bf16 -> fp32 is a 16-bit shift).
inline __m256 load8(const uint16_t* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) { return load8(reinterpret_cast<const uint16_t*>(p)); }

// 8 fp32 -> 8 bf16 as c10::BFloat16(float) rounds them (torch's bf16 results): to nearest even, NaN to the
// quiet NaN 0x7FC0.
inline __m128i round_bf16x8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // each lane < 2^16
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The same rounding of 16 fp32.
inline __m256i round_bf16x16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
#endif

}  // namespace

// The op namespace of this build (native.py passes -DCG2_OPS=codegen2_kernels_<level>). TORCH_LIBRARY pastes its
// namespace argument into identifiers; one more macro level expands CG2_OPS first. decode_linear.cpp defines the
// library, the other sources add fragments to it.
#ifndef CG2_OPS
#define CG2_OPS codegen2_kernels_avx2
#endif
#define CG2_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define CG2_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define CG2_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)
