// Matrix-vector products with group-wise packed low-bit weights, for decode (a few rows of
// activations at a time), reading ~bits/32 of what a float32 weight would.
//
// Weight layout (PackedLinear in runtime/packed.py): row n of the weight is the concatenation of
// its G column groups, group g packed at its own width bits[g] (formats/pack.py layout: every 8
// codes form a little-endian integer of bits[g] bytes), starting at byte offset[g] of the row.
// Uniform formats have one width; SliM-LLM's mixed widths differ per group. With scale s and zero
// point z per (row, group), the weight is s * (code - z), so
//   y[m, n] = sum_g s[n,g] * ( sum_{k in g} x[m,k] code[n,k]  -  z[n,g] * sum_{k in g} x[m,k] )
// The per-group sums of x are computed once per call. Each group's codes are unpacked once into a
// float buffer and used for every activation row. Float32 accumulation throughout. `dequantize`
// computes (code - z) * s element by element, the same float operations as formats/affine.py, so
// its output is bit-identical to the torch reference.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "decode_ops.h"
#include "unpack.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// Within a group, the activations are reordered by phase so that codes sitting at the same bit
// position of consecutive packing units line up with consecutive floats: for a width with P codes
// per unit (4 bits: 2 per byte; 2 bits: 4 per byte; 3 bits: 8 per 3-byte word; 8 bits: 1),
// xd[p * (group / P) + j] = x[P * j + p]. The vector paths then turn 8 units into 8 lanes, shift
// out phase p, convert and multiply-add against 8 consecutive floats.
inline int phases(int bits) { return bits == 4 ? 2 : bits == 2 ? 4 : bits == 3 ? 8 : bits == 8 ? 1 : 0; }

// Where row n's group g starts. il 1: rows one after another. il 4: rows in blocks of four,
// group by group (the block's four copies of group g side by side), so a kernel working on four
// rows at once reads one sequential stream. gb[g]: bytes of group g in one row.
inline const uint8_t* group_ptr(const uint8_t* wp, int64_t n, int64_t g, int64_t RB, const int64_t* off,
                                const int64_t* gb, int64_t il) {
  if (il == 1) return wp + n * RB + off[g];
  return wp + (n / 4) * 4 * RB + 4 * off[g] + (n % 4) * gb[g];
}

inline bool vector_path(int bits, int64_t group) {
#if defined(__AVX2__) && defined(__FMA__)
  const int P = phases(bits);
  return P && (group / P) % 8 == 0;
#else
  (void)bits; (void)group;
  return false;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// sum_k xd[k] * code[k] over one group at `bits` (vector_path(bits, group) must hold), as 8 lanes.
inline __m256 dot_group(const uint8_t* src, const float* xd, int bits, int64_t group) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  if (bits == 4) {
    const int64_t U = group / 2;
    const __m256i m = _mm256_set1_epi32(0xF);
    for (int64_t j = 0; j < U; j += 8) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m)), _mm256_loadu_ps(xd + j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xd + U + j), acc1);
    }
  } else if (bits == 2) {
    const int64_t U = group / 4;
    const __m256i m = _mm256_set1_epi32(3);
    for (int64_t j = 0; j < U; j += 8) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m)), _mm256_loadu_ps(xd + j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 2), m)),
                             _mm256_loadu_ps(xd + U + j), acc1);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4), m)),
                             _mm256_loadu_ps(xd + 2 * U + j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 6)), _mm256_loadu_ps(xd + 3 * U + j), acc1);
    }
  } else if (bits == 3) {
    const int64_t U = group / 8;
    const __m256i m = _mm256_set1_epi32(7);
    alignas(32) int32_t words[8];
    for (int64_t j = 0; j < U; j += 8) {
      const uint8_t* w = src + 3 * j;
      for (int i = 0; i < 8; ++i) words[i] = w[3 * i] | (w[3 * i + 1] << 8) | (w[3 * i + 2] << 16);
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(words));
      for (int p = 0; p < 8; p += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 3 * p), m)),
                               _mm256_loadu_ps(xd + p * U + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 3 * p + 3), m)),
                               _mm256_loadu_ps(xd + (p + 1) * U + j), acc1);
      }
    }
  } else {  // 8 bits
    for (int64_t j = 0; j < group; j += 8) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(xd + j), acc0);
    }
  }
  return _mm256_add_ps(acc0, acc1);
}
#endif

}  // namespace

// Checks a packed weight's layout (packed [N, RB] uint8, bits / offset [G] int64, scales / zeros
// [N, G] float32, groups of `group` columns, row interleave il) and returns each group's bytes in
// one row. Shared by every entry point that reads the layout.
static std::vector<int64_t> checked_layout(const torch::Tensor& packed, const torch::Tensor& bits, const torch::Tensor& offset,
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

// x [M, K] float32; packed [N, row_bytes] uint8; bits, offset [G] int64; scales, zeros
// [N, G] float32; group = K / G -> y [M, N] float32.
torch::Tensor gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor bits, torch::Tensor offset,
                   torch::Tensor scales, torch::Tensor zeros, int64_t group, int64_t il) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "qgemv: x must be contiguous float32 [M, K]");
  const std::vector<int64_t> gb = checked_layout(packed, bits, offset, scales, zeros, group, il);
  scales = scales.to(torch::kFloat32);  // float16 scales and zeros: exact in float32
  zeros = zeros.to(torch::kFloat32);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), RB = packed.size(1), G = bits.numel();
  TORCH_CHECK(G * group == K, "qgemv: the groups must cover x's K columns");
  const int64_t* bp = bits.data_ptr<int64_t>();
  const int64_t* offp = offset.data_ptr<int64_t>();
  // per-group sums of x
  std::vector<float> xsum(M * G, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += xp[m * K + g * group + k];
      xsum[m * G + g] = s;
    }
  // activations reordered by phase for the groups that take the vector path
  std::vector<float> xd(M * K);
  std::vector<char> vec(G);
  for (int64_t g = 0; g < G; ++g) {
    const int b = static_cast<int>(bp[g]);
    vec[g] = vector_path(b, group);
    const int P = vec[g] ? phases(b) : 1;
    const int64_t U = group / P;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t j = 0; j < U; ++j) xd[m * K + g * group + p * U + j] = xp[m * K + g * group + P * j + p];
  }
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> codes(group), acc(M);
#if defined(__AVX2__) && defined(__FMA__)
    std::vector<__m256> lanes(M);
#endif
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
#if defined(__AVX2__) && defined(__FMA__)
      std::fill(lanes.begin(), lanes.end(), _mm256_setzero_ps());
#endif
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* src = group_ptr(wp, n, g, RB, offp, gb.data(), il);
        const int b = static_cast<int>(bp[g]);
        const float s = sp[n * G + g], z = zp[n * G + g];
#if defined(__AVX2__) && defined(__FMA__)
        if (vec[g]) {  // scale the group's lanes into the row's lanes; one horizontal sum per row
          for (int64_t m = 0; m < M; ++m) {
            lanes[m] = _mm256_fmadd_ps(_mm256_set1_ps(s), dot_group(src, xd.data() + m * K + g * group, b, group),
                                       lanes[m]);
            acc[m] -= s * z * xsum[m * G + g];
          }
          continue;
        }
#endif
        lowbit::unpack(src, group, b, codes.data());
        for (int64_t m = 0; m < M; ++m) {
          const float* xg = xp + m * K + g * group;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t k = 0; k < group; ++k) dot += xg[k] * codes[k];
          acc[m] += s * (dot - z * xsum[m * G + g]);
        }
      }
#if defined(__AVX2__) && defined(__FMA__)
      for (int64_t m = 0; m < M; ++m) acc[m] += hsum(lanes[m]);
