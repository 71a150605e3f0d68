// The packed weight layout every qgemv kernel reads (PackedLinear in runtime/packed.py): row n of
// the weight is the concatenation of its G column groups, group g packed at its own width bits[g]
// (formats/pack.py layout: every 8 codes form a little-endian integer of bits[g] bytes), starting
// at byte offset[g] of the row. Uniform formats have one width; SliM-LLM's mixed widths differ per
// group. Rows one after another (il 1) or in blocks of four, group by group (il 4: group_ptr).
#pragma once

#include <torch/types.h>  // not torch/extension.h: only the bindings (qgemv.cpp) need Python and pybind11

#include <cstdint>
#include <vector>

namespace lowbit {

// Where row n's group g starts. il 1: rows one after another. il 4: rows in blocks of four,
// group by group (the block's four copies of group g side by side), so a kernel working on four
// rows at once reads one sequential stream. gb[g]: bytes of group g in one row.
inline const uint8_t* group_ptr(const uint8_t* wp, int64_t n, int64_t g, int64_t RB, const int64_t* off,
                                const int64_t* gb, int64_t il) {
  if (il == 1) return wp + n * RB + off[g];
  return wp + (n / 4) * 4 * RB + 4 * off[g] + (n % 4) * gb[g];
}

// Checks a packed weight's layout (packed [N, RB] uint8, bits / offset [G] int64, scales / zeros
// [N, G] float32, groups of `group` columns, row interleave il) and returns each group's bytes in
// one row. Shared by every entry point that reads the layout.
std::vector<int64_t> checked_layout(const torch::Tensor& packed, const torch::Tensor& bits, const torch::Tensor& offset,
                                    const torch::Tensor& scales, const torch::Tensor& zeros, int64_t group, int64_t il);

}  // namespace lowbit
