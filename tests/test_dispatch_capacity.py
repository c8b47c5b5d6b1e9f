"""dispatch with expert capacity (position or probability priority, token groups), held to
reference.dispatch, to a loop written out here, and to a GShard-style dense drop-and-pad layer."""

import pytest
import torch
import torch.nn.functional as F

from sparsemoe import ops, reference
from helpers import make_priority, random_ids


def dispatch(x, ids, E, capacity=-1, priority=None, token_groups=1):
    return ops.dispatch(x, ids, E, capacity=capacity, priority=priority, token_groups=token_groups)


def expected_keep(ids, E, capacity, priority=None, token_groups=1):
    """Which picks survive, by the contract: per (expert, token group) the `capacity` best picks,
    best = higher priority, ties (and priority None) to the earlier token."""
    T, k = ids.shape
    if capacity < 0:
        return torch.ones(T, k, dtype=torch.bool)
    keep = torch.zeros(T, k, dtype=torch.bool)
    size = T // token_groups if token_groups else T
    for g in range(token_groups):
        lo = g * size
        for e in range(E):
            picks = [(lo + t, j) for t, j in torch.nonzero(ids[lo:lo + size] == e).tolist()]  # token order
            if priority is not None:
                picks.sort(key=lambda p: -priority[p[0], p[1]].item())  # stable: ties keep token order
            for t, j in picks[:capacity]:
                keep[t, j] = True
    return keep


def check_contract(x, ids, E, capacity, priority, token_groups, out):
    x_sorted, offsets, slot = out
    T, k = ids.shape
    N = T * k if capacity < 0 else min(T * k, E * token_groups * capacity)
    assert x_sorted.shape == (N, x.shape[1]) and x_sorted.dtype == x.dtype
    assert offsets.dtype == torch.int64 and slot.dtype == torch.int64 and slot.shape == (T, k)
    keep = expected_keep(ids, E, capacity, priority, token_groups)
    assert torch.equal(slot >= 0, keep)
    assert torch.all((slot == -1) | (slot >= 0))
    counts = torch.bincount(ids[keep], minlength=E)
    assert offsets.tolist() == [0] + counts.cumsum(0).tolist()
    if capacity >= 0:
        assert counts.max().item() <= token_groups * capacity
    for e in range(E):
        t, j = torch.nonzero(keep & (ids == e), as_tuple=True)  # token order
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        assert slot[t, j].tolist() == list(range(lo, hi))
        assert torch.equal(x_sorted[lo:hi], x[t])
    assert torch.all(x_sorted[offsets[E]:] == 0)


CASES = [  # T, d, E, k, token group choices
    (48, 8, 8, 2, (1, 2, 4)),
    (60, 5, 4, 4, (1, 3)),
    (7, 3, 5, 1, (1, 7)),
    (96, 16, 16, 3, (1, 2)),
]


@pytest.mark.parametrize("T,d,E,k,groups", CASES)
@pytest.mark.parametrize("capacity", [0, 1, 3, "T"])
@pytest.mark.parametrize("priority_kind", [None, "rand", "ties"])
def test_matches_reference_and_contract(T, d, E, k, groups, capacity, priority_kind):
    capacity = T if capacity == "T" else capacity
    ids = random_ids(T, E, k)
    priority = make_priority(priority_kind, T, k)
    for G in groups:
        for dtype in (torch.float32, torch.bfloat16) if capacity != 1 else (torch.float64, torch.float16):
            x = torch.randn(T, d).to(dtype)
            got = dispatch(x, ids, E, capacity, priority, G)
            want = reference.dispatch(x, ids, E, capacity, priority, G)
            for g, w in zip(got, want):  # rows are copied: exact at every dtype
                assert g.shape == w.shape and torch.equal(g, w)
            if dtype in (torch.float32, torch.float64):
                check_contract(x, ids, E, capacity, priority, G, got)


