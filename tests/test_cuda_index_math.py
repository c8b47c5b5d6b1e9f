"""64-bit index math of every CUDA op past 2**31 elements (opt-in: about 30 GB of GPU memory).

They skip with "needs CUDA" on a machine without a GPU.
"""

from __future__ import annotations


import pytest
import torch

from sparsemoe import ops, reference
from helpers import DEV, lowp_tolerance, needs_cuda

pytestmark = needs_cuda
SCORINGS = ops.SCORINGS


# --- 64-bit index math (opt-in: about 30 GB of GPU memory) ------------------------------------

INT32_ELEMENTS = 1 << 31
WIDE = 1 << 15


@pytest.mark.slow
@pytest.mark.parametrize("d", [WIDE, WIDE + 1])  # a _grouped_mm width and an odd one
def test_index_math_beyond_int32(d):
    T, E, f = INT32_ELEMENTS // d + 8, 4, 8
    x = torch.randn(T, d, dtype=torch.bfloat16, device=DEV)
    ids = (torch.arange(T, device=DEV) % E).unsqueeze(1)
    x_sorted, offsets, slot = ops.dispatch(x, ids, E)
    assert x_sorted.numel() > INT32_ELEMENTS
    t = torch.arange(T, device=DEV)
    counts = torch.bincount(ids[:, 0], minlength=E)
    assert torch.equal(offsets, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    assert torch.equal(slot[:, 0], offsets[t % E] + t // E)
    assert torch.equal(x_sorted.index_select(0, slot[:, 0]), x)
    assert torch.equal(ops.combine(x_sorted, slot), x)
    assert torch.equal(ops.scatter_rows(x, slot, None, T), x_sorted)
    tail = slice(T - 16, T)  # the rows whose elements sit past 2**31
    dots = ops.slot_dot(x, x_sorted, slot)
    torch.testing.assert_close(dots[tail, 0], x[tail].float().square().sum(1), rtol=1e-4, atol=1e-3)

    w1 = (torch.randn(E, 2 * f, d, device=DEV) / d**0.5).bfloat16()
    w2 = (torch.randn(E, d, f, device=DEV) / f**0.5).bfloat16()
    y, hidden = torch.ops.sparsemoe.expert_ffn(x_sorted, offsets, w1, w2, "swiglu")
    last = slice(T - 4, T)  # rows of the last expert, past 2**31 elements
    local = torch.tensor([0] * E + [4], device=DEV)
    exact_leaf = x_sorted[last].double().requires_grad_()
    exact = reference.expert_ffn(exact_leaf, local, w1.double(), w2.double())
    plain_leaf = x_sorted[last].clone().requires_grad_()
    plain = reference.expert_ffn(plain_leaf, local, w1, w2)
    lowp_tolerance(y[last], plain, exact)
    grad_x, grad_w1, grad_w2, _, _ = torch.ops.sparsemoe.expert_ffn_backward(
        y, x_sorted, offsets, w1, w2, hidden, "swiglu", 1.702, 7.0, False)
    lowp_tolerance(grad_x[last], torch.autograd.grad(plain, plain_leaf, y[last])[0],
                   torch.autograd.grad(exact, exact_leaf, y[last].double())[0])
    # The last expert's weight gradients reduce over its whole segment of the buffer.
    segment = slice(int(offsets[E - 1]), T)
    one = torch.tensor([0, T - segment.start], device=DEV)
    for dtype in (torch.float32, torch.bfloat16):
        w = [w1[E - 1:].to(dtype).clone().requires_grad_(), w2[E - 1:].to(dtype).clone().requires_grad_()]
        out = reference.expert_ffn(x_sorted[segment].to(dtype), one, *w)
        grads = torch.autograd.grad(out, w, y[segment].to(dtype))
        if dtype == torch.float32:
            exact_grads = grads
        else:
            lowp_tolerance(grad_w1[E - 1], grads[0][0], exact_grads[0][0])
            lowp_tolerance(grad_w2[E - 1], grads[1][0], exact_grads[1][0])
