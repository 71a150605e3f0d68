// The small operations of one bfloat16 decode step of a Llama / Qwen2 layer, on raw rows, for
// decoder.cpp's Decoder, which runs whole layers with them between its packed products: between
// those products a transformers step runs about fifty torch operations per layer, a few
// microseconds each (for a 1.5B model about 4 ms a step, 15% of it). Each computes what the
// torch operations it replaces compute, rounding to bfloat16 where they round (round to nearest
// even, as torch does):
//   rms_norm_row:    w * bf16(x * rsqrt(mean(x^2) + eps)), the mean in float32
//   rope_attend_row: q, k rotated (bf16(bf16(q * cos) + bf16(rotate_half(q) * sin))), k and v
//                    written into the cache at `pos`, then per query head scores bf16(q . k) *
//                    scale over positions 0..pos, a float32 softmax rounded to bf16, and
//                    bf16(sum p v)
//   finish_row:      bf16(bf16(y + bias) + residual), a product's float32 result to bfloat16
//   silu_mul_row:    bf16(bf16(silu(g)) * u), the gated MLP's activation
// Sums run in float32 in another order than torch's kernels, so results can differ from the
// torch operations in the last bit of a bfloat16 now and then; tests/runtime/test_decode.py
// bounds that and checks generation against the transformers forward.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lowbit_decode {


inline float f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t bf16(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float rbf(float f) { return f32(bf16(f)); }

#if defined(__AVX512F__)
inline __m512 load16(const uint16_t* p) {  // 16 bfloat16 -> float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

// sum_i a[i] * b[i] (b bfloat16), float32
inline float dot(const float* a, const uint16_t* b, int64_t D) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < D; ++i) s += a[i] * f32(b[i]);
  return s;
}

// acc[i] += p * v[i] (v bfloat16)
inline void axpy(float p, const uint16_t* v, float* acc, int64_t D) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vp = _mm512_set1_ps(p);
  for (; i + 16 <= D; i += 16) _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(vp, load16(v + i), _mm512_loadu_ps(acc + i)));
#endif
  for (; i < D; ++i) acc[i] += p * f32(v[i]);
}

#if defined(__AVX512F__)
// 16 floats -> bfloat16 (round to nearest even, NaN kept NaN: bf16() for 16 lanes), in the low
// half of each 32-bit lane
inline __m512i bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

inline __m512 widen16(__m512i r) { return _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)); }  // bf16x16 -> float

inline __m512 load16m(const uint16_t* p, __mmask16 k) {  // up to 16 bfloat16 -> float32 (0 outside k)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

inline __mmask16 tail16(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }
#endif

// out[i] = bf16(bf16(y[i] + bias[i]) + res[i]): a product's float32 result, plus its float32 bias
// (if any), rounded as torch's .to(bfloat16), then added to a bfloat16 residual (if any) as
// torch adds two bfloat16 tensors. out may be res (each element is read before it is written).
inline void finish_row(const float* y, const float* bias, const uint16_t* res, uint16_t* out, int64_t N) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < N; i += 16) {
    const __mmask16 k = tail16(N - i);
    __m512 v = _mm512_maskz_loadu_ps(k, y + i);
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + i));
    __m512i r = bf16x16(v);
    if (res != nullptr) r = bf16x16(_mm512_add_ps(load16m(res + i, k), widen16(r)));
    _mm512_mask_cvtepi32_storeu_epi16(out + i, k, r);
  }
#endif
  for (; i < N; ++i) {
    uint16_t r = bf16(bias != nullptr ? y[i] + bias[i] : y[i]);
    if (res != nullptr) r = bf16(f32(res[i]) + f32(r));
    out[i] = r;
  }
}

inline void rms_norm_row(const uint16_t* xp, const uint16_t* wp, int64_t H, float eps, uint16_t* yp) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i < H; i += 16) {
    const __m512 x = load16m(xp + i, tail16(H - i));
    acc = _mm512_fmadd_ps(x, x, acc);
  }
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < H; ++i) s += f32(xp[i]) * f32(xp[i]);
  const float r = 1.f / std::sqrt(s / static_cast<float>(H) + eps);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vr = _mm512_set1_ps(r);
  for (; i < H; i += 16) {
    const __mmask16 k = tail16(H - i);
    const __m512 normed = widen16(bf16x16(_mm512_mul_ps(load16m(xp + i, k), vr)));
    _mm512_mask_cvtepi32_storeu_epi16(yp + i, k, bf16x16(_mm512_mul_ps(load16m(wp + i, k), normed)));
  }
#endif
  for (; i < H; ++i) yp[i] = bf16(f32(wp[i]) * rbf(f32(xp[i]) * r));
}

#if defined(__AVX512F__)
// exp of 16 floats: 2^k * e^r with k = round(x / ln 2), r = x - k ln 2 (ln 2 in two parts), e^r
// by a degree-7 polynomial (Cephes' expf coefficients: within about one float32 ulp of
// std::exp, far below the bfloat16 rounding the softmax ends in); scalef keeps underflow exact.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // e^-104 is 0 in float32 (scalef underflows to it)
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, k);
}
#endif

