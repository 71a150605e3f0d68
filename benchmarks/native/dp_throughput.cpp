// Peak issue rate of vdpbf16ps (and, for scale, vfmadd231ps) on one core: twelve independent
// accumulator chains, so latency does not bound it. BENCHMARKS.md (session 13) compares the bf16
// decode loops' dot-product rate with this.
//
//   g++ -O2 -march=native -o /tmp/dp benchmarks/native/dp_throughput.cpp && /tmp/dp
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
int main() {
  // distinct starting values (and an opaque asm barrier) keep the compiler from merging chains
#define DECL(i) __m512 a##i = _mm512_set1_ps(i); asm volatile("" : "+v"(a##i));
  R12(DECL)
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3f80);
  const __m512 f = _mm512_set1_ps(1.0f);
  const long n = 100000000;
  for (int mode = 0; mode < 2; ++mode) {
    const auto t = std::chrono::steady_clock::now();
    if (mode == 0) {
      for (long i = 0; i < n; ++i) {
#define DP(i) a##i = _mm512_dpbf16_ps(a##i, x, y);
        R12(DP)
      }
    } else {
      for (long i = 0; i < n; ++i) {
#define FM(i) a##i = _mm512_fmadd_ps(a##i, f, f);
        R12(FM)
      }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
#define SUM(i) +_mm512_reduce_add_ps(a##i)
    const float sum = 0 R12(SUM);
    std::printf("%s: %.2f G instructions/s (checksum %g)\n", mode == 0 ? "vdpbf16ps" : "vfmadd231ps", 12.0 * n / s / 1e9, sum);
  }
}