#endif
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = acc[m];
    }
  });
  return y;
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define LOWBIT_BF16_PATH 1
namespace {

// bfloat16 activations, any width 1..8 per group, groups a multiple of 64 wide. Per 64 codes:
// a masked load of the 8*b bytes that hold them; vpermb puts each b-byte packing unit (8 codes)
// into its own 64-bit lane; vpmultishiftqb pulls code i of the unit out of bits [i*b, i*b+8)
// into byte i. Read as 16-bit lanes, the low bytes are the even codes and the high bytes the odd
// ones: one ternary-logic op keeps b bits of a lane and sets 0x4300, making the bfloat16 number
// 0x43cc = 128 + c exactly (c < 128) with no shuffle, so one vdpbf16ps multiplies 32 codes by 32
// activations with float32 sums, and 128 * sum(x) is taken off per group with the zero point:
//   sum_k (c_k - z) x_k = sum_k (128 + c_k) x_k - (128 + z) sum_k x_k.
// 8-bit codes go as two nibbles (c = lo + 16 hi, offset 128 * 17). The activations are put once
// per call in the order each group's path leaves its codes in (see bf16_mode).
struct WidthTables {
  __m512i perm[9], shift[9];
  WidthTables() {
    for (int b = 1; b <= 8; ++b) {
      alignas(64) uint8_t p[64], sh[64];
      for (int j = 0; j < 64; ++j) {
        const int q = j / 8, k = j % 8;
        p[j] = static_cast<uint8_t>(k < b ? q * b + k : q * b);
        sh[j] = static_cast<uint8_t>(k * b);
      }
      perm[b] = _mm512_load_si512(p);
      shift[b] = _mm512_load_si512(sh);
    }
  }
};

inline const WidthTables& tables() {
  static const WidthTables t;
  return t;
}

// 3 bits in groups of 128: formats/pack.py packs 8 codes in a 3-byte unit, codes 0-3 in its low
// 12 bits and codes 4-7 in its high 12. vpermb gives lane 2u bytes (3u, 3u + 1) and lane 2u + 1
// bytes (3u + 1, 3u + 2), so lane j holds codes 4j .. 4j + 3 from bit 0 (even lanes) or bit 4
// (odd lanes, shifted down once under a mask); phase p then sits at bit 3p. 128 codes: 48 bytes,
// one shuffle.
struct ThreeWide {
  __m512i perm;
  __mmask64 lmask = (__mmask64{1} << 48) - 1;
  ThreeWide() {
    alignas(64) uint8_t pm[64];
    for (int j = 0; j < 32; ++j) {
      const int u = j / 2, odd = j % 2;
      pm[2 * j] = static_cast<uint8_t>(3 * u + odd);
      pm[2 * j + 1] = static_cast<uint8_t>(3 * u + odd + 1);
    }
    perm = _mm512_load_si512(pm);
  }
};

inline const ThreeWide& three_wide() {
  static const ThreeWide t;
  return t;
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

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

// The float32 scales and zeros of rows n .. n + rows - 1 ([rows, G], contiguous): the tensors'
// own when they are float32, else converted from float16 into `buf` (exact: every float16 is a float32).
inline void row_scales(const BF16Args& a, int64_t n, int64_t rows, std::vector<float>& buf, const float** s,
                       const float** z) {
  if (a.scales != nullptr) {
    *s = a.scales + n * a.G;
    *z = a.zeros + n * a.G;
    return;
  }
  const int64_t cnt = rows * a.G;
  buf.resize(2 * cnt);
  const at::Half* hs = a.scales16 + n * a.G;
  const at::Half* hz = a.zeros16 + n * a.G;
  // 16 at a time with vcvtph2ps (at::Half's scalar conversion is a bit-manipulation routine:
  // converting one block's scales that way cost 15% of a decode product at groups of 128)
  for (int64_t i = 0; i < cnt; i += 16) {
    const __mmask16 k = cnt - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cnt - i)) - 1);
    _mm512_mask_storeu_ps(buf.data() + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, hs + i)));
    _mm512_mask_storeu_ps(buf.data() + cnt + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, hz + i)));
  }
  *s = buf.data();
  *z = buf.data() + cnt;
}

// M activation rows at once (a compile-time count, so the accumulators stay in registers).
// GS: the group width when it is 128 (the common case, loops unrolled at compile time), else 0.
// The row's correction sum_g s_g (xoff_g + z_g sum(x_g)), all groups at once, taken off `acc`.
inline __m512 corrected(const BF16Args& a, const float* srow, const float* zrow, int m, __m512 acc) {
  for (int64_t g0 = 0; g0 < a.G; g0 += 16) {
    const __mmask16 k = a.G - g0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.G - g0)) - 1);
    const __m512 t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, zrow + g0), _mm512_maskz_loadu_ps(k, a.xsum + m * a.G + g0),
                                     _mm512_maskz_loadu_ps(k, a.xoff + m * a.G + g0));
    acc = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, srow + g0), t, acc);
  }
  return acc;
}

// The sums of four rows' accumulators, as four floats in row order (by value: an array argument
// made GCC keep the accumulators on the stack through the whole group loop).
inline __attribute__((always_inline)) __m128 hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  auto half = [](__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); };
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(half(v0), half(v1)), _mm256_hadd_ps(half(v2), half(v3)));
  return _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
}

constexpr int PREFETCH_BLOCKS = 2;    // rows not interleaved: blocks of four rows ahead
constexpr int64_t PREFETCH_BYTES = 8192;  // interleaved rows: bytes ahead in the stream
constexpr int64_t SCALE_AHEAD = 4;        // scales and zero points: blocks of four rows ahead

// Bytes of one row's group for a width's own loop at a compile-time group width (0: not known).
constexpr int64_t fixed_group_bytes(int gs, int mode) {
  return gs == 0 ? 0 : mode == kFour || mode == kFourWide ? gs / 2 : mode == kThreeWide ? gs / 8 * 3
       : mode == kTwo ? gs / 4 : mode == kEight ? gs : 0;
}

