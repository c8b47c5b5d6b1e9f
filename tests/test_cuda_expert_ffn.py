"""expert_ffn and its backward on CUDA against the CPU kernel and sparsemoe.reference (every
activation, biases, padding rows, both GEMM paths), opcheck, gradcheck and bitwise repeatability.

They skip with "needs CUDA" on a machine without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsemoe import ops, reference
from helpers import (ACTS, DEV, LOWP, assert_grads_close, dev, experts, host, interleave_gate_up, kink_distance,
                     lowp_tolerance, needs_cuda, opcheck, random_ids, routed, transposed_view)

pytestmark = needs_cuda
SCORINGS = ops.SCORINGS


# --- expert_ffn ------------------------------------------------------------------------------

# N, d, f, E, padding rows. Widths that are multiples of 8 take at::_grouped_mm in bfloat16;
# the others (and every other dtype) take the tiled kernels; both tile edges (64) are crossed.
FFN_SHAPES = [
    (40, 16, 12, 4, 0),
    (1, 1, 3, 1, 0),
    (130, 100, 40, 8, 7),
    (64, 24, 8, 16, 0),
    (96, 64, 48, 4, 11),
    (1000, 128, 96, 8, 24),
    (700, 100, 72, 6, 20),
    (300, 36, 20, 6, 5),
]
SWIGLU_KW = {"swiglu_alpha": 1.5, "swiglu_limit": 1.5}  # clamps active at x_scale=2


def ffn_args(x, off, w1, w2, b1, b2, device):
    return [None if t is None else t.to(device) for t in (x, off, w1, w2, b1, b2)]


def run_ffn(fn, act, x, off, w1, w2, b1=None, b2=None, device=DEV):
    x, off, w1, w2, b1, b2 = ffn_args(x, off, w1, w2, b1, b2, device)
    return fn(x, off, w1, w2, act, b1, b2, **SWIGLU_KW).cpu()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N,d,f,E,pad", FFN_SHAPES)
def test_expert_ffn_matches_cpu_and_reference(N, d, f, E, pad, act):
    for dtype in (torch.float32, torch.float64):
        x, off, w1, w2, b1, b2 = experts(N, d, f, E, act, dtype, pad=pad, x_scale=2.0)
        for biases in ((None, None), (b1, None), (None, b2), (b1, b2)):
            got = run_ffn(ops.expert_ffn, act, x, off, w1, w2, *biases)
            assert got.dtype == dtype and got.shape == (N + pad, d)
            assert torch.all(got[N:] == 0)
            exact = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), act,
                                         *(None if b is None else b.double() for b in biases), **SWIGLU_KW)
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
            torch.testing.assert_close(got, exact.to(dtype), **tol)
            torch.testing.assert_close(got, run_ffn(ops.expert_ffn, act, x, off, w1, w2, *biases, device="cpu"), **tol)


LOWP_FFN_SHAPES = [  # N, d, f, E, padding rows, counts (None: random, with empty experts likely)
    (96, 64, 48, 4, 11, [30, 0, 40, 26]),
    (1000, 128, 96, 8, 24, None),
    (130, 100, 40, 8, 7, None),
    (64, 24, 12, 4, 0, None),
    (50, 36, 64, 3, 5, None),
    (700, 100, 72, 6, 20, [200, 0, 150, 250, 0, 100]),
]


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N,d,f,E,pad,counts", LOWP_FFN_SHAPES)
def test_expert_ffn_low_precision_within_2x_plain_pytorch(N, d, f, E, pad, counts, act, dtype):
    x, off, w1, w2, b1, b2 = experts(N, d, f, E, act, dtype, counts=counts, pad=pad, x_scale=2.0)
    for biases in ((None, None), (b1, b2)):
        got = run_ffn(ops.expert_ffn, act, x, off, w1, w2, *biases)
        assert got.dtype == dtype and torch.all(got[N:] == 0)
        plain = run_ffn(reference.expert_ffn, act, x, off, w1, w2, *biases)
        exact = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), act,
                                     *(None if b is None else b.double() for b in biases), **SWIGLU_KW)
        lowp_tolerance(got, plain, exact)


# In low precision a kink of the activation turns rounding into a discrete event: a hidden value
# that rounds across relu's 0 or onto a clamp limit flips its derivative between 0 and 1. Those
# flips, not precision, would decide the comparison, so low-precision gradients are compared where
# they are rare against the number of values: relu on the large shape only, and clamped_swiglu with
# GPT-OSS's limit 7, which these activations never reach (the clamps are covered in float32/64).
BACKWARD_SHAPES = [(80, 32, 16, 9), (80, 36, 20, 9), (400, 64, 96, 16)]
BACKWARD_CASES = [(*shape, dtype, act) for shape in BACKWARD_SHAPES for dtype in (torch.float32, torch.float64, *LOWP)
                  for act in ACTS if not (dtype in LOWP and act == "relu" and shape[0] < 400)]


@pytest.mark.parametrize("N,d,f,pad,dtype,act", BACKWARD_CASES)
def test_expert_ffn_backward_matches_and_empty_experts_get_zero_grads(N, d, f, pad, dtype, act):
    counts = [round(N * c) for c in (0.25, 0, 0.375, 0, 0.3125)]
    counts.append(N - sum(counts))
    x, off, w1, w2, b1, b2 = experts(N, d, f, 6, act, dtype, counts=counts, pad=pad)
    g = torch.randn(N + pad, d).to(dtype)
    kw = SWIGLU_KW if dtype not in LOWP else {}

    def grads(fn, leaf_dtype, device):
        leaves = [t.to(device, leaf_dtype).requires_grad_() for t in (x, w1, w2, b1, b2)]
        out = fn(leaves[0], off.to(device), leaves[1], leaves[2], act, leaves[3], leaves[4], **kw)
        return [t.cpu() for t in torch.autograd.grad(out, leaves, g.to(device, leaf_dtype))]

    got = grads(ops.expert_ffn, dtype, DEV)
    exact = grads(reference.expert_ffn, torch.float64, "cpu")
    if dtype == torch.float64:
        for a, e in zip(got, exact):
            torch.testing.assert_close(a, e)
    else:
        assert_grads_close(got, grads(reference.expert_ffn, dtype, DEV), exact, dtype)
    if dtype in (torch.float32, torch.float64):
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        for a, c in zip(got, grads(ops.expert_ffn, dtype, "cpu")):
            torch.testing.assert_close(a, c, **tol)
    # Experts 1 and 3 own no rows: exactly zero gradients for their weights and biases.
    for grad_param in got[1:]:
        assert torch.all(grad_param[1] == 0) and torch.all(grad_param[3] == 0)
        assert grad_param[0].abs().sum() > 0
    assert torch.all(got[0][N:] == 0)  # padding rows feed no expert


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_expert_ffn_gradcheck(act, with_bias):
    limit = 1.0
    x, off, w1, w2, b1, b2 = experts(7, 4, 3, 3, act, torch.float64, counts=[3, 0, 4], pad=2, x_scale=2.0)
    # Away from the kinks of relu and the clamps (the finite-difference step is 1e-6).
    assert kink_distance(x, off, w1, b1 if with_bias else None, act, limit) > 1e-3
    leaves = [dev(t).requires_grad_() for t in ((x, w1, w2, b1, b2) if with_bias else (x, w1, w2))]
    off = dev(off)

    def fn(a, c, d, e=None, h=None):
        return ops.expert_ffn(a, off, c, d, act, e, h, swiglu_alpha=1.702, swiglu_limit=limit)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("act,dtype,use_b1,use_b2,pad", [
    ("clamped_swiglu", torch.float32, True, True, 3),
    ("clamped_swiglu", torch.bfloat16, True, True, 0),
    ("clamped_swiglu", torch.float64, False, True, 2),
    ("swiglu", torch.bfloat16, False, False, 5),
    ("gelu", torch.float16, True, False, 1),
    ("relu", torch.float32, True, False, 4),
])
def test_expert_ffn_opcheck(act, dtype, use_b1, use_b2, pad):
    x, off, w1, w2, b1, b2 = (dev(t) for t in experts(20, 16, 8, 4, act, dtype, counts=[5, 0, 10, 5], pad=pad,
                                                       x_scale=3.0))
    args = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
    b1, b2 = (args[3] if use_b1 else None), (args[4] if use_b2 else None)
    opcheck(torch.ops.sparsemoe.expert_ffn.default, args[0], off, args[1], args[2], act, b1, b2, 1.702, 2.0)
    y, hidden = torch.ops.sparsemoe.expert_ffn(x.detach(), off, w1.detach(), w2.detach(), act,
                                               None if b1 is None else b1.detach(), None, 1.702, 2.0)
    opcheck(torch.ops.sparsemoe.expert_ffn_backward.default, torch.randn_like(y), x.detach(), off, w1.detach(),
            w2.detach(), hidden, act, 1.702, 2.0, use_b1 or use_b2)


# Hugging Face's layouts: transposed weights (copied on CUDA for now, their gradients copied back
# into the weights' layout) and interleaved gate/up rows, on both GEMM paths (bfloat16 with d and f
# multiples of 8 takes at::_grouped_mm, float32 the tiled kernels).
@pytest.mark.parametrize("act,interleaved", [("swiglu", True), ("clamped_swiglu", True), ("clamped_swiglu", False),
                                             ("gelu", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_hf_layouts_match_cpu_and_reference(act, interleaved, dtype):
    counts = [30, 0, 2, 45, 1, 20]
    N = sum(counts)
    x, off, w1, w2, b1, b2 = experts(N, 64, 48, len(counts), act, torch.float32, counts=counts, pad=5)
    if interleaved:
        w1, b1 = interleave_gate_up(w1), interleave_gate_up(b1)
    w1, w2 = transposed_view(w1), transposed_view(w2)
    g = torch.randn(N + 5, 64)
    kw = dict(swiglu_alpha=1.702, swiglu_limit=7.0, gate_up_interleaved=interleaved)

    def run(fn, device, leaf_dtype, contiguous=False):
        leaves = [(t.contiguous() if contiguous else t).to(device, leaf_dtype).requires_grad_()
                  for t in (x, w1, w2, b1, b2)]
        y = fn(leaves[0], off.to(device), leaves[1], leaves[2], act, leaves[3], leaves[4], **kw)
        grads = torch.autograd.grad(y, leaves, g.to(device, leaf_dtype))
        return [y, *grads], leaves

    got, leaves = run(ops.expert_ffn, DEV, dtype)
    # A .to() keeps a transposed view's strides: the CUDA kernel saw transposed weights.
    assert leaves[1].stride() == w1.stride()
    for grad, weight in zip(got[2:4], leaves[1:3]):
        assert grad.stride() == weight.stride()
    exact, _ = run(reference.expert_ffn, "cpu", torch.float64, contiguous=True)
    if dtype == torch.float32:
        cpu, _ = run(ops.expert_ffn, "cpu", dtype)
        for a, e, c in zip(got, exact, cpu):
            torch.testing.assert_close(a.cpu(), e.float(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.cpu(), c, rtol=1e-5, atol=1e-5)
    else:
        plain, _ = run(reference.expert_ffn, DEV, dtype)
        lowp_tolerance(got[0].cpu(), plain[0].cpu(), exact[0])
        assert_grads_close([t.cpu() for t in got[1:]], [t.cpu() for t in plain[1:]], exact[1:], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_hf_layouts_opcheck(dtype):
    x, off, w1, w2, b1, b2 = (dev(t) for t in experts(20, 16, 8, 4, "clamped_swiglu", dtype, counts=[5, 0, 10, 5],
                                                       pad=3))
    w1, b1 = transposed_view(interleave_gate_up(w1)), interleave_gate_up(b1)
    w2 = transposed_view(w2)
    args = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
    opcheck(torch.ops.sparsemoe.expert_ffn.default, args[0], off, args[1], args[2], "clamped_swiglu", args[3],
            args[4], 1.702, 2.0, True)
    y, hidden = torch.ops.sparsemoe.expert_ffn(x.detach(), off, w1.detach(), w2.detach(), "clamped_swiglu",
                                               b1.detach(), b2.detach(), 1.702, 2.0, True)
    opcheck(torch.ops.sparsemoe.expert_ffn_backward.default, torch.randn_like(y), x.detach(), off, w1.detach(),
            w2.detach(), hidden, "clamped_swiglu", 1.702, 2.0, True, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expert_ffn_single_expert_is_a_dense_ffn(dtype):
    x, off, w1, w2, _, _ = experts(50, 16, 8, 1, "swiglu", dtype)
    gate, up = (x.double() @ w1[0].double().T).chunk(2, dim=-1)
    dense = (F.silu(gate) * up) @ w2[0].double().T
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(run_ffn(ops.expert_ffn, "swiglu", x, off, w1, w2), dense.to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_empty_buffers(dtype):
    # No rows at all, only padding rows, and every row on one expert.
    for N, pad, counts in ((0, 0, [0, 0, 0]), (0, 5, [0, 0, 0]), (64, 0, [0, 64, 0])):
        x, off, w1, w2, b1, b2 = (dev(t) for t in experts(N, 16, 8, 3, "clamped_swiglu", dtype, counts=counts,
                                                           pad=pad))
        leaves = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
        y = ops.expert_ffn(leaves[0], off, leaves[1], leaves[2], "clamped_swiglu", leaves[3], leaves[4])
        assert y.shape == (N + pad, 16) and torch.all(y[N:] == 0)
        grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
        assert torch.all(grads[0][N:] == 0)
        for grad_param in grads[1:]:
            assert torch.all(grad_param[0] == 0) and torch.all(grad_param[2] == 0)
            assert (grad_param[1].abs().sum() > 0) == (N > 0)


@pytest.mark.parametrize("act", ["swiglu", "clamped_swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_padding_rows_are_never_read(act, dtype):
    x, off, w1, w2, b1, b2 = experts(64, 16, 8, 3, act, dtype, counts=[24, 40, 0], pad=6)
    x[64:] = torch.tensor([math.nan, math.inf, -math.inf, 1e30, 0.0, 3.0]).unsqueeze(1).to(dtype)
    leaves = [dev(t).requires_grad_() for t in (x, w1, w2, b1, b2)]
    y = ops.expert_ffn(leaves[0], dev(off), leaves[1], leaves[2], act, leaves[3], leaves[4])
    assert torch.all(y[64:] == 0) and torch.isfinite(y).all()
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][64:] == 0)


@pytest.mark.parametrize("dtype,d,f", [(torch.bfloat16, 128, 96), (torch.bfloat16, 100, 72), (torch.float32, 128, 96)])
def test_expert_ffn_bitwise_repeatable(dtype, d, f):
    x, off, w1, w2, b1, b2 = experts(3000, d, f, 8, "swiglu", dtype, pad=40)
    leaves = [dev(t).requires_grad_() for t in (x, w1, w2, b1, b2)]
    runs = []
    for _ in range(2):
        out = ops.expert_ffn(leaves[0], dev(off), leaves[1], leaves[2], "swiglu", leaves[3], leaves[4])
        runs.append((out, *torch.autograd.grad(out.float().square().sum(), leaves)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --- storage that starts off a vector boundary -----------------------------------------------


def misaligned(t):
    """A contiguous copy of t whose data starts one element past an aligned address."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return out.copy_(t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_misaligned_storage_gives_the_aligned_results(dtype):
    # Vectorised loads and at::_grouped_mm need aligned rows; other addresses must still work.
    T, d, E, k = 300, 64, 8, 2
    x, ids = dev(torch.randn(T, d).to(dtype)), dev(random_ids(T, E, k))
    assert all(torch.equal(a, b) for a, b in zip(ops.dispatch(misaligned(x), ids, E), ops.dispatch(x, ids, E)))
    rows, slot, weights = (dev(t) for t in routed(T, d, E, k, dtype))
    assert torch.equal(ops.combine(misaligned(rows), slot, misaligned(weights)), ops.combine(rows, slot, weights))
    assert torch.equal(ops.scatter_rows(misaligned(x), slot, misaligned(weights), T * k),
                       ops.scatter_rows(x, slot, weights, T * k))
    assert torch.equal(ops.slot_dot(misaligned(x), misaligned(rows), slot), ops.slot_dot(x, rows, slot))
    x, off, w1, w2, b1, b2 = experts(T, d, 32, E, "swiglu", dtype, pad=5)
    got = ops.expert_ffn(*(misaligned(dev(t)) if t.is_floating_point() else dev(t) for t in (x, off, w1, w2)),
                         "swiglu", misaligned(dev(b1)), misaligned(dev(b2))).cpu()
    exact = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), "swiglu", b1.double(), b2.double())
    if dtype == torch.float32:
        torch.testing.assert_close(got, exact.float(), rtol=1e-5, atol=1e-5)
    else:
        lowp_tolerance(got, host(reference.expert_ffn(*(dev(t) for t in (x, off, w1, w2)), "swiglu", dev(b1),
                                                      dev(b2))), exact)


