"""expert_ffn with the expert weights of Hugging Face "experts" modules read in place: w1 / w2 as
transposed views (each expert's matrix column-major, as GPT-OSS and Llama-4 store them), gate and
up rows interleaved (GPT-OSS, gate_up_interleaved=True), and both together. Forward and every
gradient against sparsemoe.reference with the equivalent contiguous weights; gradients in the
weights' own layout; no copy of the weights on the CPU."""

from __future__ import annotations


import pytest
import torch

from sparsemoe import ops, reference
from helpers import assert_grads_close, experts, interleave_gate_up, lowp_tolerance, threads, transposed_view

GATED = ("swiglu", "clamped_swiglu")
KW = {"swiglu_alpha": 1.3, "swiglu_limit": 1.2}  # clamps active for hidden values of order 1
# Rows per expert: the decode path (at most 4 rows), the BLAS path, empty experts in both.
FEW = [1, 0, 2, 3, 4, 1]
MANY = [40, 0, 17, 63, 5, 0]


def laid_out(w1, w2, b1, transpose: bool, interleaved: bool):
    if interleaved:
        w1, b1 = interleave_gate_up(w1), interleave_gate_up(b1)
    if transpose:
        w1, w2 = transposed_view(w1), transposed_view(w2)
    return w1, w2, b1


def run(fn, x, off, w1, w2, act, b1, b2, g, interleaved, dtype=None, **kw):
    """(y, grads of x, w1, w2, b1, b2), the leaves in `dtype` keeping their layout."""
    def leaf(t):
        if t is None:
            return None
        t = t.detach()
        return (t if dtype is None else t.to(dtype)).requires_grad_()
    leaves = [leaf(t) for t in (x, w1, w2, b1, b2)]
    y = fn(leaves[0], off, leaves[1], leaves[2], act, leaves[3], leaves[4], gate_up_interleaved=interleaved, **kw)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, used, g.to(y.dtype))
    return y, grads, used


def float32_close(got, exact):
    for a, e in zip(got, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=1e-5)


def cases():
    for act in (*GATED, "gelu"):
        for interleaved in ((False, True) if act in GATED else (False,)):
            for transpose in (False, True):
                if transpose or interleaved:
                    yield act, transpose, interleaved


@pytest.mark.parametrize("act,transpose,interleaved", list(cases()))
@pytest.mark.parametrize("counts", [FEW, MANY], ids=["few_rows", "many_rows"])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_reference(act, transpose, interleaved, counts, bias):
    N, pad = sum(counts), 3
    # Reductions of 21 and 37: the decode kernels' eight-row steps and a remainder.
    x, off, w1, w2, b1, b2 = experts(N, 21, 37, len(counts), act, counts=counts, pad=pad)
    w1, w2, b1 = laid_out(w1, w2, b1, transpose, interleaved)
    b1, b2 = (b1, b2) if bias else (None, None)
    g = torch.randn(N + pad, 21)
    y, got, leaves = run(ops.expert_ffn, x, off, w1, w2, act, b1, b2, g, interleaved, **KW)
    # The oracle in float64 on contiguous copies of the same weights.
    y_exact, exact, _ = run(reference.expert_ffn, x, off, w1.contiguous(), w2.contiguous(), act, b1, b2, g,
                            interleaved, dtype=torch.float64, **KW)
    torch.testing.assert_close(y, y_exact.float(), rtol=1e-5, atol=1e-5)
    assert torch.all(y[N:] == 0)
    float32_close(got, exact)
    assert torch.all(got[0][N:] == 0)  # padding rows feed no expert
    for grad, weight in zip(got[1:3], leaves[1:3]):
        assert grad.stride() == weight.stride()
        # Experts 1 and 5 own no rows (expert 1 in FEW): exactly zero weight gradients.
        assert torch.all(grad[1] == 0)


