// The bf16 kernel's 4-bit inner loop (qgemv.cpp four_rows, kFourWide, groups of 128, rows
// interleaved by four) on its own, without the op's set-up (activation reorder, group sums,
// float16 scale conversion, dispatch), to separate the loop's rate from everything around it.
// Variants: 0 as qgemv.cpp's loop was in session 11 (session 12 gave it this file's constant
// group stride and one prefetch per cache line, non-temporal, 8 KB ahead, and prefetches the
// scales, which closed most of the gap below); 1 one accumulator per row and group (no lo + hi add); 2 no
// per-group scale step at all (wrong result, timing only). Arguments: rows, columns, copies of
// the weight cycled through (copies x rows x columns / 2 bytes > L3 puts the weight in DRAM).
//
//   g++ -O3 -march=native -fopenmp -o /tmp/k4 benchmarks/native/four_bit_loop.cpp
//   OMP_NUM_THREADS=1 /tmp/k4 4096 1536 1                        # L3-resident
//   OMP_NUM_THREADS=2 OMP_PROC_BIND=true /tmp/k4 151936 1536 4   # from DRAM
//
// Session 11 (quantization jobs paused): L3-resident, 1 thread, variant 0 118 G weights/s
// against 61.5 for the same shape through PackedLinear (benchmarks/gemv_throughput.py), and a
// fixed ~12 us per call at 128x1536; from DRAM, 2 threads, ~47 GB/s for both, as fast as a plain
// AVX-512 streaming read in the same minute (42 GB/s); prefetch distance made no difference.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <cstring>
#include <omp.h>
// four_rows kFourWide, group 128, il=4: block b, group g at wp + b*4*RB + g*256, row r at +r*64
static inline __m512bh bh(__m512i v) { return (__m512bh)v; }
template <int VAR>
void run(const uint8_t* wp, const uint16_t* x, const float* sc, float* y, int N, int K, int PF) {
  const int G = K / 128, RB = K / 2;
  const __m512i magic = _mm512_set1_epi16(0x4300), mask = _mm512_set1_epi16(0xF);
  auto bf = [&](__m512i l) { return bh(_mm512_ternarylogic_epi32(l, mask, magic, 0xEA)); };
  #pragma omp parallel for schedule(static)
  for (int blk = 0; blk < N / 4; ++blk) {
    const uint8_t* base = wp + (int64_t)blk * 4 * RB;
    const float* s = sc + (int64_t)blk * 4 * G;
    __m512 row[4];
    for (int r = 0; r < 4; ++r) row[r] = _mm512_setzero_ps();
    if (VAR == 2) {  // one accumulator pair per row for all groups, scale applied ... (wrong math, timing only)
      __m512 lo[4], hi[4];
      for (int r = 0; r < 4; ++r) { lo[r] = _mm512_setzero_ps(); hi[r] = _mm512_setzero_ps(); }
      for (int g = 0; g < G; ++g) {
        const uint8_t* src = base + g * 256;
        if (PF) for (int r = 0; r < 4; ++r) _mm_prefetch((const char*)(src + PF * 4 * RB + r * 64), _MM_HINT_T0);
        const uint16_t* xg = x + g * 128;
        const __m512bh x0 = bh(_mm512_loadu_si512(xg)), x1 = bh(_mm512_loadu_si512(xg + 32));
        const __m512bh x2 = bh(_mm512_loadu_si512(xg + 64)), x3 = bh(_mm512_loadu_si512(xg + 96));
        for (int r = 0; r < 4; ++r) {
          const __m512i w = _mm512_loadu_si512(src + r * 64);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w), x0);
          hi[r] = _mm512_dpbf16_ps(hi[r], bf(_mm512_srli_epi16(w, 4)), x1);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(_mm512_srli_epi16(w, 8)), x2);
          hi[r] = _mm512_dpbf16_ps(hi[r], bf(_mm512_srli_epi16(w, 12)), x3);
        }
      }
      for (int r = 0; r < 4; ++r) row[r] = _mm512_add_ps(lo[r], hi[r]);
    } else if (VAR == 1) {  // one accumulator per row and group: no lo + hi add
      for (int g = 0; g < G; ++g) {
        const uint8_t* src = base + g * 256;
        if (PF) for (int r = 0; r < 4; ++r) _mm_prefetch((const char*)(src + PF * 4 * RB + r * 64), _MM_HINT_T0);
        const uint16_t* xg = x + g * 128;
        const __m512bh x0 = bh(_mm512_loadu_si512(xg)), x1 = bh(_mm512_loadu_si512(xg + 32));
        const __m512bh x2 = bh(_mm512_loadu_si512(xg + 64)), x3 = bh(_mm512_loadu_si512(xg + 96));
        for (int r = 0; r < 4; ++r) {
          const __m512i w = _mm512_loadu_si512(src + r * 64);
          __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), bf(w), x0);
          a = _mm512_dpbf16_ps(a, bf(_mm512_srli_epi16(w, 4)), x1);
          a = _mm512_dpbf16_ps(a, bf(_mm512_srli_epi16(w, 8)), x2);
          a = _mm512_dpbf16_ps(a, bf(_mm512_srli_epi16(w, 12)), x3);
          row[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * G + g]), a, row[r]);
        }
      }
    } else {
      for (int g = 0; g < G; ++g) {
        const uint8_t* src = base + g * 256;
        if (PF) for (int r = 0; r < 4; ++r) _mm_prefetch((const char*)(src + PF * 4 * RB + r * 64), _MM_HINT_T0);
        const uint16_t* xg = x + g * 128;
        const __m512bh x0 = bh(_mm512_loadu_si512(xg)), x1 = bh(_mm512_loadu_si512(xg + 32));
        const __m512bh x2 = bh(_mm512_loadu_si512(xg + 64)), x3 = bh(_mm512_loadu_si512(xg + 96));
        __m512 lo[4], hi[4];
        for (int r = 0; r < 4; ++r) { lo[r] = _mm512_setzero_ps(); hi[r] = _mm512_setzero_ps(); }
        for (int r = 0; r < 4; ++r) {
          const __m512i w = _mm512_loadu_si512(src + r * 64);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w), x0);
          hi[r] = _mm512_dpbf16_ps(hi[r], bf(_mm512_srli_epi16(w, 4)), x1);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(_mm512_srli_epi16(w, 8)), x2);
          hi[r] = _mm512_dpbf16_ps(hi[r], bf(_mm512_srli_epi16(w, 12)), x3);
        }
        for (int r = 0; r < 4; ++r) row[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * G + g]), _mm512_add_ps(lo[r], hi[r]), row[r]);
      }
    }
    for (int r = 0; r < 4; ++r) y[blk * 4 + r] = _mm512_reduce_add_ps(row[r]);
  }
}
int main(int argc, char** argv) {
  int N = atoi(argv[1]), K = atoi(argv[2]), copies = atoi(argv[3]);
  size_t bytes = (size_t)N * K / 2;
  std::vector<uint8_t*> W(copies);
  for (int c = 0; c < copies; ++c) { W[c] = (uint8_t*)aligned_alloc(64, bytes); for (size_t i = 0; i < bytes; ++i) W[c][i] = rand(); }
  std::vector<uint16_t> x(K, 0x3f80); std::vector<float> sc((size_t)N * K / 128, 0.5f), y(N);
  for (int var : {0, 1, 2}) for (int pf : {0, 2}) {
    for (int it = 0; it < 3; ++it) (var == 2 ? run<2> : var == 1 ? run<1> : run<0>)(W[it % copies], x.data(), sc.data(), y.data(), N, K, pf);
    int n = 0; auto t = std::chrono::steady_clock::now(); double s;
    do { (var == 2 ? run<2> : var == 1 ? run<1> : run<0>)(W[n % copies], x.data(), sc.data(), y.data(), N, K, pf); ++n;
         s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count(); } while (s < 1.0);
    printf("var %d pf %d: %.1f Gw/s  %.1f GB/s\n", var, pf, (double)N * K * n / s / 1e9, bytes * n / s / 1e9);
  }
}
