// What the bfloat16 product's inner loops (bf16_kernel.cpp) share with Product (bf16_product.cpp):
// which loop a group takes, and the arguments of one product.
#pragma once

#include "qgemv.h"

#ifdef LOWBIT_BF16_PATH
#include <cstdint>

namespace lowbit {

enum { kGeneric = 0, kFour = 1, kTwo = 2, kEight = 3, kFourWide = 4, kThreeWide = 5 };

// Which inner loop a group of width b takes: 2 and 8 bits (and 4 bits in groups of 64) widen 32
// code bytes to 16-bit lanes (one shuffle) and shift the codes out of them in place; in groups a
// multiple of 128, 4 bits read 64 bytes as 32 lanes of four codes (no shuffle at all) and 3 bits
// put the four codes of each 12-bit half of a 3-byte unit into a lane (one shuffle per 128
// codes); the others go through vpermb + vpmultishiftqb, which handles any width at two
// shuffles per 64 codes.
inline int bf16_mode(int b, int64_t group) {
  if (b == 4) return group % 128 == 0 ? kFourWide : kFour;
  if (b == 3 && group % 128 == 0) return kThreeWide;
  if (b == 2 && group % 128 == 0) return kTwo;
  if (b == 8) return kEight;
  return kGeneric;
}

struct BF16Args {
  const uint16_t* xr;
  const float* xsum;   // [M, G] per activation row and group: sum x_k
  const float* xoff;   // [M, G]: sum over the group of the offset each code carries times x'_k
  const uint8_t* wp;
  const int64_t* bits;
  const int64_t* offset;
  const float* scales;     // float32 scales and zeros, or
  const float* zeros;
  const at::Half* scales16;  // float16 ones (the other pair null)
  const at::Half* zeros16;
  float* y;
  int64_t K, N, RB, G, group;
  const uint8_t* end;  // one past the packed codes
  const int64_t* gb;   // per group: bytes in one row
  int64_t il;          // row interleave (group_ptr)
};

// y [M, N] float32 = x W^T for M = 1 to 8 activation rows, the bias not added: a.xr, a.xsum and
// a.xoff as prepare_bf16 (bf16_product.cpp) leaves them; the loops are in bf16_kernel.cpp
void bf16_product(const BF16Args& a, int64_t M);

}  // namespace lowbit
#endif
