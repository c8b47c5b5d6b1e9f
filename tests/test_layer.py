"""MoELayer against the pure-PyTorch Hugging Face loop in sparsemoe.reference.

Covers forward/backward in float64/float32/bfloat16 for every activation, gradcheck of the
whole layer, torch.compile, autocast, edge shapes, the load-balancing loss, determinism and a
short training run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import sparsemoe
from sparsemoe import MoEConfig, MoELayer, reference
from sparsemoe.ops import ACTIVATIONS, GATED_ACTIVATIONS

PARAM_NAMES = ("router.weight", "gate_up_proj", "down_proj")


# --- helpers ---------------------------------------------------------------------------------


def make_layer(d=16, f=24, E=6, k=2, activation="swiglu", renormalize=True,
               dtype=torch.float32, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(d, f, E, k, activation=activation, renormalize=renormalize, dtype=dtype)
    # A router with logits of order 1 makes the routing weights non-trivial (not ~1/E).
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0 / math.sqrt(d) * 2)
    return layer


def params_of(layer: MoELayer) -> dict[str, torch.Tensor]:
    return dict(layer.named_parameters())


def run_layer(layer: MoELayer, x: torch.Tensor, grad_out: torch.Tensor):
    """Forward + backward of the library layer -> (out, grads dict incl. 'x')."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return out.detach(), grads


def run_reference(params: dict[str, torch.Tensor], x: torch.Tensor, grad_out: torch.Tensor,
                  top_k: int, activation: str, renormalize: bool, dtype: torch.dtype):
    """Forward + backward of reference.moe_forward with copies of params cast to dtype."""
    leaves = {n: p.detach().to(dtype).clone().requires_grad_(True) for n, p in params.items()}
    xr = x.detach().to(dtype).clone().requires_grad_(True)
    E, _, d = params["gate_up_proj"].shape
    config = MoEConfig(d_model=d, d_ff=params["down_proj"].shape[2], num_experts=E, top_k=top_k,
                       activation=activation, renormalize=renormalize)
    out = reference.moe_forward(xr, leaves, config)
    out.backward(grad_out.to(dtype))
    grads = {"x": xr.grad}
    grads.update({n: p.grad for n, p in leaves.items()})
    return out.detach(), grads


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def scale_of(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


# --- forward / backward against the reference ------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_reference(dtype, activation, renormalize):
    B, S, d, f, E, k = 2, 7, 16, 24, 6, 2
    layer = make_layer(d, f, E, k, activation, renormalize, dtype=torch.float32, seed=1)
    layer = layer.to(dtype)
    torch.manual_seed(2)
    x = torch.randn(B, S, d).to(dtype)
    g = torch.randn(B, S, d).to(dtype)

    width = 2 * f if activation in GATED_ACTIVATIONS else f
    assert layer.gate_up_proj.shape == (E, width, d)

    out, grads = run_layer(layer, x, g)
    assert out.shape == (B, S, d) and out.dtype == dtype
    assert set(grads) == {"x", *PARAM_NAMES}
    for name, gr in grads.items():
        assert gr is not None and gr.dtype == dtype, name

    if dtype in (torch.float64, torch.float32):
        ref_out, ref_grads = run_reference(params_of(layer), x, g, k, activation, renormalize, dtype)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol * scale_of(ref_out))
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=tol, atol=tol * scale_of(ref),
                                       msg=lambda m, name=name: f"grad {name}: {m}")
    else:
        # bfloat16: the library may be off float64 by at most twice what the reference loop
        # computed in bfloat16 is off float64 on the very same (bf16-valued) inputs.
        ref64_out, ref64_grads = run_reference(params_of(layer), x, g, k, activation, renormalize,
                                               torch.float64)
        ref16_out, ref16_grads = run_reference(params_of(layer), x, g, k, activation, renormalize,
                                               torch.bfloat16)
        pairs = [("out", out, ref16_out, ref64_out)]
        pairs += [(n, grads[n], ref16_grads[n], ref64_grads[n]) for n in ref64_grads]
        for name, lib, r16, r64 in pairs:
            floor = 1e-6 * scale_of(r64)
            err_lib, err_ref = max_err(lib, r64), max_err(r16, r64)
            assert err_lib <= 2 * err_ref + floor, (
                f"{name}: bf16 layer error {err_lib:.3e} vs float64 exceeds 2x the bf16 "
                f"reference's error {err_ref:.3e}")


