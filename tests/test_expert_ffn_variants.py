"""expert_ffn's variants: biases b1/b2, the GPT-OSS clamped SwiGLU, and capacity padding rows
(expert_offsets[E] < N), held to reference.expert_ffn and to formulas written out here."""

import pytest
import torch
import torch.nn.functional as F

from sparsemoe import ops, reference
from helpers import assert_grads_close, experts, hidden_pre_activation, kink_distance, lowp_tolerance

ACTS = ("swiglu", "clamped_swiglu", "silu", "gelu", "gelu_tanh", "relu")


def ffn(x, off, w1, w2, act, b1=None, b2=None, **kw):
    return ops.expert_ffn(x, off, w1, w2, act, b1=b1, b2=b2, **kw)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N,d,f,E", [(40, 16, 12, 4), (1, 1, 3, 1), (130, 100, 40, 8), (64, 24, 8, 16)])
def test_biases_match_reference(N, d, f, E, act):
    for use_b1, use_b2 in ((True, False), (False, True), (True, True)):
        for dtype in (torch.float32, torch.float64) if N < 100 else (torch.float32,):
            x, off, w1, w2, b1, b2 = experts(N, d, f, E, act, dtype)
            b1, b2 = (b1 if use_b1 else None), (b2 if use_b2 else None)
            got = ffn(x, off, w1, w2, act, b1, b2)
            assert got.dtype == dtype and got.shape == (N, d)
            torch.testing.assert_close(got, reference.expert_ffn(x, off, w1, w2, act, b1, b2))


@pytest.mark.parametrize("act", ["clamped_swiglu", "gelu"])
def test_larger_buffer_with_padding(act):
    x, off, w1, w2, b1, b2 = experts(700, 64, 96, 8, act, pad=150, x_scale=3.0)
    kw = {"swiglu_alpha": 1.2, "swiglu_limit": 2.5}
    got = ffn(x, off, w1, w2, act, b1, b2, **kw)
    want = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), act, b1.double(), b2.double(), **kw)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    assert torch.all(got[700:] == 0)


def test_zero_biases_equal_no_biases():
    for act in ACTS:
        x, off, w1, w2, b1, b2 = experts(50, 16, 8, 4, act)
        got = ffn(x, off, w1, w2, act, torch.zeros_like(b1), torch.zeros_like(b2))
        torch.testing.assert_close(got, ffn(x, off, w1, w2, act), rtol=0, atol=0)


def test_bias_formula_written_out():
    x, off, w1, w2, b1, b2 = experts(60, 12, 10, 3, "gelu", torch.float64, counts=[25, 0, 35])
    got = ffn(x, off, w1, w2, "gelu", b1, b2)
    for e, (lo, hi) in enumerate(((0, 25), (25, 25), (25, 60))):
        torch.testing.assert_close(got[lo:hi], F.gelu(x[lo:hi] @ w1[e].T + b1[e]) @ w2[e].T + b2[e])


# --- clamped SwiGLU ----------------------------------------------------------------------------------


def clamped_swiglu(gate, up, alpha, limit):
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


GATE = [-20.0, -9.0, -7.5, -3.0, -0.4, 0.0, 0.3, 1.1, 2.9, 3.2, 6.8, 7.4, 9.0, 40.0]
UP = [-50.0, -8.0, -7.2, -6.5, -3.3, -0.6, 0.0, 0.8, 2.5, 3.4, 6.9, 7.3, 12.0, 100.0]


