// Compute ceilings of the instructions the bf16 decode kernel is built on, one core, registers
// only (no memory): vdpbf16ps alone, the 4-bit inner step (shift + ternary-logic + vdpbf16ps per
// 32 codes), and vpdpbusd (VNNI, int8) for comparison.
//
//   g++ -O2 -march=native -o /tmp/peak benchmarks/native/peak.cpp && /tmp/peak
//
// Session 11, AMD EPYC Zen 5 (this machine): vdpbf16ps 7.9 G/s (252 G codes/s), the 4-bit step
// 5.6 G/s (178 G codes/s), vpdpbusd 8.6 G/s (548 G int8 products/s) per core.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
int main() {
  const long N = 200000000;
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(i);
  __m512i w = _mm512_set1_epi16(0x4301), x = _mm512_set1_epi16(0x3f80);
  __m512i mask = _mm512_set1_epi16(0xF), magic = _mm512_set1_epi16(0x4300);
  auto bh = [](__m512i v) { return (__m512bh)v; };
  // 1: dpbf16 only, 12 independent chains
  auto t = std::chrono::steady_clock::now();
  for (long i = 0; i < N / 12; ++i) {
    #pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], bh(w), bh(x));
    __asm__ volatile("" : "+v"(w));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  float sink = 0; for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  printf("dpbf16: %.2f G/s (%.1f G codes/s)\n", N / s / 1e9, 32 * N / s / 1e9);
  // 2: the 4-bit inner step: ternlogic + shift + dpbf16 per 32 codes
  t = std::chrono::steady_clock::now();
  for (long i = 0; i < N / 8; ++i) {
    __asm__ volatile("" : "+v"(w));
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m512i l = _mm512_srli_epi16(w, 4 * (j & 3));
      acc[j] = _mm512_dpbf16_ps(acc[j], bh(_mm512_ternarylogic_epi32(l, mask, magic, 0xEA)), bh(x));
    }
  }
  s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  printf("shift+tern+dpbf16: %.2f G/s (%.1f G codes/s) %f\n", N / s / 1e9, 32 * N / s / 1e9, sink);
  // 3: vpdpbusd (VNNI) only
  __m512i iacc[12]; for (int i = 0; i < 12; ++i) iacc[i] = _mm512_set1_epi32(i);
  t = std::chrono::steady_clock::now();
  for (long i = 0; i < N / 12; ++i) {
    #pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) iacc[j] = _mm512_dpbusd_epi32(iacc[j], w, x);
    __asm__ volatile("" : "+v"(w));
  }
  s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  int isink = 0; for (int i = 0; i < 12; ++i) isink += _mm512_reduce_add_epi32(iacc[i]);
  printf("dpbusd: %.2f G/s (%.1f G int8 MACs/s) %d\n", N / s / 1e9, 64 * N / s / 1e9, isink);
}