@pytest.mark.parametrize("act,transpose,interleaved", list(cases()))
def test_bfloat16_within_2x_plain_pytorch(act, transpose, interleaved):
    counts = [30, 0, 2, 45, 1, 20]
    N = sum(counts)
    x, off, w1, w2, b1, b2 = experts(N, 64, 48, len(counts), act, counts=counts, pad=5)
    w1, w2, b1 = laid_out(w1, w2, b1, transpose, interleaved)
    g = torch.randn(N + 5, 64)
    bf = torch.bfloat16
    # GPT-OSS's clamp limit, which these hidden values never reach: a bf16 rounding across a clamp
    # flips its derivative, an event rather than an error (the clamps are covered in float32/64).
    kw = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
    y, got, _ = run(ops.expert_ffn, x, off, w1, w2, act, b1, b2, g, interleaved, dtype=bf, **kw)
    y_plain, plain, _ = run(reference.expert_ffn, x, off, w1, w2, act, b1, b2, g, interleaved, dtype=bf, **kw)
    y_exact, exact, _ = run(reference.expert_ffn, x, off, w1.contiguous(), w2.contiguous(), act, b1, b2, g,
                            interleaved, dtype=torch.float64, **kw)
    assert y.dtype == bf
    lowp_tolerance(y, y_plain, y_exact)
    assert_grads_close(got, plain, exact, bf)


@pytest.mark.parametrize("act", GATED)
def test_oracle_interleaved_equals_concatenated(act):
    """The oracle's interleaved form reads the rows GPT-OSS's gate, up = h[..., ::2], h[..., 1::2]
    does: the same layer as the [gate | up] weights it was made from."""
    x, off, w1, w2, b1, b2 = experts(30, 8, 6, 3, act, torch.float64, counts=[10, 0, 20])
    torch.testing.assert_close(
        reference.expert_ffn(x, off, interleave_gate_up(w1), w2, act, interleave_gate_up(b1), b2,
                             gate_up_interleaved=True, **KW),
        reference.expert_ffn(x, off, w1, w2, act, b1, b2, **KW), rtol=0, atol=0)


@pytest.mark.parametrize("act", GATED)
@pytest.mark.parametrize("counts", [FEW, MANY], ids=["few_rows", "many_rows"])
def test_interleaved_transposed_equals_concatenated_contiguous(act, counts):
    """The kernel on GPT-OSS's layout gives the layer of the default layout, gradients mapped."""
    N = sum(counts)
    x, off, w1, w2, b1, b2 = experts(N, 16, 20, len(counts), act, counts=counts)
    g = torch.randn(N, 16)
    y, (gx, g1, g2, gb1, gb2), _ = run(ops.expert_ffn, x, off, w1, w2, act, b1, b2, g, False, **KW)
    hf = laid_out(w1, w2, b1, transpose=True, interleaved=True)
    y_hf, (gx_hf, g1_hf, g2_hf, gb1_hf, gb2_hf), _ = run(ops.expert_ffn, x, off, hf[0], hf[1], act, hf[2], b2, g,
                                                         True, **KW)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_hf, y, **tol)
    torch.testing.assert_close(gx_hf, gx, **tol)
    torch.testing.assert_close(g1_hf, interleave_gate_up(g1), **tol)
    torch.testing.assert_close(g2_hf, g2, **tol)
    torch.testing.assert_close(gb1_hf, interleave_gate_up(gb1), **tol)
    torch.testing.assert_close(gb2_hf, gb2, **tol)


@pytest.mark.parametrize("act", GATED)
def test_hidden_is_in_w1_row_order(act):
    """The op's saved pre-activation is x @ w1[e]^T + b1[e] with w1's rows as given, also when
    they alternate gate and up."""
    counts = [5, 0, 9]
    x, off, w1, w2, b1, b2 = experts(14, 8, 6, 3, act, torch.float64, counts=counts, pad=2)
    w1, w2, b1 = laid_out(w1, w2, b1, transpose=True, interleaved=True)
    _, hidden = torch.ops.sparsemoe.expert_ffn(x, off, w1, w2, act, b1, b2, 1.3, 1.2, True)
    want = torch.cat([x[:5] @ w1[0].T + b1[0], x[5:14] @ w1[2].T + b1[2], torch.zeros(2, 12, dtype=torch.float64)])
    torch.testing.assert_close(hidden, want)


