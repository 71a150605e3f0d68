// W4A8: 4-bit codes c (group-wise, integer scales iscale and integer zero points z per group)
// times int8 activations q, all in integers:
//   T[m, n] = sum_g iscale[n, g] * ( sum_{k in g} c[n, k] q[m, k]  -  z[n, g] * sum_{k in g} q[m, k] )
// exactly (int64 out); the caller multiplies by the token's and the row's float scales. Per 64
// codes: 32 packed bytes split into low and high nibbles (the even and odd codes), one vpdpbusd
// (unsigned code bytes times signed activation bytes, four products per int32 lane). Lane sums
// stay in int32: a lane holds 4 products per 64 codes, |c q| <= 15 * 127, times iscale <= 255,
// so a row of K codes keeps |lane| <= K / 16 * 15 * 127 * 255 (2.9e8 at K = 9000); the lanes are
// added in int64 at the end.

#include "layout.h"
#include "qgemv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#ifdef LOWBIT_W4A8_PATH
using lowbit::group_ptr;

torch::Tensor w4a8_gemm(torch::Tensor q, torch::Tensor packed, torch::Tensor iscale, torch::Tensor zeros,
                        int64_t group, int64_t il) {
  TORCH_CHECK(q.dtype() == torch::kInt8 && q.dim() == 2 && q.is_contiguous(), "w4a8: q must be contiguous int8 [M, K]");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(), "w4a8: packed must be contiguous uint8");
  TORCH_CHECK(iscale.dtype() == torch::kInt32 && zeros.dtype() == torch::kInt32 && iscale.is_contiguous()
              && zeros.is_contiguous(), "w4a8: iscale and zeros must be contiguous int32 [N, G]");
  const int64_t M = q.size(0), K = q.size(1), N = packed.size(0), RB = packed.size(1);
  TORCH_CHECK(group % 64 == 0 && K % group == 0, "w4a8: groups must be a multiple of 64 wide and tile K");
  const int64_t G = K / group, gb = group / 2;
  TORCH_CHECK(RB == K / 2 && iscale.size(0) == N && iscale.size(1) == G && zeros.sizes() == iscale.sizes(),
              "w4a8: shapes do not match a 4-bit [N, K] weight");
  TORCH_CHECK(il == 1 || (il == 4 && N % 4 == 0), "w4a8: interleave must be 1, or 4 with rows a multiple of 4");
  std::vector<int64_t> off(G), gbs(G, gb);
  for (int64_t g = 0; g < G; ++g) off[g] = g * gb;
  // activations: each 64-chunk as [even positions, odd positions]; per-group sums
  const int8_t* qp = q.data_ptr<int8_t>();
  std::vector<int8_t> qr(M * K);
  std::vector<int64_t> qsum(M * G, 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < K; c += 64)
      for (int j = 0; j < 32; ++j) {
        qr[m * K + c + j] = qp[m * K + c + 2 * j];
        qr[m * K + c + 32 + j] = qp[m * K + c + 2 * j + 1];
      }
    for (int64_t k = 0; k < K; ++k) qsum[m * G + k / group] += qp[m * K + k];
  }
  auto out = torch::empty({M, N}, torch::dtype(torch::kInt64));
  int64_t* op = out.data_ptr<int64_t>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int32_t* sp = iscale.data_ptr<int32_t>();
  const int32_t* zp = zeros.data_ptr<int32_t>();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  if (M == 1 && N % 4 == 0) {  // decode: four rows per activation load, accumulators in registers
    at::parallel_for(0, N / 4, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n = 4 * blk;
        __m512i row[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* src = group_ptr(wp, n, g, RB, off.data(), gbs.data(), il);
          const int64_t rs = il == 4 ? gb : RB;
          __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
          for (int64_t c = 0; c < group; c += 64) {
            const __m512i qv = _mm512_loadu_si512(qr.data() + g * group + c);
            for (int r = 0; r < 4; ++r) {
              const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * rs + c / 2));
              const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
              acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), qv);
            }
          }
          for (int r = 0; r < 4; ++r)
            row[r] = _mm512_add_epi32(row[r], _mm512_mullo_epi32(acc[r], _mm512_set1_epi32(sp[(n + r) * G + g])));
        }
        for (int r = 0; r < 4; ++r) {
          const __m512i wide = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(row[r])),
                                                _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(row[r], 1)));
          int64_t t = _mm512_reduce_add_epi64(wide);
          for (int64_t g = 0; g < G; ++g) t -= int64_t(sp[(n + r) * G + g]) * zp[(n + r) * G + g] * qsum[g];
          op[n + r] = t;
        }
      }
    });
    return out;
  }
  if (N % 4 == 0) {  // prefill: tiles of 4 weight rows x 4 activation rows, 16 accumulators
    const int64_t MT = (M + 3) / 4;
    at::parallel_for(0, (N / 4) * MT, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = 4 * (t / MT), m0 = 4 * (t % MT), mc = std::min<int64_t>(4, M - m0);
        __m512i row[4][4];
        for (int r = 0; r < 4; ++r)
          for (int i = 0; i < 4; ++i) row[r][i] = _mm512_setzero_si512();
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* src = group_ptr(wp, n, g, RB, off.data(), gbs.data(), il);
          const int64_t rs = il == 4 ? gb : RB;
          __m512i acc[4][4];
          for (int r = 0; r < 4; ++r)
            for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_si512();
          for (int64_t c = 0; c < group; c += 64) {
            __m512i qv[4];
            for (int i = 0; i < 4; ++i)  // rows past M repeat the last one; their sums are dropped
              qv[i] = _mm512_loadu_si512(qr.data() + (m0 + std::min<int64_t>(i, mc - 1)) * K + g * group + c);
            for (int r = 0; r < 4; ++r) {
              const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * rs + c / 2));
              const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
              const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
              for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], codes, qv[i]);
            }
          }
          for (int r = 0; r < 4; ++r) {
            const __m512i sc = _mm512_set1_epi32(sp[(n + r) * G + g]);
            for (int i = 0; i < 4; ++i) row[r][i] = _mm512_add_epi32(row[r][i], _mm512_mullo_epi32(acc[r][i], sc));
          }
        }
        for (int r = 0; r < 4; ++r)
          for (int i = 0; i < mc; ++i) {
            const int64_t m = m0 + i;
            const __m512i wide = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(row[r][i])),
                                                  _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(row[r][i], 1)));
            int64_t v = _mm512_reduce_add_epi64(wide);
            for (int64_t g = 0; g < G; ++g) v -= int64_t(sp[(n + r) * G + g]) * zp[(n + r) * G + g] * qsum[m * G + g];
            op[m * N + n + r] = v;
          }
      }
    });
    return out;
  }
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<__m512i> row(M), acc(M);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; ++m) row[m] = _mm512_setzero_si512();
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* src = group_ptr(wp, n, g, RB, off.data(), gbs.data(), il);
        for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
        for (int64_t c = 0; c < group; c += 64) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c / 2));
          const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
          const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
          for (int64_t m = 0; m < M; ++m)
            acc[m] = _mm512_dpbusd_epi32(acc[m], codes, _mm512_loadu_si512(qr.data() + m * K + g * group + c));
        }
        const __m512i s = _mm512_set1_epi32(sp[n * G + g]);
        for (int64_t m = 0; m < M; ++m) row[m] = _mm512_add_epi32(row[m], _mm512_mullo_epi32(acc[m], s));
      }
      for (int64_t m = 0; m < M; ++m) {
        const __m512i wide = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(row[m])),
                                              _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(row[m], 1)));
        int64_t t = _mm512_reduce_add_epi64(wide);
        for (int64_t g = 0; g < G; ++g) t -= int64_t(sp[n * G + g]) * zp[n * G + g] * qsum[m * G + g];
        op[m * N + n] = t;
      }
    }
  });
  return out;
}
#endif

bool has_w4a8_path() {
#ifdef LOWBIT_W4A8_PATH
  return true;
#else
  return false;
#endif
}
