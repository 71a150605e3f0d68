// The packed layout's checks (layout.h), and interleave_uniform: rows put in blocks of four,
// group by group, in place.

#include "layout.h"
#include "qgemv.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace lowbit {

std::vector<int64_t> checked_layout(const torch::Tensor& packed, const torch::Tensor& bits, const torch::Tensor& offset,
                                    const torch::Tensor& scales, const torch::Tensor& zeros, int64_t group, int64_t il) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(), "qgemv: packed must be contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(bits.dtype() == torch::kInt64 && offset.dtype() == torch::kInt64 && bits.numel() == offset.numel(),
              "qgemv: bits and offset must be int64 [G]");
  const int64_t N = packed.size(0), RB = packed.size(1), G = bits.numel();
  TORCH_CHECK(group % 8 == 0, "qgemv: groups must be a multiple of 8 wide");
  TORCH_CHECK((scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kFloat16) && zeros.dtype() == scales.dtype()
              && scales.is_contiguous() && zeros.is_contiguous() && scales.dim() == 2 && scales.size(0) == N
              && scales.size(1) == G && zeros.sizes() == scales.sizes(),
              "qgemv: scales and zeros must be contiguous float32 (or both float16) [N, G]");
  TORCH_CHECK(il == 1 || (il == 4 && N % 4 == 0), "qgemv: interleave must be 1, or 4 with rows a multiple of 4");
  const int64_t* bp = bits.data_ptr<int64_t>();
  const int64_t* offp = offset.data_ptr<int64_t>();
  std::vector<int64_t> gb(G);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(bp[g] >= 1 && bp[g] <= 8 && offp[g] >= 0 && offp[g] + group / 8 * bp[g] <= RB,
                "qgemv: group layout exceeds the row");
    gb[g] = group / 8 * bp[g];
  }
  return gb;
}

}  // namespace lowbit

// interleave_rows for groups of equal width, in place: each block of four rows [4, RB] becomes
// group 0 of the four rows, then group 1 of the four, and so on (group_ptr with il 4). The same
// bytes as runtime/packed.py's interleave_uniform_, without its strided torch copies.
void interleave_uniform(torch::Tensor packed, int64_t group_bytes) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(),
              "interleave: packed must be contiguous uint8 [N, row_bytes]");
  const int64_t N = packed.size(0), RB = packed.size(1);
  TORCH_CHECK(N % 4 == 0, "interleave: rows must be a multiple of 4");
  TORCH_CHECK(group_bytes > 0 && RB % group_bytes == 0, "interleave: group bytes must tile the row");
  uint8_t* p = packed.data_ptr<uint8_t>();
  const int64_t G = RB / group_bytes;
  at::parallel_for(0, N / 4, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> tmp(4 * RB);
    for (int64_t blk = begin; blk < end; ++blk) {
      uint8_t* b = p + blk * 4 * RB;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < 4; ++r)
          std::memcpy(tmp.data() + (g * 4 + r) * group_bytes, b + r * RB + g * group_bytes, group_bytes);
      std::memcpy(b, tmp.data(), 4 * RB);
    }
  });
}