@pytest.mark.parametrize("interleaved", [False, True])
def test_decode_rows_wider_than_one_pass(interleaved):
    """On one thread an expert's 4200 activation columns make 8 blocks of 528 gate and 528 up
    columns (cpu/expert_blocks.h), more than the decode kernel's float64 accumulators hold for
    3 rows (cpu/few_rows_gemm.cpp): several passes over w1's rows."""
    act, f = "swiglu", 4200
    x, off, w1, w2, b1, b2 = experts(3, 9, f, 1, act, torch.float64, counts=[3])
    w1, w2, b1 = laid_out(w1, w2, b1, transpose=True, interleaved=interleaved)
    with threads(1):
        got = ops.expert_ffn(x, off, w1, w2, act, b1, b2, gate_up_interleaved=interleaved)
    want = reference.expert_ffn(x, off, w1.contiguous(), w2.contiguous(), act, b1, b2,
                                gate_up_interleaved=interleaved)
    torch.testing.assert_close(got, want)




@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("counts", [[2, 3], [90, 70]], ids=["few_rows", "many_rows"])
def test_column_blocks_split_over_threads(interleaved, counts):
    """f = 320 with two busy experts on two threads gives each expert five column blocks of 64
    (cpu/expert_blocks.h), so blocks start inside the gate/up rows of a transposed w1."""
    act, N, f = "clamped_swiglu", sum(counts), 320
    x, off, w1, w2, b1, b2 = experts(N, 32, f, 2, act, counts=counts)
    w1, w2, b1 = laid_out(w1, w2, b1, transpose=True, interleaved=interleaved)
    g = torch.randn(N, 32)
    with threads(2):
        y, got, leaves = run(ops.expert_ffn, x, off, w1, w2, act, b1, b2, g, interleaved, **KW)
    y_exact, exact, _ = run(reference.expert_ffn, x, off, w1.contiguous(), w2.contiguous(), act, b1, b2, g,
                            interleaved, dtype=torch.float64, **KW)
    torch.testing.assert_close(y, y_exact.float(), rtol=1e-5, atol=1e-5)
    float32_close(got, exact)
    for grad, weight in zip(got[1:3], leaves[1:3]):
        assert grad.stride() == weight.stride()


@pytest.mark.parametrize("act,transpose,interleaved", [("swiglu", True, True), ("clamped_swiglu", True, False),
                                                        ("clamped_swiglu", False, True), ("relu", True, False)])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck(act, transpose, interleaved, bias):
    """Through the parameters' own layout: w1 = p1.transpose(1, 2) inside the function, so the
    gradient reaches p1 through the transposed view."""
    x, off, w1, w2, b1, b2 = experts(7, 4, 3, 3, act, torch.float64, counts=[1, 0, 6], pad=2, x_scale=0.5)
    if interleaved:
        w1, b1 = interleave_gate_up(w1), interleave_gate_up(b1)
    p1, p2 = (w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()) if transpose else (w1, w2)
    leaves = [t.clone().requires_grad_() for t in (x, p1, p2, b1, b2)]

    def fn(x, p1, p2, b1, b2):
        w1, w2 = (p1.transpose(1, 2), p2.transpose(1, 2)) if transpose else (p1, p2)
        return ops.expert_ffn(x, off, w1, w2, act, b1 if bias else None, b2 if bias else None,
                              gate_up_interleaved=interleaved, swiglu_alpha=1.3, swiglu_limit=3.0)

    assert torch.autograd.gradcheck(fn, leaves if bias else leaves[:3] + [b1, b2])


def test_parameter_gradient_is_the_kernels_buffer():
    """With p1 [E, d, 2f] and p2 [E, f, d] as HF holds them and w = p.transpose(1, 2), the kernel's
    gradient transposes back into p's own layout, so AccumulateGrad keeps that very buffer as
    p.grad: no copy of the weight gradients."""
    act, counts = "clamped_swiglu", [20, 0, 3, 31]
    x, off, w1, w2, b1, b2 = experts(sum(counts), 16, 24, 4, act, counts=counts)
    p1 = interleave_gate_up(w1).transpose(1, 2).contiguous().requires_grad_()
    p2 = w2.transpose(1, 2).contiguous().requires_grad_()
    seen = {}
    v1, v2 = p1.transpose(1, 2), p2.transpose(1, 2)
    v1.register_hook(lambda g: seen.__setitem__("w1", (g.data_ptr(), g.stride())))
    v2.register_hook(lambda g: seen.__setitem__("w2", (g.data_ptr(), g.stride())))
    y = ops.expert_ffn(x, off, v1, v2, act, interleave_gate_up(b1), b2, gate_up_interleaved=True, **KW)
    y.square().sum().backward()
    for name, p, v in (("w1", p1, v1), ("w2", p2, v2)):
        assert seen[name] == (p.grad.data_ptr(), v.stride()), name
        assert p.grad.stride() == p.stride()