# --- gradcheck -------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation, renormalize):
    d, f, E, k, T = 4, 3, 4, 2, 5
    layer = make_layer(d, f, E, k, activation, renormalize, dtype=torch.float64, seed=3)
    torch.manual_seed(4)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in
              (layer.router.weight, layer.gate_up_proj, layer.down_proj)]

    def fn(x, router_w, w1, w2):
        return functional_call(layer, dict(zip(PARAM_NAMES, (router_w, w1, w2))), (x,))

    # Top-k routing is piecewise: make sure every token's k-th and (k+1)-th logits are far
    # apart compared with the finite-difference step, so no perturbation flips a pick.
    logits = F.linear(x, params[0]).sort(dim=-1, descending=True).values
    assert (logits[:, k - 1] - logits[:, k]).min() > 1e-3
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


# --- torch.compile ---------------------------------------------------------------------------


def test_compile_matches_eager():
    B, S, d, f, E, k = 2, 6, 16, 32, 4, 2
    layer = make_layer(d, f, E, k, "swiglu", True, dtype=torch.float32, seed=5)
    torch.manual_seed(6)
    x = torch.randn(B, S, d)
    g = torch.randn(B, S, d)

    def step(module):
        layer.zero_grad(set_to_none=True)
        layer._routing = layer._stats = None  # forget the previous step's statistics
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        aux, tpe = layer.aux_loss, layer.tokens_per_expert
        assert aux is not None and tpe is not None, "aux_loss/tokens_per_expert not set"
        ((out * g).sum() + aux).backward()
        grads = {"x": xi.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}
        return out.detach(), aux.detach(), tpe, grads

    out_e, aux_e, tpe_e, grads_e = step(layer)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True)
        out_c, aux_c, tpe_c, grads_c = step(compiled)
        # A second call reuses the compiled graph and must agree as well.
        out_c2, _, _, _ = step(compiled)
    finally:
        torch._dynamo.reset()

    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_c2, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_c, aux_e, rtol=1e-6, atol=1e-6)
    assert tpe_c.dtype == torch.int64 and torch.equal(tpe_c, tpe_e)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


# --- autocast --------------------------------------------------------------------------------


def test_autocast_bf16():
    B, S, d, f, E, k = 2, 8, 16, 32, 4, 2
    layer = make_layer(d, f, E, k, "swiglu", True, dtype=torch.float32, seed=7)
    torch.manual_seed(8)
    x = torch.randn(B, S, d, requires_grad=True)

    with torch.no_grad():
        out32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (B, S, d)

    # The experts really run in bf16: identical to a bf16 copy of the layer on bf16 input.
    layer16 = MoELayer(d, f, E, k, dtype=torch.bfloat16)
    layer16.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(out, layer16(x.detach().bfloat16()))

    # Close to fp32 at bf16 tolerance: within 2x the error of the reference loop run in bf16.
    p = params_of(layer)
    with torch.no_grad():
        ref16 = reference.moe_forward(x.bfloat16(), {n: p[n].bfloat16() for n in PARAM_NAMES}, layer.config)
    err_ref = max_err(ref16, out32)
    assert 0 < max_err(out, out32) <= 2 * err_ref + 1e-6

    (out.float().square().sum() + layer.aux_loss).backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


# --- edge shapes -----------------------------------------------------------------------------


def test_single_expert_is_dense_swiglu():
    d, f = 8, 12
    layer = make_layer(d, f, E=1, k=1, dtype=torch.float64, seed=9)
    torch.manual_seed(10)
    x = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    w_gate, w_up = layer.gate_up_proj[0].chunk(2, dim=0)
    dense = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), layer.down_proj[0])
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)

    g = torch.randn_like(out)
    gx, gw1, gw2, grouter = torch.autograd.grad(
        out, (x, layer.gate_up_proj, layer.down_proj, layer.router.weight), g)
    dx, dw1, dw2 = torch.autograd.grad(dense, (x, layer.gate_up_proj, layer.down_proj), g)
    torch.testing.assert_close(gx, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw1, dw1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw2, dw2, rtol=1e-12, atol=1e-12)
    # The only expert always gets weight 1: the router receives no gradient from the output.
    assert grouter.abs().max() < 1e-12
    assert torch.equal(layer.tokens_per_expert, torch.tensor([15]))


@pytest.mark.parametrize("renormalize", [True, False])
def test_top_k_equals_num_experts(renormalize):
    E = 4
    layer = make_layer(8, 12, E, E, "gelu", renormalize, dtype=torch.float64, seed=11)
    torch.manual_seed(12)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    g = torch.randn_like(x)
    out, grads = run_layer(layer, x, g)
    ref_out, ref_grads = run_reference(params_of(layer), x, g, E, "gelu", renormalize, torch.float64)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.tokens_per_expert, torch.full((E,), 10))
    # Even with every expert picked, the weights (the full softmax) depend on the router.
    assert grads["router.weight"].abs().max() > 0


