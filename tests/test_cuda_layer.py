"""MoELayer on CUDA.

The same layer on the GPU equals it on the CPU (forward, every gradient, every statistic) for each
option set of the layer cases (helpers.CASES), and in bfloat16 stays within 2x plain PyTorch's error;
torch.compile and the replay of a CUDA graph (captured forward + backward, fed new input) equal
eager; forward + backward is bitwise repeatable and never synchronises with the host.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

from sparsemoe import MoELayer, routing_summary
from helpers import (CASES, D, DEV, STATS, build, check_autocast_bf16_matches_bf16_layer, close, grad_or_zero, inputs,
                     loss_of, lowp_tolerance, needs_cuda, run_oracle)

pytestmark = needs_cuda


def run(layer: MoELayer, x, g, padding_mask=None, module=None):
    """Forward (through `module`, default the layer) and backward on copies of the inputs on the
    layer's device -> (out, grads by name incl. 'x', statistics), all on the CPU."""
    device = layer.gate_up_proj.device
    layer.zero_grad(set_to_none=True)
    xi = x.detach().to(device).requires_grad_(True)
    mask = None if padding_mask is None else padding_mask.to(device)
    out = (layer if module is None else module)(xi, mask)
    loss_of(out, g.to(device), layer.aux_loss, layer.z_loss).backward()
    cpu = lambda t: None if t is None else t.detach().cpu()
    grads = {"x": cpu(xi.grad), **{n: cpu(p.grad) for n, p in layer.named_parameters()}}
    return cpu(out), grads, {s: cpu(getattr(layer, s)) for s in STATS}


def assert_runs_close(got, want, tol, layer):
    (out, grads, stats), (out_w, grads_w, stats_w) = got, want
    assert out.dtype == out_w.dtype and out.shape == out_w.shape
    close(out, out_w, tol, "out")
    params = {n: p.detach().cpu() for n, p in layer.named_parameters()}
    assert set(grads) == set(grads_w)
    for name in grads_w:
        like = params.get(name, out)
        close(grad_or_zero(grads, name, like), grad_or_zero(grads_w, name, like), tol, f"grad {name}")
    assert stats["tokens_per_expert"].dtype == torch.int64
    assert torch.equal(stats["tokens_per_expert"], stats_w["tokens_per_expert"])
    for name in ("aux_loss", "z_loss", "dropped_fraction", "router_entropy", "router_logits"):
        close(stats[name], stats_w[name], tol, name)


def assert_runs_equal(a, b):
    for what, x, y in (("out", a[0], b[0]), *((f"grad {n}", a[1][n], b[1][n]) for n in a[1]),
                       *((n, a[2][n], b[2][n]) for n in a[2])):
        assert (x is None and y is None) or torch.equal(x, y), what


# --- the same layer on the GPU and on the CPU ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_layer_matches_cpu_layer(case, dtype):
    config, shape = CASES[case]
    cpu_layer = build(config, dtype)
    gpu_layer = copy.deepcopy(cpu_layer).to(DEV)
    x, g = inputs(shape, dtype)
    mask = None
    if dtype == torch.float64:  # with padding (losses over the real tokens) in float64
        mask = torch.rand(shape) > 0.3
        mask.view(-1)[0] = True
    tol = 1e-12 if dtype == torch.float64 and cpu_layer.router.dtype_override is None else 1e-5
    assert_runs_close(run(gpu_layer, x, g, mask), run(cpu_layer, x, g, mask), tol, cpu_layer)


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_layer_bf16_within_plain_pytorch_error(case):
    config, shape = CASES[case]
    layer = build(config, torch.bfloat16).to(DEV)
    x, g = (t.to(DEV) for t in inputs(shape, torch.bfloat16))
    out, grads, _ = run(layer, x, g)
    plain_out, plain_grads, _ = run_oracle(layer, x, g, torch.bfloat16)
    exact_out, exact_grads, _ = run_oracle(layer, x, g, torch.float64)
    assert out.dtype == torch.bfloat16
    lowp_tolerance(out, plain_out.cpu(), exact_out.cpu())
    if layer.activation in ("relu", "clamped_swiglu"):
        return  # tiny shapes: a hidden value rounding across a kink would decide the gradients
    params = dict(layer.named_parameters())
    for name, exact in exact_grads.items():
        like = params.get(name, x)
        assert grads[name] is None or grads[name].dtype == like.dtype, name
        try:
            lowp_tolerance(grad_or_zero(grads, name, like.cpu()), grad_or_zero(plain_grads, name, like).cpu(),
                           grad_or_zero(exact_grads, name, like).cpu())
        except AssertionError as e:
            raise AssertionError(f"grad {name}: {e}") from None


