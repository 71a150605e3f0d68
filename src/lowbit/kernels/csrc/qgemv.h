// The qgemv extension's entry points, all bound to Python in qgemv.cpp; one file per concern:
//   gemv.cpp          float32 activations times group-wise packed low-bit weights (any width,
//                     AVX2 where the width allows), and dequantize to a float weight
//   layout.h/.cpp     the packed layout: where a row's group starts, its checks, interleave_uniform
//   bf16_kernel.cpp   the AVX-512 BF16 inner loops of the bfloat16 product (bf16_kernel.h: the
//                     pieces bf16_product.cpp shares with them)
//   bf16_product.cpp  Product (one packed weight, checked once) and gemv_bf16
//   decoder.cpp       Decoder: every decoder layer of one decode step in one call
//   w4a8.cpp          4-bit weights times int8 activations in integers (AVX-512 VNNI)
//   act_quant.cpp     per-token int8 quantization of activations, and the integer linears' epilogue
// The AVX-512 paths are compiled only where the compiler targets their instructions (the build
// uses -march=native); has_bf16_path / has_w4a8_path say whether they were.
#pragma once

#include <torch/types.h>  // not torch/extension.h: only the bindings (qgemv.cpp) need Python and pybind11

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define LOWBIT_BF16_PATH 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LOWBIT_W4A8_PATH 1
#endif

// gemv.cpp
torch::Tensor gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor bits, torch::Tensor offset,
                   torch::Tensor scales, torch::Tensor zeros, int64_t group, int64_t il);
void dequantize_into(torch::Tensor w, torch::Tensor packed, torch::Tensor bits, torch::Tensor offset,
                     torch::Tensor scales, torch::Tensor zeros, int64_t group, int64_t il);
torch::Tensor dequantize(torch::Tensor packed, torch::Tensor bits, torch::Tensor offset, torch::Tensor scales,
                         torch::Tensor zeros, int64_t group, bool bf16, int64_t il);

// layout.cpp
void interleave_uniform(torch::Tensor packed, int64_t group_bytes);

// act_quant.cpp
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, bool shifted);
torch::Tensor scale_rows(torch::Tensor acc, torch::Tensor w_scale, torch::Tensor s, c10::optional<torch::Tensor> bias,
                         bool bf16);

// w4a8.cpp
bool has_w4a8_path();
#ifdef LOWBIT_W4A8_PATH
torch::Tensor w4a8_gemm(torch::Tensor q, torch::Tensor packed, torch::Tensor iscale, torch::Tensor zeros,
                        int64_t group, int64_t il);
#endif

// bf16_product.cpp, decoder.cpp
bool has_bf16_path();
#ifdef LOWBIT_BF16_PATH
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor packed, torch::Tensor bits, torch::Tensor offset,
                        torch::Tensor scales, torch::Tensor zeros, int64_t group, int64_t il);
torch::Tensor silu_mul(torch::Tensor gu);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);

namespace lowbit {

// One packed weight for the bfloat16 path (a linear, or the fused rows of several that read the
// same input), checked once: y = x W^T (+ bias) for 1 to 8 bfloat16 activation rows.
struct Product {
  torch::Tensor packed, bits, offset, scales, zeros, bias;  // bias: float32 [N], or undefined
  int64_t group, il, N, K, RB, G;
  std::vector<int64_t> gb;
  std::vector<float> off;
  std::vector<int> mode;

  Product(torch::Tensor packed_, torch::Tensor bits_, torch::Tensor offset_, torch::Tensor scales_,
          torch::Tensor zeros_, int64_t group_, int64_t il_, std::optional<torch::Tensor> bias_);

  const float* bias_ptr() const { return bias.defined() ? bias.data_ptr<float>() : nullptr; }

  // x [M, K] (raw bfloat16) -> y [M, N] float32, the bias not added; xr and xsum are scratch
  void run(const uint16_t* x, int64_t M, float* y, std::vector<uint16_t>& xr, std::vector<float>& xsum) const;

  int64_t rows_of(const torch::Tensor& x) const;

  // x [..., K] bfloat16 -> bf16(bf16(x W^T + bias) + residual) [M, N] bfloat16: what the float32
  // product, `+ bias.float()`, `.to(bfloat16)` and `residual + y` compute in torch, in one call
  torch::Tensor call(const torch::Tensor& x, std::optional<torch::Tensor> residual) const;
};

// Every decoder layer of a bfloat16 model whose projections are packed, one decode step per call
// (decoder.cpp).
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
                 int64_t kv_heads);

  // h [1, 1, hidden] bfloat16, updated in place through every layer; cos, sin [D] for `pos`
  void step(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, int64_t pos);

  int64_t layers() const { return static_cast<int64_t>(layers_.size()); }
};

}  // namespace lowbit
#endif
