import pytest
import torch

from sparsemoe import ops, reference
from helpers import lowp_tolerance, routed


@pytest.mark.parametrize("T,d,k", [(33, 16, 2), (1, 1, 1), (64, 600, 8), (7, 100, 3)])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_combine_matches_reference(T, d, k, drop):
    for dtype in (torch.float32, torch.float64):
        rows, slot, weights = routed(T, d, 8, k, dtype, drop)
        torch.testing.assert_close(ops.combine(rows, slot, weights), reference.combine(rows, slot, weights))
        torch.testing.assert_close(ops.combine(rows, slot), reference.combine(rows, slot))
    for dtype in (torch.bfloat16, torch.float16):
        rows, slot, weights = routed(T, d, 8, k, dtype, drop)
        exact = reference.combine(rows.double(), slot, weights.double())
        plain = (rows[slot.clamp(min=0)] * (slot >= 0).unsqueeze(-1) * weights.unsqueeze(-1).to(dtype)).sum(1)
        got = ops.combine(rows, slot, weights)
        assert got.dtype == dtype
        lowp_tolerance(got, plain, exact)


def test_dropped_slots_contribute_exactly_zero():
    rows, slot, weights = routed(20, 8, 4, 2)
    slot[:, 1] = -1
    rows_req = rows.clone().requires_grad_()
    w_req = weights.clone().requires_grad_()
    out = ops.combine(rows_req, slot, w_req)
    assert torch.equal(out, ops.combine(rows, slot[:, :1].contiguous(), weights[:, :1].contiguous()))
    g_rows, g_w = torch.autograd.grad(out, (rows_req, w_req), torch.randn_like(out))
    assert torch.all(g_w[:, 1] == 0)
    dropped_rows = torch.ones(rows.shape[0], dtype=torch.bool)
    dropped_rows[slot[:, 0]] = False
    assert torch.all(g_rows[dropped_rows] == 0)


def test_scatter_rows_and_slot_dot_match_reference():
    for drop in (0.0, 0.25):
        rows, slot, weights = routed(40, 24, 8, 3, torch.float64, drop)
        src = torch.randn(40, 24, dtype=torch.float64)
        torch.testing.assert_close(ops.scatter_rows(src, slot, weights, 120),
                                   reference.scatter_rows(src, slot, weights, 120))
        torch.testing.assert_close(ops.scatter_rows(src, slot, None, 130),
                                   reference.scatter_rows(src, slot, None, 130))
        torch.testing.assert_close(ops.slot_dot(src, rows, slot), reference.slot_dot(src, rows, slot))


def test_bitwise_repeatable_and_split_invariant():
    rows, slot, weights = routed(2000, 64, 8, 4)
    a = ops.combine(rows, slot, weights)
    assert torch.equal(a, ops.combine(rows, slot, weights))
    assert torch.equal(a[:700], ops.combine(rows, slot[:700], weights[:700]))
    perm = torch.randperm(2000)
    assert torch.equal(a[perm], ops.combine(rows, slot[perm], weights[perm]))


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_gradcheck(drop):
    rows, slot, weights = routed(5, 4, 6, 3, torch.float64, drop)
    rows.requires_grad_()
    weights.requires_grad_()
    src = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, w: ops.combine(r, slot, w), (rows, weights))
    assert torch.autograd.gradgradcheck(lambda r, w: ops.combine(r, slot, w), (rows, weights))
    assert torch.autograd.gradcheck(lambda s, w: ops.scatter_rows(s, slot, w, 16), (src, weights))
    assert torch.autograd.gradcheck(lambda s, r: ops.slot_dot(s, r, slot), (src, rows))


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        rows, slot, weights = routed(12, 8, 4, 2, dtype, 0.2)
        rows.requires_grad_()
        weights.requires_grad_()
        src = torch.randn(12, 8, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.sparsemoe.combine.default, (rows, slot, weights))
        torch.library.opcheck(torch.ops.sparsemoe.combine.default, (rows, slot, None))
        torch.library.opcheck(torch.ops.sparsemoe.scatter_rows.default, (src, slot, weights, 30))
        torch.library.opcheck(torch.ops.sparsemoe.slot_dot.default, (src, rows, slot))


def test_empty():
    rows = torch.randn(0, 5)
    slot = torch.empty(0, 2, dtype=torch.long)
    assert ops.combine(rows, slot, torch.empty(0, 2)).shape == (0, 5)
    assert ops.scatter_rows(rows, slot, None, 0).shape == (0, 5)
    assert ops.slot_dot(rows, rows, slot).shape == (0, 2)


def test_non_contiguous():
    rows, slot, weights = routed(10, 8, 4, 2)
    wide = torch.randn(20, 16)[:, ::2]
    torch.testing.assert_close(ops.combine(wide, slot, weights), reference.combine(wide.contiguous(), slot, weights))
    slot_t = slot.t().contiguous().t()
    torch.testing.assert_close(ops.combine(rows, slot_t, weights), reference.combine(rows, slot, weights))
