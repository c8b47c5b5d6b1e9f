"""Regression tests for the defects a hostile-input probe found, one section per defect: a huge
capacity, unwritten gradients with d_ff = 0, an empty batch of sequences, activations at huge
and non-finite pre-activations, double backward, float16 clamped-SwiGLU gradients, repeated
slots, late errors, and the oracle's dropped picks. Plus the NaN/inf contracts the README states."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsemoe import MoELayer, ops, reference
from helpers import D, FF, build, random_ids

INF, NAN = float("inf"), float("nan")


@contextlib.contextmanager
def poisoned_empty():
    """Every torch.empty (the kernels' own output buffers included) starts as NaN, so an output
    element a kernel forgets to write shows up."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


# --- 1. a huge capacity is dropless, never a short buffer ----------------------------------------


@pytest.mark.parametrize("capacity", [2**61 + 1, 2**62, 2**63 - 1])
def test_huge_capacity_dispatch_is_dropless(capacity):
    x = torch.randn(6, 1024)
    ids = random_ids(6, 8, 2)
    want = ops.dispatch(x, ids, 8)
    for got in (ops.dispatch(x, ids, 8, capacity), torch.ops.sparsemoe.dispatch(x, ids, 8, capacity, None, 1),
                torch.ops.sparsemoe.dispatch(x, ids, 8, capacity, torch.rand(6, 2), 2)):
        assert got[0].shape == (12, 1024)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert ops.dispatch(x, ids, 8, 2**100)[0].shape == (12, 1024)  # any Python int


@pytest.mark.parametrize("options", [dict(expert_capacity=2**62), dict(expert_capacity=sys.maxsize),
                                     dict(capacity_factor=1e18), dict(capacity_factor=1e30),
                                     dict(expert_capacity=2**62, capacity_scope="sequence"),
                                     dict(routing="expert_choice", expert_capacity=2**62)])
def test_huge_layer_capacity_equals_dropless(options):
    capped = build(dict(num_experts=4, top_k=2, **options), seed=3)
    dropless = build(dict(num_experts=4, top_k=2, routing=options.get("routing", "token_choice"),
                          **({"capacity_factor": 4.0} if options.get("routing") else {})), seed=3)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(capped(x), dropless(x))
    assert capped.dropped_fraction.item() == 0.0


# --- 2. every output written: d_ff = 0 with a b2 bias ----------------------------------------------


def test_zero_width_experts_write_every_gradient():
    E, N, d = 3, 7, 4
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    off = torch.tensor([0, 3, 3, 7])
    w1 = torch.randn(E, 0, d, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, d, 0, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(E, 0, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(E, d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(N, d, dtype=torch.float64)
    with poisoned_empty():
        y = ops.expert_ffn(x, off, w1, w2, "relu", b1, b2)
        y.backward(g)
    torch.testing.assert_close(y, reference.expert_ffn(x.detach(), off, w1.detach(), w2.detach(), "relu", b1, b2))
    assert torch.equal(x.grad, torch.zeros_like(x))
    want_b2 = torch.stack([g[0:3].sum(0), torch.zeros(d, dtype=torch.float64), g[3:7].sum(0)])
    torch.testing.assert_close(b2.grad, want_b2)
    assert w1.grad.shape == w1.shape and w2.grad.shape == w2.shape and b1.grad.shape == b1.shape


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("N,d,f,counts", [(0, 4, 3, [0, 0]), (5, 0, 3, [2, 3]), (5, 4, 3, [0, 5]),
                                          (9, 1, 1, [1, 8])])
def test_expert_ffn_writes_every_output_on_edge_shapes(act, N, d, f, counts):
    from helpers import experts

    x, off, w1, w2, b1, b2 = experts(N, d, f, len(counts), act, torch.float64, counts=counts, pad=2)
    leaves = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
    g = torch.randn(N + 2, d, dtype=torch.float64)
    with poisoned_empty():
        got = ops.expert_ffn(x, off, w1, w2, act, b1, b2)
        grads = torch.autograd.grad(got, leaves, g)
    want = reference.expert_ffn(x, off, w1, w2, act, b1, b2)
    torch.testing.assert_close(got, want)
    # The oracle's output is a constant when no expert has a row: every gradient is then zero.
    want_grads = (torch.autograd.grad(want, leaves, g, allow_unused=True) if want.requires_grad
                  else [None] * len(leaves))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)


# --- 3. an empty batch of sequences --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_empty_batch_with_sequence_capacity(shape, routing):
    layer = build(dict(num_experts=4, top_k=2, expert_capacity=2, capacity_scope="sequence", routing=routing))
    x = torch.randn(*shape, D, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    (out.sum() + layer.aux_loss + layer.z_loss).backward()
    assert x.grad.shape == x.shape and layer.dropped_fraction.item() == 0.0


# --- 5. activations at huge and non-finite pre-activations --------------------------------------

EXTREMES = [-3e38, -1e38, -1e10, -100.0, -88.9, -88.5, -20.0, -1.0, 0.0, 1.0, 20.0, 88.5, 100.0, 1e38, 3e38,
            -INF, INF, NAN]


def extreme_experts(values, act, dtype):
    """One expert, d = f = 1, unit weights: each row's pre-activations (gate and up alike) are
    exactly the given value, and y = act(h)."""
    x = torch.tensor(values, dtype=torch.float32).to(dtype).unsqueeze(1)
    width = 2 if act in ("swiglu", "clamped_swiglu") else 1
    w1 = torch.ones(1, width, 1, dtype=dtype)
    w2 = torch.ones(1, 1, 1, dtype=dtype)
    return x, torch.tensor([0, len(values)]), w1, w2


@pytest.mark.parametrize("act", ["silu", "swiglu", "clamped_swiglu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows", ["few", "many"])  # the dot-product path (<= 4 rows) and the BLAS path
def test_activations_at_extreme_pre_activations(act, dtype, rows):
    # Against the oracle in float64 on the same inputs: the exact values, which torch's own
    # float32 composites do not always reach (clamped_swiglu's gradient at -1e38 is 0 * inf there).
    chunks = [EXTREMES[i:i + 3] for i in range(0, len(EXTREMES), 3)] if rows == "few" else [EXTREMES]
    for chunk in chunks:
        x, off, w1, w2 = extreme_experts(chunk, act, dtype)
        xk = x.clone().requires_grad_()
        got = ops.expert_ffn(xk, off, w1, w2, act, swiglu_limit=7.0)
        x64 = x.double().requires_grad_()
        want = reference.expert_ffn(x64, off, w1.double(), w2.double(), act, swiglu_limit=7.0)
        torch.testing.assert_close(got, want.to(dtype), equal_nan=True, msg=lambda m: f"{act} {chunk}: {m}")
        got_grad = torch.autograd.grad(got, xk, torch.ones_like(got))[0]
        want_grad = torch.autograd.grad(want, x64, torch.ones_like(want))[0]
        torch.testing.assert_close(got_grad, want_grad.to(dtype), equal_nan=True,
                                   msg=lambda m: f"{act} grad {chunk}: {m}")


def test_silu_of_huge_negative_is_zero_not_a_clamped_value():
    x, off, w1, w2 = extreme_experts([-1e38, -3e38, -INF], "silu", torch.float32)
    y = ops.expert_ffn(x, off, w1, w2, "silu").flatten()
    assert y[0] == 0 and y[1] == 0 and y[2].isnan()  # torch: silu(-inf) is NaN


# --- 6. double backward: supported or a clear error, never a silent zero -------------------------


def test_route_double_backward_is_a_clear_error():
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weights, _ = ops.route(logits, 2)
    (grad,) = torch.autograd.grad(weights.square().sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported by sparsemoe\.route"):
        grad.square().sum().backward()


def test_expert_ffn_double_backward_is_a_clear_error():
    from helpers import experts

    x, off, w1, w2, _, _ = experts(6, 4, 3, 2, "swiglu", torch.float64)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(ops.expert_ffn(x, off, w1, w2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported by sparsemoe\.expert_ffn"):
        grad.square().sum().backward()


def test_gradient_penalty_on_the_layer_is_a_clear_error():
    layer = build(dict(num_experts=4, top_k=2), torch.float64)
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported by sparsemoe\."):
        grad.norm().backward()


def test_double_backward_of_the_index_ops():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ids = random_ids(5, 4, 2)
    x_sorted, _, slot = ops.dispatch(x, ids, 4)
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(x_sorted.shape, dtype=torch.float64, requires_grad=True)
    src = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda r, w: ops.combine(r, slot, w), (rows, w))
    assert torch.autograd.gradgradcheck(lambda s, w: ops.scatter_rows(s, slot, w, 10), (src, w))
    assert torch.autograd.gradgradcheck(lambda a, b: ops.slot_dot(a, b, slot), (src, rows))
    assert torch.autograd.gradgradcheck(lambda t: ops.dispatch(t, ids, 4)[0], (x,))


# --- 8. float16 clamped SwiGLU gradients outside the clamps ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_clamped_swiglu_gradient_outside_the_clamps_is_zero_not_nan(dtype):
    # gate 8 > limit, up 100 > limit: both clamps are flat there, so the gradient is exactly 0
    # even where grad * ... overflows (1e4 * 7 > float16's 65504).
    x = torch.tensor([[1.0], [1.0]], dtype=dtype)
    w1 = torch.tensor([[[8.0], [100.0]]], dtype=dtype)
    w2 = torch.ones(1, 1, 1, dtype=dtype)
    off = torch.tensor([0, 2])
    g = torch.full((2, 1), 1e4 if dtype == torch.float16 else 1e38, dtype=dtype)
    got = torch.autograd.grad(ops.expert_ffn(x.requires_grad_(), off, w1, w2, "clamped_swiglu"), x, g)[0]
    xr = x.detach().clone().requires_grad_()
    want = torch.autograd.grad(reference.expert_ffn(xr, off, w1, w2, "clamped_swiglu"), xr, g)[0]
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)


# --- 9. repeated slots: refused in both directions --------------------------------------------------


def test_repeated_slots_are_refused_by_every_slot_op():
    rows, a = torch.randn(8, 3), torch.randn(4, 3)
    slot = torch.tensor([[0, 1], [2, 1], [4, 5], [6, 7]])
    weights = torch.rand(4, 2)
    match = r"slot: expected distinct rows \(each buffer row belongs to one pick\), row 1 appears twice"
    for call in (lambda: ops.combine(rows, slot, weights), lambda: ops.combine(rows, slot),
                 lambda: ops.scatter_rows(a, slot, weights, 8), lambda: ops.slot_dot(a, rows, slot)):
        with pytest.raises(RuntimeError, match=match):
            call()
    dropped = torch.tensor([[0, -1], [2, -1], [4, 5], [6, 7]])  # -1 may repeat: it is no row
    ops.combine(rows, dropped, weights)


# --- 10. late or unclear errors ---------------------------------------------------------------------


def test_layer_on_the_meta_device():
    with torch.device("meta"):
        layer = MoELayer(D, FF, 4, 2, shared_expert_d_ff=6, capacity_factor=1.0, capacity_scope="sequence")
        out = layer(torch.randn(3, 5, D))
    assert out.device.type == "meta" and out.shape == (3, 5, D)
    assert layer.aux_loss.device.type == "meta"


def test_unused_swiglu_limit_is_not_checked():
    # Only clamped_swiglu reads the limit: other activations accept any value, in the layer and the op.
    layer = MoELayer(D, FF, 4, 2, activation="relu", swiglu_limit=-1.0)
    assert layer(torch.randn(3, D)).shape == (3, D)
    from helpers import experts

    x, off, w1, w2, _, _ = experts(5, 4, 3, 2, "gelu")
    ops.expert_ffn(x, off, w1, w2, "gelu", swiglu_limit=0.0)
    with pytest.raises(ValueError, match=r"^swiglu_limit: expected a positive clamp limit for clamped_swiglu"):
        MoELayer(D, FF, 4, 2, activation="clamped_swiglu", swiglu_limit=0.0)


def test_route_backward_refuses_repeated_ids():
    with pytest.raises(RuntimeError, match="expert_ids: row 1 picks expert 2 more than once"):
        torch.ops.sparsemoe.route_backward(torch.randn(3, 2), torch.randn(3, 4), torch.tensor([[0, 1], [2, 2], [0, 3]]),
                                           True, "softmax", 1.0)


# --- 11. the oracle: a dropped pick adds nothing, whatever its row holds ---------------------------


def test_dropped_picks_add_nothing_even_when_their_rows_are_nan():
    rows = torch.randn(6, 3)
    rows[2] = NAN
    rows[4] = INF
    slot = torch.tensor([[0, -1], [1, 3], [-1, 5]])
    weights = torch.tensor([[0.5, NAN], [0.2, 0.8], [INF, 1.0]])
    a = torch.randn(3, 3)
    for impl in (ops, reference):
        out = impl.combine(rows, slot, weights)
        assert torch.isfinite(out).all(), impl.__name__
        dots = impl.slot_dot(a, rows, slot)
        assert torch.isfinite(dots).all() and dots[0, 1] == 0 and dots[2, 0] == 0, impl.__name__
    torch.testing.assert_close(ops.combine(rows, slot, weights), reference.combine(rows, slot, weights))
    torch.testing.assert_close(ops.slot_dot(a, rows, slot), reference.slot_dot(a, rows, slot))


# --- the README's NaN/inf contracts for inputs and weights ------------------------------------------


def test_a_nan_token_reaches_only_its_own_output():
    layer = build(dict(num_experts=4, top_k=2, shared_expert_d_ff=6), torch.float64, seed=5)
    x = torch.randn(9, D, dtype=torch.float64)
    x[3, 2] = NAN
    x[6, 0] = INF
    out = layer(x)
    bad = torch.zeros(9, dtype=torch.bool)
    bad[[3, 6]] = True
    assert out[bad].isnan().any(-1).all()
    clean = layer(x[~bad])
    torch.testing.assert_close(out[~bad], clean, rtol=1e-12, atol=1e-12)


def test_nan_expert_weights_reach_only_the_tokens_routed_to_that_expert():
    layer = build(dict(num_experts=4, top_k=1), torch.float64, seed=6)
    with torch.no_grad():
        layer.down_proj[2, 0, 0] = NAN
    x = torch.randn(40, D, dtype=torch.float64)
    out = layer(x)
    _, ids = ops.route(layer.router_logits, 1)
    on_2 = ids[:, 0] == 2
    assert on_2.any() and (~on_2).any()
    assert out[on_2].isnan().any(-1).all() and torch.isfinite(out[~on_2]).all()


def test_layer_bitwise_repeatable_and_close_across_thread_counts():
    # The README: bitwise repeatable for a given thread count; another thread count agrees to
    # float rounding (the column blocking follows the threads).
    layer = build(dict(num_experts=8, top_k=2), torch.float32, seed=7, d=64, f=96)
    x = torch.randn(300, 64, requires_grad=True)
    threads = torch.get_num_threads()

    def step(n):
        torch.set_num_threads(n)
        try:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = layer(x)
            F.mse_loss(out, torch.ones_like(out)).backward()
            return out.detach(), x.grad.clone(), layer.gate_up_proj.grad.clone()
        finally:
            torch.set_num_threads(threads)

    first, again, one = step(threads), step(threads), step(1)
    for a, b, c in zip(first, again, one):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
