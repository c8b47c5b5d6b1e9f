import pytest
import torch

from sparsemoe import ops, reference
from helpers import assert_grads_close, lowp_tolerance

ACTS = ops.ACTIVATIONS


def experts(N, d, f, E, act, dtype=torch.float32, counts=None):
    """x_sorted [N,d], offsets [E+1], w1 [E,F1,d], w2 [E,d,f] with a random (or given) split."""
    if counts is None:
        cuts = torch.sort(torch.randint(0, N + 1, (E - 1,))).values
        counts = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([N])]))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.as_tensor(counts).cumsum(0)])
    width = 2 * f if act in ops.GATED_ACTIVATIONS else f
    x = torch.randn(N, d).to(dtype)
    w1 = (torch.randn(E, width, d) / d**0.5).to(dtype)
    w2 = (torch.randn(E, d, f) / f**0.5).to(dtype)
    return x, offsets, w1, w2


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N,d,f,E", [(40, 16, 12, 4), (1, 1, 3, 1), (130, 100, 40, 8), (64, 24, 8, 16)])
def test_forward_matches_reference(N, d, f, E, act):
    for dtype in (torch.float32, torch.float64):
        x, off, w1, w2 = experts(N, d, f, E, act, dtype)
        got = ops.expert_ffn(x, off, w1, w2, act)
        torch.testing.assert_close(got, reference.expert_ffn(x, off, w1, w2, act))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_low_precision_within_2x_plain_pytorch(dtype, act):
    x, off, w1, w2 = experts(96, 64, 48, 4, act, dtype)
    exact = reference.expert_ffn(x.double(), off, w1.double(), w2.double(), act)
    plain = reference.expert_ffn(x, off, w1, w2, act)
    got = ops.expert_ffn(x, off, w1, w2, act)
    assert got.dtype == dtype
    lowp_tolerance(got, plain, exact)


@pytest.mark.parametrize("act", ACTS)
def test_backward_matches_reference(act):
    for dtype in (torch.float32, torch.bfloat16):
        x, off, w1, w2 = experts(80, 32, 16, 6, act, dtype, counts=[20, 0, 30, 0, 25, 5])
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
        out = ops.expert_ffn(leaves[0], off, leaves[1], leaves[2], act)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, g)
        exact_leaves = [t.detach().double().requires_grad_() for t in (x, w1, w2)]
        exact = torch.autograd.grad(reference.expert_ffn(exact_leaves[0], off, *exact_leaves[1:], act),
                                    exact_leaves, g.double())
        plain_leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
        plain = torch.autograd.grad(reference.expert_ffn(plain_leaves[0], off, *plain_leaves[1:], act),
                                    plain_leaves, g)
        assert_grads_close(got, plain, exact, dtype)
        # Experts 1 and 3 own no rows: exactly zero weight gradients.
        for grad_w in got[1:]:
            assert torch.all(grad_w[1] == 0) and torch.all(grad_w[3] == 0)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(act):
    x, off, w1, w2 = experts(7, 4, 3, 3, act, torch.float64, counts=[3, 0, 4])
    leaves = [t.requires_grad_() for t in (x, w1, w2)]
    assert torch.autograd.gradcheck(lambda a, b, c: ops.expert_ffn(a, off, b, c, act), leaves)


@pytest.mark.parametrize("act", ["swiglu", "relu"])
def test_opcheck(act):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x, off, w1, w2 = experts(20, 8, 6, 4, act, dtype, counts=[5, 0, 10, 5])
        args = [t.requires_grad_() for t in (x, w1, w2)]
        torch.library.opcheck(torch.ops.sparsemoe.expert_ffn.default, (args[0], off, args[1], args[2], act))
        y, hidden = torch.ops.sparsemoe.expert_ffn(x.detach(), off, w1.detach(), w2.detach(), act)
        torch.library.opcheck(torch.ops.sparsemoe.expert_ffn_backward.default,
                              (torch.randn_like(y), x.detach(), off, w1.detach(), w2.detach(), hidden, act,
                               1.702, 7.0, False))


def test_single_expert_is_a_dense_ffn():
    x, off, w1, w2 = experts(50, 16, 8, 1, "swiglu", torch.float64)
    gate, up = (x @ w1[0].T).chunk(2, dim=-1)
    dense = (torch.nn.functional.silu(gate) * up) @ w2[0].T
    torch.testing.assert_close(ops.expert_ffn(x, off, w1, w2), dense)


def test_empty_and_all_rows_on_one_expert():
    x, off, w1, w2 = experts(0, 8, 4, 3, "swiglu")
    assert ops.expert_ffn(x, off, w1, w2).shape == (0, 8)
    x, off, w1, w2 = experts(30, 8, 4, 3, "swiglu", counts=[0, 30, 0])
    x.requires_grad_(), w1.requires_grad_(), w2.requires_grad_()
    out = ops.expert_ffn(x, off, w1, w2)
    torch.testing.assert_close(out, reference.expert_ffn(x, off, w1, w2))
    gx, g1, g2 = torch.autograd.grad(out.sum(), (x, w1, w2))
    assert torch.all(g1[0] == 0) and torch.all(g1[2] == 0) and torch.all(g2[[0, 2]] == 0)
    assert g1[1].abs().sum() > 0


def test_bitwise_repeatable():
    x, off, w1, w2 = experts(200, 64, 32, 8, "swiglu")
    leaves = [t.requires_grad_() for t in (x, w1, w2)]
    runs = []
    for _ in range(2):
        out = ops.expert_ffn(leaves[0], off, leaves[1], leaves[2])
        runs.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
