// The small operations of one bfloat16 decode step of a Llama / Qwen2 layer, each in one native
// call (runtime/decode.py's native loop): between the packed matrix products a transformers step
// runs about fifty torch operations per layer, a few microseconds each, which for a 1.5B model
// add up to about 4 ms a step, 15% of it.
//
// Each function computes what the torch operations it replaces compute, rounding to bfloat16
// where they round (round to nearest even, as torch does):
//   rms_norm:    w * bf16(x * rsqrt(mean(x^2) + eps)), the mean in float32
//   rope_attend: q, k rotated (bf16(bf16(q * cos) + bf16(rotate_half(q) * sin))), k and v written
//                into the cache at `pos`, then per query head scores bf16(q . k) * scale over
//                positions 0..pos, a float32 softmax rounded to bf16, and bf16(sum p v)
// Sums run in float32 in another order than torch's kernels, so results can differ from the
// torch operations in the last bit of a bfloat16 now and then; tests/runtime/test_decode.py
// bounds that and checks generation against the transformers forward.

#include <torch/extension.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

namespace {

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

const uint16_t* bp(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bp_mut(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

void check_bf16(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kBFloat16 && t.is_contiguous(), "decode_ops: ", name, " must be contiguous bfloat16");
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_bf16(x, "x");
  check_bf16(w, "weight");
  const int64_t H = w.numel();
  TORCH_CHECK(x.numel() == H, "decode_ops.rms_norm: one row of ", H, " values expected");
  const uint16_t* xp = bp(x);
  const uint16_t* wp = bp(w);
  float s = 0.f;
  for (int64_t i = 0; i < H; ++i) s += f32(xp[i]) * f32(xp[i]);
  const float r = 1.f / std::sqrt(s / static_cast<float>(H) + static_cast<float>(eps));
  auto y = torch::empty_like(x);
  uint16_t* yp = bp_mut(y);
  for (int64_t i = 0; i < H; ++i) yp[i] = bf16(f32(wp[i]) * rbf(f32(xp[i]) * r));
  return y;
}

// y: the q/k/v projection [H*D | KV*D | KV*D] (bias added, bfloat16); cos, sin [D] for `pos`;
// keys, values [1, KV, T, D] (the StaticCache's buffers, written at pos) -> o [1, 1, H*D].
torch::Tensor rope_attend(torch::Tensor y, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys,
                          torch::Tensor values, int64_t pos, double scale, int64_t H, int64_t KV) {
  check_bf16(y, "the q/k/v row");
  check_bf16(cos, "cos");
  check_bf16(sin, "sin");
  check_bf16(keys, "keys");
  check_bf16(values, "values");
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == 1 && keys.size(1) == KV && keys.sizes() == values.sizes(),
              "decode_ops.rope_attend: caches must be [1, KV, T, D]");
  const int64_t T = keys.size(2), D = keys.size(3), half = D / 2, G = H / KV;
  TORCH_CHECK(D % 2 == 0 && H % KV == 0 && cos.numel() == D && sin.numel() == D && y.numel() == (H + 2 * KV) * D,
              "decode_ops.rope_attend: shapes do not agree");
  TORCH_CHECK(pos >= 0 && pos < T, "decode_ops.rope_attend: position ", pos, " outside the cache (", T, ")");
  const uint16_t* yp = bp(y);
  const uint16_t* cp = bp(cos);
  const uint16_t* sp = bp(sin);
  uint16_t* kp = bp_mut(keys);
  uint16_t* vp = bp_mut(values);
  auto rotate = [&](const uint16_t* src, float* dst) {  // bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))
    for (int64_t i = 0; i < D; ++i) {
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
  auto o = torch::empty({1, 1, H * D}, y.options());
  uint16_t* op = bp_mut(o);
  const int64_t n = pos + 1;
  // per kv head: the scores of its G query heads (one pass over the keys), their softmax, then
  // one pass over the values accumulating all G outputs
  std::vector<float> p(G * n), acc(G * D);
  for (int64_t j = 0; j < KV; ++j) {
    const float* qj = q.data() + j * G * D;
    for (int64_t t = 0; t < n; ++t) {
      const uint16_t* kt = kp + (j * T + t) * D;
      for (int64_t g = 0; g < G; ++g) p[g * n + t] = rbf(dot(qj + g * D, kt, D)) * static_cast<float>(scale);
    }
    for (int64_t g = 0; g < G; ++g) {
      float* pg = p.data() + g * n;
      float mx = -INFINITY, sum = 0.f;
      for (int64_t t = 0; t < n; ++t) mx = std::max(mx, pg[t]);
      for (int64_t t = 0; t < n; ++t) {
        pg[t] = std::exp(pg[t] - mx);
        sum += pg[t];
      }
      for (int64_t t = 0; t < n; ++t) pg[t] = rbf(pg[t] / sum);
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t t = 0; t < n; ++t) {
      const uint16_t* vt = vp + (j * T + t) * D;
      for (int64_t g = 0; g < G; ++g) axpy(p[g * n + t], vt, acc.data() + g * D, D);
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < D; ++i) op[(j * G + g) * D + i] = bf16(acc[g * D + i]);
  }
  return o;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of one bfloat16 row");
  m.def("rope_attend", &rope_attend, "rotary embedding, cache write and single-query attention");
}