// One activation row, R = 4 weight rows at a time, every group of one width (MODE: that
// width's inner loop): each activation chunk is loaded once for the four rows, and four
// independent code streams keep more loads in flight. IL4: rows interleaved by four (group_ptr).
// TAIL: the block is the last whose 64-byte loads could reach past the packed codes (the 3-bit
// and vpermb loops read 48 or 8 * b bytes with a 64-byte load): those loads are masked there.
template <int GS, int MODE, bool IL4, bool TAIL>
void four_rows(const BF16Args& a, int64_t n) {
  constexpr int R = 4;
  const int64_t group = GS ? GS : a.group;
  // every group has one width here: with rows interleaved, group g of the block starts at
  // g * 4 * gbytes and its rows are gbytes apart (a constant for a known width and group)
  constexpr int64_t CB = fixed_group_bytes(GS, MODE);
  const int64_t gbytes = CB ? CB : a.gb[0];
  const uint8_t* block = a.wp + n * a.RB;
  const __m512i magic16 = _mm512_set1_epi16(0x4300);
  const __m512i mask = _mm512_set1_epi16(MODE == kTwo ? 0x03 : MODE == kThreeWide ? 0x07 : 0x0F);
  // the second code of a lane left in place (bits 2-3 for 2 bits, 3-5 for 3): 128 + 4c or 128 + 8c
  const __m512i mask_up = _mm512_set1_epi16(MODE == kTwo ? 0x0C : 0x38);
  auto bf = [&](__m512i lanes) { return as_bh(_mm512_ternarylogic_epi32(lanes, mask, magic16, 0xEA)); };
  auto bf_up = [&](__m512i lanes) { return as_bh(_mm512_ternarylogic_epi32(lanes, mask_up, magic16, 0xEA)); };
  // the width tables, fetched before the group loop: their first-use guard inside it is a call
  // path, around which GCC kept the row accumulators on the stack
  const ThreeWide& T3 = three_wide();
  const __m512i perm3 = T3.perm;
  const WidthTables& T = tables();
  thread_local std::vector<float> sbuf;
  const float *srows, *zrows;  // [R, G]
  // the scales and zero points are a second stream, [N, G] each: fetch the block's that is
  // SCALE_AHEAD blocks on (their first use, below, otherwise waits on DRAM every block)
  if (n + (SCALE_AHEAD + 1) * R <= a.N) {
    const int64_t esz = a.scales != nullptr ? 4 : 2;
    const char* sp = a.scales != nullptr ? reinterpret_cast<const char*>(a.scales) : reinterpret_cast<const char*>(a.scales16);
    const char* zp = a.zeros != nullptr ? reinterpret_cast<const char*>(a.zeros) : reinterpret_cast<const char*>(a.zeros16);
    const int64_t from = (n + SCALE_AHEAD * R) * a.G * esz, bytes = R * a.G * esz;
    for (int64_t off = from & ~int64_t{63}; off < from + bytes; off += 64) {
      _mm_prefetch(sp + off, _MM_HINT_T0);
      _mm_prefetch(zp + off, _MM_HINT_T0);
    }
  }
  row_scales(a, n, R, sbuf, &srows, &zrows);
  __m512 row[R];
  for (int r = 0; r < R; ++r) row[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    const uint16_t* xg = a.xr + g * group;
    // row r of the block: src + r * rs (interleaved: the four rows' group g are adjacent)
    const uint8_t* src = IL4 ? block + g * R * gbytes : group_ptr(a.wp, n, g, a.RB, a.offset, a.gb, a.il);
    const int64_t rs = IL4 ? gbytes : a.RB;
    const int64_t ahead = R * a.RB;  // bytes from one block to the next
    // the group's sums: the loops that read 128 codes a row at a time keep one chain per row
    // (fewer registers to zero and no lo + hi add; measured 2-4% faster than two), the others two
    constexpr bool ONE_CHAIN = MODE == kFourWide || MODE == kThreeWide || MODE == kTwo;
    __m512 lo[R], hi[R];
    for (int r = 0; r < R; ++r) { lo[r] = _mm512_setzero_ps(); hi[r] = _mm512_setzero_ps(); }
    if (IL4) {
      // the block is one sequential stream: prefetch the lines PREFETCH_BYTES ahead of this
      // group's, non-temporal (each weight is read once per step; from DRAM this measured
      // 5-10% faster than the T0 hint, and faster than 2 or 4 KB ahead: BENCHMARKS.md)
      const char* q = reinterpret_cast<const char*>(src) + PREFETCH_BYTES;
      if (reinterpret_cast<const uint8_t*>(q) + R * gbytes <= a.end)
        for (int64_t off = 0; off < R * gbytes; off += 64) _mm_prefetch(q + off, _MM_HINT_NTA);
    } else if (n + (PREFETCH_BLOCKS + 1) * R <= a.N) {
      // rows apart: the same group PREFETCH_BLOCKS blocks of rows ahead, row by row
      for (int r = 0; r < R; ++r)
        for (int64_t off = 0; off < gbytes; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(src + PREFETCH_BLOCKS * ahead + r * rs + off), _MM_HINT_T0);
    }
    if (MODE == kFourWide) {  // lane j of 64 bytes: codes 4j .. 4j + 3 at bits 0, 4, 8, 12
      for (int64_t c = 0; c < group; c += 128) {
        const __m512bh x0 = as_bh(_mm512_loadu_si512(xg + c)), x1 = as_bh(_mm512_loadu_si512(xg + c + 32));
        const __m512bh x2 = as_bh(_mm512_loadu_si512(xg + c + 64)), x3 = as_bh(_mm512_loadu_si512(xg + c + 96));
        for (int r = 0; r < R; ++r) {
          const __m512i w = _mm512_loadu_si512(src + r * rs + c / 2);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w), x0);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(_mm512_srli_epi16(w, 4)), x1);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(_mm512_srli_epi16(w, 8)), x2);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(_mm512_srli_epi16(w, 12)), x3);
        }
      }
    } else if (MODE == kThreeWide) {  // lane j: codes 4j .. 4j + 3 at bits 0, 3, 6, 9 (ThreeWide)
      for (int64_t c = 0; c < group; c += 128) {
        const __m512bh x0 = as_bh(_mm512_loadu_si512(xg + c)), x1 = as_bh(_mm512_loadu_si512(xg + c + 32));
        const __m512bh x2 = as_bh(_mm512_loadu_si512(xg + c + 64)), x3 = as_bh(_mm512_loadu_si512(xg + c + 96));
        for (int r = 0; r < R; ++r) {
          const uint8_t* p = src + r * rs + c / 8 * 3;
          const __m512i raw = !TAIL || p + 64 <= a.end ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(T3.lmask, p);
          __m512i w = _mm512_permutexvar_epi8(perm3, raw);
          w = _mm512_mask_srli_epi16(w, 0xAAAAAAAAu, w, 4);  // odd lanes: their codes from bit 0 too
          const __m512i w6 = _mm512_srli_epi16(w, 6);
          // codes 1 and 3 of a lane stay at bits 3-5 (x1, x3 carry x / 8: prepare_bf16)
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w), x0);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf_up(w), x1);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w6), x2);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf_up(w6), x3);
        }
      }
    } else if (MODE == kFour) {
      for (int64_t c = 0; c < group; c += 64) {
        const __m512bh x0 = as_bh(_mm512_loadu_si512(xg + c)), x1 = as_bh(_mm512_loadu_si512(xg + c + 32));
        for (int r = 0; r < R; ++r) {
          const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * rs + c / 2)));
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w), x0);
          hi[r] = _mm512_dpbf16_ps(hi[r], bf(_mm512_srli_epi16(w, 4)), x1);
        }
      }
    } else if (MODE == kEight) {  // code = lo + 16 hi; the high nibbles' sums are weighted 16
      __m512 lo16[R], hi16[R];
      for (int r = 0; r < R; ++r) { lo16[r] = _mm512_setzero_ps(); hi16[r] = _mm512_setzero_ps(); }
      for (int64_t c = 0; c < group; c += 64) {
        const __m512bh x0 = as_bh(_mm512_loadu_si512(xg + c)), x1 = as_bh(_mm512_loadu_si512(xg + c + 32));
        for (int r = 0; r < R; ++r) {
          const uint8_t* p = src + r * rs + c;
          const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
          const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w0), x0);
          hi[r] = _mm512_dpbf16_ps(hi[r], bf(w1), x1);
          lo16[r] = _mm512_dpbf16_ps(lo16[r], bf(_mm512_srli_epi16(w0, 4)), x0);
          hi16[r] = _mm512_dpbf16_ps(hi16[r], bf(_mm512_srli_epi16(w1, 4)), x1);
        }
      }
      for (int r = 0; r < R; ++r) lo[r] = _mm512_fmadd_ps(_mm512_set1_ps(16.f), _mm512_add_ps(lo16[r], hi16[r]), lo[r]);
    } else if (MODE == kGeneric) {  // any width b < 8 through vpermb + vpmultishiftqb
      const int b = static_cast<int>(a.bits[g]);
      const __m512i perm = T.perm[b], shift = T.shift[b], m16 = _mm512_set1_epi16((1 << b) - 1);
      const __mmask64 lmask = (__mmask64{1} << (8 * b)) - 1;
      for (int64_t c = 0; c < group; c += 64) {
        const __m512bh x0 = as_bh(_mm512_loadu_si512(xg + c)), x1 = as_bh(_mm512_loadu_si512(xg + c + 32));
        for (int r = 0; r < R; ++r) {
          const uint8_t* p = src + r * rs + c / 8 * b;
          const __m512i raw = !TAIL || p + 64 <= a.end ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(lmask, p);
          const __m512i c8 = _mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(perm, raw));
          lo[r] = _mm512_dpbf16_ps(lo[r], as_bh(_mm512_ternarylogic_epi32(c8, m16, magic16, 0xEA)), x0);
          hi[r] = _mm512_dpbf16_ps(hi[r], as_bh(_mm512_ternarylogic_epi32(_mm512_srli_epi16(c8, 8), m16, magic16, 0xEA)), x1);
        }
      }
    } else {
      for (int64_t c = 0; c < group; c += 128) {
        const __m512bh x0 = as_bh(_mm512_loadu_si512(xg + c)), x1 = as_bh(_mm512_loadu_si512(xg + c + 32));
        const __m512bh x2 = as_bh(_mm512_loadu_si512(xg + c + 64)), x3 = as_bh(_mm512_loadu_si512(xg + c + 96));
        for (int r = 0; r < R; ++r) {  // codes 1 and 3 of a lane at bits 2-3 (x1, x3 carry x / 4)
          const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * rs + c / 4)));
          const __m512i w4 = _mm512_srli_epi16(w, 4);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w), x0);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf_up(w), x1);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf(w4), x2);
          lo[r] = _mm512_dpbf16_ps(lo[r], bf_up(w4), x3);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      row[r] = _mm512_fmadd_ps(_mm512_set1_ps(srows[r * a.G + g]), ONE_CHAIN ? lo[r] : _mm512_add_ps(lo[r], hi[r]), row[r]);
  }
  for (int r = 0; r < R; ++r) row[r] = corrected(a, srows + r * a.G, zrows + r * a.G, 0, row[r]);
  _mm_storeu_ps(a.y + n, hsum4(row[0], row[1], row[2], row[3]));
}

