// Every decoder layer of a bfloat16 Llama / Qwen2 model whose projections are packed, one decode
// step in one call: per layer RMSNorm, the fused q/k/v product (+ bias), rotary embedding, cache
// write and attention, the output product added to the residual, RMSNorm, the fused gate/up
// product, SiLU(gate) * up, the down product added to the residual. The same operations, in the
// same order and roundings, as runtime/decode.py's torch loop, without a Python call between
// them (norms, attention and SiLU sum and take exp in their own way: within bfloat16 rounding
// of it, see decode_ops.h).
// (The class and its data are declared in qgemv.h.)

#include "decode_ops.h"
#include "qgemv.h"

#ifdef LOWBIT_BF16_PATH
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

namespace lowbit {

void Decoder::add_layer(torch::Tensor ln1, double eps1, std::shared_ptr<Product> qkv, std::shared_ptr<Product> o,
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
void Decoder::step(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, int64_t pos) {
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

}  // namespace lowbit

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
#endif
