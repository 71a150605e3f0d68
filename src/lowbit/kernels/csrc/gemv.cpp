// Matrix-vector products with group-wise packed low-bit weights, for decode (a few rows of
// activations at a time), reading ~bits/32 of what a float32 weight would.
//
// Weight layout: layout.h (row n of the weight is its G column groups back to back, group g
// packed at its own width bits[g]; uniform formats have one width, SliM-LLM's mixed widths differ
// per group). With scale s and zero point z per (row, group), the weight is s * (code - z), so
// The per-group sums of x are computed once per call. Each group's codes are unpacked once into a
// float buffer and used for every activation row. Float32 accumulation throughout. `dequantize`
// computes (code - z) * s element by element, the same float operations as formats/affine.py, so
// its output is bit-identical to the torch reference.

#include "layout.h"
#include "qgemv.h"
#include "unpack.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

using lowbit::checked_layout;
using lowbit::group_ptr;

namespace {

// Within a group, the activations are reordered by phase so that codes sitting at the same bit
// position of consecutive packing units line up with consecutive floats: for a width with P codes
// per unit (4 bits: 2 per byte; 2 bits: 4 per byte; 3 bits: 8 per 3-byte word; 8 bits: 1),
// xd[p * (group / P) + j] = x[P * j + p]. The vector paths then turn 8 units into 8 lanes, shift
// out phase p, convert and multiply-add against 8 consecutive floats.
inline int phases(int bits) { return bits == 4 ? 2 : bits == 2 ? 4 : bits == 3 ? 8 : bits == 8 ? 1 : 0; }

inline bool vector_path(int bits, int64_t group) {
#if defined(__AVX2__) && defined(__FMA__)
  const int P = phases(bits);
  return P && (group / P) % 8 == 0;
#else
  (void)bits; (void)group;
  return false;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// sum_k xd[k] * code[k] over one group at `bits` (vector_path(bits, group) must hold), as 8 lanes.
inline __m256 dot_group(const uint8_t* src, const float* xd, int bits, int64_t group) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  if (bits == 4) {
    const int64_t U = group / 2;
    const __m256i m = _mm256_set1_epi32(0xF);
    for (int64_t j = 0; j < U; j += 8) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m)), _mm256_loadu_ps(xd + j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xd + U + j), acc1);
    }
  } else if (bits == 2) {
    const int64_t U = group / 4;
    const __m256i m = _mm256_set1_epi32(3);
    for (int64_t j = 0; j < U; j += 8) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m)), _mm256_loadu_ps(xd + j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 2), m)),
                             _mm256_loadu_ps(xd + U + j), acc1);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4), m)),
                             _mm256_loadu_ps(xd + 2 * U + j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 6)), _mm256_loadu_ps(xd + 3 * U + j), acc1);
    }
  } else if (bits == 3) {
    const int64_t U = group / 8;
    const __m256i m = _mm256_set1_epi32(7);
    alignas(32) int32_t words[8];
    for (int64_t j = 0; j < U; j += 8) {
      const uint8_t* w = src + 3 * j;
      for (int i = 0; i < 8; ++i) words[i] = w[3 * i] | (w[3 * i + 1] << 8) | (w[3 * i + 2] << 16);
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(words));
      for (int p = 0; p < 8; p += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 3 * p), m)),
                               _mm256_loadu_ps(xd + p * U + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 3 * p + 3), m)),
                               _mm256_loadu_ps(xd + (p + 1) * U + j), acc1);
      }
    }
  } else {  // 8 bits
    for (int64_t j = 0; j < group; j += 8) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(xd + j), acc0);
    }
  }
  return _mm256_add_ps(acc0, acc1);
}
#endif

}  // namespace

// x [M, K] float32; packed [N, row_bytes] uint8; bits, offset [G] int64; scales, zeros
// [N, G] float32; group = K / G -> y [M, N] float32.
torch::Tensor gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor bits, torch::Tensor offset,
                   torch::Tensor scales, torch::Tensor zeros, int64_t group, int64_t il) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "qgemv: x must be contiguous float32 [M, K]");
  const std::vector<int64_t> gb = checked_layout(packed, bits, offset, scales, zeros, group, il);
  scales = scales.to(torch::kFloat32);  // float16 scales and zeros: exact in float32
  zeros = zeros.to(torch::kFloat32);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), RB = packed.size(1), G = bits.numel();
  TORCH_CHECK(G * group == K, "qgemv: the groups must cover x's K columns");
  const int64_t* bp = bits.data_ptr<int64_t>();
  const int64_t* offp = offset.data_ptr<int64_t>();
  // per-group sums of x
  std::vector<float> xsum(M * G, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += xp[m * K + g * group + k];
      xsum[m * G + g] = s;
    }
  // activations reordered by phase for the groups that take the vector path
  std::vector<float> xd(M * K);
  std::vector<char> vec(G);
  for (int64_t g = 0; g < G; ++g) {
    const int b = static_cast<int>(bp[g]);
    vec[g] = vector_path(b, group);
    const int P = vec[g] ? phases(b) : 1;
    const int64_t U = group / P;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t j = 0; j < U; ++j) xd[m * K + g * group + p * U + j] = xp[m * K + g * group + P * j + p];
  }
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> codes(group), acc(M);
#if defined(__AVX2__) && defined(__FMA__)
    std::vector<__m256> lanes(M);
