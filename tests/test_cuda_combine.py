"""combine, scatter_rows and slot_dot on CUDA against the CPU kernels and sparsemoe.reference:
float32/float64 tight, bfloat16/float16 within 2x plain PyTorch's error; bitwise repeatable.

They skip with "needs CUDA" on a machine without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsemoe import ops, reference
from helpers import DEV, LOWP, dev, host, lowp_tolerance, needs_cuda, opcheck, routed

pytestmark = needs_cuda
SCORINGS = ops.SCORINGS


# --- combine, scatter_rows, slot_dot ---------------------------------------------------------


def plain_combine(rows, slot, weights):
    """combine in plain PyTorch at the rows' dtype: the low-precision baseline."""
    picked = rows[slot.clamp(min=0)] * (slot >= 0).unsqueeze(-1).to(rows.dtype)
    if weights is not None:
        picked = picked * weights.unsqueeze(-1).to(rows.dtype)
    return picked.sum(1)


def plain_scatter_rows(src, slot, weights, num_rows):
    out = src.new_zeros(num_rows, src.shape[1])
    t, j = torch.nonzero(slot >= 0, as_tuple=True)
    out[slot[t, j]] = src[t] if weights is None else src[t] * weights[t, j].to(src.dtype).unsqueeze(-1)
    return out


def plain_slot_dot(a, b, slot):
    return ((a.unsqueeze(1) * b[slot.clamp(min=0)]).sum(-1) * (slot >= 0)).to(reference.opmath_dtype(a.dtype))


COMBINE_SHAPES = [(33, 16, 2), (1, 1, 1), (64, 600, 8), (7, 100, 3), (3000, 64, 4), (5, 4097, 2)]


@pytest.mark.parametrize("T,d,k", COMBINE_SHAPES)
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_combine_matches_cpu_and_reference(T, d, k, drop):
    for dtype in (torch.float32, torch.float64, *LOWP):
        rows, slot, weights = routed(T, d, 8, k, dtype, drop)
        for w in (weights, None):
            got = host(ops.combine(dev(rows), dev(slot), dev(w)))
            assert got.dtype == dtype and got.shape == (T, d)
            if dtype in LOWP:
                exact = reference.combine(rows.double(), slot, None if w is None else w.double())
                lowp_tolerance(got, host(plain_combine(dev(rows), dev(slot), dev(w))), exact)
            else:
                torch.testing.assert_close(got, reference.combine(rows, slot, w))
                torch.testing.assert_close(got, ops.combine(rows, slot, w))


@pytest.mark.parametrize("T,d,k", COMBINE_SHAPES)
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_scatter_rows_and_slot_dot_match_cpu_and_reference(T, d, k, drop):
    for dtype in (torch.float32, torch.float64, *LOWP):
        rows, slot, weights = routed(T, d, 8, k, dtype, drop)
        src = torch.randn(T, d).to(dtype)
        n = T * k + 3  # rows no slot points at stay zero
        for w in (weights, None):
            got = host(ops.scatter_rows(dev(src), dev(slot), dev(w), n))
            assert got.dtype == dtype and got.shape == (n, d) and torch.all(got[T * k:] == 0)
            if dtype in LOWP:
                exact = reference.scatter_rows(src.double(), slot, None if w is None else w.double(), n)
                lowp_tolerance(got, host(plain_scatter_rows(dev(src), dev(slot), dev(w), n)), exact)
            else:
                torch.testing.assert_close(got, reference.scatter_rows(src, slot, w, n))
                torch.testing.assert_close(got, ops.scatter_rows(src, slot, w, n))
        got = host(ops.slot_dot(dev(src), dev(rows), dev(slot)))
        assert got.dtype == reference.opmath_dtype(dtype) and got.shape == (T, k)
        assert torch.all(got[slot < 0] == 0)
        exact = reference.slot_dot(src.double(), rows.double(), slot)
        if dtype in LOWP:
            lowp_tolerance(got, host(plain_slot_dot(dev(src), dev(rows), dev(slot))), exact)
        else:
            # A float32 dot of d products carries about sqrt(d) roundings.
            tol = dict(rtol=1e-5, atol=1e-5 * math.sqrt(d)) if dtype == torch.float32 else {}
            torch.testing.assert_close(got, exact.to(got.dtype), **tol)
            torch.testing.assert_close(got, ops.slot_dot(src, rows, slot), **tol)


def test_dropped_slots_contribute_exactly_zero():
    rows, slot, weights = routed(20, 8, 4, 2)
    slot[:, 1] = -1
    rows_leaf, w_leaf = dev(rows).requires_grad_(), dev(weights).requires_grad_()
    out = ops.combine(rows_leaf, dev(slot), w_leaf)
    assert torch.equal(out, ops.combine(dev(rows), dev(slot[:, :1].contiguous()), dev(weights[:, :1].contiguous())))
    g_rows, g_w = host(torch.autograd.grad(out, (rows_leaf, w_leaf), dev(torch.randn(20, 8))))
    assert torch.all(g_w[:, 1] == 0)
    unused = torch.ones(rows.shape[0], dtype=torch.bool)
    unused[slot[:, 0]] = False
    assert torch.all(g_rows[unused] == 0)