@pytest.mark.parametrize("alpha,limit", [(None, None), (1.0, 3.0), (2.5, 0.5), (1.702, 7.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamped_swiglu_pointwise(alpha, limit, dtype):
    """Identity projections expose the activation: y = [act(gate, up), act(gate, up)]."""
    f = len(GATE)
    gate = torch.tensor(GATE, dtype=dtype)
    up = torch.tensor(UP, dtype=dtype)
    x = torch.stack([torch.cat([gate, up]), torch.cat([up, gate]), torch.cat([gate, gate.flip(0)])])
    x = x.requires_grad_()
    w1 = torch.eye(2 * f, dtype=dtype).unsqueeze(0)
    w2 = torch.cat([torch.eye(f, dtype=dtype)] * 2).unsqueeze(0)
    off = torch.tensor([0, 3])
    kw = {} if alpha is None else {"swiglu_alpha": alpha, "swiglu_limit": limit}
    a, lim = (1.702, 7.0) if alpha is None else (alpha, limit)
    y = ffn(x, off, w1, w2, "clamped_swiglu", **kw)
    xd = x.detach().clone().requires_grad_()
    want = clamped_swiglu(xd[:, :f], xd[:, f:], a, lim)
    # Both clamps matter: values beyond the limit on each side (gate is clamped above only).
    assert (xd[:, :f] > lim).any() and (xd[:, f:] > lim).any() and (xd[:, f:] < -lim).any()
    assert (xd[:, :f] < -lim).any()
    torch.testing.assert_close(y[:, :f], want)
    torch.testing.assert_close(y[:, f:], want)
    torch.testing.assert_close(y, reference.expert_ffn(x.detach(), off, w1, w2, "clamped_swiglu", **kw))
    g = torch.randn_like(want)
    (grad,) = torch.autograd.grad(y[:, :f], x, g)
    (grad_want,) = torch.autograd.grad(want, xd, g)
    torch.testing.assert_close(grad, grad_want)
    # Past the limit the clamped input gets no gradient.
    assert torch.all(grad[:, :f][xd[:, :f] > lim] == 0)
    assert torch.all(grad[:, f:][xd[:, f:].abs() > lim] == 0)


def test_clamped_swiglu_differs_from_swiglu_and_obeys_parameters():
    x, off, w1, w2, b1, b2 = experts(64, 16, 8, 4, "swiglu", torch.float64, x_scale=4.0)
    h = hidden_pre_activation(x, off, w1, b1)
    gate, up = h.chunk(2, -1)
    limit = 2.0
    assert (gate > limit).sum() > 20 and (up > limit).sum() > 20 and (up < -limit).sum() > 20
    got = ffn(x, off, w1, w2, "clamped_swiglu", b1, b2, swiglu_alpha=1.3, swiglu_limit=limit)
    torch.testing.assert_close(got, reference.expert_ffn(x, off, w1, w2, "clamped_swiglu", b1, b2, 1.3, limit))
    unclamped = reference.expert_ffn(x, off, w1, w2, "clamped_swiglu", b1, b2, 1.3, 1e30)
    assert (got - unclamped).abs().max() > 1.0
    default = ffn(x, off, w1, w2, "clamped_swiglu", b1, b2)
    torch.testing.assert_close(default, reference.expert_ffn(x, off, w1, w2, "clamped_swiglu", b1, b2, 1.702, 7.0))
    assert (default - got).abs().max() > 1.0
    # The SwiGLU parameters are ignored by every other activation.
    for act in ("swiglu", "silu"):
        xs, o, a1, a2, c1, c2 = experts(20, 8, 4, 2, act, torch.float64)
        torch.testing.assert_close(ffn(xs, o, a1, a2, act, c1, c2, swiglu_alpha=3.0, swiglu_limit=0.1),
                                   ffn(xs, o, a1, a2, act, c1, c2))


# --- capacity padding and empty experts --------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_padding_rows_give_zero_and_get_zero_grads(act):
    for dtype in (torch.float32, torch.float64):
        x, off, w1, w2, b1, b2 = experts(40, 16, 8, 5, act, dtype, counts=[10, 0, 15, 15, 0], pad=13)
        x = x.requires_grad_()
        leaves = [x, w1.requires_grad_(), w2.requires_grad_(), b1.requires_grad_(), b2.requires_grad_()]
        y = ffn(x, off, w1, w2, act, b1, b2)
        assert y.shape == (53, 16)
        assert torch.all(y[40:] == 0)
        g = torch.randn_like(y)  # nonzero upstream gradient on the padding rows too
        grads = torch.autograd.grad(y, leaves, g)
        assert torch.all(grads[0][40:] == 0)
        exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
        want = reference.expert_ffn(exact_leaves[0], off, *exact_leaves[1:3], act, *exact_leaves[3:])
        torch.testing.assert_close(y, want.to(dtype))
        for a, e in zip(grads, torch.autograd.grad(want, exact_leaves, g.double())):
            torch.testing.assert_close(a, e.to(dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["swiglu", "clamped_swiglu", "gelu"])
def test_padding_rows_are_never_read(act):
    # Padding rows of a buffer need not hold zeros: even NaN and inf there must not leak.
    x, off, w1, w2, b1, b2 = experts(30, 8, 6, 3, act, counts=[10, 20, 0], pad=6)
    x[30:] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, 0.0, 3.0]).unsqueeze(1)
    leaves = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
    y = ffn(x, off, w1, w2, act, b1, b2)
    assert torch.all(y[30:] == 0) and torch.isfinite(y).all()
    torch.testing.assert_close(y[:30], reference.expert_ffn(x[:30].detach(), off, w1.detach(), w2.detach(), act,
                                                            b1.detach(), b2.detach()))
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][30:] == 0)


def test_only_padding_rows():
    x, off, w1, w2, b1, b2 = experts(0, 8, 4, 3, "clamped_swiglu", pad=5)
    leaves = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
    y = ffn(x, off, w1, w2, "clamped_swiglu", b1, b2)
    assert y.shape == (5, 8) and torch.all(y == 0)
    assert all(torch.all(g == 0) for g in torch.autograd.grad(y, leaves, torch.randn_like(y)))


