"""route's scoring schemes and selection options (sigmoid, softmax_topk, selection_bias, group-limited
selection, scale), held to reference.route and to the semantics spelled out independently."""

import math

import pytest
import torch

from sparsemoe import ops, reference
from helpers import lowp_tolerance

SCORINGS = ("softmax", "sigmoid", "softmax_topk")


def route(logits, k, renormalize=True, **options):
    return ops.route(logits, k, renormalize, **options)


def scores(logits, scoring):
    """Unbiased per-expert scores in opmath, written out here rather than taken from reference."""
    x = logits.to(reference.opmath_dtype(logits.dtype))
    return {"softmax": lambda: torch.softmax(x, -1), "sigmoid": lambda: torch.sigmoid(x),
            "softmax_topk": lambda: x}[scoring]()


def expected_weights(logits, ids, scoring, renormalize, scale=1.0):
    """The weights route must return for the picked `ids`: unbiased scores of those experts."""
    s = scores(logits, scoring).gather(1, ids)
    if scoring == "softmax_topk":
        s = torch.softmax(s, -1)
    if renormalize:
        s = s / (s.sum(-1, keepdim=True) + 1e-20)
    return s * scale


def check_against_reference(logits, k, renormalize, **options):
    w, ids = route(logits, k, renormalize, **options)
    w_ref, ids_ref = reference.route(logits, k, renormalize, **options)
    assert w.dtype == reference.opmath_dtype(logits.dtype) and ids.dtype == torch.int64
    assert w.shape == ids.shape == (logits.shape[0], k)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, equal_nan=True)
    return w, ids


# --- scoring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (64, 64, 8), (5, 128, 8), (9, 4, 4), (3, 1, 1)])
def test_scoring_matches_reference(T, E, k, scoring, renormalize):
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(T, E, dtype=dtype)
        w, ids = check_against_reference(logits, k, renormalize, scoring=scoring)
        # Without bias or groups every scoring picks the top-k logits.
        assert torch.equal(ids, torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k])
        torch.testing.assert_close(w, expected_weights(logits, ids, scoring, renormalize))


def test_softmax_topk_is_renormalized_softmax():
    logits = torch.randn(50, 16, dtype=torch.float64)
    for renormalize in (True, False):
        w, ids = route(logits, 4, renormalize, scoring="softmax_topk")
        w_soft, ids_soft = route(logits, 4, True, scoring="softmax")
        assert torch.equal(ids, ids_soft)
        torch.testing.assert_close(w, w_soft)
        torch.testing.assert_close(w.sum(-1), torch.ones(50, dtype=torch.float64))


def test_sigmoid_without_renormalize_is_plain_sigmoid():
    logits = torch.randn(30, 10)
    w, ids = route(logits, 3, False, scoring="sigmoid")
    torch.testing.assert_close(w, torch.sigmoid(torch.topk(logits, 3).values))
    assert torch.equal(ids, torch.topk(logits, 3).indices)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scale", [2.5, 16.0, 0.5])
def test_scale_multiplies_weights_only(scoring, renormalize, scale):
    logits = torch.randn(40, 12)
    w1, ids1 = route(logits, 3, renormalize, scoring=scoring)
    w, ids = check_against_reference(logits, 3, renormalize, scoring=scoring, scale=scale)
    assert torch.equal(ids, ids1)
    torch.testing.assert_close(w, w1 * scale)


# --- selection bias --------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_selection_bias_changes_picks_not_weights(scoring, renormalize):
    T, E, k = 64, 16, 4
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(T, E, dtype=dtype)
        bias = torch.randn(E) * (2.0 if scoring == "softmax_topk" else 0.2)
        w, ids = check_against_reference(logits, k, renormalize, scoring=scoring, selection_bias=bias)
        # The bias picks: ids are the top-k of (unbiased score + bias).
        choice = scores(logits, scoring) + bias.to(w.dtype)
        assert torch.equal(ids, torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :k])
        _, ids_plain = route(logits, k, renormalize, scoring=scoring)
        assert (ids != ids_plain).any(dim=1).sum() > T // 4, "the bias should change many picks"
        # ... but the weights are the unbiased scores of the picked experts.
        torch.testing.assert_close(w, expected_weights(logits, ids, scoring, renormalize))


