"""The unpacked bfloat16 expert forward on the weights in place (ops.native_forward_runs): experts
with _C.native_forward_min_rows to _C.native_forward_max_rows rows multiply the row-major weights
on oneDNN's native bf16 micro-kernel, with no packing. Against sparsemoe.reference for every
activation, gate/up order and bias; which blocks take it (row counts, dtypes, layouts, odd sizes
and offsets, the switch); bitwise repeatability and thread invariance; a training step of the
layer on it against the layer without it."""

from __future__ import annotations

import pytest
import torch

import sparsemoe
from sparsemoe import ops, reference
from helpers import experts, interleave_gate_up, lowp_tolerance, threads, transposed_view

ACTS = ("swiglu", "clamped_swiglu", "gelu", "relu")
GATED = ("swiglu", "clamped_swiglu")
KW = {"swiglu_alpha": 1.3, "swiglu_limit": 1.2}
LO, HI = sparsemoe._C.native_forward_min_rows, sparsemoe._C.native_forward_max_rows
# Experts below, at and above both ends of the native range, and empty ones.
COUNTS = [3, 0, LO, 33, HI, 0, HI + 1, 130, 1]

native = pytest.mark.skipif(not ops.native_forward_runs(torch.bfloat16),
                            reason="needs oneDNN's native bf16 micro-kernel (AVX512-BF16 or AMX)")


def blocks_run(fn):
    """fn()'s result and the native blocks it ran."""
    before = sparsemoe._C.native_forward_blocks()
    out = fn()
    return out, sparsemoe._C.native_forward_blocks() - before


def forward(x, off, w1, w2, act, b1, b2, interleaved=False):
    return ops.expert_ffn(x, off, w1, w2, act, b1, b2, gate_up_interleaved=interleaved, **KW)


def check_against_reference(got, x, off, w1, w2, act, b1, b2, interleaved=False):
    N = int(off[-1])
    exact = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), act,
                                 None if b1 is None else b1.double(), None if b2 is None else b2.double(),
                                 gate_up_interleaved=interleaved, **KW)
    plain = reference.expert_ffn(x, off, w1, w2, act, b1, b2, gate_up_interleaved=interleaved, **KW)
    assert got.dtype == torch.bfloat16
    lowp_tolerance(got[:N], plain[:N], exact[:N])
    assert torch.equal(got[N:], torch.zeros_like(got[N:]))  # capacity padding rows


def test_the_switch_and_the_range():
    assert 1 <= LO <= HI
    assert not ops.native_forward_runs(torch.float32) and not ops.native_forward_runs(torch.float16)
    with pytest.raises(TypeError, match="enabled: expected a bool, got int"):
        ops.set_native_forward(1)
    if ops.packed_kernels_available(torch.bfloat16) and ops.panels_in_pairs(torch.bfloat16):
        assert ops.native_forward_runs(torch.bfloat16)


@native
@pytest.mark.parametrize("act, interleaved", [(a, False) for a in ACTS] + [(a, True) for a in GATED])
@pytest.mark.parametrize("bias", [False, True])
# (300, 200): reductions past one micro-kernel tile, and column blocks past one 64-row slice of
# the weights with a tail; (512, 192): a fine-grained expert's shape.
@pytest.mark.parametrize("d, f", [(64, 48), (300, 200), (512, 192)])
def test_forward_matches_reference(act, interleaved, bias, d, f):
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), d, f, len(COUNTS), act, dtype=torch.bfloat16,
                                     counts=COUNTS, pad=4)
    if interleaved:
        w1, b1 = interleave_gate_up(w1), interleave_gate_up(b1)
    b1, b2 = (b1, b2) if bias else (None, None)
    got, ran = blocks_run(lambda: forward(x, off, w1, w2, act, b1, b2, interleaved))
    assert ran > 0
    check_against_reference(got, x, off, w1, w2, act, b1, b2, interleaved)


@native
def test_only_experts_in_the_range_run_natively():
    d, f = 64, 48
    for counts, runs in (([LO - 1, 0, 2, LO - 1], False), ([HI + 1, 0, 200], False), ([0, LO, 1], True),
                         ([HI, HI + 1], True)):
        x, off, w1, w2, b1, b2 = experts(sum(counts), d, f, len(counts), "swiglu", dtype=torch.bfloat16,
                                         counts=counts)
        got, ran = blocks_run(lambda: forward(x, off, w1, w2, "swiglu", b1, b2))
        assert (ran > 0) == runs, counts
        check_against_reference(got, x, off, w1, w2, "swiglu", b1, b2)