template <int M, int GS>
void bf16_rows(const BF16Args& a) {
  const int64_t group = GS ? GS : a.group;
  const WidthTables& T = tables();
  const ThreeWide& T3 = three_wide();
  const __m512i magic16 = _mm512_set1_epi16(0x4300);
  const __m512i m4 = _mm512_set1_epi16(0x0F), m2 = _mm512_set1_epi16(0x03), m3 = _mm512_set1_epi16(0x07);
  const __m512i m0c = _mm512_set1_epi16(0x0C), m38 = _mm512_set1_epi16(0x38);
  int uniform = bf16_mode(static_cast<int>(a.bits[0]), group);
  for (int64_t g = 1; g < a.G; ++g)
    if (a.bits[g] != a.bits[0]) uniform = -1;
  // blocks of four rows (aligned: an interleaved block is four rows from a multiple of 4)
  const int64_t blocks = M == 1 && uniform >= 0 ? a.N / 4 : 0;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      // interleaved rows (a compile-time stride) or not
      auto run = [&](auto il4) {
        constexpr bool IL4 = decltype(il4)::value;
        // only the last blocks' 64-byte loads can reach past the codes (TAIL)
        const bool tail = a.wp + (4 * blk + 4) * a.RB + 64 > a.end;
        switch (uniform) {
          case kFour: four_rows<GS, kFour, IL4, false>(a, 4 * blk); break;
          case kFourWide: four_rows<GS, kFourWide, IL4, false>(a, 4 * blk); break;
          case kThreeWide:
            if (tail) four_rows<GS, kThreeWide, IL4, true>(a, 4 * blk);
            else four_rows<GS, kThreeWide, IL4, false>(a, 4 * blk);
            break;
          case kTwo: four_rows<GS, kTwo, IL4, false>(a, 4 * blk); break;
          case kEight: four_rows<GS, kEight, IL4, false>(a, 4 * blk); break;
          default:
            if (tail) four_rows<GS, kGeneric, IL4, true>(a, 4 * blk);
            else four_rows<GS, kGeneric, IL4, false>(a, 4 * blk);
            break;
        }
      };
      if (a.il == 4) run(std::true_type{});
      else run(std::false_type{});
    }
  });
  at::parallel_for(4 * blocks, a.N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf;
    for (int64_t n = begin; n < end; ++n) {
      const float *srow, *zrow;
      row_scales(a, n, 1, sbuf, &srow, &zrow);
      __m512 row[M];
      for (int m = 0; m < M; ++m) row[m] = _mm512_setzero_ps();
      for (int64_t g = 0; g < a.G; ++g) {
        const int b = static_cast<int>(a.bits[g]);
        const uint8_t* src = group_ptr(a.wp, n, g, a.RB, a.offset, a.gb, a.il);
        __m512 lo_acc[M], hi_acc[M];
        for (int m = 0; m < M; ++m) { lo_acc[m] = _mm512_setzero_ps(); hi_acc[m] = _mm512_setzero_ps(); }
        const uint16_t* xg = a.xr + g * group;
        const int md = bf16_mode(b, group);
        // (lanes & mask) | 0x4300: 16-bit lanes holding codes < 128 become bfloat16 128 + code
        auto bf = [&](__m512i lanes, __m512i m16) { return as_bh(_mm512_ternarylogic_epi32(lanes, m16, magic16, 0xEA)); };
        auto dot2 = [&](__m512bh w0, __m512bh w1, const uint16_t* xm, __m512* acc0, __m512* acc1) {
          for (int m = 0; m < M; ++m) {
            acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, as_bh(_mm512_loadu_si512(xm + m * a.K)));
            acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, as_bh(_mm512_loadu_si512(xm + m * a.K + 32)));
          }
        };
        if (md == kFourWide) {  // 64 bytes as 32 lanes of four codes (bits 0, 4, 8, 12)
          for (int64_t c = 0; c < group; c += 128) {
            const __m512i w = _mm512_loadu_si512(src + c / 2);
            dot2(bf(w, m4), bf(_mm512_srli_epi16(w, 4), m4), xg + c, lo_acc, hi_acc);
            dot2(bf(_mm512_srli_epi16(w, 8), m4), bf(_mm512_srli_epi16(w, 12), m4), xg + c + 64, lo_acc, hi_acc);
          }
        } else if (md == kThreeWide) {  // 48 bytes as 32 lanes of four 3-bit codes
          for (int64_t c = 0; c < group; c += 128) {
            const uint8_t* p = src + c / 8 * 3;
            const __m512i raw = p + 64 <= a.end ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(T3.lmask, p);
            __m512i w = _mm512_permutexvar_epi8(T3.perm, raw);
            w = _mm512_mask_srli_epi16(w, 0xAAAAAAAAu, w, 4);
            const __m512i w6 = _mm512_srli_epi16(w, 6);  // codes 1 and 3 stay at bits 3-5 (as in four_rows)
            dot2(bf(w, m3), bf(w, m38), xg + c, lo_acc, hi_acc);
            dot2(bf(w6, m3), bf(w6, m38), xg + c + 64, lo_acc, hi_acc);
          }
        } else if (md == kFour) {  // 32 bytes -> 32 lanes; low nibbles are the even codes, high the odd
          for (int64_t c = 0; c < group; c += 64) {
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c / 2)));
            dot2(bf(w, m4), bf(_mm512_srli_epi16(w, 4), m4), xg + c, lo_acc, hi_acc);
          }
        } else if (md == kTwo) {  // 32 bytes -> 32 lanes -> four phases of 2 bits
          for (int64_t c = 0; c < group; c += 128) {
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c / 4)));
            const __m512i w4 = _mm512_srli_epi16(w, 4);  // codes 1 and 3 stay at bits 2-3 (as in four_rows)
            dot2(bf(w, m2), bf(w, m0c), xg + c, lo_acc, hi_acc);
            dot2(bf(w4, m2), bf(w4, m0c), xg + c + 64, lo_acc, hi_acc);
          }
        } else if (md == kEight) {  // code = lo + 16 hi: the high nibbles go to their own sums
          __m512 acc16[M], acc16b[M];
          for (int m = 0; m < M; ++m) { acc16[m] = _mm512_setzero_ps(); acc16b[m] = _mm512_setzero_ps(); }
          for (int64_t c = 0; c < group; c += 64) {
            const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c)));
            const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c + 32)));
            dot2(bf(w0, m4), bf(w1, m4), xg + c, lo_acc, hi_acc);
            dot2(bf(_mm512_srli_epi16(w0, 4), m4), bf(_mm512_srli_epi16(w1, 4), m4), xg + c, acc16, acc16b);
          }
          for (int m = 0; m < M; ++m)
            lo_acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(16.f), _mm512_add_ps(acc16[m], acc16b[m]), lo_acc[m]);
        } else {
          const __mmask64 lmask = (__mmask64{1} << (8 * b)) - 1;
          const __m512i perm = T.perm[b], shift = T.shift[b], mb = _mm512_set1_epi16((1 << b) - 1);
          for (int64_t c = 0; c < group; c += 64) {
            const uint8_t* p = src + c / 8 * b;
            const __m512i raw = p + 64 <= a.end ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(lmask, p);
            const __m512i c8 = _mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(perm, raw));
            dot2(bf(c8, mb), bf(_mm512_srli_epi16(c8, 8), mb), xg + c, lo_acc, hi_acc);
          }
        }
        const __m512 vs = _mm512_set1_ps(srow[g]);
        for (int m = 0; m < M; ++m) row[m] = _mm512_fmadd_ps(vs, _mm512_add_ps(lo_acc[m], hi_acc[m]), row[m]);
      }
      for (int m = 0; m < M; ++m) a.y[m * a.N + n] = hsum512(corrected(a, srow, zrow, m, row[m]));
    }
  });
}

