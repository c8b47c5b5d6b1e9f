"""MoELayer's routing / capacity / expert-variant options against the pure-PyTorch oracle
(sparsemoe.reference.moe_forward, a Hugging Face style per-expert loop of the whole layer).

Every option and the model presets (Mixtral, Qwen2-MoE, DeepSeek-V3, GPT-OSS, Llama-4, Switch,
expert choice): forward, gradients of the input and every parameter, the statistics, float64
gradcheck, torch.compile, autocast; then the semantics of capacity, the losses, the selection
bias, jitter, routing_summary, argument errors and the state dict. Tiny shapes throughout.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparsemoe import MoELayer, RoutingCollapseWarning, reference, routing_summary
from helpers import (CASES, D, FF, STATS, build, check_autocast_bf16_matches_bf16_layer, close, grad_or_zero, inputs,
                     loss_of, lowp_tolerance, oracle, run_layer, run_oracle)

@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny shapes: waking the intra-op thread pool costs more than the work, and on a loaded
    # machine it makes this file several times slower (gradcheck runs thousands of forwards).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- forward, gradients and statistics against the oracle -----------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(case, dtype):
    config, shape = CASES[case]
    layer = build(config, dtype)
    x, g = inputs(shape, dtype)
    mask = None
    if dtype == torch.float64:  # with padding (losses over the real tokens) in float64
        mask = torch.rand(shape) > 0.3
        mask.view(-1)[0] = True
    out, grads, stats = run_layer(layer, x, g, mask)
    ref_out, ref_grads, ref_stats = run_oracle(layer, x, g, dtype, mask)

    tol = 1e-12 if dtype == torch.float64 and layer.router.dtype_override is None else 1e-5
    assert out.dtype == dtype and out.shape == x.shape
    close(out, ref_out, tol, "out")
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        like = dict(layer.named_parameters()).get(name, x)
        close(grad_or_zero(grads, name, like), grad_or_zero(ref_grads, name, like), tol, f"grad {name}")
    assert stats["tokens_per_expert"].dtype == torch.int64
    assert torch.equal(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])
    assert stats["dropped_fraction"].item() == pytest.approx(ref_stats["dropped_fraction"], abs=1e-6)
    for name in ("aux_loss", "z_loss", "router_logits"):
        close(stats[name].detach(), ref_stats[name].detach(), tol, name)
    if mask is None:  # with a mask: test_router_entropy_excludes_padding
        close(stats["router_entropy"], ref_stats["router_entropy"], 1e-5, "router_entropy")


def test_router_entropy_excludes_padding():
    # forward's docstring: padding_mask keeps padding out of the losses and statistics.
    layer = build(dict(num_experts=6, top_k=2), seed=24)
    x = torch.randn(3, 5, D)
    mask = torch.rand(3, 5) > 0.4
    mask[0, 0] = True
    with torch.no_grad():
        layer(x, mask)
        masked = layer.router_entropy.clone()
        layer(x[mask])
    torch.testing.assert_close(masked, layer.router_entropy, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_within_plain_pytorch_error(case):
    config, shape = CASES[case]
    layer = build(config, torch.bfloat16)
    x, g = inputs(shape, torch.bfloat16)
    out, grads, _ = run_layer(layer, x, g)
    plain_out, plain_grads, _ = run_oracle(layer, x, g, torch.bfloat16)
    exact_out, exact_grads, _ = run_oracle(layer, x, g, torch.float64)
    assert out.dtype == torch.bfloat16
    lowp_tolerance(out, plain_out, exact_out)
    for name, exact in exact_grads.items():
        like = dict(layer.named_parameters()).get(name, x)
        assert grads[name] is None or grads[name].dtype == like.dtype, name
        try:
            lowp_tolerance(grad_or_zero(grads, name, like), grad_or_zero(plain_grads, name, like),
                           grad_or_zero(exact_grads, name, like))
        except AssertionError as e:
            raise AssertionError(f"grad {name}: {e}") from None


# --- gradcheck -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["preset_qwen2_moe", "preset_deepseek_v3", "preset_gpt_oss", "preset_llama4",
                                  "preset_switch", "preset_expert_choice", "capacity_probability"])
def test_gradcheck(case):
    config, _ = CASES[case]
    d = 4
    # A float32 router would not be float64-differentiable.
    layer = build(config, torch.float64, seed=3, d=d, f=2, router_dtype=None,
                  shared_expert_d_ff=2 if config.shared_expert_d_ff else 0)
    torch.manual_seed(4)
    x = torch.randn(2, 3, d, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def fn(x, *ps):
        out = functional_call(layer, dict(zip(names, ps)), (x,))
        return out, layer.aux_loss, layer.z_loss

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-6, rtol=1e-5)


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["preset_deepseek_v3", "preset_switch"])
def test_compile_matches_eager(case):
    config, shape = CASES[case]
    layer = build(config, torch.float32, seed=5)
    x, g = inputs(shape, torch.float32, seed=6)

    def step(module):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        stats = {s: getattr(layer, s).detach() for s in STATS}
        loss_of(out, g, layer.aux_loss, layer.z_loss).backward()
        grads = {"x": xi.grad, **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}}
        return out.detach(), stats, grads

    out_e, stats_e, grads_e = step(layer)
    torch._dynamo.reset()
    try:
        # aot_eager: fullgraph capture, fake kernels and compiled autograd without the minutes
        # of C++ codegen (test_layer.py covers inductor).
        out_c, stats_c, grads_c = step(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    close(out_c, out_e, 1e-6, "out")
    for name in STATS:
        close(stats_c[name].double(), stats_e[name].double(), 1e-6, name)
    assert set(grads_c) == set(grads_e)
    for name in grads_e:
        close(grads_c[name], grads_e[name], 1e-6, f"grad {name}")


# --- autocast --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["preset_mixtral", "preset_gpt_oss", "preset_switch"])
def test_autocast_bf16_matches_bf16_layer(case):
    check_autocast_bf16_matches_bf16_layer(case, torch.device("cpu"))


def test_autocast_router_dtype_float32_keeps_fp32_router():
    # DeepSeek-V3's float32 router: under bf16 autocast the logits must still be float32,
    # computed from the float32 input and weight (router_dtype's contract).
    config, shape = CASES["preset_deepseek_v3"]
    layer = build(config, torch.float32, seed=9)
    x, _ = inputs(shape, torch.float32, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert layer.router_logits.dtype == torch.float32
    ref = F.linear(x.reshape(-1, D), layer.router.weight)
    torch.testing.assert_close(layer.router_logits, ref, rtol=1e-6, atol=1e-6)


# --- capacity --------------------------------------------------------------------------------


def one_expert_layer(E=4, k=1, seed=11, dtype=torch.float64, **opts) -> MoELayer:
    """Every token prefers expert 0 (then 1, 2, ...): a constant router bias, tiny weights."""
    layer = build(dict(num_experts=E, top_k=k, router_bias=True, **opts), dtype, seed=seed)
    with torch.no_grad():
        layer.router.weight.mul_(0.01)
        layer.router.bias.copy_(torch.arange(E, 0, -1, dtype=dtype) * 3.0)
    return layer


@pytest.mark.parametrize("shared", [False, True])
def test_fully_dropped_token_is_exactly_zero(shared):
    T, cap = 8, 3
    opts = dict(shared_expert_d_ff=6, shared_expert_gate=True) if shared else {}
    layer = one_expert_layer(expert_capacity=cap, **opts)
    torch.manual_seed(12)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T, D, dtype=torch.float64)
    out = layer(x)
    out.backward(g)
    assert torch.equal(layer.tokens_per_expert, torch.tensor([cap, 0, 0, 0]))
    assert layer.dropped_fraction.item() == pytest.approx((T - cap) / T)
    dropped = slice(cap, T)
    if not shared:
        assert torch.count_nonzero(out[dropped]) == 0
        assert torch.count_nonzero(x.grad[dropped]) == 0
        assert torch.count_nonzero(out[:cap]) > 0 and torch.count_nonzero(x.grad[:cap]) > 0
    else:
        # Only the shared expert (and its gate) reaches a dropped token.
        xs = x.detach().clone().requires_grad_(True)
        shared_out = torch.sigmoid(layer.shared_expert_gate(xs)) * layer.shared_expert(xs)
        shared_out.backward(g)
        torch.testing.assert_close(out[dropped], shared_out[dropped], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(x.grad[dropped], xs.grad[dropped], rtol=1e-13, atol=1e-13)
    # Experts that only had dropped picks get exactly zero gradients.
    for name in ("gate_up_proj", "down_proj"):
        assert torch.count_nonzero(getattr(layer, name).grad[1:]) == 0, name


def test_capacity_zero_drops_everything():
    layer = build(dict(num_experts=4, top_k=2, expert_capacity=0, expert_bias=True), torch.float32)
    x = torch.randn(3, 4, D, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(x.grad) == 0
    assert layer.dropped_fraction.item() == 1.0
    assert torch.equal(layer.tokens_per_expert, torch.zeros(4, dtype=torch.int64))
    for name, p in layer.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("k", [1, 2])
def test_dropped_pick_contributes_zero(k):
    # A token whose first pick is dropped but second kept gets exactly its second expert's term.
    T = 6
    layer = one_expert_layer(E=3, k=k, expert_capacity=2)
    x = torch.randn(T, D, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        logits = layer.router_logits
        p = torch.softmax(logits, -1)
        w = p[:, :k] / p[:, :k].sum(-1, keepdim=True)
        ffn = [reference.expert_ffn(x, torch.tensor([0, T]), layer.gate_up_proj[e:e + 1], layer.down_proj[e:e + 1])
               for e in range(3)]
    expected = torch.zeros_like(x)
    expected[:2] += w[:2, :1] * ffn[0][:2]            # expert 0 keeps tokens 0, 1
    if k == 2:
        expected[:2] += w[:2, 1:2] * ffn[1][:2]       # expert 1 keeps tokens 0, 1 as well
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert layer.dropped_fraction.item() == pytest.approx(1 - 2 * k / (T * k))


@pytest.mark.parametrize("opts", [dict(expert_capacity=10), dict(capacity_factor=4.0 / 2),
                                  dict(expert_capacity=10, capacity_scope="sequence"),
                                  dict(expert_capacity=10, drop_policy="probability")])
def test_capacity_at_least_tokens_equals_dropless(opts):
    base = dict(num_experts=4, top_k=2)
    dropless, capped = build(base, seed=13), build({**base, **opts}, seed=13)
    x = torch.randn(2, 5, D)  # 10 tokens; capacity_factor 2 gives ceil(2*10*2/4) = 10
    g = torch.randn_like(x)
    out_a, grads_a, stats_a = run_layer(dropless, x, g)
    out_b, grads_b, stats_b = run_layer(capped, x, g)
    assert stats_b["dropped_fraction"].item() == 0.0
    assert torch.equal(stats_a["tokens_per_expert"], stats_b["tokens_per_expert"])
    torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-6)


def test_drop_policy_probability_keeps_highest_weights():
    T, cap = 8, 3
    layer = one_expert_layer(expert_capacity=cap, drop_policy="probability", renormalize=False)
    torch.manual_seed(14)
    x = torch.randn(T, D, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)  # distinct expert-0 probabilities, expert 0 still first
        out = layer(x)
    p0 = torch.softmax(layer.router_logits, -1)[:, 0]
    assert (layer.router_logits.argmax(-1) == 0).all()
    kept = set(p0.topk(cap).indices.tolist())
    assert kept != set(range(cap))  # the position policy would keep other tokens
    nonzero = {t for t in range(T) if out[t].abs().sum() > 0}
    assert nonzero == kept
    position = one_expert_layer(expert_capacity=cap, renormalize=False)
    position.load_state_dict(layer.state_dict())
    with torch.no_grad():
        out_pos = position(x)
    assert {t for t in range(T) if out_pos[t].abs().sum() > 0} == set(range(cap))
    torch.testing.assert_close(out, oracle(layer, x, return_stats=False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_capacity_scope_sequence_applies_per_sequence(routing):
    B, S, cap = 3, 4, 1
    layer = one_expert_layer(expert_capacity=cap, capacity_scope="sequence", routing=routing)
    x = torch.randn(B, S, D, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    batch = one_expert_layer(expert_capacity=cap, routing=routing)
    batch.load_state_dict(layer.state_dict())
    with torch.no_grad():
        out_batch = batch(x)
        # The same input as B separate calls: each sequence gets its own capacity.
        out_each = torch.cat([batch(x[b:b + 1]) for b in range(B)])
    torch.testing.assert_close(out, out_each, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, out_batch)
    if routing == "token_choice":
        assert (out.abs().sum(-1) > 0).tolist() == [[True] + [False] * (S - 1)] * B
        assert layer.tokens_per_expert.tolist() == [B * cap, 0, 0, 0]
        assert layer.dropped_fraction.item() == pytest.approx(1 - B * cap / (B * S))
    torch.testing.assert_close(out, oracle(layer, x, return_stats=False), rtol=1e-12, atol=1e-12)


def test_expert_choice_takes_top_tokens_per_expert():
    E, T, k = 4, 8, 1  # capacity = ceil(1.0 * 8 * 1 / 4) = 2 tokens per expert
    layer = build(dict(num_experts=E, top_k=k, routing="expert_choice"), torch.float64, seed=15)
    x = torch.randn(T, D, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        s = torch.softmax(layer.router_logits, -1)
        expected = torch.zeros_like(x)
        for e in range(E):
            top = s[:, e].topk(2).indices
            y = reference.expert_ffn(x[top], torch.tensor([0, 2]), layer.gate_up_proj[e:e + 1],
                                     layer.down_proj[e:e + 1])
            expected.index_add_(0, top, s[top, e, None] * y)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert layer.tokens_per_expert.tolist() == [2] * E
    covered = torch.zeros(T, dtype=torch.bool)
    for e in range(E):
        covered[s[:, e].topk(2).indices] = True
    assert layer.dropped_fraction.item() == pytest.approx(1 - covered.double().mean().item())
    assert layer.aux_loss.item() == 0.0


def test_expert_choice_ties_go_to_earlier_tokens():
    E, T = 4, 8
    layer = build(dict(num_experts=E, top_k=1, routing="expert_choice"), torch.float64, seed=16)
    with torch.no_grad():
        layer.router.weight.zero_()  # every token scores 1/E for every expert
        out = layer(torch.randn(T, D, dtype=torch.float64))
    # Each expert keeps the first 2 tokens: tokens 0, 1 get all 4 experts, the rest nothing.
    assert (out.abs().sum(-1) > 0).tolist() == [True, True] + [False] * (T - 2)
    assert layer.dropped_fraction.item() == pytest.approx(0.75)


# --- losses ----------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [dict(), dict(scoring="sigmoid"), dict(expert_capacity=1),
                                  dict(scoring="softmax_topk", top_k=3)])
def test_padding_mask_losses_equal_real_tokens_only(opts):
    layer = build({"num_experts": 6, "top_k": 2, **opts}, seed=17)
    B, S = 3, 5
    x = torch.randn(B, S, D)
    mask = torch.rand(B, S) > 0.4
    mask[0, 0] = True
    layer(x, mask)
    aux, z = layer.aux_loss, layer.z_loss
    gaux = torch.autograd.grad(aux, layer.router.weight, retain_graph=True)
    gz = torch.autograd.grad(z, layer.router.weight)
    logits = layer.router_logits.detach()
    layer(x[mask])  # the real tokens alone (the capacity then differs; the losses do not)
    torch.testing.assert_close(aux, layer.aux_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, layer.z_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gaux[0], torch.autograd.grad(layer.aux_loss, layer.router.weight, retain_graph=True)[0],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz[0], torch.autograd.grad(layer.z_loss, layer.router.weight)[0],
                               rtol=1e-5, atol=1e-6)
    # z_loss is the mean over real tokens of logsumexp(logits)^2.
    lse = torch.logsumexp(logits.reshape(B, S, -1)[mask], -1)
    torch.testing.assert_close(z, lse.square().mean(), rtol=1e-6, atol=1e-6)


def test_z_loss_without_mask():
    layer = build(dict(num_experts=6, top_k=2, router_bias=True), seed=18)
    x = torch.randn(4, 3, D)
    layer(x)
    logits = F.linear(x.reshape(-1, D), layer.router.weight, layer.router.bias)
    torch.testing.assert_close(layer.z_loss, torch.logsumexp(logits, -1).square().mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "softmax_topk"])
@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_one_when_balanced(scoring, k):
    E = 4
    layer = build(dict(num_experts=E, top_k=k, scoring=scoring))
    # Uniform router: P_e = 1/E exactly, so E * sum_e f_e P_e = sum_e f_e = 1.
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(7, D))
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0), rtol=1e-6, atol=1e-6)
    # Balanced picks with cyclically symmetric probabilities (so P_e = 1/E): token t prefers
    # expert t % E, then (t + 1) % E.
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E].copy_(3.0 * torch.eye(E))
    x = torch.zeros(4 * E, D)
    x[:, :E] = (torch.eye(E) + 0.5 * torch.eye(E).roll(1, dims=1)).repeat(4, 1)
    layer(x)
    assert torch.equal(layer.tokens_per_expert, torch.full((E,), 4 * k))
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0), rtol=1e-6, atol=1e-6)


# --- selection bias --------------------------------------------------------------------------


def test_selection_bias_changes_picks_not_weights():
    E, T = 4, 10
    layer = build(dict(num_experts=E, top_k=1, scoring="sigmoid", renormalize=False, selection_bias=True),
                  torch.float64, seed=19)
    x = torch.randn(T, D, dtype=torch.float64)
    with torch.no_grad():
        layer.router.selection_bias.zero_()
        before = layer(x)
        picks_before = layer.tokens_per_expert.clone()
        layer.router.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
        out = layer(x)
    assert picks_before[3] < T and layer.tokens_per_expert.tolist() == [0, 0, 0, T]
    s = torch.sigmoid(F.linear(x, layer.router.weight))
    y3 = reference.expert_ffn(x, torch.tensor([0, T]), layer.gate_up_proj[3:], layer.down_proj[3:])
    # The weight is expert 3's sigmoid score, without the bias.
    torch.testing.assert_close(out, s[:, 3:] * y3, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, before)
    # The bias is a buffer: it gets no gradient and the router gradient ignores it.
    assert not layer.router.selection_bias.requires_grad


def test_update_selection_bias_step():
    E, rate = 4, 0.01
    layer = one_expert_layer(E=E, k=1, selection_bias=True, scoring="sigmoid", dtype=torch.float32)
    with torch.no_grad():
        layer.router.selection_bias.zero_()
        layer.router.bias.copy_(torch.tensor([3.0, 2.0, -9.0, -9.0]))
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 20.0  # tokens with x0 > 0.05 go to expert 1, the rest to 0
    x = torch.randn(40, D)
    x[:, 0] = torch.tensor([1.0] * 10 + [-1.0] * 30)
    layer(x)
    assert layer.tokens_per_expert.tolist() == [30, 10, 0, 0]  # mean 10: 0 over, 1 at, 2-3 under
    layer.update_selection_bias(rate)
    assert layer.router.selection_bias.dtype == torch.float32
    torch.testing.assert_close(layer.router.selection_bias, torch.tensor([-rate, 0.0, rate, rate]))


def test_selection_bias_stays_float32_through_casts_and_meta_init():
    layer = build(dict(num_experts=4, top_k=2, selection_bias=True))
    with torch.no_grad():
        layer.router.selection_bias.copy_(torch.tensor([1e-3, 1.0 + 1e-3, -2.0, 0.0]))
    exact = layer.router.selection_bias.clone()
    layer.to(torch.bfloat16)
    assert layer.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(layer.router.selection_bias, exact)  # not rounded to bfloat16
    # Built without memory, then materialised: the buffer gets real float32 storage.
    with torch.device("meta"):
        meta = MoELayer(D, FF, 4, 2, selection_bias=True, dtype=torch.bfloat16)
    meta.to_empty(device="cpu")
    assert meta.router.selection_bias.device.type == "cpu"
    assert meta.router.selection_bias.dtype == torch.float32


def test_update_selection_bias_requires_buffer_and_forward():
    with pytest.raises(RuntimeError):
        build(dict(num_experts=4, top_k=2, selection_bias=True)).update_selection_bias(0.1)
    layer = build(dict(num_experts=4, top_k=2))
    layer(torch.randn(3, D))
    with pytest.raises(RuntimeError):
        layer.update_selection_bias(0.1)


def test_selection_bias_balancing_reduces_imbalance():
    E, k, T = 8, 2, 128
    layer = build(dict(num_experts=E, top_k=k, scoring="sigmoid", selection_bias=True, router_bias=True), seed=20)
    with torch.no_grad():
        layer.router.selection_bias.zero_()
        layer.router.bias.copy_(torch.linspace(1.5, -1.5, E))  # skewed towards the low experts
    torch.manual_seed(21)
    x = torch.randn(T, D)

    def imbalance():
        load = layer.tokens_per_expert.double()
        return (load.max() / load.mean()).item()

    with torch.no_grad():
        layer(x)
        first = imbalance()
        late = []
        for step in range(100):
            layer(x)
            if step >= 90:
                late.append(imbalance())
            layer.update_selection_bias(0.02)
    # The sign update settles into a small oscillation around balance.
    assert first > 2.0, first
    assert max(late) < 1.3, (first, late)


# --- jitter ----------------------------------------------------------------------------------


def test_router_jitter():
    opts = dict(num_experts=4, top_k=2)
    layer = build(opts, seed=22, router_jitter=0.2)
    plain = build(opts, seed=22)
    x = torch.randn(3, 5, D)
    layer.eval()
    plain.eval()
    with torch.no_grad():
        a, b, c = layer(x), layer(x), plain(x)
    assert torch.equal(a, b) and torch.equal(a, c)
    layer.train()
    plain.train()
    with torch.no_grad():
        t1, t2 = layer(x), layer(x)
        assert torch.equal(plain(x), c)  # no jitter: training mode alone changes nothing
    assert not torch.equal(t1, c) and not torch.equal(t1, t2)
    with pytest.raises(ValueError, match=r"^router_jitter\b"):
        MoELayer(D, FF, 4, 2, router_jitter=1.5)


# --- routing_summary -------------------------------------------------------------------------


def test_routing_summary():
    model = nn.Sequential(build(dict(num_experts=4, top_k=2)), nn.Identity(),
                          build(dict(num_experts=4, top_k=1, expert_capacity=2), seed=1))
    with torch.no_grad():
        model[0].router.weight.zero_()
        model[0].router.weight[:, :4].copy_(3.0 * torch.eye(4))
    x = torch.zeros(8, D)
    x[:, :4] = torch.eye(4).repeat(2, 1)
    x = x + 0.01 * torch.randn_like(x)
    model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoutingCollapseWarning)  # balanced: no warning
        summary = routing_summary(model[:1])
    summary = routing_summary(model, warn=False)
    assert [s.name for s in summary] == ["0", "2"]
    for s, layer in zip(summary, (model[0], model[2])):
        assert len(s.load) == 4 and sum(s.load) == pytest.approx(1.0)
        tpe = layer.tokens_per_expert.double()
        assert s.load == pytest.approx((tpe / tpe.sum()).tolist())
        assert s.dropped_fraction == pytest.approx(layer.dropped_fraction.item())
        assert s.router_entropy == pytest.approx(layer.router_entropy.item())
        assert s.aux_loss == pytest.approx(layer.aux_loss.item())
        assert s.z_loss == pytest.approx(layer.z_loss.item())


def test_routing_summary_warns_on_collapse():
    layer = one_expert_layer(E=4, k=1, dtype=torch.float32)
    layer(torch.randn(16, D))
    assert layer.tokens_per_expert.tolist() == [16, 0, 0, 0]
    with pytest.warns(RoutingCollapseWarning):
        (s,) = routing_summary(layer)
    assert s.load == [1.0, 0.0, 0.0, 0.0]
    # A uniform router has the maximal entropy log(E).
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()
    layer(torch.randn(16, D))
    assert layer.router_entropy.item() == pytest.approx(math.log(4), rel=1e-6)


# --- state dict ------------------------------------------------------------------------------


def test_state_dict_keys_and_shapes():
    E, fs = 6, 10
    layer = MoELayer(D, FF, E, 2, router_bias=True, selection_bias=True, expert_bias=True,
                     shared_expert_d_ff=fs, shared_expert_gate=True, dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "router.weight": (E, D), "router.bias": (E,), "router.selection_bias": (E,),
        "gate_up_proj": (E, 2 * FF, D), "down_proj": (E, D, FF),
        "gate_up_proj_bias": (E, 2 * FF), "down_proj_bias": (E, D),
        "shared_expert.gate_proj.weight": (fs, D), "shared_expert.up_proj.weight": (fs, D),
        "shared_expert.down_proj.weight": (D, fs), "shared_expert_gate.weight": (1, D)}
    assert layer.state_dict()["router.selection_bias"].dtype == torch.float32
    assert layer.state_dict()["router.weight"].dtype == torch.bfloat16
    plain = MoELayer(D, FF, E, 2, activation="relu", shared_expert_d_ff=fs)
    assert set(plain.state_dict()) == {"router.weight", "gate_up_proj", "down_proj",
                                       "shared_expert.up_proj.weight", "shared_expert.down_proj.weight"}
    assert plain.gate_up_proj.shape == (E, FF, D)
    assert set(MoELayer(D, FF, E, 2).state_dict()) == {"router.weight", "gate_up_proj", "down_proj"}


@pytest.mark.parametrize("case", ["preset_deepseek_v3", "preset_gpt_oss", "preset_qwen2_moe"])
def test_save_load_round_trip(case):
    config, shape = CASES[case]
    layer = build(config, seed=23)
    x = torch.randn(*shape, D)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = MoELayer.from_config(config)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for name, t in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