def layouts_that_stay_off():
    """(what, x, off, w1, w2) the in-place blocks cannot read, each with in-range experts."""
    counts = [20, 7]
    x, off, w1, w2, _, _ = experts(sum(counts), 64, 48, 2, "swiglu", dtype=torch.bfloat16, counts=counts)
    yield "float32", x.float(), off, w1.float(), w2.float()
    yield "float16", x.half(), off, w1.half(), w2.half()
    yield "column-major w1", x, off, transposed_view(w1), w2
    yield "column-major w2", x, off, w1, transposed_view(w2)
    # Odd reductions: pairs would straddle rows.
    xo, offo, w1o, w2o, _, _ = experts(sum(counts), 63, 48, 2, "swiglu", dtype=torch.bfloat16, counts=counts)
    yield "odd d", xo, offo, w1o, w2o
    xo, offo, w1o, w2o, _, _ = experts(sum(counts), 64, 47, 2, "swiglu", dtype=torch.bfloat16, counts=counts)
    yield "odd f", xo, offo, w1o, w2o
    # An odd storage offset: the weights' pairs are not whole 32-bit words.
    yield "odd offset of w1", x, off, torch.cat([w1.flatten(), w1.new_zeros(1)])[1:].view_as(w1).copy_(w1), w2
    wide = torch.cat([w2, w2[:, :, :1]], dim=2)  # [E, d, f + 1]
    yield "odd row stride of w2", x, off, w1, wide[:, :, :-1]


@native
@pytest.mark.parametrize("case", list(range(8)))
def test_layouts_it_cannot_read_run_on_the_gemms(case):
    what, x, off, w1, w2 = list(layouts_that_stay_off())[case]
    got, ran = blocks_run(lambda: ops.expert_ffn(x, off, w1, w2, "swiglu"))
    assert ran == 0, what
    exact = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), "swiglu")
    plain = reference.expert_ffn(x, off, w1, w2, "swiglu")
    if x.dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5, msg=what)
    else:
        lowp_tolerance(got, plain, exact)


@native
def test_turned_off_it_does_not_run_and_the_results_stay_close():
    x, off, w1, w2, b1, b2 = experts(sum(COUNTS), 64, 48, len(COUNTS), "swiglu", dtype=torch.bfloat16,
                                     counts=COUNTS)
    on, ran = blocks_run(lambda: forward(x, off, w1, w2, "swiglu", b1, b2))
    assert ran > 0
    ops.set_native_forward(False)
    try:
        assert not ops.native_forward_runs(torch.bfloat16)
        off_, ran = blocks_run(lambda: forward(x, off, w1, w2, "swiglu", b1, b2))
        assert ran == 0
    finally:
        ops.set_native_forward(True)
    assert ops.native_forward_runs(torch.bfloat16)
    check_against_reference(off_, x, off, w1, w2, "swiglu", b1, b2)
    torch.testing.assert_close(on, off_, rtol=2e-2, atol=2e-2)


@native
def test_bitwise_repeatable_and_independent_of_the_thread_count():
    # Each output element is one micro-kernel reduction over d (or f) in a fixed order, computed by
    # whichever thread owns its column block. (Experts outside the range run on oneDNN's GEMMs,
    # whose reduction order may follow the column split, so every expert here is in range.)
    counts = [LO, 33, 0, HI, 17]
    x, off, w1, w2, b1, b2 = experts(sum(counts), 300, 200, len(counts), "swiglu", dtype=torch.bfloat16,
                                     counts=counts)
    with threads(1):
        one = forward(x, off, w1, w2, "swiglu", b1, b2)
    with threads(2):
        two = forward(x, off, w1, w2, "swiglu", b1, b2)
        again = forward(x, off, w1, w2, "swiglu", b1, b2)
    assert torch.equal(two, again)
    assert torch.equal(one, two)


@native
def test_layer_training_step_on_it_matches_the_layer_without_it():
    torch.manual_seed(0)
    layer = sparsemoe.MoELayer(64, 96, 8, 2, dtype=torch.bfloat16)
    x = torch.randn(96, 64).bfloat16()  # 24 rows per expert on average: unpacked, native

    def step():
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.float().square().sum().backward()
        return out, xi.grad, [p.grad.clone() for p in layer.parameters()]

    (out, dx, grads), ran = blocks_run(step)
    assert ran > 0 and layer._packed.tensor is None
    ops.set_native_forward(False)
    try:
        (out_off, dx_off, grads_off), ran = blocks_run(step)
    finally:
        ops.set_native_forward(True)
    assert ran == 0
    torch.testing.assert_close(out, out_off, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx, dx_off, rtol=3e-2, atol=3e-2)
    for (name, _), a, b in zip(layer.named_parameters(), grads, grads_off):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2, msg=name)


@native
@pytest.mark.parametrize("d, f", [(64, 48), (300, 200)])
def test_a_rows_output_is_the_same_whatever_its_experts_row_count_in_the_range(d, f):
    x, _, w1, w2, b1, b2 = experts(HI, d, f, 1, "swiglu", dtype=torch.bfloat16)
    many = forward(x, torch.tensor([0, HI]), w1, w2, "swiglu", b1, b2)
    for n in range(LO, HI):
        few = forward(x[:n], torch.tensor([0, n]), w1, w2, "swiglu", b1, b2)
        assert torch.equal(few, many[:n]), n
