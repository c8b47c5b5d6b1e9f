"""Batch invariance: ops.fixed_order_linear against F.linear (values, gradients, errors, opcheck)
and its rows bitwise independent of the batch and the thread count; MoELayer(batch_invariant=True)
giving every token bitwise the same output alone or in any batch, with any thread count, in
inference and in training, and refusing what it cannot make invariant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsemoe
from sparsemoe import ops
from helpers import lowp_tolerance, needs_microkernel, threads

pytestmark = needs_microkernel


# --- fixed_order_linear ------------------------------------------------------------------------


# d past one 256-deep reduction tile and E past one 64-column tile, and the degenerate sizes.
@pytest.mark.parametrize("T, d, E", [(37, 300, 70), (1, 1, 1), (130, 64, 8), (5, 0, 3), (0, 16, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_fixed_order_linear_matches_linear_fp32(T, d, E, bias):
    x, w = torch.randn(T, d), torch.randn(E, d)
    b = torch.randn(E) if bias else None
    got = ops.fixed_order_linear(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (T, E)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fixed_order_linear_low_precision_within_twice_plain_pytorch(dtype):
    x, w, b = torch.randn(40, 200), torch.randn(24, 200) / 200**0.5, torch.randn(24)
    exact = F.linear(x.double(), w.double(), b.double())
    got = ops.fixed_order_linear(x.to(dtype), w.to(dtype), b.to(dtype))
    plain = F.linear(x.to(dtype), w.to(dtype), b.to(dtype))
    assert got.dtype == dtype
    lowp_tolerance(got, plain, exact)


def test_fixed_order_linear_gradients_match_linear():
    x, w, b = (torch.randn(*s, dtype=torch.float32, requires_grad=True) for s in ((9, 33), (5, 33), (5,)))
    g = torch.randn(9, 5)
    got = torch.autograd.grad((ops.fixed_order_linear(x, w, b) * g).sum(), (x, w, b))
    want = torch.autograd.grad((F.linear(x, w, b) * g).sum(), (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_fixed_order_linear_opcheck():
    x, w, b = torch.randn(6, 20, requires_grad=True), torch.randn(3, 20, requires_grad=True), torch.randn(3)
    torch.library.opcheck(torch.ops.sparsemoe.fixed_order_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.sparsemoe.fixed_order_linear.default, (x, w, None))


@pytest.mark.parametrize("args, message", [
    (lambda: (torch.randn(2, 3, 4), torch.randn(5, 4), None), "x: expected a 2-D tensor"),
    (lambda: (torch.randn(2, 4), torch.randn(5, 3), None), r"weight: expected size 4 at dim 1 \(d, from x\)"),
    (lambda: (torch.randn(2, 4), torch.randn(5, 4).bfloat16(), None), "weight: expected dtype Float"),
    (lambda: (torch.randn(2, 4), torch.randn(5, 4), torch.randn(4)), r"bias: expected size 5 at dim 0"),
    (lambda: (torch.randn(2, 4), torch.randn(5, 4), torch.randn(5, 1)), "bias: expected a 1-D tensor"),
    (lambda: (torch.randn(2, 4).double(), torch.randn(5, 4).double(), None), "x: expected float32, bfloat16"),
    (lambda: (torch.ones(2, 4, dtype=torch.long), torch.ones(5, 4, dtype=torch.long), None), "x: expected float32"),
])
def test_fixed_order_linear_bad_arguments_are_named(args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.fixed_order_linear(*args())


def test_fixed_order_linear_rows_do_not_depend_on_the_batch_or_threads():
    torch.manual_seed(0)
    x, w, b = torch.randn(203, 300), torch.randn(70, 300), torch.randn(70)
    whole = ops.fixed_order_linear(x, w, b)
    for lo, hi in [(0, 1), (5, 6), (64, 65), (100, 200), (3, 203)]:
        assert torch.equal(ops.fixed_order_linear(x[lo:hi], w, b), whole[lo:hi])
    with threads(1):
        assert torch.equal(ops.fixed_order_linear(x, w, b), whole)


# --- MoELayer(batch_invariant=True) -----------------------------------------------------------


def invariant_layer(**options):
    torch.manual_seed(0)
    options = {"router_bias": True, **options}
    options = {"num_experts": 8, "top_k": 2, **options}
    layer = sparsemoe.MoELayer(48, 64, batch_invariant=True, **options)
    torch.nn.init.normal_(layer.router.weight, std=48 ** -0.5)
    return layer


def batches_around(token, sizes=(1, 7, 64, 300)):
    """The token at a position of batches of random other tokens, with that position."""
    for n in sizes:
        others = torch.randn(n, token.shape[-1]) * 2
        at = n // 2
        yield torch.cat([others[:at], token[None], others[at + 1:]]), at


@pytest.mark.parametrize("options", [{}, {"activation": "gelu", "expert_bias": True}, {"top_k": 1, "num_experts": 64},
                                     {"scoring": "sigmoid", "selection_bias": True, "num_groups": 4, "topk_groups": 2},
                                     {"weights_on_input": True, "top_k": 1}])
def test_a_tokens_output_is_bitwise_the_same_in_any_batch(options):
    layer = invariant_layer(**options)
    token = torch.randn(48)
    with torch.no_grad():
        alone = layer(token[None])[0]
        for batch, at in batches_around(token):
            assert torch.equal(layer(batch)[at], alone), batch.shape
        with threads(1):
            for batch, at in batches_around(token, sizes=(1, 300)):
                assert torch.equal(layer(batch)[at], alone), ("1 thread", batch.shape)


def test_batch_invariant_layer_matches_the_plain_layer():
    layer = invariant_layer()
    plain = sparsemoe.MoELayer(48, 64, 8, 2, router_bias=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 50, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(x)
    grads = [torch.autograd.grad((m(x) * g).sum(), list(m.parameters())) for m in (layer, plain)]
    for name, a, b in zip([n for n, _ in layer.named_parameters()], *grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_training_forward_is_invariant_too_and_runs_on_the_panels():
    layer = invariant_layer()
    token = torch.randn(48)
    alone = layer(token[None])[0]
    assert layer._packed.tensor is not None  # packed in a training step: the experts need the panels
    for batch, at in batches_around(token, sizes=(9, 130)):
        assert torch.equal(layer(batch)[at], alone)


def test_under_torch_compile_the_layer_runs_eagerly_and_stays_invariant():
    layer = invariant_layer()
    token = torch.randn(48)
    compiled = torch.compile(layer, backend="eager")
    with torch.no_grad():
        alone = layer(token[None])[0]
        for batch, at in batches_around(token, sizes=(1, 64)):
            assert torch.equal(compiled(batch)[at], alone)


def test_bfloat16_and_autocast_are_refused():
    layer, x = invariant_layer(), torch.randn(4, 48)
    with pytest.raises(ValueError, match="batch_invariant: expected no autocast"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    with pytest.raises(ValueError, match="batch_invariant: expected float32"):
        layer.bfloat16()(x.bfloat16())


def test_a_missing_micro_kernel_and_a_non_cpu_tensor_are_refused(monkeypatch):
    layer, x = invariant_layer(), torch.randn(4, 48)
    monkeypatch.setattr(ops, "packed_kernels_available", lambda dtype=torch.float32: False)
    with pytest.raises(ValueError, match="batch_invariant: needs oneDNN's GEMM micro-kernel"):
        layer(x)
    monkeypatch.undo()
    meta = sparsemoe.MoELayer(48, 64, 8, 2, batch_invariant=True, device="meta")
    with pytest.raises(ValueError, match="batch_invariant: expected a CPU tensor"):
        meta(torch.randn(4, 48, device="meta"))


# What would tie a token's output to the rest of its batch is refused when the config is made.
@pytest.mark.parametrize("options, reason", [
    ({"packed_weights": False}, "packed_weights=False"),
    ({"capacity_factor": 1.25}, "a capacity or expert_choice"),
    ({"expert_capacity": 4}, "a capacity or expert_choice"),
    ({"routing": "expert_choice"}, "a capacity or expert_choice"),
    ({"shared_expert_d_ff": 40}, "a shared expert"),
    ({"router_jitter": 0.01}, "router_jitter"),
    ({"router_dtype": torch.float64}, "router_dtype=torch.float64"),
])
def test_batch_invariant_config_refuses_what_depends_on_the_batch(options, reason):
    with pytest.raises(ValueError, match=f"batch_invariant: not available with {reason}"):
        sparsemoe.MoEConfig(d_model=48, d_ff=64, num_experts=8, top_k=2, batch_invariant=True, **options)


def test_batch_invariant_must_be_a_bool():
    with pytest.raises(ValueError, match="batch_invariant: expected True or False"):
        sparsemoe.MoEConfig(d_model=48, d_ff=64, num_experts=8, top_k=2, batch_invariant=1)
