// Decode attention read straight from a KIVI cache's packed codes (formats/kv.py), so that a step
// never materializes the dequantized cache.
//
// Keys are stored per channel in blocks of `block` tokens: row (i, bh*D + c) holds the codes of
// channel c for tokens [i*block, (i+1)*block) with one scale s and minimum m (k = code * s + m).
// For a query q,
//   q . k_t = sum_c (q_c s_c) code_{c,t} + sum_c q_c m_c,
// so each channel's codes are unpacked once and accumulated along tokens (the inner loop runs
// over tokens and vectorizes).
// Values are stored per token in groups of `group` channels: row (t, bh) with scales/mins [G].
//   out_c = sum_t (p_t s_{t,g}) code_{t,c} + sum_t p_t m_{t,g}     (c in group g)
//
// Packing (formats/pack.py): every 8 codes of `bits` bits form a little-endian integer of `bits`
// bytes, code k at bits [k*bits, (k+1)*bits). Rows are padded to a multiple of 8 codes.
//
// Both functions take float32 scales/minimums (converted once per step on the Python side) and
// float32 queries / probabilities, and accumulate in float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "unpack.h"

#include <cstdint>
#include <vector>

namespace {

void check(bool ok, const char* what) { TORCH_CHECK(ok, "lowbit kv_attention: ", what); }

}  // namespace

// q [B, H, R, D] float32 (R query heads per kv head); codes [n, B*H*D, P] uint8;
// scales, mins [n, B*H*D] float32 -> scores [B, H, R, n*block] float32 (unscaled q.k).
torch::Tensor key_scores(torch::Tensor q, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                         int64_t bits, int64_t block) {
  check(q.dtype() == torch::kFloat32 && q.dim() == 4 && q.is_contiguous(), "q must be contiguous float32 [B, H, R, D]");
  check(codes.dtype() == torch::kUInt8 && codes.dim() == 3 && codes.is_contiguous(), "codes must be contiguous uint8 [n, rows, P]");
  check(scales.dtype() == torch::kFloat32 && mins.dtype() == torch::kFloat32, "scales/mins must be float32");
  check(block % 8 == 0 && bits >= 1 && bits <= 8, "block must be a multiple of 8 and bits in 1..8");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3);
  const int64_t n = codes.size(0), rows = codes.size(1), P = codes.size(2);
  check(rows == B * H * D && P == block / 8 * bits, "codes do not match q's shape and the block/bits");
  check(scales.numel() == n * rows && mins.numel() == n * rows, "one scale and minimum per row expected");
  auto scores = torch::empty({B, H, R, n * block}, q.options());
  const float* qp = q.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.contiguous().data_ptr<float>();
  const float* mp = mins.contiguous().data_ptr<float>();
  float* op = scores.data_ptr<float>();
  at::parallel_for(0, B * H * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> codes_f(block), acc(R * block), qs(R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n, i = task % n;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> bias(R, 0.f);
      for (int64_t c = 0; c < D; ++c) {
        const int64_t row = i * rows + bh * D + c;
        lowbit::unpack(cp + row * P, block, bits, codes_f.data());
        const float s = sp[row], mn = mp[row];
        for (int64_t r = 0; r < R; ++r) {
          const float qc = qp[(bh * R + r) * D + c], w = qc * s;
          bias[r] += qc * mn;
          float* a = acc.data() + r * block;
          for (int64_t t = 0; t < block; ++t) a[t] += w * codes_f[t];
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        float* o = op + (bh * R + r) * n * block + i * block;
        for (int64_t t = 0; t < block; ++t) o[t] = acc[r * block + t] + bias[r];
      }
    }
  });
  return scores;
}

// p [B, H, R, T] float32; codes [T, B*H, P] uint8 (P = packed length of D); scales, mins
// [T, B*H, G] float32 with G = D / group -> out [B, H, R, D] float32 = sum_t p_t * v_t.
torch::Tensor value_mix(torch::Tensor p, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                        int64_t bits, int64_t group) {
  check(p.dtype() == torch::kFloat32 && p.dim() == 4 && p.is_contiguous(), "p must be contiguous float32 [B, H, R, T]");
  check(codes.dtype() == torch::kUInt8 && codes.dim() == 3 && codes.is_contiguous(), "codes must be contiguous uint8 [T, rows, P]");
  check(scales.dtype() == torch::kFloat32 && mins.dtype() == torch::kFloat32, "scales/mins must be float32");
  check(group % 8 == 0 && bits >= 1 && bits <= 8, "group must be a multiple of 8 and bits in 1..8");
  const int64_t B = p.size(0), H = p.size(1), R = p.size(2), T = p.size(3);
  const int64_t rows = codes.size(1), P = codes.size(2), G = scales.size(2);
  const int64_t D = G * group;
  check(codes.size(0) == T && rows == B * H && P == D / 8 * bits, "codes do not match p's shape and the group/bits");
  check(scales.size(0) == T && scales.size(1) == rows && mins.sizes() == scales.sizes(), "scales/mins must be [T, rows, G]");
  auto out = torch::empty({B, H, R, D}, p.options());
  const float* pp = p.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.contiguous().data_ptr<float>();
  const float* mp = mins.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t gbytes = group / 8 * bits;
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> codes_f(group), acc(R * group), bias(R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / G, g = task % G;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(bias.begin(), bias.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = t * rows + bh;
        lowbit::unpack(cp + row * P + g * gbytes, group, bits, codes_f.data());
        const float s = sp[row * G + g], mn = mp[row * G + g];
        for (int64_t r = 0; r < R; ++r) {
          const float pt = pp[(bh * R + r) * T + t], w = pt * s;
          bias[r] += pt * mn;
          float* a = acc.data() + r * group;
          for (int64_t c = 0; c < group; ++c) a[c] += w * codes_f[c];
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        float* o = op + (bh * R + r) * D + g * group;
        for (int64_t c = 0; c < group; ++c) o[c] = acc[r * group + c] + bias[r];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_scores", &key_scores, "q . k over per-channel packed key blocks");
  m.def("value_mix", &value_mix, "sum_t p_t v_t over per-token packed value groups");
}