def copies_of_weight_size(fn, numel: int) -> list[str]:
    """The aten copies (copy_, clone, contiguous) of at least `numel` elements that fn makes: a
    whole weight's w.contiguous() shows, block-local copies of a few activation rows do not."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    found = []
    for ev in prof.events():
        if ev.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"):
            for shape in ev.input_shapes:
                if shape and torch.Size(shape).numel() >= numel:
                    found.append(f"{ev.name} {shape}")
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [FEW, MANY], ids=["few_rows", "many_rows"])
def test_no_copy_of_the_weights(dtype, counts):
    act, N = "clamped_swiglu", sum(counts)
    x, off, w1, w2, b1, b2 = experts(N, 32, 48, len(counts), act, dtype, counts=counts)
    p1, p2 = interleave_gate_up(w1).transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    smallest = min(p1.numel(), p2.numel())

    def forward():
        with torch.no_grad():
            ops.expert_ffn(x, off, p1.transpose(1, 2), p2.transpose(1, 2), act, interleave_gate_up(b1), b2,
                           gate_up_interleaved=True, **KW)

    q1, q2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()

    def forward_backward():
        y = ops.expert_ffn(x, off, q1.transpose(1, 2), q2.transpose(1, 2), act, gate_up_interleaved=True, **KW)
        y.sum().backward()

    assert copies_of_weight_size(forward, smallest) == []
    assert copies_of_weight_size(forward_backward, smallest) == []
    assert q1.grad is not None and q2.grad is not None

    # The detector sees the copy a layout with no unit stride costs.
    odd = p1.permute(0, 2, 1).contiguous().permute(0, 2, 1).transpose(0, 2).contiguous().transpose(0, 2)
    assert odd.stride(1) != 1 and odd.stride(2) != 1

    def odd_forward():
        with torch.no_grad():
            ops.expert_ffn(x, off, odd.transpose(1, 2), p2.transpose(1, 2), act, gate_up_interleaved=True, **KW)

    assert copies_of_weight_size(odd_forward, smallest) != []


def test_other_strides_still_work():
    """Weights with no unit stride in their last two dims are copied once and give the same
    results; the gradients take the layout empty_like gives the weight (as the fake kernel)."""
    act, counts = "swiglu", [6, 0, 3, 12]
    N = sum(counts)
    x, off, w1, w2, b1, b2 = experts(N, 12, 10, 4, act, counts=counts)
    # Experts innermost: each expert's matrix has strides (12 * 4, 4) and (10 * 4, 4)... none is 1.
    odd1 = w1.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    odd2 = w2.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert 1 not in odd1.stride()[1:] and 1 not in odd2.stride()[1:]
    g = torch.randn(N, 12)
    y, got, leaves = run(ops.expert_ffn, x, off, odd1, odd2, act, b1, b2, g, False)
    y_ref, ref, _ = run(ops.expert_ffn, x, off, w1, w2, act, b1, b2, g, False)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for grad, weight in zip(got[1:3], leaves[1:3]):
        assert grad.stride() == torch.empty_like(weight).stride()


def test_expert_stride_and_shared_storage():
    """Experts every other slot of a larger tensor (a gap between them), and one weight expanded
    over all experts (expert stride 0, as a test of shared storage): read in place, and the
    expanded weight's gradient is the sum over experts, as autograd's expand gives."""
    act, counts = "swiglu", [3, 0, 25, 2]
    N = sum(counts)
    x, off, w1, w2, b1, b2 = experts(N, 16, 12, 8, act, counts=counts + [0] * 4)
    gapped1, gapped2 = transposed_view(w1)[::2], w2[::2]
    off4 = off[:5]
    g = torch.randn(N, 16)
    y, got, leaves = run(ops.expert_ffn, x, off4, gapped1, gapped2, act, None, None, g, False)
    y_ref, ref, _ = run(reference.expert_ffn, x, off4, gapped1.contiguous(), gapped2.contiguous(), act, None,
                        None, g, False, dtype=torch.float64)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    float32_close(got, ref)

    shared1 = transposed_view(w1[:1]).requires_grad_()
    shared2 = w2[:1].clone().requires_grad_()
    out = ops.expert_ffn(x, off4, shared1.expand(4, -1, -1), shared2.expand(4, -1, -1), act)
    gs = torch.autograd.grad(out, (shared1, shared2), g)
    dense = [t.detach().double().requires_grad_() for t in (w1[:1], w2[:1])]
    out_ref = reference.expert_ffn(x.double(), off4, dense[0].expand(4, -1, -1), dense[1].expand(4, -1, -1), act)
    gs_ref = torch.autograd.grad(out_ref, dense, g.double())
    torch.testing.assert_close(out, out_ref.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(gs, gs_ref):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act,interleaved", [("swiglu", True), ("clamped_swiglu", True), ("swiglu", False),
                                             ("relu", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(act, interleaved, dtype):
    """opcheck also compares the fake kernel's strides with the real ones: the gradients of
    transposed weights are transposed in both."""
    x, off, w1, w2, b1, b2 = experts(20, 8, 6, 4, act, dtype, counts=[5, 0, 2, 13], pad=3)
    w1, w2, b1 = laid_out(w1, w2, b1, transpose=True, interleaved=interleaved)
    args = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]
    torch.library.opcheck(torch.ops.sparsemoe.expert_ffn.default,
                          (args[0], off, args[1], args[2], act, args[3], args[4], 1.3, 1.2, interleaved))
    y, hidden = torch.ops.sparsemoe.expert_ffn(x.detach(), off, w1.detach(), w2.detach(), act, b1.detach(),
                                               b2.detach(), 1.3, 1.2, interleaved)
    for bias_grads in (False, True):
        torch.library.opcheck(torch.ops.sparsemoe.expert_ffn_backward.default,
                              (torch.randn_like(y), x.detach(), off, w1.detach(), w2.detach(), hidden, act, 1.3,
                               1.2, bias_grads, interleaved))
    grads = torch.ops.sparsemoe.expert_ffn_backward(torch.randn_like(y), x.detach(), off, w1.detach(), w2.detach(),
                                                    hidden, act, 1.3, 1.2, True, interleaved)
    assert grads[1].stride() == w1.stride() and grads[2].stride() == w2.stride()


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_interleaved_needs_a_gated_activation(act):
    x, off, w1, w2, b1, b2 = experts(10, 8, 6, 2, act, counts=[4, 6])
    match = f"gate_up_interleaved: expected False for the ungated activation '{act}'"
    with pytest.raises(RuntimeError, match=match):
        ops.expert_ffn(x, off, w1, w2, act, gate_up_interleaved=True)
    y, hidden = torch.ops.sparsemoe.expert_ffn(x, off, w1, w2, act)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsemoe.expert_ffn_backward(torch.ones_like(y), x, off, w1, w2, hidden, act, 1.702, 7.0, False,
                                                True)
    with pytest.raises(ValueError, match=match):
        reference.expert_ffn(x, off, w1, w2, act, gate_up_interleaved=True)
    # The fake kernel (meta tensors, as torch.compile traces) refuses it the same way.
    meta = [t.to("meta") for t in (x, off, w1, w2)]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsemoe.expert_ffn(*meta, act, gate_up_interleaved=True)


def test_compile_fullgraph_matches_eager():
    act, counts = "clamped_swiglu", [7, 0, 12, 1]
    x, off, w1, w2, b1, b2 = experts(sum(counts), 16, 8, 4, act, counts=counts)
    p1 = interleave_gate_up(w1).transpose(1, 2).contiguous()
    p2 = w2.transpose(1, 2).contiguous()

    def step(x, p1, p2, b1):
        y = ops.expert_ffn(x, off, p1.transpose(1, 2), p2.transpose(1, 2), act, b1, None,
                           gate_up_interleaved=True, **KW)
        return y.square().sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (x, p1, p2, interleave_gate_up(b1))]
        loss = fn(*leaves)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