def test_combine_family_bitwise_repeatable_and_split_invariant():
    rows, slot, weights = (dev(t) for t in routed(20000, 64, 8, 4, drop=0.1))
    src = dev(torch.randn(20000, 64))
    perm = dev(torch.randperm(20000))
    out = ops.combine(rows, slot, weights)
    assert torch.equal(out, ops.combine(rows, slot, weights))
    assert torch.equal(out[:7001], ops.combine(rows, slot[:7001], weights[:7001]))
    assert torch.equal(out[perm], ops.combine(rows, slot[perm], weights[perm]))
    scattered = ops.scatter_rows(src, slot, weights, 80000)
    assert torch.equal(scattered, ops.scatter_rows(src, slot, weights, 80000))
    assert torch.equal(scattered, ops.scatter_rows(src[perm], slot[perm], weights[perm], 80000))
    dots = ops.slot_dot(src, rows, slot)
    assert torch.equal(dots, ops.slot_dot(src, rows, slot))
    assert torch.equal(dots[perm], ops.slot_dot(src[perm], rows, slot[perm]))


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_combine_family_gradcheck(drop):
    rows, slot, weights = routed(5, 4, 6, 3, torch.float64, drop)
    rows, slot, weights = dev(rows).requires_grad_(), dev(slot), dev(weights).requires_grad_()
    src = torch.randn(5, 4, dtype=torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda r, w: ops.combine(r, slot, w), (rows, weights))
    assert torch.autograd.gradgradcheck(lambda r, w: ops.combine(r, slot, w), (rows, weights))
    assert torch.autograd.gradcheck(lambda r: ops.combine(r, slot), (rows,))
    assert torch.autograd.gradcheck(lambda s, w: ops.scatter_rows(s, slot, w, 16), (src, weights))
    assert torch.autograd.gradgradcheck(lambda s, w: ops.scatter_rows(s, slot, w, 16), (src, weights))
    assert torch.autograd.gradcheck(lambda s, r: ops.slot_dot(s, r, slot), (src, rows))
    assert torch.autograd.gradgradcheck(lambda s, r: ops.slot_dot(s, r, slot), (src, rows))


def test_combine_family_opcheck():
    for dtype in (torch.float32, torch.float64, *LOWP):
        rows, slot, weights = routed(12, 8, 4, 2, dtype, 0.2)
        rows, slot, weights = dev(rows).requires_grad_(), dev(slot), dev(weights).requires_grad_()
        src = torch.randn(12, 8, dtype=dtype).to(DEV).requires_grad_()
        opcheck(torch.ops.sparsemoe.combine.default, rows, slot, weights)
        opcheck(torch.ops.sparsemoe.combine.default, rows, slot, None)
        opcheck(torch.ops.sparsemoe.scatter_rows.default, src, slot, weights, 30)
        opcheck(torch.ops.sparsemoe.scatter_rows.default, src, slot, None, 24)
        opcheck(torch.ops.sparsemoe.slot_dot.default, src, rows, slot)


def test_combine_family_empty():
    slot = dev(torch.empty(0, 2, dtype=torch.long))
    rows = dev(torch.randn(0, 5))
    assert ops.combine(rows, slot, dev(torch.empty(0, 2))).shape == (0, 5)
    assert ops.scatter_rows(rows, slot, None, 0).shape == (0, 5)
    assert ops.scatter_rows(rows, slot, None, 3).cpu().eq(0).all()
    assert ops.slot_dot(rows, rows, slot).shape == (0, 2)
    # Every pick dropped (capacity 0): no rows at all, zeros out.
    dropped = dev(torch.full((4, 2), -1))
    assert torch.equal(ops.combine(rows, dropped, dev(torch.rand(4, 2))).cpu(), torch.zeros(4, 5))
    assert torch.equal(ops.slot_dot(dev(torch.randn(4, 5)), rows, dropped).cpu(), torch.zeros(4, 2))
    assert torch.equal(ops.scatter_rows(dev(torch.randn(4, 5)), dropped, None, 0).cpu(), torch.zeros(0, 5))


def test_combine_family_non_contiguous():
    rows, slot, weights = routed(10, 8, 4, 2)
    wide = torch.randn(20, 16)
    slot_t = dev(slot).t().contiguous().t()
    weights_t = dev(weights).t().contiguous().t()
    torch.testing.assert_close(host(ops.combine(dev(wide)[:, ::2], slot_t, weights_t)),
                               reference.combine(wide[:, ::2].contiguous(), slot, weights))
    src = torch.randn(10, 16)
    torch.testing.assert_close(host(ops.scatter_rows(dev(src)[:, ::2], slot_t, weights_t, 20)),
                               reference.scatter_rows(src[:, ::2].contiguous(), slot, weights, 20))
    torch.testing.assert_close(host(ops.slot_dot(dev(src)[:, ::2], dev(wide)[:, ::2], slot_t)),
                               reference.slot_dot(src[:, ::2].contiguous(), wide[:, ::2].contiguous(), slot))
