"""route and route_backward on CUDA against the CPU kernel and sparsemoe.reference: ids equal,
weights close, NaN/inf/ties, gradients, opcheck, gradcheck and autocast.

They skip with "needs CUDA" on a machine without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsemoe import ops, reference
from helpers import DEV, LOWP, dev, host, lowp_tolerance, needs_cuda, opcheck

pytestmark = needs_cuda
SCORINGS = ops.SCORINGS


# --- route -----------------------------------------------------------------------------------


def check_route(logits, k, renormalize=True, **options):
    """route on the GPU: ids equal the CPU kernel's and the reference's, weights close to both."""
    w, ids = host(ops.route(dev(logits), k, renormalize, **{n: dev(v) for n, v in options.items()}))
    w_cpu, ids_cpu = ops.route(logits, k, renormalize, **options)
    w_ref, ids_ref = reference.route(logits, k, renormalize, **options)
    assert w.dtype == reference.opmath_dtype(logits.dtype) and ids.dtype == torch.int64
    assert w.shape == ids.shape == (logits.shape[0], k)
    assert torch.equal(ids, ids_cpu) and torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, equal_nan=True)
    torch.testing.assert_close(w, w_cpu, equal_nan=True)
    return w, ids


# The last rows are wider than a warp's shared-memory buffer: they route through global scratch.
ROUTE_SHAPES = [(37, 8, 2), (64, 64, 8), (5, 128, 8), (9, 4, 4), (3, 1, 1), (1, 8, 2), (0, 8, 2),
                (2000, 256, 8), (16, 1024, 4), (300, 16384, 4)]


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", ROUTE_SHAPES)
def test_route_matches_cpu_and_reference(T, E, k, renormalize, scoring):
    # Low-precision logits route in float32: their weights are compared tightly too (and their
    # many exact ties check the lower-index rule).
    for dtype in (torch.float32, torch.float64, *LOWP):
        check_route(torch.randn(T, E).to(dtype), k, renormalize, scoring=scoring)


ROUTE_OPTIONS = [  # T, E, k, options; "bias" is replaced by a random selection bias
    (64, 16, 4, dict(selection_bias="bias")),
    (40, 12, 3, dict(scale=16.0)),
    (40, 16, 4, dict(num_groups=4, topk_groups=2)),
    (33, 64, 8, dict(num_groups=8, topk_groups=4, selection_bias="bias", scale=2.5)),  # DeepSeek-V3
    (20, 8, 2, dict(num_groups=8, topk_groups=2)),  # groups of one expert
    (25, 12, 6, dict(num_groups=3, topk_groups=3, selection_bias="bias")),  # every group allowed
    (17, 16, 4, dict(num_groups=4, topk_groups=1, scale=0.5)),  # k fills the one group
    (300, 256, 8, dict(num_groups=8, topk_groups=4, selection_bias="bias", scale=2.5)),
]


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k,options", ROUTE_OPTIONS)
def test_route_selection_options(T, E, k, options, renormalize, scoring):
    options = {n: (torch.randn(E) * 0.2 if v == "bias" else v) for n, v in options.items()}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        check_route(torch.randn(T, E).to(dtype), k, renormalize, scoring=scoring, **options)
    if "selection_bias" in options:  # a bias of another dtype is widened to opmath
        check_route(torch.randn(T, E), k, renormalize, scoring=scoring,
                    **{**options, "selection_bias": options["selection_bias"].bfloat16()})


NAN, INF = math.nan, math.inf
SPECIAL_LOGITS = [
    [NAN, 1.0, 2.0, NAN, 0.0, -1.0, 0.5, 0.2],
    [NAN] * 8,
    [-INF, 0.0, -INF, 1.0, -INF, 2.0, 0.0, -INF],
    [INF, 0.0, 1.0, 2.0, INF, -1.0, 0.0, 0.0],
    [-INF] * 8,
    [INF] * 8,
    [NAN, INF, -INF, 0.0, NAN, INF, -INF, 1.0],
    [0.5] * 8,
    [1.0, 3.0, 3.0, 0.0, 3.0, 0.0, 0.0, 3.0],
]


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("options", [{}, {"selection_bias": torch.tensor([0.1, -0.2, 0.0, 0.3, 0.0, 0.1, 0.2, -0.1])},
                                     {"num_groups": 4, "topk_groups": 2},
                                     {"num_groups": 2, "topk_groups": 1, "selection_bias": torch.full((8,), 0.05)}])
def test_route_nan_inf_and_ties(options, renormalize, scoring):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        _, ids = check_route(torch.tensor(SPECIAL_LOGITS).to(dtype), 3, renormalize, scoring=scoring, **options)
        assert ((ids >= 0) & (ids < 8)).all()
        assert all(len(set(row)) == 3 for row in ids.tolist())


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k,options", [
    (300, 64, 6, {}), (300, 64, 6, {"scale": 2.5, "num_groups": 8, "topk_groups": 4, "selection_bias": "bias"}),
    (100, 16384, 4, {})])
def test_route_backward_matches_cpu_and_reference(T, E, k, options, renormalize, scoring):
    options = {n: (torch.randn(E) * 0.2 if v == "bias" else v) for n, v in options.items()}
    for dtype in (torch.float64, torch.float32, *LOWP):
        logits = torch.randn(T, E).to(dtype)
        g = torch.randn(T, k, dtype=reference.opmath_dtype(dtype))

        def grad_of(route_fn, leaf_dtype, device):
            leaf = logits.to(device, leaf_dtype).requires_grad_()
            w, _ = route_fn(leaf, k, renormalize, scoring=scoring,
                            **{n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in options.items()})
            return torch.autograd.grad(w, leaf, g.to(device, w.dtype))[0].cpu()

        got = grad_of(ops.route, dtype, DEV)
        exact = grad_of(reference.route, torch.float64, "cpu")
        assert got.dtype == dtype
        if dtype in LOWP:
            lowp_tolerance(got, grad_of(reference.route, dtype, DEV), exact)
        else:
            torch.testing.assert_close(got, exact.to(dtype))
            torch.testing.assert_close(got, grad_of(ops.route, dtype, "cpu"))


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k,options", [
    (1, {}), (3, {}), (6, {}), (3, {"num_groups": 3, "topk_groups": 2, "selection_bias": "bias", "scale": 2.0})])
def test_route_gradcheck(k, options, renormalize, scoring):
    options = {n: (torch.randn(6, dtype=torch.float64).to(DEV) * 0.2 if v == "bias" else v) for n, v in options.items()}
    logits = torch.randn(7, 6, dtype=torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.route(t, k, renormalize, scoring=scoring, **options)[0], (logits,))


@pytest.mark.parametrize("scoring", SCORINGS)
def test_route_opcheck(scoring):
    bias = dev(torch.randn(8) * 0.2)
    for dtype in (torch.float32, torch.float64, *LOWP):
        logits = torch.randn(9, 8, dtype=dtype).to(DEV).requires_grad_()
        opcheck(torch.ops.sparsemoe.route.default, logits, 3, True, scoring)
        opcheck(torch.ops.sparsemoe.route.default, logits, 3, False, scoring, bias, 4, 2, 1.5)
        ids = ops.route(logits.detach(), 3, True, scoring)[1]
        grad = torch.randn(9, 3, dtype=reference.opmath_dtype(dtype)).to(DEV)
        opcheck(torch.ops.sparsemoe.route_backward.default, grad, logits.detach(), ids, True, scoring, 2.0)


def test_route_under_autocast_stays_fp32():
    x, weight = torch.randn(32, 16), torch.randn(8, 16)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        logits = F.linear(dev(x), dev(weight))
        w, ids = ops.route(logits, 2, True)
    assert logits.dtype == torch.bfloat16 and w.dtype == torch.float32
    w_ref, ids_ref = reference.route(logits.float().cpu(), 2, True)
    assert torch.equal(ids.cpu(), ids_ref)
    torch.testing.assert_close(w.cpu(), w_ref)


def test_route_non_contiguous_logits():
    logits = torch.randn(8, 20)
    w, ids = host(ops.route(dev(logits)[:, ::2], 2, True))
    w_ref, ids_ref = reference.route(logits[:, ::2].contiguous(), 2, True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