def test_zero_tokens():
    layer = make_layer(8, 12, 4, 2, seed=13)
    x = torch.randn(0, 8, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 8)
    assert layer.tokens_per_expert.dtype == torch.int64
    assert torch.equal(layer.tokens_per_expert, torch.zeros(4, dtype=torch.int64))
    assert torch.isfinite(layer.aux_loss)
    (out.sum() + layer.aux_loss).backward()
    assert x.grad.shape == (0, 8)
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    # Leading dims are kept too.
    assert layer(torch.randn(2, 0, 8)).shape == (2, 0, 8)


@pytest.mark.parametrize("shape", [(1, 8), (1, 1, 8)])
def test_single_token(shape):
    layer = make_layer(8, 12, 4, 2, dtype=torch.float64, seed=14)
    torch.manual_seed(15)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn_like(x)
    out, grads = run_layer(layer, x, g)
    ref_out, ref_grads = run_reference(params_of(layer), x, g, 2, "swiglu", True, torch.float64)
    assert out.shape == shape
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-12, atol=1e-12)


# --- experts without tokens ------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_unused_experts_get_exactly_zero_grads(activation):
    d, f, E, k = 8, 12, 6, 2
    layer = make_layer(d, f, E, k, activation, dtype=torch.float32, seed=16)
    torch.manual_seed(17)
    x = torch.randn(4, 16, d)
    x[..., 0] = 1.0  # a constant feature acts as a router bias
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([10.0, 10.0, 10.0, 10.0, -10.0, -10.0])
        layer.router.weight[:, 1:].clamp_(-0.1, 0.1)  # |other logits| << 20
    g = torch.randn_like(x)
    out, grads = run_layer(layer, x, g)

    tpe = layer.tokens_per_expert
    assert tpe[4:].sum() == 0 and (tpe[:4] > 0).all(), tpe
    for name in ("gate_up_proj", "down_proj"):
        assert torch.count_nonzero(grads[name][4:]) == 0, name
        for e in range(4):
            assert torch.count_nonzero(grads[name][e]) > 0, (name, e)

    ref_out, ref_grads = run_reference(params_of(layer), x, g, k, activation, True, torch.float32)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5 * scale_of(ref))


# --- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,E", [(torch.float32, 8), (torch.float64, 8), (torch.float32, 1), (torch.float64, 1)])
def test_token_permutation_invariance(dtype, E):
    # The README's contract: permuting the tokens permutes the routing exactly and the outputs to
    # float rounding (a row's BLAS result may depend on its position among its expert's rows).
    d, k, T = 32, min(2, E), 384
    layer = make_layer(d, 64, E, k, dtype=dtype, seed=18)
    torch.manual_seed(19)
    x = torch.randn(T, d, dtype=dtype)
    perm = torch.randperm(T)
    with torch.no_grad():
        out = layer(x)
        tpe = layer.tokens_per_expert.clone()
        out_perm = layer(x[perm])
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(out_perm, out[perm], rtol=tol, atol=tol)
    assert torch.equal(layer.tokens_per_expert, tpe)


def test_bitwise_repeatable():
    d, E, k = 32, 8, 2
    layer = make_layer(d, 64, E, k, dtype=torch.float32, seed=20)
    torch.manual_seed(21)
    x = torch.randn(4, 1024, d)  # large enough for the kernels to split the tokens over threads
    g = torch.randn_like(x)

    def once():
        out, grads = run_layer(layer, x, g)
        return out, {n: t.clone() for n, t in grads.items()}, layer.aux_loss.detach().clone()

    out1, grads1, aux1 = once()
    out2, grads2, aux2 = once()
    assert torch.equal(out1, out2)
    assert torch.equal(aux1, aux2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


# --- aux loss / tokens_per_expert ------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_loss_matches_reference(k):
    d, E = 16, 6
    layer = make_layer(d, 24, E, k, dtype=torch.float32, seed=22)
    torch.manual_seed(23)
    x = torch.randn(3, 11, d)
    layer(x)
    aux, tpe = layer.aux_loss, layer.tokens_per_expert
    assert aux.dim() == 0

    router_w = layer.router.weight.detach().clone().requires_grad_(True)
    logits = F.linear(x.reshape(-1, d), router_w)
    _, ids = reference.route(logits, k, True)
    ref_aux = reference.load_balancing_loss(logits, ids, E)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-6, atol=1e-6)

    assert tpe.dtype == torch.int64 and tpe.shape == (E,)
    assert tpe.sum().item() == 33 * k
    assert torch.equal(tpe, torch.bincount(ids.reshape(-1), minlength=E))

    # aux_loss carries gradient to the router (through the mean probabilities) only.
    (grad_w,) = torch.autograd.grad(aux, layer.router.weight)
    (ref_grad_w,) = torch.autograd.grad(ref_aux, router_w)
    assert grad_w.abs().max() > 0
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-6)
    assert torch.autograd.grad(aux, layer.gate_up_proj, allow_unused=True)[0] is None


