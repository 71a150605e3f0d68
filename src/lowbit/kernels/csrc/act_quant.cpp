// Per-token int8 quantization of activations for the integer-activation linears, with the very
// operations of runtime/w8a8.py's quantize_per_token, so codes and scales are identical to it:
// s = max(max_k |x_k| / 127, smallest normal float), q_k = clamp(round(x_k / s), -127, 127) (exact
// division, rounding half to even), written as int8, or with `shifted` as uint8 q + 128 (oneDNN's
// unsigned activations). AVX-512 where compiled for it, else the scalar loop.
//
// scale_rows: the integer linears' epilogue, the float scales applied to their int32 / int64 sums.

#include "qgemv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
template <typename T>
inline __m512 load16(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {  // bfloat16: the high half of a float32
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <typename T>
inline void quantize_row(const T* x, int64_t K, uint8_t* q, float* s_out, bool shifted) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + k, m)));
  }
  const float s = std::max(_mm512_reduce_max_ps(amax) / 127.f, std::numeric_limits<float>::min());
  *s_out = s;
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m128i flip = _mm_set1_epi8(shifted ? char(0x80) : 0);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(load16(x + k, m), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m128i b = _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)), flip);
    _mm_mask_storeu_epi8(q + k, m, b);
  }
}
#else
template <typename T>
inline void quantize_row(const T* x, int64_t K, uint8_t* q, float* s_out, bool shifted) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(x[k])));
  const float s = std::max(amax / 127.f, std::numeric_limits<float>::min());
  *s_out = s;
  for (int64_t k = 0; k < K; ++k) {
    const float v = std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(x[k]) / s)));
    q[k] = static_cast<uint8_t>(static_cast<int8_t>(v)) ^ (shifted ? 0x80 : 0);
  }
}
#endif

// x [M, K] float32 or bfloat16 -> (q [M, K] int8, or uint8 q + 128 when shifted; s float32 [M, 1]).
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, bool shifted) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16),
              "quantize_rows: x must be contiguous float32 or bfloat16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, torch::dtype(shifted ? torch::kUInt8 : torch::kInt8));
  auto sc = torch::empty({M, 1}, torch::dtype(torch::kFloat32));
  const bool bf = x.dtype() == torch::kBFloat16;
  uint8_t* qp = static_cast<uint8_t*>(q.data_ptr());
  float* sp = sc.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));  // small rows: fewer, larger tasks
  at::parallel_for(0, M, grain, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      if (bf) {
        quantize_row(reinterpret_cast<const at::BFloat16*>(x.data_ptr<at::BFloat16>()) + m * K, K, qp + m * K, sp + m, shifted);
      } else {
        quantize_row(x.data_ptr<float>() + m * K, K, qp + m * K, sp + m, shifted);
      }
    }
  });
  return {q, sc};
}

// y[m, n] = acc[m, n] * w_scale[n] * s[m] (+ bias[n]) in float32, written as `dtype` (float32 or
// bfloat16) in one pass: the epilogue of the integer-activation linears.
torch::Tensor scale_rows(torch::Tensor acc, torch::Tensor w_scale, torch::Tensor s, c10::optional<torch::Tensor> bias,
                         bool bf16) {
  TORCH_CHECK(acc.dtype() == torch::kFloat32 && acc.dim() == 2 && acc.is_contiguous(), "scale_rows: acc must be contiguous float32");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(w_scale.dtype() == torch::kFloat32 && w_scale.numel() == N && s.dtype() == torch::kFloat32 && s.numel() == M,
              "scale_rows: w_scale [N] and s [M] must be float32");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->numel() == N && bias->is_contiguous(), "scale_rows: bias must be float32 [N]");
    bp = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, acc.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const float* ap = acc.data_ptr<float>();
  const float* wp = w_scale.contiguous().data_ptr<float>();
  const float* spp = s.contiguous().data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float sm = spp[m];
      if (bf16) {
        at::BFloat16* o = y.data_ptr<at::BFloat16>() + m * N;
        for (int64_t n = 0; n < N; ++n) o[n] = at::BFloat16(ap[m * N + n] * wp[n] * sm + (bp ? bp[n] : 0.f));
      } else {
        float* o = y.data_ptr<float>() + m * N;
        for (int64_t n = 0; n < N; ++n) o[n] = ap[m * N + n] * wp[n] * sm + (bp ? bp[n] : 0.f);
      }
    }
  });
  return y;
}