@pytest.mark.parametrize("priority_kind,G", [(None, 1), ("rand", 4), ("ties", 8)])
def test_large_batch_matches_reference(priority_kind, G):
    T, E, k = 4096, 16, 4
    x = torch.randn(T, 8)
    ids = random_ids(T, E, k)
    priority = make_priority(priority_kind, T, k)
    for capacity in (0, 37, T * k // (E * G)):
        got = dispatch(x, ids, E, capacity, priority, G)
        want = reference.dispatch(x, ids, E, capacity, priority, G)
        assert all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, want))


def test_position_priority_layout():
    x = torch.arange(6.0).unsqueeze(1)
    ids = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1], [2, 1], [1, 2]])
    x_sorted, offsets, slot = dispatch(x, ids, 3, capacity=2)
    # Expert 0 is picked by tokens 0, 1, 2, 3: keeps 0 and 1. Expert 1 by 0, 1, 3, 4, 5: keeps 0, 1.
    # Expert 2 by 2, 4, 5: keeps 2, 4. N = min(12, 3 * 2) = 6.
    assert offsets.tolist() == [0, 2, 4, 6]
    assert x_sorted.squeeze(1).tolist() == [0, 1, 0, 1, 2, 4]
    assert slot.tolist() == [[0, 2], [3, 1], [-1, 4], [-1, -1], [5, -1], [-1, -1]]
    # Two token groups of 3: capacity 1 per (expert, group).
    x_sorted, offsets, slot = dispatch(x, ids, 3, capacity=1, token_groups=2)
    assert offsets.tolist() == [0, 2, 4, 6]
    assert x_sorted.squeeze(1).tolist() == [0, 3, 0, 3, 2, 4]
    assert slot.tolist() == [[0, 2], [-1, -1], [-1, 4], [1, 3], [5, -1], [-1, -1]]


def test_probability_priority_layout():
    x = torch.arange(4.0).unsqueeze(1)
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    priority = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.7, 0.5], [0.2, 0.9]])
    x_sorted, offsets, slot = dispatch(x, ids, 2, capacity=2, priority=priority)
    # Expert 0: token 3 (0.9), then tokens 1 and 2 tie at 0.7 -> token 1. Rows in token order.
    # Expert 1: token 0 (0.9), token 2 (0.5).
    assert offsets.tolist() == [0, 2, 4]
    assert x_sorted.squeeze(1).tolist() == [1, 3, 0, 2]
    assert slot.tolist() == [[-1, 2], [0, -1], [-1, 3], [-1, 1]]


def test_capacity_zero_drops_everything():
    x = torch.randn(12, 4, requires_grad=True)
    ids = random_ids(12, 4, 2)
    for G, priority in ((1, None), (3, torch.rand(12, 2))):
        x_sorted, offsets, slot = dispatch(x, ids, 4, capacity=0, priority=priority, token_groups=G)
        assert x_sorted.shape == (0, 4) and offsets.tolist() == [0] * 5 and torch.all(slot == -1)
        out = ops.combine(x_sorted, slot, torch.ones(12, 2))
        assert torch.equal(out, torch.zeros(12, 4))
        (grad,) = torch.autograd.grad(out, x, torch.randn(12, 4))
        assert torch.equal(grad, torch.zeros(12, 4))


@pytest.mark.parametrize("capacity", ["T", "T+3", 2**31, 2**40])
@pytest.mark.parametrize("G", [1, 2])
def test_large_capacity_equals_dropless(capacity, G):
    T, E, k = 50, 6, 3
    capacity = {"T": T, "T+3": T + 3}.get(capacity, capacity)
    x = torch.randn(T, 8)
    ids = random_ids(T, E, k)
    dropless = dispatch(x, ids, E)
    for priority in (None, torch.rand(T, k)):
        got = dispatch(x, ids, E, capacity, priority, G)
        assert all(torch.equal(a, b) for a, b in zip(got, dropless))


def test_buffer_size_and_padding():
    T, E, k = 40, 4, 2
    x = torch.randn(T, 6) + 10  # no row of x is zero
    for capacity, G in ((3, 1), (3, 2), (5, 4), (9, 1), (10, 2), (20, 1)):
        ids = torch.zeros(T, k, dtype=torch.long)
        ids[:, 1] = 1 + torch.arange(T) % 3  # expert 0 overloaded, 1..3 light
        x_sorted, offsets, slot = dispatch(x, ids, E, capacity=capacity, token_groups=G)
        N = min(T * k, E * G * capacity)
        assert x_sorted.shape[0] == N
        kept = offsets[E].item()
        assert kept == (slot >= 0).sum().item() <= N
        assert torch.all(x_sorted[kept:] == 0) and torch.all(x_sorted[:kept] != 0)
        assert offsets[1] - offsets[0] == min(G * capacity, T)