@pytest.mark.parametrize("case", ["preset_deepseek_v3", "preset_gpt_oss", "preset_llama4", "preset_switch",
                                  "preset_expert_choice", "capacity_probability"])
def test_cuda_layer_gradcheck(case):
    config, _ = CASES[case]
    # A float32 router would not be float64-differentiable.
    layer = build(config, torch.float64, seed=3, d=4, f=2, router_dtype=None,
                  shared_expert_d_ff=2 if config.shared_expert_d_ff else 0).to(DEV)
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, dtype=torch.float64).to(DEV).requires_grad_(True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def fn(x, *ps):
        out = functional_call(layer, dict(zip(names, ps)), (x,))
        return out, layer.aux_loss, layer.z_loss

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["preset_mixtral", "preset_llama4", "preset_switch", "capacity_zero"])
@pytest.mark.parametrize("shape", [(0,), (2, 0), (1,), (1, 1)])
def test_cuda_layer_zero_and_one_token(case, shape):
    config, _ = CASES[case]
    cpu_layer = build(config, torch.float64)
    gpu_layer = copy.deepcopy(cpu_layer).to(DEV)
    x, g = inputs(shape, torch.float64)
    got, want = run(gpu_layer, x, g), run(cpu_layer, x, g)
    assert_runs_close(got, want, 1e-12, cpu_layer)
    if x.numel() == 0:
        assert got[0].shape == (*shape, D)
        assert all(t is None or torch.count_nonzero(t) == 0 for t in got[1].values())


@pytest.mark.parametrize("case", ["preset_mixtral", "preset_gpt_oss", "preset_switch"])
def test_cuda_autocast_bf16_matches_bf16_layer(case):
    check_autocast_bf16_matches_bf16_layer(case, DEV)


def test_cuda_selection_bias_update_matches_cpu():
    opts = dict(num_experts=8, top_k=2, scoring="sigmoid", selection_bias=True, router_bias=True)
    cpu_layer = build(opts, seed=20)
    with torch.no_grad():
        cpu_layer.router.bias.copy_(torch.linspace(1.5, -1.5, 8))  # skewed: the bias has work to do
    gpu_layer = copy.deepcopy(cpu_layer).to(DEV)
    x = torch.randn(128, D)
    with torch.no_grad():
        for _ in range(5):
            cpu_layer(x)
            gpu_layer(x.to(DEV))
            assert torch.equal(gpu_layer.tokens_per_expert.cpu(), cpu_layer.tokens_per_expert)
            cpu_layer.update_selection_bias(0.02)
            gpu_layer.update_selection_bias(0.02)
            assert torch.equal(gpu_layer.router.selection_bias.cpu(), cpu_layer.router.selection_bias)
    # Moving the module to bf16 keeps the bias in float32, on the module's device.
    bias = gpu_layer.to(torch.bfloat16).router.selection_bias
    assert bias.dtype == torch.float32 and bias.device.type == DEV.type


def test_cuda_routing_summary_matches_cpu():
    cpu_layer = build(dict(num_experts=4, top_k=1, expert_capacity=3), seed=1)
    gpu_layer = copy.deepcopy(cpu_layer).to(DEV)
    x = torch.randn(16, D)
    with torch.no_grad():
        cpu_layer(x)
        gpu_layer(x.to(DEV))
    (got,), (want,) = routing_summary(gpu_layer, warn=False), routing_summary(cpu_layer, warn=False)
    assert got.load == want.load and got.dropped_fraction == pytest.approx(want.dropped_fraction)
    for name in ("router_entropy", "aux_loss", "z_loss"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-5), name


# --- torch.compile, CUDA graphs --------------------------------------------------------------