@pytest.mark.parametrize("scoring", SCORINGS)
def test_large_bias_forces_an_expert(scoring):
    logits = torch.randn(20, 8)
    bias = torch.zeros(8)
    bias[5] = 100.0
    w, ids = check_against_reference(logits, 2, False, scoring=scoring, selection_bias=bias)
    assert (ids[:, 0] == 5).all()
    torch.testing.assert_close(w, expected_weights(logits, ids, scoring, False))
    assert w.abs().max() < 50  # no trace of the bias in the weights


def test_zero_bias_equals_no_bias():
    logits = torch.randn(50, 12)
    for scoring in SCORINGS:
        got = route(logits, 3, True, scoring=scoring, selection_bias=torch.zeros(12))
        want = route(logits, 3, True, scoring=scoring)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bias_dtype_is_widened(bias_dtype):
    logits = torch.randn(40, 8)
    bias = (torch.randn(8) * 0.3).to(bias_dtype)
    check_against_reference(logits, 2, True, scoring="sigmoid", selection_bias=bias)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradient_does_not_reach_bias(scoring, renormalize):
    logits = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    bias = (torch.randn(8, dtype=torch.float64) * 0.3).requires_grad_()
    w, ids = route(logits, 3, renormalize, scoring=scoring, selection_bias=bias)
    g = torch.randn_like(w)
    grad_logits, grad_bias = torch.autograd.grad(w, (logits, bias), g, allow_unused=True)
    assert grad_bias is None or torch.all(grad_bias == 0)
    exact = logits.detach().clone().requires_grad_()
    w_ref, _ = reference.route(exact, 3, renormalize, scoring=scoring, selection_bias=bias.detach())
    (grad_ref,) = torch.autograd.grad(w_ref, exact, g)
    torch.testing.assert_close(grad_logits, grad_ref)


# --- group-limited selection -----------------------------------------------------------------


GROUP_CASES = [  # T, E, k, num_groups, topk_groups
    (40, 16, 4, 4, 2),
    (33, 64, 8, 8, 4),
    (20, 8, 2, 8, 2),    # groups of one expert: group score is the expert's own choice
    (25, 12, 6, 3, 3),   # every group allowed: same picks as no groups
    (17, 16, 4, 4, 1),   # k fills the one group
    (9, 32, 3, 2, 1),
]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("T,E,k,G,TG", GROUP_CASES)
def test_groups_match_reference(T, E, k, G, TG, renormalize, with_bias):
    for scoring in SCORINGS:
        for dtype in (torch.float32, torch.float64):
            logits = torch.randn(T, E, dtype=dtype)
            bias = torch.randn(E) * 0.2 if with_bias else None
            w, ids = check_against_reference(logits, k, renormalize, scoring=scoring, selection_bias=bias,
                                             num_groups=G, topk_groups=TG)
            torch.testing.assert_close(w, expected_weights(logits, ids, scoring, renormalize))