// x * 2^-e for 32 bfloat16 values, exactly: the exponent field lowered by e. Values whose result
// would be subnormal become signed zero, as vdpbf16ps reads subnormal inputs; infinities and NaN
// stay as they are.
inline __m512i bf16_scaled_down(__m512i v, int e) {
  const __m512i ex = _mm512_and_si512(_mm512_srli_epi16(v, 7), _mm512_set1_epi16(0xFF));
  const __mmask32 normal = _mm512_cmpgt_epi16_mask(ex, _mm512_set1_epi16(static_cast<int16_t>(e)));
  const __mmask32 special = _mm512_cmpeq_epi16_mask(ex, _mm512_set1_epi16(0xFF));
  const __m512i zero = _mm512_and_si512(v, _mm512_set1_epi16(static_cast<int16_t>(0x8000)));
  const __m512i low = _mm512_mask_sub_epi16(zero, normal, v, _mm512_set1_epi16(static_cast<int16_t>(e << 7)));
  return _mm512_mask_mov_epi16(low, special, v);
}

inline __m512 bf16_sum32(const uint16_t* p) {  // 32 bfloat16 values, summed in float32 (16 lanes)
  return _mm512_add_ps(lowbit_decode::load16(p), lowbit_decode::load16(p + 16));
}

// The activations as the bfloat16 loops read them: each group's values in the order its inner
// loop leaves its codes in, and each group's float32 sum. Chunks of 32 * P values (P phases:
// code P * j + p of the chunk goes to lane 32p + j): 4 bits in groups of 64 leave the even codes
// in the low nibbles and the odd in the high (P = 2); 2 bits, and 4 and 3 bits in groups of 128,
// leave codes 4j .. 4j + 3 in lane j (P = 4); the vpermb path leaves code j of 64 in byte j, so
// the low bytes of its 16-bit lanes are the even codes too (P = 2); 8 bits keep the order.
// The 2 and 3-bit loops for groups of 128 leave codes 1 and 3 of a lane where they are, 2 or 3
// bits up (the bfloat16 number becomes 128 + 4c or 128 + 8c): their activations are stored
// divided by 4 or 8, exactly. xsum [M, G] gets each group's sum of x; xoff [M, G] the sum of the
// offset each code carries (off[g]: 128, or 128 * 17 for 8 bits) times the activation it meets.
void prepare_bf16(const uint16_t* xp, int64_t M, int64_t K, int64_t G, int64_t group, const int* mode, const float* off,
                  uint16_t* xr, float* xsum, float* xoff) {
  alignas(64) static const struct Idx {
    uint16_t even[32], odd[32], four[4][32];
    Idx() {
      for (int j = 0; j < 32; ++j) {
        even[j] = static_cast<uint16_t>(2 * j);
        odd[j] = static_cast<uint16_t>(2 * j + 1);
        for (int p = 0; p < 4; ++p) four[p][j] = static_cast<uint16_t>(j < 16 ? 4 * j + p : 0);
      }
    }
  } idx;
  const __m512i ev = _mm512_loadu_si512(idx.even), od = _mm512_loadu_si512(idx.odd);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* src = xp + m * K + g * group;
      uint16_t* dst = xr + m * K + g * group;
      const int md = mode[g];
      if (md == kEight) {
        std::memcpy(dst, src, group * sizeof(uint16_t));
      } else if (md == kTwo || md == kFourWide || md == kThreeWide) {
        const int up = md == kTwo ? 2 : md == kThreeWide ? 3 : 0;  // codes 1 and 3: bits left in place
        for (int64_t c = 0; c < group; c += 128) {
          const __m512i r0 = _mm512_loadu_si512(src + c), r1 = _mm512_loadu_si512(src + c + 32);
          const __m512i r2 = _mm512_loadu_si512(src + c + 64), r3 = _mm512_loadu_si512(src + c + 96);
          for (int p = 0; p < 4; ++p) {
            const __m512i ix = _mm512_loadu_si512(idx.four[p]);
            const __m512i lo = _mm512_permutex2var_epi16(r0, ix, r1), hi = _mm512_permutex2var_epi16(r2, ix, r3);
            __m512i v = _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1);
            if (up != 0 && p % 2 == 1) v = bf16_scaled_down(v, up);
            _mm512_storeu_si512(dst + c + 32 * p, v);
          }
        }
      } else {
        for (int64_t c = 0; c < group; c += 64) {
          const __m512i r0 = _mm512_loadu_si512(src + c), r1 = _mm512_loadu_si512(src + c + 32);
          _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi16(r0, ev, r1));
          _mm512_storeu_si512(dst + c + 32, _mm512_permutex2var_epi16(r0, od, r1));
        }
      }
      __m512 acc = _mm512_setzero_ps(), acc_r = _mm512_setzero_ps();
      for (int64_t k = 0; k < group; k += 32) {
        acc = _mm512_add_ps(acc, bf16_sum32(src + k));
        acc_r = _mm512_add_ps(acc_r, bf16_sum32(dst + k));
      }
      xsum[m * G + g] = _mm512_reduce_add_ps(acc);
      xoff[m * G + g] = off[g] * _mm512_reduce_add_ps(acc_r);
    }
  }
}

// One packed weight for the bfloat16 path (a linear, or the fused rows of several that read the
// same input), checked once: y = x W^T (+ bias) for 1 to 8 bfloat16 activation rows.
struct Product {
  torch::Tensor packed, bits, offset, scales, zeros, bias;  // bias: float32 [N], or undefined
  int64_t group, il, N, K, RB, G;
  std::vector<int64_t> gb;
  std::vector<float> off;
  std::vector<int> mode;

