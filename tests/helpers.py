"""Helpers shared by the test modules (which never import each other): tolerance rules, input
builders for the ops, the layer cases with their oracle runs, and the CUDA plumbing."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

import sparsemoe
from sparsemoe import MoEConfig, MoELayer, reference
from sparsemoe.config import ACTIVATIONS, GATED_ACTIVATIONS

@contextlib.contextmanager
def threads(n: int):
    """torch's thread count set to n inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- tolerance rules ---------------------------------------------------------------------------


def lowp_tolerance(kernel: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    """Assert that `kernel` (low precision) is within 2x the error that plain PyTorch at the same
    precision (`plain`) makes against a float64 reference (`exact`), plus a floor of one ulp-ish."""
    exact = exact.double()
    plain_err = (plain.double() - exact).abs().max().item()
    kernel_err = (kernel.double() - exact).abs().max().item()
    floor = 1e-2 * max(exact.abs().max().item(), 1e-3) * torch.finfo(kernel.dtype).eps
    assert kernel_err <= 2 * plain_err + floor, f"error {kernel_err:.3g} > 2 x plain PyTorch's {plain_err:.3g}"


def assert_grads_close(got, plain, exact, dtype: torch.dtype) -> None:
    """Kernel gradients `got` against float64 `exact` ones: tight in float32, and within 2x the
    error of plain PyTorch (`plain`, computed at `dtype`) in low precision."""
    for a, p, e in zip(got, plain, exact):
        assert a.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=1e-5)
        else:
            lowp_tolerance(a, p, e)


def close(a, b, tol, what):
    a, b = a.double(), b.double()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


# --- op inputs ---------------------------------------------------------------------------------


def routed(T, d, E, k, dtype=torch.float32, drop=0.0):
    """rows [T*k, d], slot [T,k] (a permutation, optionally with dropped picks), weights [T,k]."""
    rows = torch.randn(T * k, d).to(dtype)
    slot = torch.randperm(T * k).view(T, k)
    if drop:
        slot = torch.where(torch.rand(T, k) < drop, -1, slot)
    weights = torch.rand(T, k, dtype=reference.opmath_dtype(dtype))
    return rows, slot, weights


def random_ids(T, E, k):
    return torch.rand(T, E).argsort(dim=1)[:, :k].contiguous()


def make_priority(kind, T, k, dtype=torch.float32):
    if kind is None:
        return None
    if kind == "rand":
        return torch.rand(T, k, dtype=dtype)
    return torch.randint(0, 3, (T, k)).to(dtype)  # "ties": many equal priorities


def experts(N, d, f, E, act, dtype=torch.float32, counts=None, pad=0, x_scale=1.0):
    """x_sorted [N + pad, d] (the last `pad` rows are capacity padding), offsets [E+1] with
    offsets[E] = N, w1 [E,F1,d], w2 [E,d,f], b1 [E,F1], b2 [E,d]."""
    if counts is None:
        cuts = torch.sort(torch.randint(0, N + 1, (E - 1,))).values
        counts = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([N])]))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.as_tensor(counts).cumsum(0)])
    assert offsets[-1] == N
    width = 2 * f if act in GATED_ACTIVATIONS else f
    x = (torch.randn(N + pad, d) * x_scale).to(dtype)
    w1 = (torch.randn(E, width, d) / d**0.5).to(dtype)
    w2 = (torch.randn(E, d, f) / f**0.5).to(dtype)
    b1 = (torch.randn(E, width) * 0.5).to(dtype)
    b2 = (torch.randn(E, d) * 0.5).to(dtype)
    return x, offsets, w1, w2, b1, b2


def interleave_gate_up(w1: torch.Tensor) -> torch.Tensor:
    """w1 [E, 2f, ...] (or b1 [E, 2f]) with [gate | up] halves -> the same rows alternating gate
    and up, GPT-OSS's order (gate_up_interleaved=True)."""
    gate, up = w1.chunk(2, dim=1)
    return torch.stack((gate, up), dim=2).reshape(w1.shape)


