// Accuracy of decode_ops.h's exp16 (the vectorized exp inside the native decode loop's softmax
// and SiLU) against std::exp, over [-100, 0] in steps of about 7e-4 (16 lanes per step), normal
// float32 results only: the largest relative error, and how often the two round to a different
// bfloat16 (what the decode loop keeps).
//
//   g++ -O2 -march=native -ffp-contract=off $(python -c "import torch.utils.cpp_extension as c; \
//     print(' '.join('-I' + p for p in c.include_paths()))") -Isrc/lowbit/kernels/csrc \
//     benchmarks/native/exp16_accuracy.cpp -o /tmp/exp16 && /tmp/exp16
//
// Session 12 (AMD EPYC Zen 5): max rel err 1.19e-07 (one float32 ulp) at -65.2; the bfloat16
// roundings differ for 5 of 1909372 values.
#include <cmath>
#include <cstdio>

#include "decode_ops.h"

using namespace lowbit_decode;

int main() {
  double maxrel = 0;
  float worst = 0;
  int bfdiff = 0, n = 0;
  for (float x = -100.f; x <= 0.f; x += 0.000731f) {
    alignas(64) float in[16], out[16];
    for (int i = 0; i < 16; ++i) in[i] = x - i * 1e-5f;
    _mm512_store_ps(out, exp16(_mm512_load_ps(in)));
    for (int i = 0; i < 16; ++i) {
      const float e = std::exp(in[i]);
      if (e < 1.17549435e-38f) continue;  // denormal results: both lose precision there
      const double rel = std::fabs(static_cast<double>(out[i]) - e) / e;
      if (rel > maxrel) {
        maxrel = rel;
        worst = in[i];
      }
      bfdiff += bf16(out[i]) != bf16(e);
      ++n;
    }
  }
  std::printf("max rel err %.3g at %g; bf16 differs %d of %d\n", maxrel, worst, bfdiff, n);
}
