// Unpacking of formats/pack.py's layout, shared by the kernels: every 8 codes of `bits` bits
// form a little-endian integer of `bits` bytes, code k at bits [k*bits, (k+1)*bits).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lowbit {

// 8 codes of B bits per B-byte little-endian word, B a compile-time constant (a run-time size
// made every word a memcpy call: 3-bit dequantize was 5x slower than 4-bit).
template <int B>
inline void unpack_words(const uint8_t* src, int64_t n, float* dst) {
  constexpr uint64_t mask = (uint64_t{1} << B) - 1;
#if defined(__AVX2__)
  // the word broadcast to 8 lanes, lane k shifted right by k B (widths up to 4: the word fits in
  // 32 bits); wider: codes 0-3 from its low 4B bits and 4-7 from the next 4B (4B <= 28 < 32)
  constexpr bool narrow = 8 * B <= 32;
  const __m256i shifts = narrow ? _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B)
                                : _mm256_setr_epi32(0, B, 2 * B, 3 * B, 0, B, 2 * B, 3 * B);
  const __m256i m = _mm256_set1_epi32(static_cast<int>(mask));
  const int64_t words = n / 8;
  for (int64_t j = 0; j < words; ++j) {
    uint64_t w = 0;
    __m256i v;
    if constexpr (narrow) {
      // a 4-byte read of a B-byte word: the bytes past it are the next words' (masked off);
      // where fewer than 4 bytes are left, at its own size (nothing past the codes is touched)
      uint32_t w32 = 0;
      if ((j + 1) * B + (4 - B) <= words * B) {
        std::memcpy(&w32, src + j * B, 4);
      } else {
        std::memcpy(&w32, src + j * B, B);
      }
      v = _mm256_set1_epi32(static_cast<int>(w32));
    } else {
      std::memcpy(&w, src + j * B, B);  // little-endian host
      const int lo = static_cast<int>(w & ((uint64_t{1} << (4 * B)) - 1)), hi = static_cast<int>(w >> (4 * B));
      v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi32(lo)), _mm_set1_epi32(hi), 1);
    }
    _mm256_storeu_ps(dst + 8 * j, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shifts), m)));
  }
#else
  for (int64_t j = 0; j < n / 8; ++j) {
    uint64_t w = 0;
    std::memcpy(&w, src + j * B, B);  // little-endian host
    for (int k = 0; k < 8; ++k) dst[8 * j + k] = static_cast<float>((w >> (k * B)) & mask);
  }
#endif
}

// Unpack `n` codes (n a multiple of 8) of `bits` bits from `src` into floats.
inline void unpack(const uint8_t* src, int64_t n, int bits, float* dst) {
  if (bits == 4) {
    for (int64_t j = 0; j < n / 2; ++j) {
      const uint8_t b = src[j];
      dst[2 * j] = static_cast<float>(b & 0xF);
      dst[2 * j + 1] = static_cast<float>(b >> 4);
    }
  } else if (bits == 2) {
    for (int64_t j = 0; j < n / 4; ++j) {
      const uint8_t b = src[j];
      dst[4 * j] = static_cast<float>(b & 3);
      dst[4 * j + 1] = static_cast<float>((b >> 2) & 3);
      dst[4 * j + 2] = static_cast<float>((b >> 4) & 3);
      dst[4 * j + 3] = static_cast<float>(b >> 6);
    }
  } else if (bits == 8) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  } else {  // any width 1..7: one `bits`-byte word per 8 codes
    switch (bits) {
      case 1: unpack_words<1>(src, n, dst); break;
      case 3: unpack_words<3>(src, n, dst); break;
      case 5: unpack_words<5>(src, n, dst); break;
      case 6: unpack_words<6>(src, n, dst); break;
      default: unpack_words<7>(src, n, dst); break;
    }
  }
}

}  // namespace lowbit
