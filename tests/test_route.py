import math

import pytest
import torch

from sparsemoe import ops, reference
from helpers import lowp_tolerance

route_op = torch.ops.sparsemoe.route.default


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (64, 64, 8), (5, 128, 8), (9, 4, 4), (3, 1, 1)])
def test_matches_reference_fp32_fp64(T, E, k, renormalize):
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(T, E, dtype=dtype)
        w, ids = ops.route(logits, k, renormalize)
        w_ref, ids_ref = reference.route(logits, k, renormalize)
        assert w.dtype == reference.opmath_dtype(dtype) and ids.dtype == torch.int64
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_route_in_fp32(dtype):
    logits = torch.randn(200, 16).to(dtype)
    w, ids = ops.route(logits, 4, True)
    assert w.dtype == torch.float32
    # The op widens to fp32 before any math, so it equals the fp32 route of the same values.
    w32, ids32 = reference.route(logits.float(), 4, True)
    assert torch.equal(ids, ids32)
    torch.testing.assert_close(w, w32)


def test_ties_go_to_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    w, ids = ops.route(logits, 2, False)
    assert ids.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(w[1], torch.full((2,), 0.2))


def test_nan_and_inf_policy():
    nan, inf = math.nan, math.inf
    logits = torch.tensor([
        [nan, 1.0, 2.0, nan],     # NaN ranks below numbers: picks 2 then 1; weights NaN
        [nan, nan, nan, nan],     # all NaN: lowest indices, weights NaN
        [-inf, 0.0, -inf, 1.0],   # -inf is a number: fine, finite weights
        [inf, 0.0, 1.0, 2.0],     # +inf is picked first; softmax of an inf row is NaN
        [-inf, -inf, -inf, -inf], # all -inf: ids 0, 1; weights NaN (as torch.softmax)
    ])
    w, ids = ops.route(logits, 2, True)
    assert ids.tolist() == [[2, 1], [0, 1], [3, 1], [0, 3], [0, 1]]
    w_ref, ids_ref = reference.route(logits, 2, True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, equal_nan=True)
    assert w[0].isnan().all() and w[1].isnan().all() and w[3].isnan().all() and w[4].isnan().all()
    assert torch.isfinite(w[2]).all()
    assert ((ids >= 0) & (ids < 4)).all()
    assert all(len(set(r)) == 2 for r in ids.tolist())


def test_empty_tokens():
    w, ids = ops.route(torch.randn(0, 8), 2, True)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_under_bf16_autocast_still_fp32():
    x = torch.randn(32, 16)
    weight = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(x, weight)
        w, ids = ops.route(logits, 2, True)
    assert logits.dtype == torch.bfloat16 and w.dtype == torch.float32
    w_ref, ids_ref = reference.route(logits.float(), 2, True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("renormalize", [True, False])
def test_backward_matches_reference(renormalize):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logits = torch.randn(40, 12).to(dtype).requires_grad_()
        w, _ = ops.route(logits, 3, renormalize)
        g = torch.randn_like(w)
        (grad,) = torch.autograd.grad(w, logits, g)
        exact = logits.detach().double().requires_grad_()
        (grad64,) = torch.autograd.grad(reference.route(exact, 3, renormalize)[0], exact, g.double())
        if dtype == torch.bfloat16:
            plain = logits.detach().clone().requires_grad_()
            (grad_plain,) = torch.autograd.grad(reference.route(plain, 3, renormalize)[0], plain, g)
            assert grad.dtype == torch.bfloat16
            lowp_tolerance(grad, grad_plain, grad64)
        else:
            torch.testing.assert_close(grad, grad64.to(dtype))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_gradcheck(k, renormalize):
    logits = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: ops.route(l, k, renormalize)[0], (logits,))


@pytest.mark.parametrize("renormalize", [True, False])
def test_opcheck(renormalize):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = torch.randn(9, 8, dtype=dtype, requires_grad=True)
        torch.library.opcheck(route_op, (logits, 3, renormalize))
    grad = torch.randn(9, 3)
    logits = torch.randn(9, 8)
    ids = ops.route(logits, 3, renormalize)[1]
    torch.library.opcheck(torch.ops.sparsemoe.route_backward.default, (grad, logits, ids, renormalize, "softmax", 1.0))


def test_non_contiguous_logits():
    logits = torch.randn(8, 20)[:, ::2]
    w, ids = ops.route(logits, 2, True)
    w_ref, ids_ref = reference.route(logits.contiguous(), 2, True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