def grouped_picks(choice, k, G, TG):
    """DeepSeek-V3's group-limited top-k written with topk and masks (random data: no ties)."""
    T, E = choice.shape
    grouped = choice.view(T, G, E // G)
    group_score = grouped.topk(min(2, E // G), dim=-1).values.sum(-1)
    groups = group_score.topk(TG, dim=-1).indices
    mask = torch.zeros(T, G, dtype=torch.bool).scatter_(1, groups, True).repeat_interleave(E // G, 1)
    return choice.masked_fill(~mask, -math.inf).topk(k, dim=-1).indices, groups


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("T,E,k,G,TG", GROUP_CASES)
def test_groups_pick_only_from_the_best_groups(T, E, k, G, TG, scoring):
    logits = torch.randn(T, E, dtype=torch.float64)
    bias = torch.randn(E, dtype=torch.float64) * 0.3
    _, ids = route(logits, k, True, scoring=scoring, selection_bias=bias, num_groups=G, topk_groups=TG)
    want, groups = grouped_picks(scores(logits, scoring) + bias, k, G, TG)
    assert torch.equal(ids, want)
    group_of = ids // (E // G)
    assert all(set(r) <= set(g) for r, g in zip(group_of.tolist(), groups.tolist()))
    assert all(len(set(r)) == k for r in ids.tolist())


def test_group_score_is_sum_of_top_two():
    # softmax_topk chooses on the raw logits. Group 0 holds the best expert but its second is poor,
    # group 1 has two good ones: the sum of the top two prefers group 1.
    logits = torch.tensor([[5.0, -5.0, 3.0, 3.0, 0.0, 0.0, -1.0, -1.0]])
    w, ids = route(logits, 2, True, scoring="softmax_topk", num_groups=4, topk_groups=1)
    assert ids.tolist() == [[2, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))
    # Two groups: group 1 (6) then groups 0 and 2 tie at 0 -> the lower index, group 0.
    w, ids = route(logits, 3, False, scoring="softmax_topk", num_groups=4, topk_groups=2)
    assert ids.tolist() == [[0, 2, 3]]
    # Without groups the plain top-2.
    assert route(logits, 2, True, scoring="softmax_topk")[1].tolist() == [[0, 2]]
    # The bias enters the group score: lift expert 5 (group 2) above everything.
    bias = torch.tensor([0.0, 0, 0, 0, 0, 20.0, 0, 0])
    _, ids = route(logits, 2, True, scoring="softmax_topk", selection_bias=bias, num_groups=4, topk_groups=1)
    assert ids.tolist() == [[5, 4]]
    check_against_reference(logits, 2, True, scoring="softmax_topk", selection_bias=bias, num_groups=4,
                            topk_groups=1)


# --- configurations of published models ----------------------------------------------------------


MODEL_CONFIGS = {  # k, E, options, renormalize, selection bias
    "deepseek_v3": (8, 64, dict(scoring="sigmoid", num_groups=8, topk_groups=4, scale=2.5), True, True),
    "deepseek_v2": (6, 64, dict(scoring="softmax", num_groups=8, topk_groups=3, scale=16.0), False, False),
    "llama4": (1, 16, dict(scoring="sigmoid"), False, False),
    "qwen_mixtral": (2, 8, dict(scoring="softmax_topk"), True, False),
    "glm_like": (4, 32, dict(scoring="sigmoid", scale=1.8), True, True),
    "sigmoid_groups_no_bias": (4, 32, dict(scoring="sigmoid", num_groups=4, topk_groups=2), True, False),
}


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_model_configurations(name):
    k, E, options, renormalize, with_bias = MODEL_CONFIGS[name]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        logits = torch.randn(100, E).to(dtype)
        bias = torch.randn(E) * 0.1 if with_bias else None
        if dtype == torch.bfloat16:
            # Low-precision logits route in fp32: the same as the fp32 route of the same values.
            w, ids = route(logits, k, renormalize, selection_bias=bias, **options)
            w32, ids32 = reference.route(logits.float(), k, renormalize, selection_bias=bias, **options)
            assert w.dtype == torch.float32 and torch.equal(ids, ids32)
            torch.testing.assert_close(w, w32)
        else:
            w, ids = check_against_reference(logits, k, renormalize, selection_bias=bias, **options)
            torch.testing.assert_close(w, expected_weights(logits, ids, options["scoring"], renormalize,
                                                           options.get("scale", 1.0)))


# --- ties, NaN, inf, low precision, k = E ----------------------------------------------------------


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("options", [{}, {"selection_bias": torch.zeros(8)},
                                     {"num_groups": 4, "topk_groups": 2},
                                     {"num_groups": 2, "topk_groups": 1, "selection_bias": torch.zeros(8)}])
def test_ties_go_to_lowest_index(scoring, options):
    logits = torch.tensor([[0.5] * 8, [1.0, 3.0, 3.0, 0.0, 3.0, 0.0, 0.0, 3.0]])
    w, ids = route(logits, 3, False, scoring=scoring, **options)
    assert ids[0].tolist() == [0, 1, 2]
    want = {"softmax": 1 / 8, "sigmoid": torch.sigmoid(torch.tensor(0.5)).item(), "softmax_topk": 1 / 3}[scoring]
    torch.testing.assert_close(w[0], torch.full((3,), want))
    if options.get("num_groups", 1) == 1:
        assert ids[1].tolist() == [1, 2, 4]
    check_against_reference(logits, 3, False, scoring=scoring, **options)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("options", [{}, {"selection_bias": torch.tensor([0.1, -0.2, 0.0, 0.3, 0.0, 0.1, 0.2, -0.1])},
                                     {"num_groups": 4, "topk_groups": 2},
                                     {"num_groups": 2, "topk_groups": 1, "selection_bias": torch.full((8,), 0.05)}])
def test_nan_and_inf_rows_keep_ids_valid(scoring, renormalize, options):
    nan, inf = math.nan, math.inf
    logits = torch.tensor([
        [nan, 1.0, 2.0, nan, 0.0, -1.0, 0.5, 0.2],
        [nan] * 8,
        [-inf, 0.0, -inf, 1.0, -inf, 2.0, 0.0, -inf],
        [inf, 0.0, 1.0, 2.0, inf, -1.0, 0.0, 0.0],
        [-inf] * 8,
        [inf] * 8,
        [nan, inf, -inf, 0.0, nan, inf, -inf, 1.0],
    ])
    w, ids = route(logits, 3, renormalize, scoring=scoring, **options)
    assert ((ids >= 0) & (ids < 8)).all()
    assert all(len(set(r)) == 3 for r in ids.tolist())
    check_against_reference(logits, 3, renormalize, scoring=scoring, **options)
    # The sigmoid of a finite row is finite whatever its neighbours.
    if scoring == "sigmoid":
        assert torch.isfinite(w[2]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_low_precision_logits_route_in_fp32(dtype, scoring):
    logits = torch.randn(200, 16).to(dtype)
    bias = torch.randn(16) * 0.1
    for options in ({}, {"selection_bias": bias}, {"num_groups": 4, "topk_groups": 2, "scale": 2.0}):
        w, ids = route(logits, 4, True, scoring=scoring, **options)
        assert w.dtype == torch.float32
        w32, ids32 = reference.route(logits.float(), 4, True, scoring=scoring, **options)
        assert torch.equal(ids, ids32)
        torch.testing.assert_close(w, w32)


@pytest.mark.parametrize("scoring", SCORINGS)
def test_k_equals_num_experts(scoring):
    """Expert-choice routing's building block: every expert scored for every token."""
    T, E = 33, 8
    logits = torch.randn(T, E)
    w, ids = check_against_reference(logits, E, False, scoring=scoring)
    assert torch.equal(ids.sort(-1).values, torch.arange(E).expand(T, E))  # a permutation per row
    full = torch.zeros(T, E).scatter_(1, ids, w)
    if scoring == "softmax_topk":
        torch.testing.assert_close(full, torch.softmax(logits, -1))
    else:
        torch.testing.assert_close(full, scores(logits, scoring))
    assert (w[:, :-1] >= w[:, 1:]).all()  # best first
    w_norm, _ = check_against_reference(logits, E, True, scoring=scoring)
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(T))
    check_against_reference(logits, E, False, scoring=scoring, selection_bias=torch.randn(E),
                            num_groups=4, topk_groups=4)


def test_empty_tokens():
    for scoring in SCORINGS:
        w, ids = route(torch.randn(0, 8), 2, True, scoring=scoring, selection_bias=torch.zeros(8),
                       num_groups=4, topk_groups=2)
        assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_non_contiguous_logits_and_bias():
    logits = torch.randn(8, 32)[:, ::2]
    bias = torch.randn(32)[::2] * 0.2
    for scoring in SCORINGS:
        w, ids = route(logits, 3, True, scoring=scoring, selection_bias=bias, num_groups=4, topk_groups=2)
        w_ref, ids_ref = reference.route(logits.contiguous(), 3, True, scoring=scoring,
                                         selection_bias=bias.contiguous(), num_groups=4, topk_groups=2)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref)


# --- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scale,options", [(1.0, {}), (2.5, {}), (1.0, {"bias": True}),
                                           (2.5, {"bias": True, "num_groups": 4, "topk_groups": 2})])
def test_gradcheck(scoring, renormalize, scale, options):
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64) * 0.2 if options.get("bias") else None
    groups = {k: v for k, v in options.items() if k != "bias"}
    for k in (1, 3):
        assert torch.autograd.gradcheck(
            lambda l: route(l, k, renormalize, scoring=scoring, selection_bias=bias, scale=scale, **groups)[0],
            (logits,))


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_backward_matches_reference(scoring, renormalize):
    options = dict(scoring=scoring, selection_bias=torch.randn(12) * 0.2, num_groups=4, topk_groups=2, scale=1.5)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logits = torch.randn(40, 12).to(dtype).requires_grad_()
        w, ids = route(logits, 3, renormalize, **options)
        g = torch.randn_like(w)
        (grad,) = torch.autograd.grad(w, logits, g)
        assert grad.dtype == dtype
        exact = logits.detach().double().requires_grad_()
        w64, ids64 = reference.route(exact, 3, renormalize, **options)
        assert torch.equal(ids, ids64)
        (grad64,) = torch.autograd.grad(w64, exact, g.double())
        if dtype == torch.bfloat16:
            plain = logits.detach().clone().requires_grad_()
            (grad_plain,) = torch.autograd.grad(reference.route(plain, 3, renormalize, **options)[0], plain, g)
            lowp_tolerance(grad, grad_plain, grad64)
        else:
            torch.testing.assert_close(grad, grad64.to(dtype))