#endif
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
#if defined(__AVX2__) && defined(__FMA__)
      std::fill(lanes.begin(), lanes.end(), _mm256_setzero_ps());
#endif
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* src = group_ptr(wp, n, g, RB, offp, gb.data(), il);
        const int b = static_cast<int>(bp[g]);
        const float s = sp[n * G + g], z = zp[n * G + g];
#if defined(__AVX2__) && defined(__FMA__)
        if (vec[g]) {  // scale the group's lanes into the row's lanes; one horizontal sum per row
          for (int64_t m = 0; m < M; ++m) {
            lanes[m] = _mm256_fmadd_ps(_mm256_set1_ps(s), dot_group(src, xd.data() + m * K + g * group, b, group),
                                       lanes[m]);
            acc[m] -= s * z * xsum[m * G + g];
          }
          continue;
        }
#endif
        lowbit::unpack(src, group, b, codes.data());
        for (int64_t m = 0; m < M; ++m) {
          const float* xg = xp + m * K + g * group;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t k = 0; k < group; ++k) dot += xg[k] * codes[k];
          acc[m] += s * (dot - z * xsum[m * G + g]);
        }
      }
#if defined(__AVX2__) && defined(__FMA__)
      for (int64_t m = 0; m < M; ++m) acc[m] += hsum(lanes[m]);
#endif
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = acc[m];
    }
  });
  return y;
}

// The float weight [N, K] of the same layout (for prefill: dequantize once, then a dense matmul),
// as float32, or rounded to bfloat16 (round to nearest even, as torch's float -> bfloat16 cast)
// when `bf16` is set, so a bfloat16 model never materializes the float32 weight.
// into `w` [N, K] (float32 or bfloat16, contiguous): a caller's reusable buffer
void dequantize_into(torch::Tensor w, torch::Tensor packed, torch::Tensor bits, torch::Tensor offset,
                     torch::Tensor scales, torch::Tensor zeros, int64_t group, int64_t il) {
  const std::vector<int64_t> gb = checked_layout(packed, bits, offset, scales, zeros, group, il);
  scales = scales.to(torch::kFloat32);  // float16 scales and zeros: exact in float32
  zeros = zeros.to(torch::kFloat32);
  const int64_t N = packed.size(0), RB = packed.size(1), G = bits.numel(), K = G * group;
  const bool bf16 = w.dtype() == torch::kBFloat16;
  TORCH_CHECK((bf16 || w.dtype() == torch::kFloat32) && w.is_contiguous() && w.dim() == 2 && w.size(0) == N &&
              w.size(1) == K, "qgemv: the output must be a contiguous float32 or bfloat16 [", N, ", ", K, "] tensor");
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int64_t* bp = bits.data_ptr<int64_t>();
  const int64_t* offp = offset.data_ptr<int64_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* out32 = bf16 ? nullptr : w.data_ptr<float>();
  at::BFloat16* out16 = bf16 ? w.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(group);
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < G; ++g) {
        float* dst = bf16 ? buf.data() : out32 + n * K + g * group;
        lowbit::unpack(group_ptr(wp, n, g, RB, offp, gb.data(), il), group, static_cast<int>(bp[g]), dst);
        const float s = sp[n * G + g], z = zp[n * G + g];
        for (int64_t k = 0; k < group; ++k) dst[k] = (dst[k] - z) * s;
        if (bf16) {
          at::BFloat16* o = out16 + n * K + g * group;
          for (int64_t k = 0; k < group; ++k) o[k] = at::BFloat16(dst[k]);
        }
      }
  });
}

torch::Tensor dequantize(torch::Tensor packed, torch::Tensor bits, torch::Tensor offset, torch::Tensor scales,
                         torch::Tensor zeros, int64_t group, bool bf16, int64_t il) {
  TORCH_CHECK(packed.dim() == 2 && bits.numel() > 0, "qgemv: packed must be [N, row bytes]");
  auto w = torch::empty({packed.size(0), bits.numel() * group},
                        scales.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  dequantize_into(w, packed, bits, offset, scales, zeros, group, il);
  return w;
}