EXTREMES = [-3e38, -1e38, -1e10, -100.0, -88.9, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1e38, 3e38, -math.inf, math.inf,
            math.nan]


@pytest.mark.parametrize("act", ACTS)
def test_expert_ffn_at_extreme_pre_activations_matches_cpu(act):
    # d = f = 1 and unit weights: every pre-activation is exactly the given value.
    x = torch.tensor(EXTREMES).unsqueeze(1).requires_grad_()
    width = 2 if act in ("swiglu", "clamped_swiglu") else 1
    w1, w2, off = torch.ones(1, width, 1), torch.ones(1, 1, 1), torch.tensor([0, len(EXTREMES)])
    cpu = ops.expert_ffn(x, off, w1, w2, act)
    (cpu_grad,) = torch.autograd.grad(cpu, x, torch.ones_like(cpu))
    xg = dev(x.detach()).requires_grad_()
    gpu = ops.expert_ffn(xg, dev(off), dev(w1), dev(w2), act)
    (gpu_grad,) = torch.autograd.grad(gpu, xg, torch.ones_like(gpu))
    torch.testing.assert_close(gpu.cpu(), cpu, equal_nan=True)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, equal_nan=True)


def test_expert_ffn_zero_width_experts_on_cuda():
    x = torch.randn(7, 4, requires_grad=True)
    off, w1, w2 = torch.tensor([0, 3, 3, 7]), torch.randn(3, 0, 4), torch.randn(3, 4, 0)
    b2 = torch.randn(3, 4, requires_grad=True)
    cpu = ops.expert_ffn(x, off, w1, w2, "relu", None, b2)
    cpu_grads = torch.autograd.grad(cpu.square().sum(), (x, b2))
    xg, b2g = dev(x.detach()).requires_grad_(), dev(b2.detach()).requires_grad_()
    gpu = ops.expert_ffn(xg, dev(off), dev(w1), dev(w2), "relu", None, b2g)
    gpu_grads = torch.autograd.grad(gpu.square().sum(), (xg, b2g))
    torch.testing.assert_close(gpu.cpu(), cpu)
    for g, c in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(g.cpu(), c)