  Product(torch::Tensor packed_, torch::Tensor bits_, torch::Tensor offset_, torch::Tensor scales_,
          torch::Tensor zeros_, int64_t group_, int64_t il_, std::optional<torch::Tensor> bias_)
      : packed(packed_), bits(bits_), offset(offset_), scales(scales_), zeros(zeros_), group(group_), il(il_) {
    gb = checked_layout(packed, bits, offset, scales, zeros, group, il);
    N = packed.size(0), RB = packed.size(1), G = bits.numel(), K = G * group;
    TORCH_CHECK(group % 64 == 0, "qgemv: the bfloat16 path needs groups a multiple of 64 wide");
    if (bias_.has_value() && bias_->defined()) {
      bias = bias_->to(torch::kFloat32).contiguous();
      TORCH_CHECK(bias.numel() == N, "qgemv: the bias must have one value per output (", N, ")");
    }
    const int64_t* bp = bits.data_ptr<int64_t>();
    for (int64_t g = 0; g < G; ++g) {
      off.push_back(bp[g] == 8 ? 128.f * 17.f : 128.f);
      mode.push_back(bf16_mode(static_cast<int>(bp[g]), group));
    }
  }

  const float* bias_ptr() const { return bias.defined() ? bias.data_ptr<float>() : nullptr; }

  // x [M, K] (raw bfloat16) -> y [M, N] float32, the bias not added; xr and xsum are scratch
  void run(const uint16_t* x, int64_t M, float* y, std::vector<uint16_t>& xr, std::vector<float>& xsum) const {
    TORCH_CHECK(M >= 1 && M <= 8, "qgemv: the bfloat16 path takes 1 to 8 activation rows");
    xr.resize(M * K);
    xsum.resize(2 * M * G);  // the sums of x, then the offsets' sums (prepare_bf16)
    prepare_bf16(x, M, K, G, group, mode.data(), off.data(), xr.data(), xsum.data(), xsum.data() + M * G);
    const bool half = scales.dtype() == torch::kFloat16;
    BF16Args a{xr.data(), xsum.data(), xsum.data() + M * G, packed.data_ptr<uint8_t>(), bits.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
               half ? nullptr : scales.data_ptr<float>(), half ? nullptr : zeros.data_ptr<float>(),
               half ? scales.data_ptr<at::Half>() : nullptr, half ? zeros.data_ptr<at::Half>() : nullptr,
               y, K, N, RB, G, group, packed.data_ptr<uint8_t>() + N * RB, gb.data(), il};
    // one instantiation per row count (accumulators in registers) and for groups of 128 or other
#define LOWBIT_ROWS(GS)                      \
  switch (M) {                               \
    case 1: bf16_rows<1, GS>(a); break;      \
    case 2: bf16_rows<2, GS>(a); break;      \
    case 3: bf16_rows<3, GS>(a); break;      \
    case 4: bf16_rows<4, GS>(a); break;      \
    case 5: bf16_rows<5, GS>(a); break;      \
    case 6: bf16_rows<6, GS>(a); break;      \
    case 7: bf16_rows<7, GS>(a); break;      \
    default: bf16_rows<8, GS>(a); break;     \
  }
    if (group == 128) {
      LOWBIT_ROWS(128)
    } else {
      LOWBIT_ROWS(0)
    }
#undef LOWBIT_ROWS
  }

  int64_t rows_of(const torch::Tensor& x) const {
    TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.is_contiguous() && x.dim() >= 1 && x.size(-1) == K,
                "qgemv: x must be contiguous bfloat16 [..., ", K, "]");
    return x.numel() / K;
  }

  // x [..., K] bfloat16 -> bf16(bf16(x W^T + bias) + residual) [M, N] bfloat16: what the float32
  // product, `+ bias.float()`, `.to(bfloat16)` and `residual + y` compute in torch, in one call
  torch::Tensor call(const torch::Tensor& x, std::optional<torch::Tensor> residual) const {
    const int64_t M = rows_of(x);
    const uint16_t* res = nullptr;
    if (residual.has_value() && residual->defined()) {
      TORCH_CHECK(residual->dtype() == torch::kBFloat16 && residual->is_contiguous() && residual->numel() == M * N,
                  "qgemv: the residual must be contiguous bfloat16 with ", M * N, " values");
      res = reinterpret_cast<const uint16_t*>(residual->data_ptr<at::BFloat16>());
    }
    std::vector<uint16_t> xr;
    std::vector<float> xsum, y(M * N);
    run(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, y.data(), xr, xsum);
    auto out = torch::empty({M, N}, x.options());
    uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    for (int64_t m = 0; m < M; ++m)
      lowbit_decode::finish_row(y.data() + m * N, bias_ptr(), res == nullptr ? nullptr : res + m * N, op + m * N, N);
    return out;
  }
};

// Every decoder layer of a bfloat16 Llama / Qwen2 model whose projections are packed, one decode
// step in one call: per layer RMSNorm, the fused q/k/v product (+ bias), rotary embedding, cache
// write and attention, the output product added to the residual, RMSNorm, the fused gate/up
// product, SiLU(gate) * up, the down product added to the residual. The same operations, in the
// same order and roundings, as runtime/decode.py's torch loop, without a Python call between
// them (norms, attention and SiLU sum and take exp in their own way: within bfloat16 rounding
// of it, see decode_ops.h).
class Decoder {
  struct Layer {
    torch::Tensor ln1, ln2, keys, values, cumlen;
    float eps1, eps2, scale;
    int64_t heads, kv_heads;
    std::shared_ptr<Product> qkv, o, gate_up, down;
  };
  std::vector<Layer> layers_;
  int64_t hidden_ = 0;
  std::vector<uint16_t> xr_, x_, qkv_, att_, gu_, act_;
  std::vector<float> xsum_, y_;

 public:
  void add_layer(torch::Tensor ln1, double eps1, std::shared_ptr<Product> qkv, std::shared_ptr<Product> o,
                 torch::Tensor ln2, double eps2, std::shared_ptr<Product> gate_up, std::shared_ptr<Product> down,
                 torch::Tensor keys, torch::Tensor values, torch::Tensor cumlen, double scale, int64_t heads,
                 int64_t kv_heads) {
    for (const torch::Tensor* t : {&ln1, &ln2, &keys, &values})
      TORCH_CHECK(t->dtype() == torch::kBFloat16 && t->is_contiguous(), "Decoder: norm weights and caches must be contiguous bfloat16");
    const int64_t hid = ln1.numel();
    TORCH_CHECK(layers_.empty() || hid == hidden_, "Decoder: every layer must have the same hidden size");
    TORCH_CHECK(keys.dim() == 4 && keys.size(0) == 1 && keys.size(1) == kv_heads && keys.sizes() == values.sizes()
                && kv_heads > 0 && heads % kv_heads == 0, "Decoder: caches must be [1, KV, T, D]");
    TORCH_CHECK(layers_.empty() || keys.sizes() == layers_[0].keys.sizes(),
                "Decoder: every layer's cache must have the first one's shape");
    const int64_t D = keys.size(3), inter = down->K;
    TORCH_CHECK(ln2.numel() == hid && qkv->K == hid && qkv->N == (heads + 2 * kv_heads) * D && o->K == heads * D
                && o->N == hid && gate_up->K == hid && gate_up->N == 2 * inter && down->N == hid && D % 2 == 0,
                "Decoder: the layer's shapes do not agree (hidden ", hid, ", heads ", heads, "/", kv_heads, " of ", D,
                ", gate/up ", gate_up->N, ", down ", down->K, "x", down->N, ")");
    hidden_ = hid;
    layers_.push_back({ln1, ln2, keys, values, cumlen, static_cast<float>(eps1), static_cast<float>(eps2),
                       static_cast<float>(scale), heads, kv_heads, qkv, o, gate_up, down});
  }

