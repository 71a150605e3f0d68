// The bfloat16 path's products (qgemv.h: Product, gemv_bf16): a packed weight checked once, the
// activations put in the order the inner loops (bf16_kernel.cpp) leave their codes in, then those
// loops, then the bias and residual added and rounded to bfloat16 as torch does.

#include "bf16_kernel.h"
#include "decode_ops.h"
#include "layout.h"
#include "qgemv.h"

#ifdef LOWBIT_BF16_PATH
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace lowbit {
namespace {

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

}  // namespace

Product::Product(torch::Tensor packed_, torch::Tensor bits_, torch::Tensor offset_, torch::Tensor scales_,
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

// x [M, K] (raw bfloat16) -> y [M, N] float32, the bias not added; xr and xsum are scratch
void Product::run(const uint16_t* x, int64_t M, float* y, std::vector<uint16_t>& xr, std::vector<float>& xsum) const {
  TORCH_CHECK(M >= 1 && M <= 8, "qgemv: the bfloat16 path takes 1 to 8 activation rows");
  xr.resize(M * K);
  xsum.resize(2 * M * G);  // the sums of x, then the offsets' sums (prepare_bf16)
  prepare_bf16(x, M, K, G, group, mode.data(), off.data(), xr.data(), xsum.data(), xsum.data() + M * G);
  const bool half = scales.dtype() == torch::kFloat16;
  BF16Args a{xr.data(), xsum.data(), xsum.data() + M * G, packed.data_ptr<uint8_t>(), bits.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
             half ? nullptr : scales.data_ptr<float>(), half ? nullptr : zeros.data_ptr<float>(),
             half ? scales.data_ptr<at::Half>() : nullptr, half ? zeros.data_ptr<at::Half>() : nullptr,
             y, K, N, RB, G, group, packed.data_ptr<uint8_t>() + N * RB, gb.data(), il};
  bf16_product(a, M);
}

int64_t Product::rows_of(const torch::Tensor& x) const {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.is_contiguous() && x.dim() >= 1 && x.size(-1) == K,
              "qgemv: x must be contiguous bfloat16 [..., ", K, "]");
  return x.numel() / K;
}

// x [..., K] bfloat16 -> bf16(bf16(x W^T + bias) + residual) [M, N] bfloat16: what the float32
// product, `+ bias.float()`, `.to(bfloat16)` and `residual + y` compute in torch, in one call
torch::Tensor Product::call(const torch::Tensor& x, std::optional<torch::Tensor> residual) const {
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

}  // namespace lowbit

using lowbit::Product;

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

bool has_bf16_path() {
#ifdef LOWBIT_BF16_PATH
  return true;
#else
  return false;
#endif
}
