import pytest
import torch

from sparsemoe import ops, reference


def random_ids(T, E, k):
    return torch.rand(T, E).argsort(dim=1)[:, :k].contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,d,E,k", [(50, 16, 8, 2), (1, 1, 4, 4), (300, 100, 64, 8), (5000, 3, 16, 1)])
def test_matches_reference(T, d, E, k, dtype):
    x = torch.randn(T, d).to(dtype)
    ids = random_ids(T, E, k)
    got = ops.dispatch(x, ids, E)
    want = reference.dispatch(x, ids, E)
    for g, w in zip(got, want):  # a permutation of rows: exact at every dtype
        assert torch.equal(g, w)


def test_layout_contract():
    x = torch.arange(4.0).unsqueeze(1)
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    x_sorted, offsets, slot = ops.dispatch(x, ids, 4)
    assert offsets.tolist() == [0, 3, 5, 8, 8]  # expert 3 owns no rows
    assert x_sorted.squeeze(1).tolist() == [0, 1, 3, 1, 2, 0, 2, 3]  # token order per expert
    assert slot.tolist() == [[5, 0], [1, 3], [6, 4], [2, 7]]
    assert offsets.dtype == torch.int64 and slot.dtype == torch.int64


def test_empty_and_single_token():
    x_sorted, offsets, slot = ops.dispatch(torch.randn(0, 8), torch.empty(0, 2, dtype=torch.long), 4)
    assert x_sorted.shape == (0, 8) and offsets.tolist() == [0] * 5 and slot.shape == (0, 2)
    x = torch.randn(1, 8)
    x_sorted, offsets, slot = ops.dispatch(x, torch.tensor([[3, 1]]), 4)
    assert offsets.tolist() == [0, 0, 1, 1, 2] and torch.equal(x_sorted, x.expand(2, 8))


def test_all_tokens_on_one_expert():
    x = torch.randn(100, 4)
    x_sorted, offsets, slot = ops.dispatch(x, torch.full((100, 1), 2), 5)
    assert offsets.tolist() == [0, 0, 0, 100, 100, 100]
    assert torch.equal(x_sorted, x) and torch.equal(slot.squeeze(1), torch.arange(100))


def test_dispatch_then_combine_is_identity():
    x = torch.randn(64, 32, requires_grad=True)
    ids = random_ids(64, 8, 1)
    x_sorted, _, slot = ops.dispatch(x, ids, 8)
    out = ops.combine(x_sorted, slot, torch.ones(64, 1))
    assert torch.equal(out, x)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.equal(grad, g)
    # With k picks and unit weights every token comes back k times.
    ids = random_ids(64, 8, 2)
    x_sorted, _, slot = ops.dispatch(x, ids, 8)
    assert torch.equal(ops.combine(x_sorted, slot), 2 * x)


def test_independent_of_batch_split_and_threads():
    x = torch.randn(3000, 8)
    ids = random_ids(3000, 16, 4)
    x_sorted, offsets, slot = ops.dispatch(x, ids, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = ops.dispatch(x, ids, 16)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip((x_sorted, offsets, slot), again))
    # Rows of the first half, per expert, are the first rows of that expert's segment.
    first = ops.dispatch(x[:1000], ids[:1000], 16)
    for e in range(16):
        n = int(first[1][e + 1] - first[1][e])
        assert torch.equal(first[0][first[1][e]:first[1][e + 1]], x_sorted[offsets[e]:offsets[e] + n])


def test_backward_is_gather_sum_and_gradcheck():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    ids = random_ids(6, 4, 3)
    assert torch.autograd.gradcheck(lambda t: ops.dispatch(t, ids, 4)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.dispatch(t, ids, 4)[0], (x,))


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(20, 6, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.sparsemoe.dispatch.default, (x, random_ids(20, 8, 3), 8))


def test_non_contiguous_inputs():
    x = torch.randn(10, 16)[:, ::2]
    ids = random_ids(10, 6, 2).t().contiguous().t()
    got = ops.dispatch(x, ids, 6)
    want = reference.dispatch(x.contiguous(), ids.contiguous(), 6)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.slow
def test_offsets_beyond_int32():
    # 2^31 + elements in x_sorted: row and byte offsets must be 64-bit.
    T, d = (1 << 16) + 8, 1 << 15
    x = torch.ones(T, d, dtype=torch.bfloat16)
    ids = torch.arange(T).remainder(4).unsqueeze(1)
    x_sorted, offsets, slot = ops.dispatch(x, ids, 4)
    assert x_sorted.numel() > 2**31 and offsets[-1] == T
    assert x_sorted[-1].float().sum().item() == d
