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

#include "bf16_kernel.h"
#include "layout.h"

#ifdef LOWBIT_BF16_PATH
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace lowbit {
namespace {

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

}  // namespace

// y = x W^T for 1 to 8 activation rows (bf16_kernel.h): one instantiation per row count
// (accumulators in registers) and for groups of 128 or other
void bf16_product(const BF16Args& a, int64_t M) {
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
  if (a.group == 128) {
    LOWBIT_ROWS(128)
  } else {
    LOWBIT_ROWS(0)
  }
#undef LOWBIT_ROWS
}

}  // namespace lowbit
#endif