@pytest.mark.parametrize("k", [1, 2, 4])
def test_aux_loss_uniform_router_is_one(k):
    E = 8
    layer = make_layer(16, 24, E, k, seed=24)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(5, 16))
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0), rtol=1e-6, atol=1e-6)


def test_aux_loss_balanced_vs_collapsed():
    E, k, d = 4, 1, 4
    layer = make_layer(d, 8, E, k, seed=25)
    # Token t is a scaled one-hot on expert t % E: perfectly balanced picks.
    x = 5.0 * torch.eye(d).repeat(8, 1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
    layer(x)
    assert torch.equal(layer.tokens_per_expert, torch.full((E,), 8))
    # Balanced f = 1/E and P_e all equal by symmetry -> exactly 1.
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0), rtol=1e-6, atol=1e-6)
    # Every token prefers expert 0: the loss approaches E.
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(5.0)
    layer(x)
    assert torch.equal(layer.tokens_per_expert, torch.tensor([32, 0, 0, 0]))
    assert layer.aux_loss.item() > 0.9 * E


# --- training --------------------------------------------------------------------------------


def test_training_reduces_loss():
    d, f, E, k, T = 16, 32, 4, 2, 256
    torch.manual_seed(26)
    teacher = MoELayer(d, f, E, k)
    x = torch.randn(T, d)
    with torch.no_grad():
        y = teacher(x)
    student = make_layer(d, f, E, k, seed=27)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        opt.zero_grad(set_to_none=True)
        mse = F.mse_loss(student(x), y)
        (mse + 0.01 * student.aux_loss).backward()
        opt.step()
        losses.append(mse.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# --- module API ------------------------------------------------------------------------------


def test_extra_repr():
    layer = MoELayer(16, 24, 6, 2, activation="gelu_tanh", renormalize=False)
    text = repr(layer)
    for key in ("d_model=16", "d_ff=24", "num_experts=6", "top_k=2", "gelu_tanh",
                "renormalize=False"):
        assert key in text, (key, text)


@pytest.mark.parametrize("activation", ["swiglu", "silu"])
def test_state_dict_layout(activation):
    d, f, E, k = 8, 12, 4, 2
    layer = MoELayer(d, f, E, k, activation=activation)
    sd = layer.state_dict()
    assert set(sd) == {"router.weight", "gate_up_proj", "down_proj"}
    width = 2 * f if activation == "swiglu" else f
    assert sd["router.weight"].shape == (E, d)
    assert sd["gate_up_proj"].shape == (E, width, d)
    assert sd["down_proj"].shape == (E, d, f)

    # Loading HF-layout tensors gives exactly the reference loop on those tensors.
    torch.manual_seed(28)
    new = {n: torch.randn_like(t) * 0.3 for n, t in sd.items()}
    layer.load_state_dict(new)
    x = torch.randn(2, 5, d, dtype=torch.float32)
    with torch.no_grad():
        out = layer(x)
        ref = reference.moe_forward(x, new, layer.config)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sparsemoe.MoELayer is MoELayer


def test_deepcopy_and_pickle_after_training_forward():
    import copy
    import io

    layer = make_layer()
    out = layer(torch.randn(10, 16))
    (out.sum() + layer.aux_loss).backward()
    clone = copy.deepcopy(layer)
    assert clone.aux_loss is None and clone.tokens_per_expert is None
    assert layer.aux_loss is not None  # the original keeps its statistics
    x = torch.randn(7, 16)
    assert torch.equal(clone(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = make_layer(seed=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), layer(x))


def test_float64_aux_loss_gradcheck():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(9, 16, dtype=torch.float64)

    def aux(w):
        functional_call(layer, {"router.weight": w}, (x,), strict=False)
        return layer.aux_loss

    w = layer.router.weight.detach().clone().requires_grad_()
    assert aux(w).dtype == torch.float64
    assert torch.autograd.gradcheck(aux, (w,))
