"""expert_ffn on weights packed for the CPU micro-kernel (ops.pack_expert_weights, expert_ffn's
`packed=`) and MoELayer's cache of them: the forward against sparsemoe.reference for every
activation, bias, layout, dtype and odd size; the errors; the cache never stale (in-place changes,
an optimizer step, load_state_dict, a new .data); batch and thread invariance of a row's float32
output."""

from __future__ import annotations

import copy

import pytest
import torch

import sparsemoe
from sparsemoe import ops, packing, reference
from helpers import (close, experts, interleave_gate_up, lowp_tolerance, needs_microkernel, threads,
                     transposed_view)

# The op runs anywhere (without the micro-kernel its panels go through the BLAS); what the
# micro-kernel alone gives (the layer's cache, which only packs where it pays, and bitwise batch
# and thread invariance) is tested where it runs (needs_microkernel).

ACTS = ("swiglu", "clamped_swiglu", "gelu", "relu")
GATED = ("swiglu", "clamped_swiglu")
KW = {"swiglu_alpha": 1.3, "swiglu_limit": 1.2}
# Rows per expert: empty experts, few rows (the decode sizes), one chunk, more than one chunk (128).
COUNTS = [3, 0, 1, 70, 0, 300, 8, 2]


def nan_empty_like(t):
    return torch.full_like(t, float("nan"))


def laid_out(w1, w2, b1, transpose, interleaved):
    if interleaved:
        w1, b1 = interleave_gate_up(w1), interleave_gate_up(b1)
    if transpose:
        w1, w2 = transposed_view(w1), transposed_view(w2)
    return w1, w2, b1


def packed_and_exact(x, off, w1, w2, act, b1, b2, interleaved=False):
    packed = ops.pack_expert_weights(w1, w2, act, interleaved)
    got = ops.expert_ffn(x, off, w1, w2, act, b1, b2, gate_up_interleaved=interleaved, packed=packed, **KW)
    exact = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), act,
                                 None if b1 is None else b1.double(), None if b2 is None else b2.double(),
                                 gate_up_interleaved=interleaved, **KW)
    return got, exact


# Interleaved gate/up rows exist only for gated activations.
LAYOUTS = [(act, layout) for act in ACTS for layout in ("contiguous", "transposed", "interleaved",
                                                        "transposed+interleaved")
           if act in GATED or "interleaved" not in layout]


@pytest.mark.parametrize("act, layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_reference_fp32(act, bias, layout):
    interleaved = "interleaved" in layout
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), 48, 40, len(COUNTS), act, counts=COUNTS, pad=5)
    w1, w2, b1 = laid_out(w1, w2, b1, "transposed" in layout, interleaved)
    got, exact = packed_and_exact(x, off, w1, w2, act, b1 if bias else None, b2 if bias else None, interleaved)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[sum(COUNTS):], torch.zeros_like(got[sum(COUNTS):]))  # padding rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["swiglu", "clamped_swiglu", "gelu"])
# (300, 200): bf16 / fp16 panels deeper than one widened slice of 128 reductions, with a tail.
@pytest.mark.parametrize("d, f", [(64, 48), (300, 200)])
def test_forward_low_precision_within_twice_plain_pytorch(dtype, act, d, f):
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), d, f, len(COUNTS), act, dtype=dtype, counts=COUNTS)
    got, exact = packed_and_exact(x, off, w1, w2, act, b1, b2)
    plain = reference.expert_ffn(x, off, w1, w2, act, b1, b2, **KW)
    assert got.dtype == dtype
    lowp_tolerance(got, plain, exact)


