"""dispatch on CUDA against the CPU kernel and sparsemoe.reference, exactly: dropless and with
capacity (position and priority, token groups), gradients, opcheck and gradcheck.

They skip with "needs CUDA" on a machine without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsemoe import ops, reference
from helpers import DEV, LOWP, dev, host, make_priority, needs_cuda, opcheck, random_ids

pytestmark = needs_cuda
SCORINGS = ops.SCORINGS


# --- dispatch --------------------------------------------------------------------------------


def check_dispatch(x, ids, E, capacity=-1, priority=None, token_groups=1):
    """dispatch on the GPU equals the CPU kernel and the reference exactly (rows are copies)."""
    got = host(ops.dispatch(dev(x), dev(ids), E, capacity, dev(priority), token_groups))
    cpu = ops.dispatch(x, ids, E, capacity, priority, token_groups)
    want = reference.dispatch(x, ids, E, capacity, priority, token_groups)
    for name, g, c, w in zip(("x_sorted", "expert_offsets", "slot"), got, cpu, want):
        assert g.dtype == c.dtype and g.shape == c.shape, name
        assert torch.equal(g, c) and torch.equal(g, w), name
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOWP])
@pytest.mark.parametrize("T,d,E,k", [(50, 16, 8, 2), (1, 1, 4, 4), (300, 100, 64, 8), (5000, 3, 16, 1),
                                     (0, 8, 4, 2), (40, 0, 4, 2), (20000, 64, 128, 8), (4096, 8, 256, 8),
                                     (300, 8, 4096, 8)])
def test_dispatch_dropless_matches_cpu_and_reference(T, d, E, k, dtype):
    check_dispatch(torch.randn(T, d).to(dtype), random_ids(T, E, k), E)


CAPACITY_CASES = [  # T, d, E, k, token group counts
    (48, 8, 8, 2, (1, 2, 4)),
    (60, 5, 4, 4, (1, 3)),
    (7, 3, 5, 1, (1, 7)),
    (96, 16, 16, 3, (1, 2)),
    (8192, 8, 64, 4, (1, 4)),
    (500, 4, 1024, 8, (1, 5)),
]


@pytest.mark.parametrize("T,d,E,k,groups", CAPACITY_CASES)
@pytest.mark.parametrize("capacity", [0, 1, 3, "T", 2**40])
@pytest.mark.parametrize("priority_kind", [None, "rand", "ties", "nan"])
def test_dispatch_capacity_matches_cpu_and_reference(T, d, E, k, groups, capacity, priority_kind):
    capacity = T if capacity == "T" else capacity
    ids = random_ids(T, E, k)
    if priority_kind == "nan":  # NaN priorities rank last
        priority = torch.where(torch.rand(T, k) < 0.3, math.nan, torch.rand(T, k))
    else:
        priority = make_priority(priority_kind, T, k)
    for G in groups:
        for dtype in (torch.float32, torch.bfloat16) if capacity != 1 else (torch.float64, torch.float16):
            check_dispatch(torch.randn(T, d).to(dtype), ids, E, capacity, priority, G)
        if priority is not None:  # a priority of another dtype ranks the same way
            check_dispatch(torch.randn(T, d), ids, E, capacity, priority.double(), G)


def test_dispatch_all_tokens_on_one_expert():
    T, E = 3000, 5
    x, ids = torch.randn(T, 4), torch.full((T, 1), 2)
    x_sorted, offsets, slot = check_dispatch(x, ids, E)
    assert offsets.tolist() == [0, 0, 0, T, T, T]
    assert torch.equal(x_sorted, x) and torch.equal(slot.squeeze(1), torch.arange(T))
    for priority in (None, torch.rand(T, 1)):
        for G in (1, 3):
            x_sorted, offsets, _ = check_dispatch(x, ids, E, 100, priority, G)
            assert offsets.tolist() == [0, 0, 0, 100 * G, 100 * G, 100 * G]


def test_dispatch_then_combine_is_identity():
    x = torch.randn(640, 32)
    for k in (1, 2):
        ids = random_ids(640, 8, k)
        leaf = dev(x).requires_grad_()
        x_sorted, _, slot = ops.dispatch(leaf, dev(ids), 8)
        out = ops.combine(x_sorted, slot, dev(torch.ones(640, k)))
        assert torch.equal(out.cpu(), k * x)
        g = torch.randn(640, 32)
        (grad,) = torch.autograd.grad(out, leaf, dev(g))
        assert torch.equal(grad.cpu(), k * g)


@pytest.mark.parametrize("capacity,priority_kind,G", [(-1, None, 1), (2, None, 1), (1, "rand", 2), (0, None, 1),
                                                      (1, "ties", 4), (100, "rand", 1)])
def test_dispatch_gradcheck(capacity, priority_kind, G):
    x = torch.randn(8, 3, dtype=torch.float64).to(DEV).requires_grad_()
    ids, priority = dev(random_ids(8, 4, 2)), dev(make_priority(priority_kind, 8, 2))
    fn = lambda t: ops.dispatch(t, ids, 4, capacity, priority, G)[0]
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_dispatch_opcheck():
    ids = dev(random_ids(20, 8, 3))
    for dtype, capacity, priority, G in ((torch.float32, -1, None, 1), (torch.float32, 2, None, 4),
                                         (torch.bfloat16, 3, torch.rand(20, 3), 2), (torch.float16, -1, None, 1),
                                         (torch.float64, 1, torch.rand(20, 3), 1)):
        x = torch.randn(20, 6, dtype=dtype).to(DEV).requires_grad_()
        opcheck(torch.ops.sparsemoe.dispatch.default, x, ids, 8, capacity, dev(priority), G)


def test_dispatch_non_contiguous_inputs():
    x, ids, priority = torch.randn(20, 16), random_ids(20, 6, 2), torch.rand(2, 20)
    got = host(ops.dispatch(dev(x)[:, ::2], dev(ids).t().contiguous().t(), 6, 3, dev(priority).t(), 2))
    want = reference.dispatch(x[:, ::2].contiguous(), ids, 6, 3, priority.t().contiguous(), 2)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("capacity", [2**61 + 1, 2**62, 2**63 - 1])
def test_dispatch_huge_capacity_is_dropless(capacity):
    # E * token_groups * capacity overflows int64: the buffer must still hold every pick.
    x, ids = torch.randn(6, 1024), random_ids(6, 8, 2)
    for got in (host(torch.ops.sparsemoe.dispatch(dev(x), dev(ids), 8, capacity, None, 1)),
                host(torch.ops.sparsemoe.dispatch(dev(x), dev(ids), 8, capacity, dev(torch.rand(6, 2)), 2))):
        assert got[0].shape == (12, 1024)
        assert all(torch.equal(g, w) for g, w in zip(got, reference.dispatch(x, ids, 8)))