OPCHECK_CASES = {  # per dtype: renormalize, selection_bias, num_groups, topk_groups, scale
    torch.float32: (True, None, 1, 1, 1.0),
    torch.bfloat16: (False, torch.randn(8) * 0.2, 1, 1, 2.5),
    torch.float64: (True, torch.randn(8) * 0.2, 4, 2, 16.0),
}


@pytest.mark.parametrize("scoring", SCORINGS)
def test_opcheck(scoring):
    route_op = torch.ops.sparsemoe.route.default
    for dtype, (renormalize, bias, G, TG, scale) in OPCHECK_CASES.items():
        logits = torch.randn(9, 8, dtype=dtype, requires_grad=True)
        torch.library.opcheck(route_op, (logits, 3, renormalize, scoring, bias, G, TG, scale))
        if dtype != torch.bfloat16:
            continue
        # The backward op takes the picked ids as given (here not the top-k of the logits).
        ids = route(logits.detach(), 3, renormalize, scoring=scoring, selection_bias=bias, num_groups=G,
                    topk_groups=TG)[1]
        grad = torch.randn(9, 3, dtype=reference.opmath_dtype(dtype))
        torch.library.opcheck(torch.ops.sparsemoe.route_backward.default,
                              (grad, logits.detach(), ids, renormalize, scoring, scale))


# --- bad inputs ---------------------------------------------------------------------------------


def test_largest_legal_k_with_groups():
    # k = topk_groups * E / num_groups is allowed: it takes every expert of the chosen groups.
    logits = torch.randn(10, 8)
    _, ids = check_against_reference(logits, 4, True, num_groups=4, topk_groups=2, scoring="sigmoid")
    groups = ids // 2
    assert all(len(set(r)) == 2 for r in groups.tolist())