@pytest.mark.parametrize("d, f", [(1, 1), (17, 9), (100, 130), (2100, 20), (16, 1000), (9000, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_sizes_and_panel_tails(d, f, dtype):
    # d = 2100 makes float32's w1 panels 16 columns wide, d = 9000 bf16 pairs' 32; f = 130 and
    # 1000 leave tail panels; odd d and f are padded reductions in pairs.
    counts = [5, 0, 131, 1]
    x, off, w1, w2, b1, b2 = experts(sum(counts), d, f, len(counts), "swiglu", counts=counts, dtype=dtype)
    got, exact = packed_and_exact(x, off, w1, w2, "swiglu", b1, b2)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        lowp_tolerance(got, reference.expert_ffn(x, off, w1, w2, "swiglu", b1, b2, **KW), exact)


@pytest.mark.parametrize("act, layout", LAYOUTS)
def test_forward_bf16_layouts_biases_and_padding(act, layout):
    # Every weight layout packs into the same panels (in pairs where the CPU multiplies them), odd
    # d and f included; few-row experts (1-3 rows) run on the panels too, padding rows stay zero.
    interleaved = "interleaved" in layout
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), 37, 21, len(COUNTS), act, counts=COUNTS, pad=5,
                                     dtype=torch.bfloat16)
    w1, w2, b1 = laid_out(w1, w2, b1, "transposed" in layout, interleaved)
    got, exact = packed_and_exact(x, off, w1, w2, act, b1, b2, interleaved)
    plain = reference.expert_ffn(x, off, w1, w2, act, b1, b2, gate_up_interleaved=interleaved, **KW)
    lowp_tolerance(got[:sum(COUNTS)], plain[:sum(COUNTS)], exact[:sum(COUNTS)])
    assert torch.equal(got[sum(COUNTS):], torch.zeros_like(got[sum(COUNTS):]))


def test_no_rows_and_no_experts_with_rows():
    x, off, w1, w2, b1, b2 = experts(0, 32, 16, 4, "swiglu", counts=[0, 0, 0, 0], pad=3)
    packed = ops.pack_expert_weights(w1, w2)
    y = ops.expert_ffn(x, off, w1, w2, packed=packed)
    assert torch.equal(y, torch.zeros(3, 32))


def test_pack_layout_size_and_dtype():
    _, _, w1, w2, _, _ = experts(4, 24, 10, 3, "swiglu", dtype=torch.bfloat16)
    packed = ops.pack_expert_weights(w1, w2)
    assert packed.dtype == torch.bfloat16 and packed.shape == (3, 20 * 24 + 24 * 10)  # the weights' dtype
    _, _, w1, w2, _, _ = experts(4, 24, 10, 3, "relu")
    assert ops.pack_expert_weights(w1, w2, "relu").shape == (3, 10 * 24 + 24 * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_size_with_odd_sizes(dtype):
    # Panels in pairs pad each odd reduction with a zero: d = 19 rows of w1 hold 20, f = 7 rows of w2 hold 8.
    _, _, w1, w2, _, _ = experts(4, 19, 7, 3, "swiglu", dtype=dtype)
    pairs = ops.panels_in_pairs(dtype)
    want = 2 * 7 * (20 if pairs else 19) + 19 * (8 if pairs else 7)
    assert ops.packed_row_elems(19, 7, True, dtype) == want
    assert ops.pack_expert_weights(w1, w2).shape == (3, want)
    torch.library.opcheck(torch.ops.sparsemoe.pack_expert_weights.default, (w1, w2, "swiglu", False))  # the fake too


def panel_width(K, pairs):
    if pairs:
        return min(64, max(32, (4 * 128 * 1024) // (2 * max(K, 1)) // 32 * 32))
    return min(64, max(16, (128 * 1024) // (4 * max(K, 1)) // 16 * 16))


def panel(slab, pairs):
    """A [width, K] slab of weights (S[c, k]) as one panel: P[k * width + c], or in pairs
    P[(k // 2) * 2 * width + 2 * c + k % 2] with K padded by a zero to even."""
    if not pairs:
        return slab.t().reshape(-1)
    width, K = slab.shape
    padded = torch.cat([slab, slab.new_zeros(width, K % 2)], dim=1)  # [width, K even]
    return padded.reshape(width, -1, 2).permute(1, 0, 2).reshape(-1)


def packed_by_the_layout(w1, w2, gated, interleaved):
    """The packed tensor as packed_weights.h lays it out, in the weights' dtype: per expert, each half's activation
    columns in panels [d, width] (P[k, c] = w1[row of column c, k]), then w2's output columns in
    panels [f, width] (P[k, c] = w2[c, k]); bfloat16 in VNNI pairs where the CPU multiplies them."""
    E, d, f = w1.shape[0], w1.shape[2], w2.shape[2]
    pairs = ops.panels_in_pairs(w1.dtype)
    pw1, pw2 = panel_width(d, pairs), panel_width(f, pairs)
    per_expert = []
    for e in range(E):
        parts = []
        for h in range(2 if gated else 1):
            for c0 in range(0, f, pw1):
                cols = torch.arange(c0, min(f, c0 + pw1))
                rows = 2 * cols + h if interleaved else h * f + cols
                parts.append(panel(w1[e, rows, :], pairs))
        parts += [panel(w2[e, c0:c0 + pw2, :], pairs) for c0 in range(0, d, pw2)]
        per_expert.append(torch.cat(parts))
    return torch.stack(per_expert)


# Sizes with panel tails and edges off the 8 x 8 transpose tiles (d, f not multiples of 8, odd
# reductions that panels in pairs pad; a width-16 panel at d = 2100, width 32 in pairs at d = 9000).
@pytest.mark.parametrize("d, f", [(19, 37), (2100, 12), (8, 8), (9000, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "interleaved", "strided"])
def test_packed_panels_are_the_weights_in_the_documented_layout(d, f, dtype, layout):
    _, _, w1, w2, _, _ = experts(4, d, f, 3, "swiglu", dtype=dtype)
    if layout == "interleaved":
        w1 = interleave_gate_up(w1)
    elif layout == "transposed":
        w1, w2 = transposed_view(w1), transposed_view(w2)
    elif layout == "strided":  # every other element of a wider weight: neither stride is 1
        w1 = torch.stack((w1, torch.zeros_like(w1)), dim=-1).flatten(-2)[..., ::2]
        w2 = torch.stack((w2, torch.zeros_like(w2)), dim=-1).flatten(-2)[..., ::2]
        assert w1.stride(2) == 2 and w2.stride(2) == 2
    want = packed_by_the_layout(w1, w2, gated=True, interleaved=layout == "interleaved")
    got = ops.pack_expert_weights(w1, w2, "swiglu", layout == "interleaved")
    assert got.dtype == dtype and torch.equal(got, want)  # one copy of the weights, in their dtype


@needs_microkernel
def test_thread_count_and_batch_do_not_change_a_rows_output():
    # Each output element is one micro-kernel reduction over a panel fixed at packing time: the
    # same bits whatever other rows share the call and however the blocks are dealt to threads.
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), 64, 96, len(COUNTS), "swiglu", counts=COUNTS)
    packed = ops.pack_expert_weights(w1, w2)
    with threads(1):
        one = ops.expert_ffn(x, off, w1, w2, "swiglu", b1, b2, packed=packed)
    with threads(2):
        two = ops.expert_ffn(x, off, w1, w2, "swiglu", b1, b2, packed=packed)
    assert torch.equal(one, two)
    # Expert 5's row 7 alone.
    lo = int(off[5]) + 7
    alone_off = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    alone = ops.expert_ffn(x[lo:lo + 1], alone_off, w1, w2, "swiglu", b1, b2, packed=packed)
    assert torch.equal(alone[0], two[lo])


@needs_microkernel
@pytest.mark.parametrize("d, f", [(64, 96), (600, 300), (37, 21)])
def test_a_rows_output_is_the_same_whatever_its_experts_row_count(d, f):
    # Experts with up to _C.stream_max_rows rows stream the panels through sparsemoe's own kernel
    # where it runs (ops.panels_stream), more rows take the micro-kernel: both must give each row
    # the same bits, over several reduction tiles (d, f > 256) and column tails (37, 21) alike.
    x, _, w1, w2, b1, b2 = experts(40, d, f, 1, "swiglu")
    packed = ops.pack_expert_weights(w1, w2)
    many = ops.expert_ffn(x, torch.tensor([0, 40]), w1, w2, "swiglu", b1, b2, packed=packed)
    for n in range(1, sparsemoe._C.stream_max_rows + 3):
        few = ops.expert_ffn(x[:n], torch.tensor([0, n]), w1, w2, "swiglu", b1, b2, packed=packed)
        assert torch.equal(few, many[:n]), n


def test_few_row_products_stream_on_avx512_cpus():
    assert not ops.panels_stream(torch.float16)
    if not ops.packed_kernels_available():
        # No micro-kernel: no panels to stream (and no bitwise reference for float32).
        assert not ops.panels_stream(torch.float32) and not ops.panels_stream(torch.bfloat16)
        return
    from sparsemoe.cli import cpu_flags
    flags = cpu_flags()
    if not flags:
        pytest.skip("needs /proc/cpuinfo (Linux) to read which vector instructions the CPU has")
    # float32 streams only where the probe found the kernel bitwise equal to the micro-kernel.
    assert ops.panels_stream(torch.float32) == ("avx512f" in flags)
    assert ops.panels_stream(torch.bfloat16) == ("avx512_bf16" in flags and ops.panels_in_pairs(torch.bfloat16))


@pytest.mark.parametrize("bad, message", [
    (lambda p: p[:, :-1], "packed: expected shape"),
    (lambda p: p.double(), "packed: expected dtype"),
    (lambda p: p.bfloat16(), "packed: expected dtype"),  # panels in another dtype than x
    (lambda p: p.t().contiguous().t(), "packed: expected a contiguous"),
    (lambda p: p[:2], "packed: expected shape"),
])
def test_bad_packed_argument_is_named(bad, message):
    x, off, w1, w2, _, _ = experts(10, 16, 8, 3, "swiglu")
    packed = ops.pack_expert_weights(w1, w2)
    with pytest.raises(RuntimeError, match=message):
        ops.expert_ffn(x, off, w1, w2, packed=bad(packed))


def test_float64_is_refused_with_named_errors():
    x, off, w1, w2, _, _ = experts(10, 16, 8, 3, "swiglu", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="w1: expected float32, bfloat16 or float16"):
        ops.pack_expert_weights(w1, w2)
    packed = ops.pack_expert_weights(w1.float(), w2.float())
    with pytest.raises(RuntimeError, match="packed: expected None for float64"):
        ops.expert_ffn(x, off, w1, w2, packed=packed)


def test_pack_argument_errors():
    _, _, w1, w2, _, _ = experts(4, 16, 8, 3, "swiglu")
    with pytest.raises(RuntimeError, match=r"w1: expected size 8 at dim 1 \(f, from w2\)"):
        ops.pack_expert_weights(w1, w2, "relu")
    with pytest.raises(RuntimeError, match="gate_up_interleaved: expected False"):
        ops.pack_expert_weights(w1[:, :8], w2, "relu", True)
    with pytest.raises(RuntimeError, match="w2: expected dtype"):
        ops.pack_expert_weights(w1, w2.bfloat16())
    out = ops.pack_expert_weights(w1, w2)
    with pytest.raises(RuntimeError, match="packed: expected dtype"):  # an old buffer of float32 panels
        ops.pack_expert_weights(w1.bfloat16(), w2.bfloat16(), out=out)


# --- MoELayer's cache --------------------------------------------------------------------------


def twin_layers(dtype=torch.float32, **options):
    packed = sparsemoe.MoELayer(32, 48, 6, 2, dtype=dtype, **options)
    plain = sparsemoe.MoELayer(32, 48, 6, 2, dtype=dtype, packed_weights=False, **options)
    plain.load_state_dict(packed.state_dict())
    return packed, plain


def same_output(packed, plain, x):
    with torch.no_grad():
        got, want = packed(x), plain(x)
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2  # bf16: either side may round a sum differently
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    return got


@needs_microkernel
@pytest.mark.parametrize("dtype", [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not ops.packed_kernels_available(torch.bfloat16), reason="bf16 packs only where the CPU has a native bf16 micro-kernel (AVX512-BF16, AMX) or no bf16 GEMMs at all")),
])
def test_cache_is_reused_while_the_weights_are_unchanged(dtype):
    layer, plain = twin_layers(dtype)
    x = torch.randn(20, 32).to(dtype)
    same_output(layer, plain, x)
    first = layer._packed.tensor
    same_output(layer, plain, x)
    assert layer._packed.tensor is first
    # One copy of the expert weights, in their own dtype.
    assert layer.packed_weights_bytes == first.nbytes == 6 * (96 * 32 + 32 * 48) * dtype.itemsize
    assert plain.packed_weights_bytes == 0


@pytest.mark.parametrize("change", ["in_place", "optimizer_step", "load_state_dict", "new_data", "to_dtype"])
def test_cache_is_never_stale(change):
    layer, plain = twin_layers()
    x = torch.randn(20, 32)
    same_output(layer, plain, x)  # packs
    if change == "in_place":
        with torch.no_grad():
            for m in (layer, plain):
                m.down_proj.mul_(-2.0)
    elif change == "optimizer_step":
        for m in (layer, plain):
            opt = torch.optim.AdamW(m.parameters(), lr=0.1)
            m(x).square().sum().backward()
            opt.step()
    elif change == "load_state_dict":
        other = sparsemoe.MoELayer(32, 48, 6, 2)
        layer.load_state_dict(other.state_dict())
        plain.load_state_dict(other.state_dict())
    elif change == "new_data":
        new = torch.randn_like(plain.gate_up_proj)
        for m in (layer, plain):
            m.gate_up_proj.data = new.clone()
    elif change == "to_dtype":
        layer, plain = layer.bfloat16(), plain.bfloat16()
        x = x.bfloat16()
    out = same_output(layer, plain, x)
    assert out.dtype == x.dtype


def test_float32_training_runs_unpacked_and_bfloat16_training_packs_where_it_pays():
    layer, plain = twin_layers()
    x = torch.randn(20, 32)
    layer(x).sum().backward()
    assert layer._packed.tensor is None  # repacking every step would cost more than it saves
    layer, plain = twin_layers(torch.bfloat16)
    layer(torch.randn(20, 32).bfloat16()).sum().backward()
    assert layer._packed.tensor is None  # 40 rows for 6 experts: packing would cost more than it saves
    # Packed where bf16 panels pay: in pairs (AVX512-BF16 / AMX) or widened (no native bf16 GEMM),
    # from 16 rows per expert; where the unpacked blocks multiply the weights in place on the
    # native bf16 kernel, only above its largest block (64 rows); never where oneDNN's bf16 GEMMs
    # run on AMX tiles.
    pays = ops.packed_kernels_available(torch.bfloat16) and ops.bf16_gemm_hardware() != "AMX"
    native = ops.native_forward_runs(torch.bfloat16)
    assert sparsemoe._C.native_forward_max_rows == 64
    for tokens, packs in ((60, pays and not native),  # 120 rows, 20 per expert
                          (192, pays and not native),  # 384 rows, 64 per expert
                          (195, pays)):  # 390 rows, 65 per expert
        layer.zero_grad()
        plain.zero_grad()
        xb = torch.randn(tokens, 32).bfloat16()
        got = layer(xb)
        assert (layer._packed.tensor is not None) == packs, tokens
        got.float().square().sum().backward()
        want = plain(xb)
        want.float().square().sum().backward()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        for (name, a), b in zip(layer.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.skipif(not ops.packed_kernels_available(torch.bfloat16), reason="needs bf16 packed weights: a CPU with a native bf16 micro-kernel (AVX512-BF16, AMX) or with no bf16 GEMMs at all, and oneDNN's micro-kernel in torch")
def test_bfloat16_forward_runs_unpacked_on_amx_from_512_rows_per_expert():
    layer, plain = twin_layers(torch.bfloat16)
    same_output(layer, plain, torch.randn(20, 32).bfloat16())
    panels = layer._packed.tensor
    assert panels is not None
    amx = ops.bf16_gemm_hardware() == "AMX"
    assert packing.AMX_UNPACKED_MIN_ROWS == 512
    sources = (layer.gate_up_proj, layer.down_proj)
    with torch.no_grad():
        for rows, unpacked in ((512 * 6 - 1, False), (512 * 6, amx), (4096 * 6, amx)):
            got = layer._packed.get(sources, *sources, "swiglu", False, rows)
            assert (got is None) == unpacked, rows
            assert layer._packed.tensor is panels  # kept for the smaller batches either way
        always = layer._packed.get(sources, *sources, "swiglu", False, 512 * 6, always=True)
        assert always is panels  # a batch-invariant layer runs on the panels at every size
    same_output(layer, plain, torch.randn(512 * 3, 32).bfloat16())  # 3072 rows, 512 per expert
    assert layer._packed.tensor is panels


def test_autocast_packs_the_cast_weights():
    layer, plain = twin_layers()
    x = torch.randn(20, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x), plain(x)
    assert (layer._packed.key is not None) == ops.packed_kernels_available(torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_clear_packed_weights_and_the_option_off():
    layer, plain = twin_layers()
    same_output(layer, plain, torch.randn(4, 32))
    assert copy.deepcopy(layer).packed_weights_bytes == 0  # copies start with an empty cache
    layer.clear_packed_weights()
    assert layer.packed_weights_bytes == 0
    assert "packed_weights" not in layer.config.to_dict()  # a setting of the run, not of the model



def test_pack_into_an_earlier_buffer_equals_a_fresh_pack():
    _, _, w1, w2, _, _ = experts(4, 40, 24, 5, "clamped_swiglu")
    out = ops.pack_expert_weights(w1 * 3, w2 * 3, "clamped_swiglu")
    same = ops.pack_expert_weights(w1, w2, "clamped_swiglu", out=out)
    assert same is out and torch.equal(out, ops.pack_expert_weights(w1, w2, "clamped_swiglu"))
    with pytest.raises(RuntimeError, match="packed: expected shape"):
        ops.pack_expert_weights(w1[:, :, :8], w2[:, :8], "clamped_swiglu", out=out)


@needs_microkernel
def test_repack_reuses_the_layers_buffer():
    layer, plain = twin_layers()
    x = torch.randn(20, 32)
    same_output(layer, plain, x)
    buffer = layer._packed.tensor
    with torch.no_grad():
        for m in (layer, plain):
            m.gate_up_proj.add_(0.5)
    same_output(layer, plain, x)
    assert layer._packed.tensor is buffer


# --- the backward on the micro-kernel (row-major weights, with or without packing) ---------------


def grads_of(fn, leaves, off, act, interleaved, g):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    x, w1, w2, b1, b2 = leaves
    y = fn(x, off, w1, w2, act, b1, b2, gate_up_interleaved=interleaved, **KW)
    (y.double() * g).sum().backward()
    return [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("act, interleaved", [("swiglu", False), ("clamped_swiglu", True), ("gelu", False),
                                              ("relu", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(act, interleaved, dtype):
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), 48, 80, len(COUNTS), act, counts=COUNTS, pad=3)
    if interleaved:
        w1, b1 = interleave_gate_up(w1), interleave_gate_up(b1)
    g = torch.randn(x.shape[0], 48, dtype=torch.float64)
    leaves = [t.to(dtype) for t in (x, w1, w2, b1, b2)]
    got = grads_of(ops.expert_ffn, leaves, off, act, interleaved, g)
    exact = grads_of(reference.expert_ffn, [t.double() for t in leaves], off, act, interleaved, g)
    plain = grads_of(reference.expert_ffn, leaves, off, act, interleaved, g)
    for name, a, e, p in zip(("x", "w1", "w2", "b1", "b2"), got, exact, plain):
        assert a.dtype == dtype, name
        if dtype == torch.float32:
            # Relative to the gradient's largest element: an expert's 300 rows sum into it.
            close(a, e, 2e-6, name)
        else:
            lowp_tolerance(a, p, e)
    # Experts 1 and 4 own no rows: exactly zero weight gradients.
    for e in (1, 4):
        assert not got[1][e].any() and not got[2][e].any()


def test_opcheck_pack_and_packed_forward():
    x, off, w1, w2, b1, b2 = experts(20, 16, 24, 3, "swiglu")
    packed = ops.pack_expert_weights(w1, w2)
    torch.library.opcheck(torch.ops.sparsemoe.pack_expert_weights.default, (w1, w2, "swiglu", False))
    torch.library.opcheck(torch.ops.sparsemoe.pack_expert_weights_into.default,
                          (torch.empty_like(packed), w1, w2, "swiglu", False))
    torch.library.opcheck(torch.ops.sparsemoe.expert_ffn.default,
                          (x, off, w1, w2, "swiglu", b1, b2, 1.702, 7.0, False, packed))


def test_dtype_round_trip_repacks():
    # float32 -> bfloat16 -> float32 can give the new float32 storage the old one's address.
    layer, plain = twin_layers()
    x = torch.randn(20, 32)
    same_output(layer, plain, x)
    layer, plain = layer.bfloat16().float(), plain.bfloat16().float()
    same_output(layer, plain, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_with_several_column_blocks_per_expert(dtype):
    # f = 512: float32 experts split into 64-column blocks (shares of grad_x summed after); rows
    # below and above the 128-row crossover to the BLAS; float16 as one block per expert.
    counts = [5, 0, 127, 200, 60]
    x, off, w1, w2, b1, b2 = experts(sum(counts), 40, 512, len(counts), "swiglu", counts=counts)
    g = torch.randn(x.shape[0], 40, dtype=torch.float64)
    leaves = [t.to(dtype) for t in (x, w1, w2, b1, b2)]
    got = grads_of(ops.expert_ffn, leaves, off, "swiglu", False, g)
    exact = grads_of(reference.expert_ffn, [t.double() for t in leaves], off, "swiglu", False, g)
    plain = grads_of(reference.expert_ffn, leaves, off, "swiglu", False, g)
    for name, a, e, p in zip(("x", "w1", "w2", "b1", "b2"), got, exact, plain):
        if dtype == torch.float32:
            close(a, e, 2e-6, name)
        else:
            lowp_tolerance(a, p, e)


def test_bf16_panels_and_atens_bf16_gemms_interleave():
    # The bf16 kernel on pairs configures the AMX tiles; oneDNN's own bf16 GEMMs set theirs. Each
    # block releases its configuration, so alternating the two on the same threads changes neither.
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), 64, 48, len(COUNTS), "swiglu", counts=COUNTS, dtype=torch.bfloat16)
    packed = ops.pack_expert_weights(w1, w2)
    a, b = torch.randn(96, 64).bfloat16(), torch.randn(64, 80).bfloat16()
    first, mm = ops.expert_ffn(x, off, w1, w2, "swiglu", b1, b2, packed=packed), a @ b
    for _ in range(3):
        assert torch.equal(ops.expert_ffn(x, off, w1, w2, "swiglu", b1, b2, packed=packed), first)
        assert torch.equal(a @ b, mm)


@pytest.mark.parametrize("act, layout", LAYOUTS)
@pytest.mark.parametrize("d, f", [(37, 21), (16, 5000)])
def test_backward_bf16_layouts_odd_sizes_and_padding(act, layout, d, f):
    # bfloat16 experts with fewer than 192 rows and small weights run their backward on the native
    # bf16 micro-kernel where the CPU has one (operands paired per block: odd d, f and row counts
    # padded; f = 5000 pairs w1's rows for grad_x in several chunks); the 300-row expert and the
    # transposed layouts keep oneDNN's GEMMs. Either way: within 2x plain PyTorch's error, zero
    # gradients for padding rows and for experts without rows.
    interleaved = "interleaved" in layout
    counts = COUNTS if f < 1000 else [3, 0, 1, 7]
    x, off, w1, w2, b1, b2 = experts(sum(counts), d, f, len(counts), act, counts=counts, pad=5,
                                     dtype=torch.bfloat16)
    w1, w2, b1 = laid_out(w1, w2, b1, "transposed" in layout, interleaved)
    g = torch.randn(x.shape[0], d, dtype=torch.float64)
    leaves = [x, w1, w2, b1, b2]
    got = grads_of(ops.expert_ffn, leaves, off, act, interleaved, g)
    exact = grads_of(reference.expert_ffn, [t.double() for t in leaves], off, act, interleaved, g)
    plain = grads_of(reference.expert_ffn, leaves, off, act, interleaved, g)
    for name, a, e, p in zip(("x", "w1", "w2", "b1", "b2"), got, exact, plain):
        assert a.dtype == torch.bfloat16 and a.shape == e.shape, name
        lowp_tolerance(a, p, e)
    assert not got[0][sum(counts):].any()
    for e in (i for i, c in enumerate(counts) if c == 0):
        assert not got[1][e].any() and not got[2][e].any() and not got[3][e].any() and not got[4][e].any()


def test_bf16_backward_and_atens_bf16_gemms_interleave():
    # The backward on pairs, like the forward, releases the tile configuration (AMX) it set, so
    # oneDNN's own bf16 GEMMs between two backwards change neither; and it is bitwise repeatable.
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), 64, 48, len(COUNTS), "swiglu", counts=COUNTS,
                                     dtype=torch.bfloat16)
    g = torch.randn(x.shape[0], 64, dtype=torch.float64)
    a, b = torch.randn(96, 64).bfloat16(), torch.randn(64, 80).bfloat16()
    first, mm = grads_of(ops.expert_ffn, [x, w1, w2, b1, b2], off, "swiglu", False, g), a @ b
    for _ in range(3):
        again = grads_of(ops.expert_ffn, [x, w1, w2, b1, b2], off, "swiglu", False, g)
        assert all(torch.equal(p, q) for p, q in zip(again, first))
        assert torch.equal(a @ b, mm)