@pytest.mark.parametrize("case,backend", [("preset_mixtral", "inductor"), ("preset_deepseek_v3", "inductor"),
                                          ("preset_llama4", "aot_eager"), ("preset_switch", "aot_eager"),
                                          ("preset_expert_choice", "aot_eager")])
def test_cuda_compile_matches_eager(case, backend):
    config, shape = CASES[case]
    layer = build(config, torch.float32, seed=5).to(DEV)
    x, g = inputs(shape, torch.float32, seed=6)
    eager = run(layer, x, g)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True, backend=backend)
        first = run(layer, x, g, module=compiled)
        second = run(layer, x, g, module=compiled)  # the cached graph agrees as well
    finally:
        torch._dynamo.reset()
    assert_runs_close(first, eager, 1e-5, layer)
    assert_runs_close(second, eager, 1e-5, layer)


def capture_step(step):
    """Warms `step` up on a side stream (lazy initialisation must not be captured), then records
    one call into a CUDA graph -> (graph, what that call returned). Every replay reruns the
    recorded kernels on the same tensors, so the returned tensors then hold the new results."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


@pytest.mark.parametrize("case", ["preset_mixtral", "preset_deepseek_v3", "preset_gpt_oss", "preset_llama4",
                                  "preset_switch", "preset_expert_choice", "capacity_probability"])
def test_cuda_graph_replay_matches_eager(case):
    config, shape = CASES[case]
    layer = build(config, torch.float32, seed=2).to(DEV)
    x0, g = inputs(shape, torch.float32, seed=3)
    static_x, static_g = x0.to(DEV).requires_grad_(True), g.to(DEV)

    def step():
        # Gradients start unset so that backward writes them afresh (inside the graph's memory).
        layer.zero_grad(set_to_none=True)
        static_x.grad = None
        out = layer(static_x)
        loss_of(out, static_g, layer.aux_loss, layer.z_loss).backward()
        return (out.detach(), {"x": static_x.grad, **{n: p.grad for n, p in layer.named_parameters()}},
                {s: getattr(layer, s).detach() for s in STATS})

    graph, (static_out, static_grads, static_stats) = capture_step(step)
    for seed in (10, 11):  # new tokens: the routing, counts and offsets all change
        x, _ = inputs(shape, torch.float32, seed=seed)
        with torch.no_grad():
            static_x.copy_(x.to(DEV))
        graph.replay()
        replayed = (static_out.cpu(), {n: None if t is None else t.cpu() for n, t in static_grads.items()},
                    {n: t.cpu() for n, t in static_stats.items()})
        assert_runs_close(replayed, run(layer, x, g), 1e-6, layer)


# --- determinism and host synchronisation ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["preset_mixtral", "preset_deepseek_v3", "preset_gpt_oss", "preset_llama4",
                                  "capacity_probability", "preset_expert_choice"])
def test_cuda_layer_bitwise_repeatable(case, dtype):
    config, _ = CASES[case]
    d = 64  # with d_ff 128: bf16 takes the _grouped_mm path
    layer = build(config, dtype, seed=21, d=d, f=128).to(DEV)
    torch.manual_seed(22)
    x = torch.randn(4, 1024, d).to(dtype)
    g = torch.randn(4, 1024, d).to(dtype)
    assert_runs_equal(run(layer, x, g), run(layer, x, g))


NO_SYNC_CASES = {**CASES, "jitter": (dict(router_jitter=0.1), (2, 5))}


@pytest.mark.parametrize("case", list(NO_SYNC_CASES))
def test_cuda_layer_never_syncs_with_the_host(case):
    config, shape = NO_SYNC_CASES[case]
    layer = build(config, torch.float32).to(DEV)
    x, g = (t.to(DEV) for t in inputs(shape, torch.float32))
    mask = torch.rand(shape) > 0.3
    mask.view(-1)[0] = True
    mask = mask.to(DEV)

    def step(autocast):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=autocast):
            out = layer(xi, mask)
        loss_of(out, g, layer.aux_loss, layer.z_loss).backward()
        if layer.router.selection_bias is not None:
            layer.update_selection_bias(1e-3)

    for autocast in (False, True):  # once first: lazy initialisation may synchronise
        step(autocast)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for autocast in (False, True):
            step(autocast)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert math.isfinite(layer.aux_loss.item())