@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_then_combine_keeps_only_kept_picks(k):
    T, E = 64, 8
    x = torch.randn(T, 32, requires_grad=True)
    ids = random_ids(T, E, k)
    for priority, G, capacity in ((None, 1, 5), (torch.rand(T, k), 1, 5), (None, 4, 1), (torch.rand(T, k), 2, 2)):
        x_sorted, _, slot = dispatch(x, ids, E, capacity=capacity, priority=priority, token_groups=G)
        kept = (slot >= 0).sum(1, keepdim=True)
        assert (kept == 0).any() and (kept == k).any()
        out = ops.combine(x_sorted, slot, torch.ones(T, k))
        assert torch.equal(out, x.detach() * kept)  # identity on kept picks, 0 for dropped tokens
        g = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, x, g)
        assert torch.equal(grad, g * kept)


def test_kept_rows_stay_in_token_order_with_priority():
    T, E, k = 200, 8, 2
    ids = random_ids(T, E, k)
    x = torch.arange(T, dtype=torch.float64).unsqueeze(1)
    x_sorted, offsets, _ = dispatch(x, ids, E, capacity=12, priority=torch.rand(T, k), token_groups=2)
    for e in range(E):
        tokens = x_sorted[offsets[e]:offsets[e + 1], 0]
        assert torch.all(tokens[1:] > tokens[:-1])


def test_empty_tokens():
    for G in (1, 3):
        x_sorted, offsets, slot = dispatch(torch.randn(0, 8), torch.empty(0, 2, dtype=torch.long), 4,
                                           capacity=2, priority=torch.rand(0, 2), token_groups=G)
        assert x_sorted.shape == (0, 8) and offsets.tolist() == [0] * 5 and slot.shape == (0, 2)


def test_non_contiguous_inputs():
    x = torch.randn(20, 16)[:, ::2]
    ids = random_ids(20, 6, 2).t().contiguous().t()
    priority = torch.rand(2, 20).t()
    got = dispatch(x, ids, 6, 3, priority, 2)
    want = reference.dispatch(x.contiguous(), ids.contiguous(), 6, 3, priority.contiguous(), 2)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# --- gradients and opcheck -------------------------------------------------------------------


@pytest.mark.parametrize("capacity,priority_kind,G", [(2, None, 1), (1, "rand", 2), (0, None, 1),
                                                      (1, "ties", 4), (100, "rand", 1)])
def test_gradcheck(capacity, priority_kind, G):
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    ids = random_ids(8, 4, 2)
    priority = make_priority(priority_kind, 8, 2)
    fn = lambda t: dispatch(t, ids, 4, capacity, priority, G)[0]
    assert torch.autograd.gradcheck(fn, (x,))
    if priority_kind == "rand":
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_opcheck():
    op = torch.ops.sparsemoe.dispatch.default
    ids = random_ids(20, 8, 3)
    for dtype, capacity, priority, G in ((torch.float32, 2, None, 4), (torch.bfloat16, 3, torch.rand(20, 3), 2),
                                         (torch.float64, 1, torch.rand(20, 3), 1)):
        x = torch.randn(20, 6, dtype=dtype, requires_grad=True)
        torch.library.opcheck(op, (x, ids, 8, capacity, priority, G))


# --- layer-level math: drop-and-pad (GShard einsums) equals drop-only ------------------------------