def transposed_view(w: torch.Tensor) -> torch.Tensor:
    """The values of an expert weight [E, R, C] as a transposed view of an [E, C, R] parameter,
    the layout Hugging Face stores GPT-OSS's and Llama-4's experts in."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def hidden_pre_activation(x, off, w1, b1):
    """x @ w1[e]^T + b1[e] for the rows of each expert (padding rows left out)."""
    return torch.cat([x[off[e]:off[e + 1]] @ w1[e].T + (0 if b1 is None else b1[e]) for e in range(w1.shape[0])])


def kink_distance(x, off, w1, b1, act, limit):
    h = hidden_pre_activation(x, off, w1, b1)
    if act == "clamped_swiglu":
        gate, up = h.chunk(2, -1)
        return min((gate - limit).abs().min(), (up - limit).abs().min(), (up + limit).abs().min()).item()
    if act == "relu":
        return h.abs().min().item()
    return 1.0


# --- layer cases and their oracle runs -------------------------------------------------------

D, FF = 8, 12  # d_model, d_ff of the layer cases unless a test says otherwise


def _cfg(**options) -> MoEConfig:
    return MoEConfig(**{"d_model": D, "d_ff": FF, "num_experts": 6, "top_k": 2, **options})


# The model presets of MoEConfig at tiny sizes, with the input shape each case runs on.
PRESETS = {
    "mixtral": (MoEConfig.mixtral(d_model=D, d_ff=FF, num_experts=4, top_k=2), (2, 5)),
    "qwen2_moe": (MoEConfig.qwen2_moe(d_model=D, d_ff=FF, num_experts=6, top_k=2, shared_expert_d_ff=10), (2, 5)),
    "deepseek_v3": (MoEConfig.deepseek_v3(d_model=D, d_ff=FF, num_experts=8, top_k=2, num_groups=4, topk_groups=2,
                                          shared_expert_d_ff=10), (2, 5)),
    "gpt_oss": (MoEConfig.gpt_oss(d_model=D, d_ff=FF, num_experts=4, top_k=2, swiglu_limit=0.6, swiglu_alpha=1.5),
                (2, 5)),
    "llama4": (MoEConfig.llama4(d_model=D, d_ff=FF, num_experts=4, top_k=1, shared_expert_d_ff=10), (2, 5)),
    # A float64-differentiable router (Switch's own is float32) and a router bias.
    "switch": (MoEConfig.switch(d_model=D, d_ff=FF, num_experts=4, expert_capacity=2, router_bias=True,
                                router_dtype=None), (2, 6)),
    "expert_choice": (_cfg(num_experts=4, top_k=2, routing="expert_choice", capacity_factor=1.0), (2, 5)),
}

# One option (or a small combination) at a time on a plain top-2 softmax layer.
OPTIONS = {
    "sigmoid": dict(scoring="sigmoid"),
    "sigmoid_no_renorm": dict(scoring="sigmoid", renormalize=False),
    "softmax_topk": dict(scoring="softmax_topk"),
    "router_bias": dict(router_bias=True),
    "router_dtype_fp32": dict(router_dtype=torch.float32),
    "selection_bias": dict(selection_bias=True, scoring="sigmoid"),
    "selection_bias_softmax": dict(selection_bias=True),
    "groups": dict(num_experts=8, num_groups=4, topk_groups=2, top_k=3),
    "groups_bias": dict(num_experts=8, num_groups=2, topk_groups=1, selection_bias=True, scoring="sigmoid"),
    "scaling": dict(routed_scaling_factor=1.7),
    "capacity_factor": dict(capacity_factor=0.75),
    "capacity_probability": dict(capacity_factor=0.75, drop_policy="probability"),
    "expert_capacity": dict(expert_capacity=2),
    "capacity_zero": dict(expert_capacity=0),
    "capacity_sequence": dict(expert_capacity=2, capacity_scope="sequence"),
    "capacity_sequence_probability": dict(capacity_factor=0.5, capacity_scope="sequence",
                                          drop_policy="probability"),
    "shared": dict(shared_expert_d_ff=10),
    "shared_gate": dict(shared_expert_d_ff=10, shared_expert_gate=True),
    "shared_plain_activation": dict(activation="gelu", shared_expert_d_ff=10, shared_expert_gate=True),
    "expert_bias": dict(expert_bias=True),
    "expert_bias_relu": dict(expert_bias=True, activation="relu"),
    "weights_on_input": dict(weights_on_input=True, top_k=2),
    "clamped_swiglu": dict(activation="clamped_swiglu", swiglu_limit=0.5),
    "expert_choice_half": dict(routing="expert_choice", capacity_factor=0.5, scoring="sigmoid"),
    "expert_choice_capacity": dict(routing="expert_choice", expert_capacity=3, capacity_scope="sequence"),
}

# name -> (MoEConfig, input shape)
CASES = {**{f"preset_{n}": c for n, c in PRESETS.items()},
         **{n: (_cfg(**o), (2, 5)) for n, o in OPTIONS.items()}}

STATS = ("aux_loss", "z_loss", "tokens_per_expert", "dropped_fraction", "router_entropy", "router_logits")


def build(config: MoEConfig | dict, dtype=torch.float32, seed=0, d=D, f=FF, **changes) -> MoELayer:
    """A layer of `config` (a MoEConfig, or MoEConfig options with 6 experts and top-2 by default)
    at width d, f with non-trivial parameters, built in `dtype` (the same values, rounded,
    whatever the dtype)."""
    if isinstance(config, dict):
        config = MoEConfig(**{"num_experts": 6, "top_k": 2, "d_model": d, "d_ff": f, **config})
    config = dataclasses.replace(config, d_model=d, d_ff=f, **changes)
    torch.manual_seed(seed)
    master = MoELayer.from_config(config)
    with torch.no_grad():
        master.router.weight.normal_(0.0, 2.0 / math.sqrt(d))  # logits of order 1
        if master.router.bias is not None:
            master.router.bias.normal_(0.0, 0.5)
        if master.router.selection_bias is not None:
            master.router.selection_bias.normal_(0.0, 0.1)
    layer = MoELayer.from_config(config, dtype=dtype)
    layer.load_state_dict(master.state_dict())
    return layer


def oracle(layer: MoELayer, x, params: dict | None = None, padding_mask=None, return_stats=True):
    """reference.moe_forward with the layer's config and `params` (default: its own tensors)."""
    tensors = {**dict(layer.named_buffers()), **dict(layer.named_parameters())}
    if params is not None:
        tensors.update(params)
    return reference.moe_forward(x, tensors, layer.config, padding_mask=padding_mask, return_stats=return_stats)


