// Matrix-vector products with group-wise packed low-bit weights, for decode (a few rows of
// activations at a time), reading ~bits/32 of what a float32 weight would.
//
// Weight layout (PackedLinear in runtime/packed.py): row n of the weight is the concatenation of
// its G column groups, group g packed at its own width bits[g] (formats/pack.py layout: every 8
// codes form a little-endian integer of bits[g] bytes), starting at byte offset[g] of the row.
// Uniform formats have one width; SliM-LLM's mixed widths differ per group. With scale s and zero
// point z per (row, group), the weight is s * (code - z), so
//   y[m, n] = sum_g s[n,g] * ( sum_{k in g} x[m,k] code[n,k]  -  z[n,g] * sum_{k in g} x[m,k] )
// The per-group sums of x are computed once per call. Each group's codes are unpacked once into a
// float buffer and used for every activation row. Float32 accumulation throughout. `dequantize`
// computes (code - z) * s element by element, the same float operations as formats/affine.py, so
// its output is bit-identical to the torch reference.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "unpack.h"

#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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
                   torch::Tensor scales, torch::Tensor zeros, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "qgemv: x must be contiguous float32 [M, K]");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(), "qgemv: packed must be contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(bits.dtype() == torch::kInt64 && offset.dtype() == torch::kInt64, "qgemv: bits and offset must be int64");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32 && scales.is_contiguous()
              && zeros.is_contiguous(), "qgemv: scales and zeros must be contiguous float32");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), RB = packed.size(1), G = bits.numel();
  TORCH_CHECK(group % 8 == 0 && G * group == K, "qgemv: groups must be a multiple of 8 wide and cover K");
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G && zeros.sizes() == scales.sizes(), "qgemv: scales and zeros must be [N, G]");
  const int64_t* bp = bits.data_ptr<int64_t>();
  const int64_t* offp = offset.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(bp[g] >= 1 && bp[g] <= 8 && offp[g] + group / 8 * bp[g] <= RB, "qgemv: group layout exceeds the row");
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
        const uint8_t* src = wp + n * RB + offp[g];
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

// The float weight [N, K] of the same layout (for prefill: dequantize once, then a dense matmul).
torch::Tensor dequantize(torch::Tensor packed, torch::Tensor bits, torch::Tensor offset, torch::Tensor scales,
                         torch::Tensor zeros, int64_t group) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(), "qgemv: packed must be contiguous uint8");
  const int64_t N = packed.size(0), RB = packed.size(1), G = bits.numel(), K = G * group;
  TORCH_CHECK(group % 8 == 0, "qgemv: groups must be a multiple of 8 wide");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32 && scales.is_contiguous()
              && zeros.is_contiguous() && scales.size(0) == N && scales.size(1) == G && zeros.sizes() == scales.sizes(),
              "qgemv: scales and zeros must be contiguous float32 [N, G]");
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(bits.data_ptr<int64_t>()[g] >= 1 && bits.data_ptr<int64_t>()[g] <= 8
                && offset.data_ptr<int64_t>()[g] + group / 8 * bits.data_ptr<int64_t>()[g] <= RB,
                "qgemv: group layout exceeds the row");
  auto w = torch::empty({N, K}, scales.options());
  float* out = w.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int64_t* bp = bits.data_ptr<int64_t>();
  const int64_t* offp = offset.data_ptr<int64_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < G; ++g) {
        float* dst = out + n * K + g * group;
        lowbit::unpack(wp + n * RB + offp[g], group, static_cast<int>(bp[g]), dst);
        const float s = sp[n * G + g], z = zp[n * G + g];
        for (int64_t k = 0; k < group; ++k) dst[k] = (dst[k] - z) * s;
      }
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x W^T with group-wise packed low-bit W");
  m.def("dequantize", &dequantize, "group-wise packed low-bit W -> float32 W");
}