def dense_drop_and_pad(x, weights, ids, E, capacity, priority, G, w1, w2):
    """GShard-style MoE: one-hot dispatch mask [T, E, G*C], expert inputs padded to capacity,
    dense einsums, combine tensor carrying the router weights of the kept picks."""
    T, k = ids.shape
    keep = expected_keep(ids, E, capacity, priority, G)
    pos = torch.zeros(T, k, dtype=torch.long)
    size = T // G
    for g in range(G):
        for e in range(E):
            t, j = torch.nonzero(keep[g * size:(g + 1) * size] & (ids[g * size:(g + 1) * size] == e), as_tuple=True)
            pos[g * size + t, j] = g * capacity + torch.arange(t.numel())
    one_hot = (F.one_hot(ids, E).unsqueeze(-1) * F.one_hot(pos, G * capacity).unsqueeze(2)).to(x.dtype)
    one_hot = one_hot * keep[:, :, None, None]                                  # [T, k, E, G*C]
    dispatch_mask = one_hot.sum(1)                                             # [T, E, G*C]
    combine_weights = (one_hot * weights[:, :, None, None]).sum(1)             # [T, E, G*C]
    expert_in = torch.einsum("tec,td->ecd", dispatch_mask, x)                 # [E, G*C, d]
    gate, up = torch.einsum("ecd,efd->ecf", expert_in, w1).chunk(2, dim=-1)
    expert_out = torch.einsum("ecf,edf->ecd", F.silu(gate) * up, w2)
    return torch.einsum("tec,ecd->td", combine_weights, expert_out)


@pytest.mark.parametrize("priority_kind", ["position", "probability"])
@pytest.mark.parametrize("capacity,G", [(6, 1), (4, 2), (3, 3), (1, 1), (40, 1)])
def test_layer_math_equals_dense_drop_and_pad(priority_kind, capacity, G):
    T, d, f, E, k = 36, 8, 6, 4, 2
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    router = torch.randn(E, d, dtype=torch.float64).requires_grad_()
    w1 = (torch.randn(E, 2 * f, d, dtype=torch.float64) / d**0.5).requires_grad_()
    w2 = (torch.randn(E, d, f, dtype=torch.float64) / f**0.5).requires_grad_()
    leaves = (x, router, w1, w2)

    weights, ids = ops.route(x @ router.T, k, True)
    priority = weights.detach() if priority_kind == "probability" else None
    x_sorted, offsets, slot = dispatch(x, ids, E, capacity, priority, G)
    out = ops.combine(ops.expert_ffn(x_sorted, offsets, w1, w2, "swiglu"), slot, weights)

    weights_ref, ids_ref = reference.route(x @ router.T, k, True)
    assert torch.equal(ids, ids_ref)
    dense = dense_drop_and_pad(x, weights_ref, ids, E, capacity, priority, G, w1, w2)
    torch.testing.assert_close(out, dense)
    if 0 < capacity < T:
        assert (slot < 0).any()
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(dense, leaves, g)):
        torch.testing.assert_close(a, b)


# --- expert choice -------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,C,G", [(40, 8, 10, 1), (64, 4, 5, 1), (30, 6, 30, 1), (48, 8, 6, 2), (12, 3, 1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_choice_keeps_each_experts_top_tokens(T, E, C, G, dtype):
    x = torch.randn(T, 5, dtype=dtype)
    logits = torch.randn(T, E, dtype=dtype)
    weights, ids = ops.route(logits, E, False)
    x_sorted, offsets, slot = dispatch(x, ids, E, capacity=C, priority=weights, token_groups=G)
    probs = torch.softmax(logits, -1)
    S = T // G
    assert x_sorted.shape[0] == min(T * E, E * G * C)
    assert torch.equal(offsets.diff(), torch.full((E,), G * min(C, S)))
    for e in range(E):
        t, j = torch.nonzero((ids == e) & (slot >= 0), as_tuple=True)
        want = torch.cat([g * S + probs[g * S:(g + 1) * S, e].topk(min(C, S)).indices for g in range(G)])
        assert sorted(t.tolist()) == sorted(want.tolist())
        assert torch.equal(x_sorted[offsets[e]:offsets[e + 1]], x[t])  # token order
    # Each token's output mixes the experts that chose it, weighted by their probabilities.
    out = ops.combine(x_sorted, slot, weights)
    chosen = torch.zeros(T, E, dtype=dtype).scatter_(1, ids, (slot >= 0).to(dtype))
    torch.testing.assert_close(out, x * (probs * chosen).sum(1, keepdim=True))
