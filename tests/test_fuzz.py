"""Property-based fuzzing of every op and of random MoEConfigs against sparsemoe.reference.

Every example runs with torch's empty tensors filled with NaN (deterministic mode's
fill_uninitialized_memory), so an output element a kernel forgets to write fails the comparison.
Shapes include T = 0, E = 1, k = E, d = 1 and E up to ~1000; inputs come contiguous, transposed,
strided or expanded, in every dtype, with NaN/inf; size arguments include huge and negative
values, which must give a clean error naming the argument (or, for a capacity, mean dropless).

The suite runs a bounded number of examples per test (SPARSEMOE_FUZZ_EXAMPLES, default 150, with a
fixed seed so that CI is repeatable). The long run (10^5+ examples in all, fresh random seeds):

    SPARSEMOE_FUZZ_EXAMPLES=20000 SPARSEMOE_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsemoe import MoEConfig, MoELayer, ops, reference
from sparsemoe.config import ACTIVATIONS, GATED_ACTIVATIONS, SCORINGS

EXAMPLES = int(os.environ.get("SPARSEMOE_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("SPARSEMOE_FUZZ_RANDOM"),
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 0.05, torch.float16: 0.01}
BIG = [2**31, 2**40, 2**61 + 1, 2**62, 2**63 - 1]


@pytest.fixture(autouse=True)
def _poison_and_one_thread():
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.set_num_threads(1)  # tiny shapes; two threads are exercised by the op and layer tests
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


# --- strategies ---------------------------------------------------------------------------------


def sizes(lo, hi, big=None):
    """Small sizes mostly, the edges often, occasionally up to `big`."""
    s = st.one_of(st.integers(lo, min(hi, lo + 3)), st.integers(lo, hi))
    return s if big is None else st.one_of(s, st.integers(lo, big))


def values(draw, shape, dtype, specials=True, scale=1.0):
    """A tensor of normal values, with NaN / +-inf / huge entries sprinkled in when asked."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if specials and t.numel() and draw(st.booleans()):
        n = draw(st.integers(1, max(1, t.numel() // 4)))
        where = torch.randint(0, t.numel(), (n,), generator=g)
        # "Huge" stays below sqrt(max) of the dtype: products of two such values are huge, not
        # overflowed (an overflow in float32 is the dtype's limit, not a kernel's error).
        big = min(1e30, math.sqrt(torch.finfo(dtype).max) / 100)
        pool = torch.tensor([math.nan, math.inf, -math.inf, big, -big, 0.0], dtype=torch.float64)
        t.view(-1)[where] = pool[torch.randint(0, len(pool), (n,), generator=g)]
    return t.to(dtype)


def laid_out(draw, t, expand=True):
    """The same values as a contiguous, transposed, strided or (with `expand`, as one row repeated)
    expanded tensor."""
    if t.dim() != 2:
        return t
    kind = draw(st.sampled_from(["contiguous", "transposed", "strided", *(["expanded"] if expand else [])]))
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "strided":
        wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if kind == "expanded" and t.shape[0] > 0:
        return t[:1].expand(t.shape[0], t.shape[1])
    return t


def distinct_ids(draw, T, E, k):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].contiguous() if T else torch.zeros(0, k, dtype=torch.long)


def grads(out, inputs, g):
    """d(out . g)/d inputs, zeros for inputs that get none (an oracle output can be a constant)."""
    got = torch.autograd.grad(out, inputs, g, allow_unused=True) if out.requires_grad else [None] * len(inputs)
    return [torch.zeros_like(t) if a is None else a for t, a in zip(inputs, got)]


def assert_close(got, want, dtype, what):
    scale = max(1.0, want.double().nan_to_num(0, 0, 0).abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=TOL[dtype], atol=TOL[dtype] * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# --- route -------------------------------------------------------------------------------------------


def choice_keys(logits, scoring, bias):
    s = reference.router_scores(logits, scoring)
    return s if bias is None else s + bias.to(s.dtype)


@fuzz
@given(st.data())
def test_fuzz_route(data):
    draw = data.draw
    T, E = draw(sizes(0, 40)), draw(st.one_of(sizes(1, 16), st.integers(1, 1000)))
    dtype = draw(st.sampled_from(DTYPES))
    divisors = [g for g in range(1, E + 1) if E % g == 0]
    groups = draw(st.sampled_from(divisors)) if draw(st.booleans()) else 1
    topk_groups = draw(st.integers(1, groups))
    k = draw(st.integers(1, topk_groups * (E // groups)))
    scoring, renorm = draw(st.sampled_from(SCORINGS)), draw(st.booleans())
    bias = values(draw, (E,), torch.float32, specials=False, scale=0.1) if draw(st.booleans()) else None
    scale = draw(st.sampled_from([1.0, 2.5, -0.5]))
    logits = laid_out(draw, values(draw, (T, E), dtype, specials=draw(st.booleans()), scale=2.0))
    w, ids = ops.route(logits, k, renorm, scoring, bias, groups, topk_groups, scale)
    assert ids.dtype == torch.int64 and ids.shape == (T, k) and w.shape == (T, k)
    if T:
        assert ids.min() >= 0 and ids.max() < E
        assert (ids.sort(1).values.diff(dim=1) > 0).all() if k > 1 else True  # distinct per row
    w_ref, ids_ref = reference.route(logits.contiguous(), k, renorm, scoring, bias, groups, topk_groups, scale)
    same = (ids == ids_ref).all(1)
    if not same.all():
        # Another order only where the choice values nearly tie (the two sides compute exp
        # differently): the picked experts' values must agree position by position.
        keys = choice_keys(logits.contiguous().double(), scoring, bias)
        rows = (~same).nonzero().squeeze(1)
        a = keys.gather(1, ids).sort(1, descending=True).values[rows]
        b = keys.gather(1, ids_ref).sort(1, descending=True).values[rows]
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True), (logits[rows], ids[rows], ids_ref[rows])
    assert_close(w[same], w_ref[same], torch.float32 if dtype != torch.float64 else torch.float64, "weights")


@fuzz
@given(st.data())
def test_fuzz_route_backward_float64(data):
    draw = data.draw
    T, E = draw(sizes(0, 12)), draw(sizes(1, 12))
    k = draw(st.integers(1, E))
    scoring, renorm = draw(st.sampled_from(SCORINGS)), draw(st.booleans())
    logits = values(draw, (T, E), torch.float64, specials=False).requires_grad_()
    w, ids = ops.route(logits, k, renorm, scoring)
    gw = values(draw, (T, k), torch.float64, specials=False)
    (got,) = grads(w, [logits], gw)
    ref_logits = logits.detach().clone().requires_grad_()
    s = reference.router_scores(ref_logits, scoring)
    v = torch.softmax(ref_logits.gather(1, ids), -1) if scoring == "softmax_topk" else s.gather(1, ids)
    if renorm:
        v = v / (v.sum(-1, keepdim=True) + 1e-20)
    (want,) = grads(v, [ref_logits], gw)
    assert_close(got, want, torch.float64, "grad logits")


# --- dispatch ------------------------------------------------------------------------------------------


@fuzz
@given(st.data())
def test_fuzz_dispatch(data):
    draw = data.draw
    T, d = draw(sizes(0, 48)), draw(sizes(1, 17))
    E = draw(st.one_of(sizes(1, 12), st.integers(1, 1000)))
    k = draw(st.integers(1, min(E, 6)))
    divisors = [g for g in range(1, T + 1) if T % g == 0] or [1]
    groups = draw(st.sampled_from(divisors))
    capacity = draw(st.one_of(st.just(-1), st.integers(0, max(T, 1) + 2), st.sampled_from(BIG)))
    dtype = draw(st.sampled_from(DTYPES))
    x = laid_out(draw, values(draw, (T, d), dtype))
    ids = laid_out(draw, distinct_ids(draw, T, E, k))
    priority = None
    if capacity >= 0 and draw(st.booleans()):
        priority = values(draw, (T, k), draw(st.sampled_from(DTYPES)), specials=draw(st.booleans()))
        if draw(st.booleans()):
            priority = priority.round()  # many ties
    got = ops.dispatch(x, ids, E, capacity, priority, groups)
    want = reference.dispatch(x.contiguous(), ids.contiguous(), E, capacity, priority, groups)
    for name, g, w in zip(("x_sorted", "expert_offsets", "slot"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.nan_to_num(0.5), w.nan_to_num(0.5)), name


@fuzz
@given(st.data())
def test_fuzz_dispatch_combine_backward_float64(data):
    draw = data.draw
    T, d, E = draw(sizes(0, 20)), draw(sizes(1, 9)), draw(sizes(1, 8))
    k = draw(st.integers(1, E))
    capacity = draw(st.one_of(st.just(-1), st.integers(0, T + 1)))
    x = values(draw, (T, d), torch.float64, specials=False).requires_grad_()
    ids = distinct_ids(draw, T, E, k)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    xs, _, slot = ops.dispatch(x, ids, E, capacity)
    out = ops.combine(xs * 2.0, slot, w)
    g = values(draw, (T, d), torch.float64, specials=False)
    got = grads(out, [x, w], g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    xs_r, _, slot_r = reference.dispatch(xr, ids, E, capacity)
    out_r = reference.combine(xs_r * 2.0, slot_r, wr)
    want = grads(out_r, [xr, wr], g)
    assert_close(out, out_r, torch.float64, "out")
    for name, a, b in zip(("x", "weights"), got, want):
        assert_close(a, b, torch.float64, f"grad {name}")


# --- combine, scatter_rows, slot_dot -----------------------------------------------------------------


@fuzz
@given(st.data())
def test_fuzz_combine_family(data):
    draw = data.draw
    T, d, k = draw(sizes(0, 40)), draw(sizes(1, 33)), draw(sizes(1, 8))
    N = T * k + draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    slot = torch.randperm(N, generator=g)[:T * k].view(T, k)
    slot = torch.where(torch.rand(T, k, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0])), -1, slot)
    slot = laid_out(draw, slot, expand=False)  # an expanded slot repeats rows
    rows = laid_out(draw, values(draw, (N, d), dtype))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = laid_out(draw, values(draw, (T, k), acc)) if draw(st.booleans()) else None
    src = laid_out(draw, values(draw, (T, d), dtype))
    c = lambda t: None if t is None else t.contiguous()
    assert_close(ops.combine(rows, slot, weights), reference.combine(c(rows), c(slot), c(weights)), dtype, "combine")
    assert_close(ops.scatter_rows(src, slot, weights, N), reference.scatter_rows(c(src), c(slot), c(weights), N), dtype,
                 "scatter_rows")
    assert_close(ops.slot_dot(src, rows, slot), reference.slot_dot(c(src), c(rows), c(slot)), dtype, "slot_dot")


# --- expert_ffn ---------------------------------------------------------------------------------------


def ffn_case(draw, dtype):
    E, d, f = draw(sizes(1, 8)), draw(sizes(1, 17)), draw(sizes(0, 13))
    N, pad = draw(sizes(0, 40)), draw(st.integers(0, 3))
    act = draw(st.sampled_from(ACTIVATIONS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cuts = torch.sort(torch.randint(0, N + 1, (E - 1,), generator=g)).values
    off = torch.cat([torch.tensor([0]), cuts, torch.tensor([N])])
    width = 2 * f if act in GATED_ACTIVATIONS else f
    x = laid_out(draw, values(draw, (N + pad, d), dtype, specials=draw(st.booleans())))
    w1 = (values(draw, (E, width, d), torch.float64, specials=False) / math.sqrt(d)).to(dtype)
    w2 = (values(draw, (E, d, f), torch.float64, specials=False) / math.sqrt(max(f, 1))).to(dtype)
    b1 = values(draw, (E, width), dtype, specials=False) if draw(st.booleans()) else None
    b2 = values(draw, (E, d), dtype, specials=False) if draw(st.booleans()) else None
    kw = dict(swiglu_alpha=draw(st.sampled_from([1.702, 1.0, 2.5])), swiglu_limit=draw(st.sampled_from([7.0, 0.5, 2.0])))
    return x, off, w1, w2, act, b1, b2, kw


@fuzz
@given(st.data())
def test_fuzz_expert_ffn(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    x, off, w1, w2, act, b1, b2, kw = ffn_case(data.draw, dtype)
    got = ops.expert_ffn(x, off, w1, w2, act, b1, b2, **kw)
    # Against the float64 oracle of the same values: exact math, a loose low-precision bound.
    d64 = lambda t: None if t is None else t.double()
    want = reference.expert_ffn(d64(x.contiguous()), off, d64(w1), d64(w2), act, d64(b1), d64(b2), **kw)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(got, want, dtype, "y")


@fuzz
@given(st.data())
def test_fuzz_expert_ffn_backward_float64(data):
    x, off, w1, w2, act, b1, b2, kw = ffn_case(data.draw, torch.float64)
    x = x.contiguous().nan_to_num(0.0, 3.0, -3.0)  # finite: the gradients are compared as numbers
    leaves = [t for t in (x, w1, w2, b1, b2) if t is not None]
    for t in leaves:
        t.requires_grad_()
    g = values(data.draw, x.shape, torch.float64, specials=False)
    got = grads(ops.expert_ffn(x, off, w1, w2, act, b1, b2, **kw), leaves, g)
    want = grads(reference.expert_ffn(x, off, w1, w2, act, b1, b2, **kw), leaves, g)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, torch.float64, f"grad {i}")


# --- random MoEConfigs, the whole layer ------------------------------------------------------------------


@st.composite
def configs(draw):
    E = draw(sizes(1, 16))
    routing = draw(st.sampled_from(["token_choice", "token_choice", "expert_choice"]))
    top_k = draw(st.integers(1, E))
    opts = dict(d_model=draw(sizes(1, 12)), d_ff=draw(sizes(1, 10)), num_experts=E, top_k=top_k, routing=routing,
                scoring=draw(st.sampled_from(SCORINGS)), renormalize=draw(st.booleans()),
                routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.5])), router_bias=draw(st.booleans()),
                activation=draw(st.sampled_from(ACTIVATIONS)), expert_bias=draw(st.booleans()),
                swiglu_alpha=draw(st.sampled_from([1.702, 1.3])), swiglu_limit=draw(st.sampled_from([7.0, 0.8])),
                drop_policy=draw(st.sampled_from(["position", "probability"])),
                capacity_scope=draw(st.sampled_from(["batch", "sequence"])))
    capacity = draw(st.sampled_from(["none", "factor", "fixed", "huge"]))
    if capacity == "factor":
        opts["capacity_factor"] = draw(st.sampled_from([0.5, 1.0, 1.25, 1e30]))
    elif capacity == "fixed":
        opts["expert_capacity"] = draw(st.integers(0, 6))
    elif capacity == "huge":
        opts["expert_capacity"] = draw(st.sampled_from(BIG))
    if routing == "token_choice":
        divisors = [g for g in range(1, E + 1) if E % g == 0]
        groups = draw(st.sampled_from(divisors))
        topk_groups = draw(st.integers(1, groups))
        if top_k <= topk_groups * (E // groups):
            opts.update(num_groups=groups, topk_groups=topk_groups)
        opts.update(selection_bias=draw(st.booleans()), weights_on_input=draw(st.booleans()))
    if draw(st.booleans()):
        opts.update(shared_expert_d_ff=draw(st.integers(1, 6)), shared_expert_gate=draw(st.booleans()))
    return MoEConfig(**opts)


@fuzz
@given(configs(), st.data())
def test_fuzz_layer_float64_against_the_oracle(config, data):
    draw = data.draw
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    layer = MoELayer.from_config(config, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 2.0 / math.sqrt(config.d_model))
        if layer.router.selection_bias is not None:
            layer.router.selection_bias.normal_(0.0, 0.1)
    B, S = draw(sizes(0, 3)), draw(sizes(0, 7))
    x = torch.randn(B, S, config.d_model, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(B, S) > 0.3) if draw(st.booleans()) else None
    g = torch.randn(B, S, config.d_model, dtype=torch.float64)
    out = layer(x, mask)
    loss = (out * g).sum() + 0.3 * layer.aux_loss + 0.01 * layer.z_loss
    params = dict(layer.named_parameters())
    one = torch.ones((), dtype=torch.float64)
    got = grads(loss, [x, *params.values()], one)
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    xr = x.detach().clone().requires_grad_()
    ref, stats = reference.moe_forward(xr, {**dict(layer.named_buffers()), **leaves}, config, padding_mask=mask,
                                       return_stats=True)
    ref_loss = (ref * g).sum() + 0.3 * stats["aux_loss"] + 0.01 * stats["z_loss"]
    want = grads(ref_loss, [xr, *leaves.values()], one)
    tol = torch.float64 if config.router_dtype is None else torch.float32
    assert_close(out.detach(), ref.detach(), tol, "out")
    assert torch.equal(layer.tokens_per_expert, stats["tokens_per_expert"])
    if B * S:  # an empty batch has no meaningful losses to compare
        for name in ("aux_loss", "z_loss"):
            assert_close(getattr(layer, name).detach(), stats[name].detach(), tol, name)
    for name, a, b in zip(["x", *params], got, want):
        assert_close(a, b, tol, f"grad {name}")


# --- size arguments: huge and negative values never crash -----------------------------------------------


@fuzz
@given(st.data())
def test_fuzz_size_arguments_fail_cleanly(data):
    draw = data.draw
    any_int = st.one_of(st.integers(-3, 12), st.sampled_from([-2**63, -2**31, *BIG]))
    T, d = draw(sizes(0, 8)), draw(sizes(1, 4))
    x, ids = torch.randn(T, d), distinct_ids(draw, T, 4, 2)
    calls = {
        "route": lambda: ops.route(torch.randn(T, 4), draw(any_int), True, "softmax", None, draw(any_int),
                                   draw(any_int)),
        "dispatch": lambda: ops.dispatch(x, ids, draw(any_int), draw(any_int), None, draw(any_int)),
        "scatter_rows": lambda: ops.scatter_rows(x, torch.full((T, 2), -1), None, draw(st.integers(-5, 2**20))),
        # Sizes that only allocate what they ask for are kept small (a 2**40-wide layer is a
        # request for memory, not a bad argument); capacities go up to 2**63 - 1.
        "layer": lambda: MoELayer(d, draw(st.integers(-3, 12)), draw(st.integers(-3, 12)), draw(st.integers(-3, 12)),
                                  expert_capacity=draw(st.one_of(st.none(), any_int)))(x),
    }
    name = draw(st.sampled_from(sorted(calls)))
    try:
        calls[name]()
    except (RuntimeError, ValueError) as e:
        first = str(e).split(":")[0]
        assert first.replace("_", "").replace(" ", "").isalnum(), f"{name}: {e}"  # names an argument first
