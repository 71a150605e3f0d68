"""Weight MSE of one real layer under three 4-bit asymmetric formats, at several group sizes.

    python benchmarks/zero_point_mse.py [MODEL] [LAYER]

Compares lowbit's integer zero points (with its clipping search), a float minimum per group
(the Q4_1 form: w' = code * scale + min, with the same kind of clipping search written inline
here) and HQQ. On smollm2-135m, whose reference weights come from a Q4_1 GGUF, the float-minimum
form is exact at group 32; this script is the source of the zero-point finding in BENCHMARKS.md.
"""

import sys

import torch

from lowbit.formats import affine
from lowbit.models import load_model
from lowbit.peers.hqq import _hqq_roundtrip, _hqq_settings


def float_min_mse(w: torch.Tensor, gs: int, bits: int = 4, grid: int = 20, max_shrink: float = 0.8) -> float:
    wg = affine.group_view(w, gs)
    qmax = (1 << bits) - 1
    best = None
    for i in range(grid + 1):
        r = 1.0 - max_shrink * i / grid
        lo, hi = wg.amin(-1, keepdim=True) * r, wg.amax(-1, keepdim=True) * r
        step = (hi - lo).clamp(min=1e-12) / qmax
        err = (((wg - lo) / step).round().clamp(0, qmax) * step + lo - wg).pow(2).sum(-1)
        best = err if best is None else torch.minimum(best, err)
    return float(best.sum() / w.numel())


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    layer = sys.argv[2] if len(sys.argv) > 2 else "model.layers.5.mlp.down_proj"
    w = load_model(model, progress=False).model.get_submodule(layer).weight.detach().float()
    print(f"{model} {layer} {tuple(w.shape)}: 4-bit weight MSE")
    print("| group | integer zero (lowbit, clip) | float minimum (Q4_1 form, clip) | HQQ |")
    print("|---|---|---|---|")
    for gs in (32, 64, 128):
        shrink = affine.search_shrink(w, 4, gs, norm=2.0)
        codes, scale, zero = affine.quantize(w, 4, gs, shrink=shrink)
        int_mse = float(((affine.dequantize(codes, scale, zero, gs) - w) ** 2).mean())
        q, params = _hqq_settings(4, gs)
        hqq_mse = float(((_hqq_roundtrip(q, params, w)[0] - w) ** 2).mean())
        print(f"| {gs} | {int_mse:.3e} | {float_min_mse(w, gs):.3e} | {hqq_mse:.3e} |")


if __name__ == "__main__":
    main()
