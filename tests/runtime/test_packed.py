"""PackedLinear against QuantLinear (the dequantize-then-matmul reference): prefill bit-identical,
decode through the packed GEMV kernel close, for every width, symmetric and asymmetric, act-order
permutations, mixed widths per group and integer scales; a model packed in place generates the same."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import build_tiny, records_of

from lowbit import kernels
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.qtensor import QuantFormat, QuantizedWeight
from lowbit.runtime.attention import use_fast_attention
from lowbit.runtime.packed import (
    PackedLinear,
    deinterleave_rows,
    interleave_rows,
    interleave_uniform_,
    kernel_scales,
    pack_model,
    pack_rows,
    unpack_rows,
)
from lowbit.runtime.qlinear import QuantLinear

needs_kernel = pytest.mark.skipif(not kernels.available("qgemv"), reason="no C++ toolchain for the native kernel")


def random_qweight(out, n_in, bits, gs, symmetric, seed, perm=False, mixed=False):
    g = torch.Generator().manual_seed(seed)
    G = n_in // gs
    group_bits = torch.randint(1, bits + 1, (G,), generator=g, dtype=torch.uint8) if mixed else None
    hi = (1 << group_bits.long()) if mixed else torch.full((G,), 1 << bits)
    codes = (torch.rand(out, n_in, generator=g) * hi.repeat_interleave(gs)).long().to(torch.uint8)
    scales = (torch.rand(out, G, generator=g) * 0.1 + 0.01).half()
    zeros = None if symmetric else (torch.rand(out, G, generator=g) * hi).long().to(torch.uint8)
    p = torch.randperm(n_in, generator=g) if perm else None
    return QuantizedWeight(codes, scales, zeros, QuantFormat(bits, gs, symmetric), p, group_bits)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 8]), gs=st.sampled_from([8, 32, 64, 128]), groups=st.integers(1, 4),
       out=st.integers(1, 40), symmetric=st.booleans(), perm=st.booleans(), mixed=st.booleans(), seed=st.integers(0, 999))
def test_packed_rows_round_trip_and_prefill_is_bit_identical(bits, gs, groups, out, symmetric, perm, mixed, seed):
    qw = random_qweight(out, gs * groups, bits, gs, symmetric, seed, perm, mixed)
    ref = QuantLinear.from_quantized(qw)
    m = PackedLinear(qw)
    assert torch.equal(unpack_rows(m.packed, m.offsets, m.widths, gs, m.interleave), qw.codes)
    assert m.interleave == (4 if out % 4 == 0 else 1)
    assert torch.equal(m.dequantized_weight(), ref.dequantized_weight(torch.float32))
    x = torch.randn(3, 11, gs * groups, generator=torch.Generator().manual_seed(seed))  # 33 rows: prefill path
    assert torch.equal(m(x), ref(x))
    assert torch.equal(m.dequantized_weight(torch.bfloat16), ref.dequantized_weight(torch.bfloat16))


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), gs=st.sampled_from([32, 128]), groups=st.integers(1, 3),
       rows=st.integers(1, 8), symmetric=st.booleans(), perm=st.booleans(), mixed=st.booleans(), seed=st.integers(0, 999))
def test_decode_kernel_matches_the_reference(bits, gs, groups, rows, symmetric, perm, mixed, seed):
    qw = random_qweight(48, gs * groups, bits, gs, symmetric, seed, perm, mixed)
    x = torch.randn(rows, gs * groups, generator=torch.Generator().manual_seed(seed + 1))
    want = QuantLinear.from_quantized(qw)(x)
    got = PackedLinear(qw)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _bf16_path() -> bool:
    return kernels.available("qgemv") and kernels.load("qgemv").has_bf16_path()


needs_bf16_path = pytest.mark.skipif(not _bf16_path(), reason="the qgemv kernel has no AVX-512 BF16 path on this CPU")


@needs_bf16_path
@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), gs=st.sampled_from([64, 128, 256]), groups=st.integers(1, 3), rows=st.integers(1, 8),
       symmetric=st.booleans(), mixed=st.booleans(), f32_scales=st.booleans(), seed=st.integers(0, 999))
def test_bf16_decode_kernel_matches_the_exact_product(bits, gs, groups, rows, symmetric, mixed, f32_scales, seed):
    """Every width and inner loop (4, 2 and 8 bits have their own, and 2, 3 and 4 bits one for
    groups of 128k),
    mixed widths per group, float16 or float32 scales: the float32 result of the bfloat16
    activations times the exact weight, to float32 summation error."""
    qw = random_qweight(40, gs * groups, bits, gs, symmetric, seed, mixed=mixed)
    m = PackedLinear(qw)
    x = torch.randn(rows, gs * groups, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    scales, zeros = (m.scales.float(), m.zero_points.float()) if f32_scales else (m.scales, m.zero_points)
    got = kernels.load("qgemv").gemv_bf16(x, m.packed, m.widths, m.offsets, scales, zeros, gs, m.interleave)
    want = x.double() @ qw.dequantize(torch.float64).T
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = float((x.double().abs() @ qw.dequantize(torch.float64).abs().T).max())
    assert float((got.double() - want).abs().max()) < 1e-5 * scale


@needs_bf16_path
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_the_wide_loops_give_the_exact_product_at_any_activation_scale(bits, rows, magnitude):
    """The 2, 3 and 4-bit loops for groups of 128 (several groups, 40 rows), for one activation
    row (four weight rows at a time) and several, with activations from 1e-30 to 1e30."""
    qw = random_qweight(40, 384, bits, 128, False, 7)
    m = PackedLinear(qw)
    x = (torch.randn(rows, 384, generator=torch.Generator().manual_seed(3)) * magnitude).bfloat16()
    got = kernels.load("qgemv").gemv_bf16(x, m.packed, m.widths, m.offsets, m.scales, m.zero_points, 128,
                                          m.interleave)
    w = qw.dequantize(torch.float64)
    want = x.double() @ w.T
    scale = float((x.double().abs() @ w.abs().T).max())
    assert float((got.double() - want).abs().max()) < 1e-5 * scale


@needs_bf16_path
@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 8]), gs=st.sampled_from([64, 128]), rows=st.integers(1, 8),
       bias=st.booleans(), residual=st.booleans(), seed=st.integers(0, 999))
def test_a_product_rounds_bias_and_residual_as_torch_does(bits, gs, rows, bias, residual, seed):
    """Product(x, residual) against the torch operations it replaces, bit for bit: the kernel's
    float32 product, `+ bias.float()`, `.to(bfloat16)`, then `residual + y` in bfloat16."""
    m = PackedLinear(random_qweight(44, 2 * gs, bits, gs, False, seed))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, 2 * gs, generator=gen).bfloat16()
    b = torch.randn(44, generator=gen).bfloat16() if bias else None
    res = (torch.randn(rows, 44, generator=gen) * 4).bfloat16() if residual else None
    ext = kernels.load("qgemv")
    args = (m.packed, m.widths, m.offsets, m.scales, m.zero_points, gs, m.interleave)
    want = ext.gemv_bf16(x, *args)
    if b is not None:
        want = want + b.float()
    want = want.bfloat16()
    if res is not None:
        want = res + want
    got = ext.Product(*args, b)(x, res)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@needs_bf16_path
def test_a_product_refuses_what_does_not_fit():
    m = PackedLinear(random_qweight(8, 128, 4, 64, False, 0))
    ext = kernels.load("qgemv")
    args = (m.packed, m.widths, m.offsets, m.scales, m.zero_points, 64, m.interleave)
    with pytest.raises(RuntimeError, match="one value per output"):
        ext.Product(*args, torch.zeros(7))
    p = ext.Product(*args)
    with pytest.raises(RuntimeError, match=r"contiguous bfloat16 \[\.\.\., 128\]"):
        p(torch.zeros(1, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="1 to 8 activation rows"):
        p(torch.zeros(9, 128, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="residual"):
        p(torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(1, 7, dtype=torch.bfloat16))


@needs_bf16_path
def test_a_bf16_packed_linear_decodes_through_the_kernel_and_prefills_through_torch():
    qw = random_qweight(48, 256, 3, 128, False, 0, perm=True)
    m, ref = PackedLinear(qw), QuantLinear.from_quantized(qw)
    x = torch.randn(2, 256).bfloat16()
    want = x.double() @ ref.dequantized_weight(torch.float64).T
    got = m(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=2 ** -7 * float(want.abs().max()))
    prefill = torch.randn(20, 256).bfloat16()
    assert torch.equal(m(prefill), ref(prefill))  # both dequantize then run torch's bfloat16 matmul


def test_packed_is_smaller_than_one_byte_per_code():
    qw = random_qweight(64, 256, 4, 64, False, 0)
    m = PackedLinear(qw)
    assert m.packed.numel() == 64 * 256 // 2
    assert m.scales.dtype == m.zero_points.dtype == torch.float16  # float16 scales, integer zeros: exact
    assert m.nbytes() == 64 * 256 // 2 + 64 * 4 * (2 + 2) + 2 * 4 * 8  # codes, float16 scales + zeros, layout


def test_integer_scales_fold_into_the_float_scales():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    qw = rtn_quantize(w, QuantFormat(4, 32, False, scale_bits=8))
    assert qw.scale_mult is not None
    ref = QuantLinear.from_quantized(qw)
    m = PackedLinear(qw)
    assert m.scales.dtype == torch.float32  # folded scales that float16 does not hold exactly stay float32
    x = torch.randn(20, 128)
    assert torch.equal(m(x), ref(x))


def test_kernel_scales_are_float16_only_when_exact():
    s = torch.tensor([[0.01, 0.5]]).half().float()
    z = torch.tensor([[3.0, 200.0]])
    hs, hz = kernel_scales(s, z)
    assert hs.dtype == hz.dtype == torch.float16 and torch.equal(hs.float(), s) and torch.equal(hz.float(), z)
    s2 = s.clone()
    s2[0, 0] = 0.1 + 1e-7  # not a float16 value
    assert kernel_scales(s2, z)[0].dtype == torch.float32
    assert kernel_scales(s, z + 0.5 ** 12)[1].dtype == torch.float32  # a zero point float16 cannot hold at 200


def test_groups_the_kernel_cannot_tile_are_refused():
    qw = random_qweight(4, 36, 4, 12, True, 0)
    with pytest.raises(ValueError, match="multiple of 8"):
        PackedLinear(qw)


def test_pack_rows_uses_each_groups_width():
    codes = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 3, 2, 1, 0, 3, 3, 2, 1]], dtype=torch.uint8)
    packed, offsets = pack_rows(codes, 8, [1, 2])
    assert offsets.tolist() == [0, 1] and packed.shape == (1, 3)
    assert packed[0, 0] == 0b10001101  # 1-bit codes, first code in the lowest bit


def test_a_packed_model_gives_the_same_greedy_tokens(monkeypatch):
    model = build_tiny("llama")
    with torch.no_grad():
        for name, mod in list(model.named_modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear) and cname != "lm_head":
                    qw = rtn_quantize(child.weight.detach(), QuantFormat(4, 16, False))
                    setattr(mod, cname, QuantLinear.from_quantized(qw, child.bias))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    packed = pack_model(model)
    assert not any(isinstance(m, QuantLinear) for m in packed.modules())
    assert torch.equal(packed.generate(ids, max_new_tokens=12, do_sample=False), ref)


def test_a_loaded_checkpoint_generates_the_same_tokens_packed(tmp_path):
    from tiny_models import quantize_all

    from lowbit.checkpoint import save_checkpoint
    from lowbit.loading import load_checkpoint
    from lowbit.runtime.generate import generate

    model = build_tiny("qwen2")
    quantize_all(model, bits=3, group_size=16)  # GPTQ act-order perms among them
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1))
    ref = generate(load_checkpoint(tmp_path / "ck").model, ids, 16, prefill_chunk=8).tokens
    packed = pack_model(load_checkpoint(tmp_path / "ck").model)
    assert any(isinstance(m, PackedLinear) and m.perm is not None for m in packed.modules())
    assert generate(packed, ids, 16, prefill_chunk=8).tokens == ref


@pytest.mark.parametrize("kind", ["uniform", "mixed", "integer-scale"])
def test_loading_packed_takes_the_stored_codes_and_equals_packing_after_load(tmp_path, kind):
    """load_checkpoint(runtime="packed") builds PackedLinears from the checkpoint's packed codes
    (never unpacking uniform ones); every buffer equals packing the reference-loaded model."""
    from tiny_models import quantize_all

    from lowbit.checkpoint import save_checkpoint
    from lowbit.loading import load_checkpoint

    model = build_tiny("qwen2")  # biases on q/k/v
    if kind == "uniform":
        quantize_all(model, bits=4, group_size=16)  # perms among them
    else:
        for i, (name, lin) in enumerate([(n, m) for n, m in model.named_modules()
                                         if isinstance(m, torch.nn.Linear) and ".layers." in n]):
            if kind == "mixed":
                qw = random_qweight(lin.out_features, lin.in_features, 4, 16, i % 2 == 0, i, mixed=True)
            else:
                qw = rtn_quantize(lin.weight.detach(), QuantFormat(4, 16, False, scale_bits=8))
            model.set_submodule(name, QuantLinear.from_quantized(qw, lin.bias))
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    direct = load_checkpoint(tmp_path / "ck", runtime="packed").model
    via = pack_model(load_checkpoint(tmp_path / "ck").model)
    use_fast_attention(via)  # as runtime="packed" does: the same attention on both sides
    direct_layers = {n: m for n, m in direct.named_modules() if isinstance(m, PackedLinear)}
    via_layers = {n: m for n, m in via.named_modules() if isinstance(m, PackedLinear)}
    assert direct_layers.keys() == via_layers.keys() and direct_layers
    for name, m in direct_layers.items():
        a, b = dict(m.named_buffers()), dict(via_layers[name].named_buffers())
        assert a.keys() == b.keys()
        for k, value in a.items():
            assert torch.equal(value, b[k]), (name, k)
        assert (m.bias is None) == (via_layers[name].bias is None)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, via(ids).logits)


def test_an_unknown_runtime_is_refused(tmp_path):
    from lowbit.errors import CheckpointError
    from lowbit.loading import load_checkpoint

    with pytest.raises(CheckpointError, match="runtime 'fast'"):
        load_checkpoint(tmp_path, runtime="fast")


@needs_bf16_path
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_fused_projections_decode_what_the_separate_ones_do(arch):
    """q/k/v and gate/up share one GEMV per step: the same greedy tokens, logits equal to
    float32 summation order, prefill untouched, one fused group per shared input per block."""
    from lowbit.runtime.generate import generate
    from lowbit.runtime.packed import fuse_projections

    def packed_model():
        model = build_tiny(arch)
        for name, mod in list(model.named_modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear) and cname != "lm_head" and child.in_features % 64 == 0:
                    qw = random_qweight(child.out_features, child.in_features, 4, 64, False, len(name))
                    setattr(mod, cname, QuantLinear.from_quantized(qw, child.bias))
        return pack_model(model).to(torch.bfloat16)

    plain, fused = packed_model(), packed_model()
    n_blocks = len(fused.model.layers)
    assert fuse_projections(fused) == 2 * n_blocks
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(0))
    assert generate(fused, ids, 10).tokens == generate(plain, ids, 10).tokens
    step = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = plain(step).logits.float(), fused(step).logits.float()
    torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * float(a.abs().max()))


@needs_bf16_path
def test_a_loaded_checkpoint_fuses_projections_without_copying_their_codes(tmp_path):
    """load_checkpoint(runtime="packed") reads the codes of q/k/v (and of gate/up) into one
    buffer, so the fused GEMV runs on those very bytes; it decodes what a model packed and fused
    after loading does."""
    from lowbit.checkpoint import save_checkpoint
    from lowbit.loading import load_checkpoint
    from lowbit.runtime.packed import fuse_projections

    model = build_tiny("qwen2")
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and cname != "lm_head" and child.in_features % 64 == 0:
                qw = random_qweight(child.out_features, child.in_features, 4, 64, False, len(name))
                setattr(mod, cname, QuantLinear.from_quantized(qw, child.bias))
    save_checkpoint(records_of(model), model, None, tmp_path / "ck", {})
    loaded = load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16, runtime="packed").model
    attn = loaded.model.layers[0].self_attn
    fused = attn.q_proj._fused
    assert fused is not None and fused is attn.k_proj._fused is attn.v_proj._fused
    assert fused.packed.data_ptr() == attn.q_proj.packed.data_ptr()
    assert attn.k_proj.packed.data_ptr() == attn.q_proj.packed.data_ptr() + attn.q_proj.packed.numel()
    after = pack_model(load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16).model)
    fuse_projections(after)
    assert torch.equal(fused.packed, after.model.layers[0].self_attn.q_proj._fused.packed)
    step = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(loaded(step).logits, after(step).logits)


def test_interleaving_puts_each_group_of_four_rows_side_by_side():
    codes = torch.arange(8 * 32, dtype=torch.int64).remainder(4).to(torch.uint8).reshape(8, 32)
    packed, offsets = pack_rows(codes, 16, [4, 2])  # group bytes: 8 and 4; row bytes 12
    il = interleave_rows(packed, offsets, [4, 2], 16)
    block0 = il[:4].reshape(-1)
    assert torch.equal(block0[:32], packed[:4, :8].reshape(-1))     # group 0 of rows 0-3
    assert torch.equal(block0[32:48], packed[:4, 8:12].reshape(-1))  # then group 1 of rows 0-3
    assert torch.equal(deinterleave_rows(il, offsets, [4, 2], 16), packed)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([16, 64, 128]), st.integers(1, 5), st.integers(1, 9),
       st.integers(1, 3), st.integers(0, 99))
def test_in_place_interleave_of_equal_groups_is_interleave_rows(bits, gs, groups, blocks, chunk_blocks, seed):
    """The loader's in-place, chunked interleave (no second copy of a large weight) gives
    interleave_rows' bytes for any chunk size, including chunks that do not divide the rows."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (4 * blocks, gs * groups), generator=g, dtype=torch.uint8)
    packed, offsets = pack_rows(codes, gs, [bits] * groups)
    want = interleave_rows(packed, offsets, [bits] * groups, gs)
    got = packed.clone()
    assert interleave_uniform_(got, gs // 8 * bits, chunk_bytes=chunk_blocks * 4 * packed.shape[1], native=False) is got
    assert torch.equal(got, want)
    if kernels.available("qgemv"):  # the native kernel the loader uses: the same bytes
        got = packed.clone()
        assert interleave_uniform_(got, gs // 8 * bits) is got
        assert torch.equal(got, want)


@needs_kernel
def test_prefill_weights_share_a_scratch_buffer_without_mixing_layers():
    """Prefill dequantizes into one reused buffer: layers of different shapes run in turn give
    exactly their own products; products autograd would keep, permuted and oversized weights get
    their own tensor."""
    from lowbit.runtime import packed as packed_mod

    a = PackedLinear(random_qweight(96, 128, 4, 64, False, 1))
    b = PackedLinear(random_qweight(40, 256, 3, 64, True, 2))
    xa, xb = torch.randn(16, 128), torch.randn(16, 256)
    want_a = torch.nn.functional.linear(xa, a.dequantized_weight())
    want_b = torch.nn.functional.linear(xb, b.dequantized_weight())
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(a(xa), want_a) and torch.equal(b(xb), want_b)
    scratch = packed_mod._scratch[torch.float32]
    with torch.inference_mode():
        assert a._prefill_weight(xa).untyped_storage().data_ptr() == scratch.untyped_storage().data_ptr()
    x_grad = xa.clone().requires_grad_()
    assert a._prefill_weight(x_grad).untyped_storage().data_ptr() != scratch.untyped_storage().data_ptr()
    permuted = PackedLinear(random_qweight(96, 128, 4, 64, False, 3, perm=True))
    assert permuted._prefill_weight(xa).untyped_storage().data_ptr() != scratch.untyped_storage().data_ptr()
