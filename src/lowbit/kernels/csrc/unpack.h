// Unpacking of formats/pack.py's layout, shared by the kernels: every 8 codes of `bits` bits
// form a little-endian integer of `bits` bytes, code k at bits [k*bits, (k+1)*bits).
#pragma once

#include <cstdint>
#include <cstring>

namespace lowbit {

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
    const uint64_t mask = (uint64_t{1} << bits) - 1;
    for (int64_t j = 0; j < n / 8; ++j) {
      uint64_t w = 0;
      std::memcpy(&w, src + j * bits, bits);  // little-endian host
      for (int k = 0; k < 8; ++k) dst[8 * j + k] = static_cast<float>((w >> (k * bits)) & mask);
    }
  }
}

}  // namespace lowbit
