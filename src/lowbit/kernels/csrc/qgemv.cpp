// The qgemv extension's Python bindings: every entry point, each kernel in its own file (qgemv.h
// lists them).

#include <torch/extension.h>

#include "qgemv.h"

#ifdef LOWBIT_BF16_PATH
using lowbit::Decoder;
using lowbit::Product;
#endif

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