@pytest.mark.parametrize("act", ACTS)
def test_backward_matches_reference_and_empty_experts_get_zero_grads(act):
    for dtype in (torch.float32, torch.bfloat16):
        x, off, w1, w2, b1, b2 = experts(80, 32, 16, 6, act, dtype, counts=[20, 0, 30, 0, 25, 5], pad=9)
        kw = {"swiglu_alpha": 1.5, "swiglu_limit": 1.5} if act == "clamped_swiglu" else {}
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b1, b2)]
        out = ffn(leaves[0], off, *leaves[1:3], act, *leaves[3:], **kw)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, g)
        exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
        exact = torch.autograd.grad(reference.expert_ffn(exact_leaves[0], off, *exact_leaves[1:3], act,
                                                         *exact_leaves[3:], **kw), exact_leaves, g.double())
        plain_leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b1, b2)]
        plain = torch.autograd.grad(reference.expert_ffn(plain_leaves[0], off, *plain_leaves[1:3], act,
                                                         *plain_leaves[3:], **kw), plain_leaves, g)
        assert_grads_close(got, plain, exact, dtype)
        # Experts 1 and 3 own no rows: exactly zero gradients for their weights and biases.
        for grad_param in got[1:]:
            assert torch.all(grad_param[1] == 0) and torch.all(grad_param[3] == 0)
            assert grad_param[0].abs().sum() > 0
        assert torch.all(got[0][80:] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["clamped_swiglu", "swiglu", "gelu"])
def test_low_precision_within_2x_plain_pytorch(dtype, act):
    x, off, w1, w2, b1, b2 = experts(96, 64, 48, 4, act, dtype, pad=11, x_scale=2.0)
    kw = {"swiglu_alpha": 1.702, "swiglu_limit": 1.0} if act == "clamped_swiglu" else {}
    exact = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), act, b1.double(), b2.double(), **kw)
    plain = reference.expert_ffn(x, off, w1, w2, act, b1, b2, **kw)
    got = ffn(x, off, w1, w2, act, b1, b2, **kw)
    assert got.dtype == dtype
    lowp_tolerance(got, plain, exact)


# --- gradcheck and opcheck ---------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(act):
    limit = 1.0
    x, off, w1, w2, b1, b2 = experts(7, 4, 3, 3, act, torch.float64, counts=[3, 0, 4], pad=2, x_scale=2.0)
    # Values stay away from the clamps' and relu's kinks (finite differences step 1e-6) ...
    assert kink_distance(x, off, w1, b1, act, limit) > 1e-3
    if act == "clamped_swiglu":  # ... yet both clamps are active somewhere.
        gate, up = hidden_pre_activation(x, off, w1, b1).chunk(2, -1)
        assert (gate > limit).any() and (up.abs() > limit).any() and (up.abs() < limit).any()
    leaves = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
    fn = lambda a, c, d, e, h: ffn(a, off, c, d, act, e, h, swiglu_alpha=1.702, swiglu_limit=limit)
    assert torch.autograd.gradcheck(fn, leaves)


OPCHECK_CASES = [  # activation, dtype, b1, b2, padding rows
    ("clamped_swiglu", torch.float32, True, True, 3),
    ("clamped_swiglu", torch.bfloat16, True, True, 0),
    ("clamped_swiglu", torch.float64, False, True, 2),
    ("relu", torch.float32, True, False, 4),
]


@pytest.mark.parametrize("act,dtype,use_b1,use_b2,pad", OPCHECK_CASES)
def test_opcheck(act, dtype, use_b1, use_b2, pad):
    x, off, w1, w2, b1, b2 = experts(20, 8, 6, 4, act, dtype, counts=[5, 0, 10, 5], pad=pad, x_scale=3.0)
    args = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
    torch.library.opcheck(torch.ops.sparsemoe.expert_ffn.default,
                          (args[0], off, args[1], args[2], act, args[3] if use_b1 else None,
                           args[4] if use_b2 else None, 1.702, 2.0))
    if dtype == torch.bfloat16:
        return
    b1 = b1 if use_b1 else None
    y, hidden = torch.ops.sparsemoe.expert_ffn(x.detach(), off, w1.detach(), w2.detach(), act,
                                               None if b1 is None else b1.detach(), None, 1.702, 2.0)
    torch.library.opcheck(torch.ops.sparsemoe.expert_ffn_backward.default,
                          (torch.randn_like(y), x.detach(), off, w1.detach(), w2.detach(), hidden, act, 1.702, 2.0,
                           use_b1 or use_b2))