  // h [1, 1, hidden] bfloat16, updated in place through every layer; cos, sin [D] for `pos`
  void step(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, int64_t pos) {
    TORCH_CHECK(!layers_.empty(), "Decoder: no layers");
    TORCH_CHECK(h.dtype() == torch::kBFloat16 && h.is_contiguous() && h.numel() == hidden_,
                "Decoder: h must be one contiguous bfloat16 row of ", hidden_);
    const int64_t T = layers_[0].keys.size(2), D = layers_[0].keys.size(3);
    TORCH_CHECK(pos >= 0 && pos < T, "Decoder: position ", pos, " outside the cache (", T, ")");
    TORCH_CHECK(cos.dtype() == torch::kBFloat16 && sin.dtype() == torch::kBFloat16 && cos.is_contiguous()
                && sin.is_contiguous() && cos.numel() == D && sin.numel() == D, "Decoder: cos and sin must be bfloat16 [D]");
    auto bf = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    uint16_t* hp = bf(h);
    x_.resize(hidden_);
    for (Layer& L : layers_) {
      const int64_t inter = L.down->K;
      y_.resize(std::max({L.qkv->N, L.gate_up->N, hidden_}));
      qkv_.resize(L.qkv->N);
      att_.resize(L.o->K);
      gu_.resize(2 * inter);
      act_.resize(inter);
      lowbit_decode::rms_norm_row(hp, bf(L.ln1), hidden_, L.eps1, x_.data());
      L.qkv->run(x_.data(), 1, y_.data(), xr_, xsum_);
      lowbit_decode::finish_row(y_.data(), L.qkv->bias_ptr(), nullptr, qkv_.data(), L.qkv->N);
      lowbit_decode::rope_attend_row(qkv_.data(), bf(cos), bf(sin), bf(L.keys), bf(L.values), T, D, pos, L.scale,
                                     L.heads, L.kv_heads, att_.data());
      L.cumlen.fill_(pos + 1);
      L.o->run(att_.data(), 1, y_.data(), xr_, xsum_);
      lowbit_decode::finish_row(y_.data(), L.o->bias_ptr(), hp, hp, hidden_);
      lowbit_decode::rms_norm_row(hp, bf(L.ln2), hidden_, L.eps2, x_.data());
      L.gate_up->run(x_.data(), 1, y_.data(), xr_, xsum_);
      lowbit_decode::finish_row(y_.data(), L.gate_up->bias_ptr(), nullptr, gu_.data(), 2 * inter);
      lowbit_decode::silu_mul_row(gu_.data(), inter, act_.data());
      L.down->run(act_.data(), 1, y_.data(), xr_, xsum_);
      lowbit_decode::finish_row(y_.data(), L.down->bias_ptr(), hp, hp, hidden_);
    }
  }

  int64_t layers() const { return static_cast<int64_t>(layers_.size()); }
};

}  // namespace

// The Decoder's elementwise pieces on their own, for tests against the torch operations.
torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.dtype() == torch::kBFloat16 && gu.is_contiguous() && gu.dim() == 1 && gu.numel() % 2 == 0,
              "silu_mul: gu must be one contiguous bfloat16 row [gate | up]");
  const int64_t I = gu.numel() / 2;
  auto out = torch::empty({I}, gu.options());
  lowbit_decode::silu_mul_row(reinterpret_cast<const uint16_t*>(gu.data_ptr<at::BFloat16>()), I,
                              reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && w.dtype() == torch::kBFloat16 && x.is_contiguous() && w.is_contiguous()
              && x.numel() == w.numel(), "rms_norm: x and the weight must be contiguous bfloat16 rows of one size");
  auto y = torch::empty_like(x);
  lowbit_decode::rms_norm_row(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                              reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.numel(),
                              static_cast<float>(eps), reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

// x [M, K] bfloat16 -> y [M, N] float32; the rest as gemv. Groups must be a multiple of 64 wide.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor packed, torch::Tensor bits, torch::Tensor offset,
                        torch::Tensor scales, torch::Tensor zeros, int64_t group, int64_t il) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "qgemv: x must be contiguous bfloat16 [M, K]");
  const Product p(packed, bits, offset, scales, zeros, group, il, std::nullopt);
  TORCH_CHECK(x.size(1) == p.K, "qgemv: the bfloat16 path needs groups a multiple of 64 wide covering K");
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "qgemv: the bfloat16 path takes 1 to 8 activation rows");
  auto y = torch::empty({M, p.N}, x.options().dtype(torch::kFloat32));
  std::vector<uint16_t> xr;
  std::vector<float> xsum;
  p.run(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, y.data_ptr<float>(), xr, xsum);
  return y;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LOWBIT_W4A8_PATH 1
// W4A8: 4-bit codes c (group-wise, integer scales iscale and integer zero points z per group)
// times int8 activations q, all in integers:
//   T[m, n] = sum_g iscale[n, g] * ( sum_{k in g} c[n, k] q[m, k]  -  z[n, g] * sum_{k in g} q[m, k] )
// exactly (int64 out); the caller multiplies by the token's and the row's float scales. Per 64
// codes: 32 packed bytes split into low and high nibbles (the even and odd codes), one vpdpbusd
// (unsigned code bytes times signed activation bytes, four products per int32 lane). Lane sums
// stay in int32: a lane holds 4 products per 64 codes, |c q| <= 15 * 127, times iscale <= 255,
// so a row of K codes keeps |lane| <= K / 16 * 15 * 127 * 255 (2.9e8 at K = 9000); the lanes are
// added in int64 at the end.
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

// Per-token int8 quantization of activations for the integer-activation linears, with the very
// operations of runtime/w8a8.py's quantize_per_token, so codes and scales are identical to it:
// s = max(max_k |x_k| / 127, smallest normal float), q_k = clamp(round(x_k / s), -127, 127) (exact
// division, rounding half to even), written as int8, or with `shifted` as uint8 q + 128 (oneDNN's
// unsigned activations). AVX-512 where compiled for it, else the scalar loop.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
template <typename T>
inline __m512 load16(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {  // bfloat16: the high half of a float32
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <typename T>
inline void quantize_row(const T* x, int64_t K, uint8_t* q, float* s_out, bool shifted) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + k, m)));
  }
  const float s = std::max(_mm512_reduce_max_ps(amax) / 127.f, std::numeric_limits<float>::min());
  *s_out = s;
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m128i flip = _mm_set1_epi8(shifted ? char(0x80) : 0);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(load16(x + k, m), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m128i b = _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)), flip);
    _mm_mask_storeu_epi8(q + k, m, b);
  }
}
#else
template <typename T>
inline void quantize_row(const T* x, int64_t K, uint8_t* q, float* s_out, bool shifted) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(x[k])));
  const float s = std::max(amax / 127.f, std::numeric_limits<float>::min());
  *s_out = s;
  for (int64_t k = 0; k < K; ++k) {
    const float v = std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(x[k]) / s)));
    q[k] = static_cast<uint8_t>(static_cast<int8_t>(v)) ^ (shifted ? 0x80 : 0);
  }
}
#endif