// p[0..n) <- bf16(softmax(p)), in float32
inline void softmax_row(float* p, int64_t n) {
  float mx = -INFINITY, sum = 0.f;
  int64_t t = 0;
#if defined(__AVX512F__)
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (; t < n; t += 16) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail16(n - t), p + t));
  mx = _mm512_reduce_max_ps(vm);
  __m512 vs = _mm512_setzero_ps();
  for (t = 0; t < n; t += 16) {
    const __mmask16 k = tail16(n - t);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + t), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(p + t, k, e);
    vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(k, e));
  }
  sum = _mm512_reduce_add_ps(vs);
  for (t = 0; t < n; t += 16) {
    const __mmask16 k = tail16(n - t);
    const __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(k, p + t), _mm512_set1_ps(sum));
    _mm512_mask_storeu_ps(p + t, k, widen16(bf16x16(q)));
  }
#else
  for (; t < n; ++t) mx = std::max(mx, p[t]);
  for (t = 0; t < n; ++t) {
    p[t] = std::exp(p[t] - mx);
    sum += p[t];
  }
  for (t = 0; t < n; ++t) p[t] = rbf(p[t] / sum);
#endif
}

// y: the q/k/v projection [H*D | KV*D | KV*D] (bias added); cp, sp: cos and sin [D] for `pos`;
// kp, vp: key and value caches [KV, T, D], written at pos; op: the output [H*D]. The KV heads
// run in parallel (each reads only its own cache rows) once there is enough work to split.
inline void rope_attend_row(const uint16_t* yp, const uint16_t* cp, const uint16_t* sp, uint16_t* kp, uint16_t* vp,
                            int64_t T, int64_t D, int64_t pos, float scale, int64_t H, int64_t KV, uint16_t* op) {
  const int64_t half = D / 2, G = H / KV;
  auto rotate = [&](const uint16_t* src, float* dst) {  // bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))
    int64_t i = 0;
#if defined(__AVX512F__)
    if (half % 16 == 0) {
      const __m512 neg = _mm512_set1_ps(-0.f);
      for (; i < D; i += 16) {
        const __m512 rot = i < half ? _mm512_xor_ps(load16(src + i + half), neg) : load16(src + i - half);
        const __m512 a = widen16(bf16x16(_mm512_mul_ps(load16(src + i), load16(cp + i))));
        const __m512 b = widen16(bf16x16(_mm512_mul_ps(rot, load16(sp + i))));
        _mm512_storeu_ps(dst + i, widen16(bf16x16(_mm512_add_ps(a, b))));
      }
    }
#endif
    for (; i < D; ++i) {
      const float rot = i < half ? -f32(src[i + half]) : f32(src[i - half]);
      dst[i] = rbf(rbf(f32(src[i]) * f32(cp[i])) + rbf(rot * f32(sp[i])));
    }
  };
  std::vector<float> q(H * D), k(D);
  for (int64_t h = 0; h < H; ++h) rotate(yp + h * D, q.data() + h * D);
  for (int64_t j = 0; j < KV; ++j) {
    rotate(yp + (H + j) * D, k.data());
    uint16_t* kd = kp + (j * T + pos) * D;
    uint16_t* vd = vp + (j * T + pos) * D;
    for (int64_t i = 0; i < D; ++i) {
      kd[i] = bf16(k[i]);
      vd[i] = yp[(H + KV + j) * D + i];
    }
  }
  const int64_t n = pos + 1;
  // per kv head: the scores of its G query heads (one pass over the keys), their softmax, then
  // one pass over the values accumulating all G outputs
  const int64_t grain = n * H * D >= (1 << 14) ? 1 : KV;
  at::parallel_for(0, KV, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(G * n), acc(G * D);
    for (int64_t j = begin; j < end; ++j) {
      const float* qj = q.data() + j * G * D;
      for (int64_t t = 0; t < n; ++t) {
        const uint16_t* kt = kp + (j * T + t) * D;
        for (int64_t g = 0; g < G; ++g) p[g * n + t] = rbf(dot(qj + g * D, kt, D)) * scale;
      }
      for (int64_t g = 0; g < G; ++g) softmax_row(p.data() + g * n, n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const uint16_t* vt = vp + (j * T + t) * D;
        for (int64_t g = 0; g < G; ++g) axpy(p[g * n + t], vt, acc.data() + g * D, D);
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < D; ++i) op[(j * G + g) * D + i] = bf16(acc[g * D + i]);
    }
  });
}

// gu: [gate (I) | up (I)] -> out [I] = bf16(bf16(silu(gate)) * up), silu(g) = g / (1 + e^-g) in
// float32 (exp16: within about one ulp of the exp torch's SiLU kernel uses)
inline void silu_mul_row(const uint16_t* gu, int64_t I, uint16_t* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < I; i += 16) {
    const __mmask16 k = tail16(I - i);
    const __m512 g = load16m(gu + i, k);
    const __m512 e = exp16(_mm512_xor_ps(g, _mm512_set1_ps(-0.f)));
    const __m512 silu = widen16(bf16x16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e))));
    _mm512_mask_cvtepi32_storeu_epi16(out + i, k, bf16x16(_mm512_mul_ps(silu, load16m(gu + I + i, k))));
  }
#endif
  for (; i < I; ++i) {
    const float g = f32(gu[i]);
    out[i] = bf16(rbf(g / (1.f + std::exp(-g))) * f32(gu[I + i]));
  }
}

}  // namespace lowbit_decode