def loss_of(out, g, aux, z):
    # The losses join the backward so that their router gradients are checked too.
    return (out.double() * g.double()).sum() + 0.3 * aux.double() + 0.01 * z.double()


def run_layer(layer: MoELayer, x, g, padding_mask=None):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, padding_mask)
    loss_of(out, g, layer.aux_loss, layer.z_loss).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    stats = {s: getattr(layer, s) for s in STATS}
    return out.detach(), grads, stats


def run_oracle(layer: MoELayer, x, g, dtype, padding_mask=None):
    leaves = {n: p.detach().to(dtype).clone().requires_grad_(True) for n, p in layer.named_parameters()}
    xr = x.detach().to(dtype).clone().requires_grad_(True)
    out, stats = oracle(layer, xr, leaves, padding_mask)
    loss_of(out, g, stats["aux_loss"], stats["z_loss"]).backward()
    grads = {"x": xr.grad, **{n: p.grad for n, p in leaves.items()}}
    return out.detach(), grads, stats


def grad_or_zero(grads, name, like):
    # A parameter that got no gradient at all (e.g. every pick dropped) compares as zeros.
    g = grads[name]
    return torch.zeros_like(like) if g is None else g


def inputs(shape, dtype, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(*shape, D).to(dtype)
    g = torch.randn(*shape, D).to(dtype)
    return x, g


def check_autocast_bf16_matches_bf16_layer(case: str, device: torch.device) -> None:
    config, shape = CASES[case]
    layer = build(config, torch.float32, seed=7).to(device)
    x, _ = inputs(shape, torch.float32, seed=8)
    x = x.to(device).requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # The experts run in bf16 and the routing math (route) in float32, exactly like a bf16 copy.
    layer16 = build(config, torch.bfloat16, seed=7).to(device)
    with torch.no_grad():
        assert torch.equal(out, layer16(x.detach().bfloat16()))
    assert torch.equal(layer.tokens_per_expert, layer16.tokens_per_expert)
    assert layer.aux_loss.dtype == torch.float32 and layer.z_loss.dtype == torch.float32
    (out.float().square().sum() + layer.aux_loss).backward()
    assert x.grad.dtype == torch.float32
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name


# --- CUDA --------------------------------------------------------------------------------------


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if not sparsemoe._C.with_cuda:
        return "sparsemoe was built without CUDA kernels"
    return None


needs_cuda = pytest.mark.skipif(cuda_skip_reason() is not None, reason=cuda_skip_reason() or "")
DEV = torch.device("cuda")
ACTS = ACTIVATIONS
LOWP = (torch.bfloat16, torch.float16)


def dev(t):
    """A copy of a tensor (or None, or any other argument, unchanged) on the GPU."""
    return t.to(DEV) if isinstance(t, torch.Tensor) else t


def host(out):
    """An op's output (a tensor or a tuple of them) back on the CPU."""
    return out.cpu() if isinstance(out, torch.Tensor) else tuple(t.cpu() for t in out)


def opcheck(op, *args):
    torch.library.opcheck(op, args)


# What only oneDNN's GEMM micro-kernel gives (the packed cache is used, bitwise invariance): it
# exists where torch exports cpublas::brgemm and the CPU is x86-64 with AVX2 or newer.
needs_microkernel = pytest.mark.skipif(not sparsemoe.ops.packed_kernels_available(),
                                       reason="needs oneDNN's micro-kernel (torch's cpublas::brgemm, x86-64 AVX2+)")