// x [M, K] float32 or bfloat16 -> (q [M, K] int8, or uint8 q + 128 when shifted; s float32 [M, 1]).
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, bool shifted) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16),
              "quantize_rows: x must be contiguous float32 or bfloat16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, torch::dtype(shifted ? torch::kUInt8 : torch::kInt8));
  auto sc = torch::empty({M, 1}, torch::dtype(torch::kFloat32));
  const bool bf = x.dtype() == torch::kBFloat16;
  uint8_t* qp = static_cast<uint8_t*>(q.data_ptr());
  float* sp = sc.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));  // small rows: fewer, larger tasks
  at::parallel_for(0, M, grain, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      if (bf) {
        quantize_row(reinterpret_cast<const at::BFloat16*>(x.data_ptr<at::BFloat16>()) + m * K, K, qp + m * K, sp + m, shifted);
      } else {
        quantize_row(x.data_ptr<float>() + m * K, K, qp + m * K, sp + m, shifted);
      }
    }
  });
  return {q, sc};
}

// y[m, n] = acc[m, n] * w_scale[n] * s[m] (+ bias[n]) in float32, written as `dtype` (float32 or
// bfloat16) in one pass: the epilogue of the integer-activation linears.
torch::Tensor scale_rows(torch::Tensor acc, torch::Tensor w_scale, torch::Tensor s, c10::optional<torch::Tensor> bias,
                         bool bf16) {
  TORCH_CHECK(acc.dtype() == torch::kFloat32 && acc.dim() == 2 && acc.is_contiguous(), "scale_rows: acc must be contiguous float32");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(w_scale.dtype() == torch::kFloat32 && w_scale.numel() == N && s.dtype() == torch::kFloat32 && s.numel() == M,
              "scale_rows: w_scale [N] and s [M] must be float32");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->numel() == N && bias->is_contiguous(), "scale_rows: bias must be float32 [N]");
    bp = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, acc.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const float* ap = acc.data_ptr<float>();
  const float* wp = w_scale.contiguous().data_ptr<float>();
  const float* spp = s.contiguous().data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float sm = spp[m];
      if (bf16) {
        at::BFloat16* o = y.data_ptr<at::BFloat16>() + m * N;
        for (int64_t n = 0; n < N; ++n) o[n] = at::BFloat16(ap[m * N + n] * wp[n] * sm + (bp ? bp[n] : 0.f));
      } else {
        float* o = y.data_ptr<float>() + m * N;
        for (int64_t n = 0; n < N; ++n) o[n] = ap[m * N + n] * wp[n] * sm + (bp ? bp[n] : 0.f);
      }
    }
  });
  return y;
}

bool has_bf16_path() {
#ifdef LOWBIT_BF16_PATH
  return true;
#else
  return false;
#endif
}

// The float weight [N, K] of the same layout (for prefill: dequantize once, then a dense matmul),
// as float32, or rounded to bfloat16 (round to nearest even, as torch's float -> bfloat16 cast)
// when `bf16` is set, so a bfloat16 model never materializes the float32 weight.
// into `w` [N, K] (float32 or bfloat16, contiguous): a caller's reusable buffer
void dequantize_into(torch::Tensor w, torch::Tensor packed, torch::Tensor bits, torch::Tensor offset,
                     torch::Tensor scales, torch::Tensor zeros, int64_t group, int64_t il) {
  const std::vector<int64_t> gb = checked_layout(packed, bits, offset, scales, zeros, group, il);
  scales = scales.to(torch::kFloat32);  // float16 scales and zeros: exact in float32
  zeros = zeros.to(torch::kFloat32);
  const int64_t N = packed.size(0), RB = packed.size(1), G = bits.numel(), K = G * group;
  const bool bf16 = w.dtype() == torch::kBFloat16;
  TORCH_CHECK((bf16 || w.dtype() == torch::kFloat32) && w.is_contiguous() && w.dim() == 2 && w.size(0) == N &&
              w.size(1) == K, "qgemv: the output must be a contiguous float32 or bfloat16 [", N, ", ", K, "] tensor");
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int64_t* bp = bits.data_ptr<int64_t>();
  const int64_t* offp = offset.data_ptr<int64_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* out32 = bf16 ? nullptr : w.data_ptr<float>();
  at::BFloat16* out16 = bf16 ? w.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(group);
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < G; ++g) {
        float* dst = bf16 ? buf.data() : out32 + n * K + g * group;
        lowbit::unpack(group_ptr(wp, n, g, RB, offp, gb.data(), il), group, static_cast<int>(bp[g]), dst);
        const float s = sp[n * G + g], z = zp[n * G + g];
        for (int64_t k = 0; k < group; ++k) dst[k] = (dst[k] - z) * s;
        if (bf16) {
          at::BFloat16* o = out16 + n * K + g * group;
          for (int64_t k = 0; k < group; ++k) o[k] = at::BFloat16(dst[k]);
        }
      }
  });
}

torch::Tensor dequantize(torch::Tensor packed, torch::Tensor bits, torch::Tensor offset, torch::Tensor scales,
                         torch::Tensor zeros, int64_t group, bool bf16, int64_t il) {
  TORCH_CHECK(packed.dim() == 2 && bits.numel() > 0, "qgemv: packed must be [N, row bytes]");
  auto w = torch::empty({packed.size(0), bits.numel() * group},
                        scales.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  dequantize_into(w, packed, bits, offset, scales, zeros, group, il);
  return w;
}

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x W^T with group-wise packed low-bit W");
  m.def("dequantize", &dequantize, "group-wise packed low-bit W -> float32 (or bfloat16) W");
  m.def("dequantize_into", &dequantize_into, "dequantize into a given float32 / bfloat16 [N, K] tensor");
  m.def("interleave_uniform", &interleave_uniform, "rows in blocks of four, group by group, in place (equal widths)");
  m.def("has_bf16_path", &has_bf16_path, "whether gemv_bf16 was compiled (AVX-512 BF16 and VBMI)");
  m.def("has_w4a8_path", &has_w4a8_path, "whether w4a8_gemm was compiled (AVX-512 VNNI)");
  m.def("quantize_rows", &quantize_rows, "per-token int8 quantization (q, scale) of float32 / bfloat16 rows; "
        "shifted: q + 128 as uint8", py::arg("x"), py::arg("shifted") = false);
  m.def("scale_rows", &scale_rows, "acc * w_scale[n] * s[m] (+ bias) -> float32 or bfloat16");
#ifdef LOWBIT_W4A8_PATH
  m.def("w4a8_gemm", &w4a8_gemm, "exact int64 T = sum_g iscale * sum (c - z) q: 4-bit codes, int8 activations");
#endif
#ifdef LOWBIT_BF16_PATH
  m.def("gemv_bf16", &gemv_bf16, "y = x W^T, bfloat16 x, group-wise packed low-bit W, float32 y");
  m.def("silu_mul", &silu_mul, "bf16(bf16(silu(gate)) * up) of one row [gate | up] (the Decoder's)");
  m.def("rms_norm", &rms_norm, "RMSNorm of one bfloat16 row (the Decoder's)");
  py::class_<Product, std::shared_ptr<Product>>(m, "Product", "one packed weight for bfloat16 decode, checked once")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t,
                    std::optional<torch::Tensor>>(),
           py::arg("packed"), py::arg("bits"), py::arg("offset"), py::arg("scales"), py::arg("zeros"),
           py::arg("group"), py::arg("il"), py::arg("bias") = py::none())
      .def("__call__", &Product::call, py::arg("x"), py::arg("residual") = py::none(),
           "bf16(bf16(x W^T + bias) + residual), bfloat16 [M, N]")
      .def_readonly("in_features", &Product::K)
      .def_readonly("out_features", &Product::N);
  py::class_<Decoder>(m, "Decoder", "every packed decoder layer of a bfloat16 model, one decode step per call")
      .def(py::init<>())
      .def("add_layer", &Decoder::add_layer)
      .def("step", &Decoder::step, "h [1, 1, hidden] updated in place through every layer")
      .def("__len__", &Decoder::layers);
#endif
}
