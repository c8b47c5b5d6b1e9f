"""The inference forward in one op (ops.moe_inference, MoELayer's CPU path with grad mode off):
bitwise the separate ops' results and statistics for every layer case it takes, the cases it
must leave to the separate ops, its refusal of inputs that need gradients, and its errors."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from sparsemoe import MoELayer, ops, reference
from helpers import CASES, STATS, build, inputs


def fuses(cfg, dtype) -> bool:
    """Whether the layer should run the case as one moe_inference call under no_grad."""
    return (cfg.routing == "token_choice" and cfg.capacity(10) < 0 and not cfg.weights_on_input
            and cfg.router_dtype in (None, dtype))


def forward_counting(layer, x):
    with torch.no_grad(), mock.patch.object(ops, "moe_inference", wraps=ops.moe_inference) as fused:
        out = layer(x)
    stats = {name: getattr(layer, name) for name in STATS}
    return out, stats, fused.call_count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_forward_is_bitwise_the_ops_one_by_one(case, dtype):
    cfg, shape = CASES[case]
    layer = build(cfg, dtype).eval()
    x, _ = inputs(shape, dtype)
    got, got_stats, calls = forward_counting(layer, x)
    assert calls == int(fuses(cfg, dtype))
    # A hook on the router makes the layer call its ops one by one (the fused op would skip it).
    hook = layer.router.register_forward_hook(lambda module, args, out: None)
    try:
        want, want_stats, calls = forward_counting(layer, x)
    finally:
        hook.remove()
    assert calls == 0
    assert torch.equal(got, want)
    for name in STATS:
        assert torch.equal(got_stats[name], want_stats[name]), name


@pytest.mark.parametrize("T", [0, 1, 7, 300])
def test_fused_forward_at_any_batch_size_and_with_packed_weights(T):
    layer = MoELayer(32, 48, 8, 2).eval()
    x = torch.randn(T, 32)
    with torch.no_grad():
        got = layer(x)  # packs on its first inference forward
        hook = layer.router.register_forward_hook(lambda module, args, out: None)
        want = layer(x)
        hook.remove()
    assert torch.equal(got, want)


def test_training_and_grad_mode_use_the_separate_ops():
    layer = MoELayer(16, 24, 6, 2, router_jitter=0.1)
    x = torch.randn(5, 16)
    with mock.patch.object(ops, "moe_inference", wraps=ops.moe_inference) as fused:
        layer(x).sum().backward()  # grad mode on
        with torch.no_grad():
            layer.train()(x)  # router jitter is on in training mode
            layer.eval()(x)
        with torch.inference_mode():
            layer(x)
    assert fused.call_count == 2
    assert layer.router.weight.grad is not None


def test_global_module_hooks_keep_the_separate_ops():
    layer = MoELayer(16, 24, 6, 2).eval()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(type(module).__name__))
    try:
        with torch.no_grad(), mock.patch.object(ops, "moe_inference", wraps=ops.moe_inference) as fused:
            layer(torch.randn(3, 16))
    finally:
        handle.remove()
    assert fused.call_count == 0 and "Router" in seen


def op_args(T=4, d=16, f=8, E=6, k=2, dtype=torch.float32):
    torch.manual_seed(0)
    return dict(x=torch.randn(T, d, dtype=dtype), router_weight=torch.randn(E, d, dtype=dtype),
                router_bias=torch.randn(E, dtype=dtype), w1=torch.randn(E, 2 * f, d, dtype=dtype) / 4,
                w2=torch.randn(E, d, f, dtype=dtype) / 3, k=k)


def test_moe_inference_equals_the_ops_and_has_a_fake_kernel():
    a = op_args()
    out, logits, ids, offsets, slot = ops.moe_inference(**a)
    want_logits = F.linear(a["x"], a["router_weight"], a["router_bias"])
    weights, want_ids = ops.route(want_logits, a["k"])
    rows, want_offsets, want_slot = ops.dispatch(a["x"], want_ids, a["w1"].shape[0])
    y = ops.expert_ffn(rows, want_offsets, a["w1"], a["w2"])
    for got, want in ((out, ops.combine(y, want_slot, weights)), (logits, want_logits), (ids, want_ids),
                      (offsets, want_offsets), (slot, want_slot)):
        assert torch.equal(got, want)
    args = (a["x"], a["router_weight"], a["router_bias"], a["k"], True, "softmax", None, 1, 1, 1.0, a["w1"],
            a["w2"], "swiglu", None, None, 1.702, 7.0, None)
    torch.library.opcheck(torch.ops.sparsemoe.moe_inference.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("options", [
    dict(),
    dict(scoring="sigmoid", renormalize=False, scale=2.5, activation="gelu"),
    dict(num_groups=3, topk_groups=2, selection_bias=torch.linspace(-0.3, 0.3, 6, dtype=torch.float64),
         activation="clamped_swiglu", swiglu_alpha=1.3, swiglu_limit=0.8),
])
def test_moe_inference_matches_its_reference_in_float64(options):
    a = op_args(dtype=torch.float64)
    if options.get("activation") == "gelu":
        a["w1"] = a["w1"][:, :8]
    a["b1"], a["b2"] = torch.randn(6, a["w1"].shape[1], dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    got = ops.moe_inference(**a, **options)
    want = reference.moe_inference(**a, **options)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g, w) if g.dtype == torch.int64 else torch.allclose(g, w, rtol=1e-13, atol=1e-13)


def test_moe_inference_refuses_inputs_that_need_gradients():
    a = op_args()
    a["w1"].requires_grad_()
    with pytest.raises(RuntimeError, match="no backward"):
        ops.moe_inference(**a)
    with torch.no_grad():
        ops.moe_inference(**a)


@pytest.mark.parametrize("change, message", [
    (dict(router_weight=torch.randn(5, 16)), "router_weight: expected \\[E=6"),
    (dict(router_weight=torch.randn(6, 15)), "router_weight: expected \\[E=6 \\(w1's experts\\), d=16"),
    (dict(router_weight=torch.randn(6, 16, dtype=torch.float64)), "router_weight: expected dtype Float"),
    (dict(router_bias=torch.randn(5)), "router_bias: expected \\[E=6\\]"),
    (dict(router_bias=torch.randn(6).bfloat16()), "router_bias: expected dtype Float"),
    (dict(x=torch.randn(4, 16, 1)), "x: expected \\[T, d\\]"),
    (dict(w1=torch.randn(6, 16)), "w1: expected \\[E, F1, d\\]"),
    (dict(k=7), "k"),
])
def test_moe_inference_bad_arguments_are_named(change, message):
    a = {**op_args(), **change}
    with pytest.raises(RuntimeError, match=message):
        ops.moe_inference(**a)
