"""Bad input, in one table per front: every argument of every op, every MoEConfig option (through
MoEConfig and through MoELayer) and the layer's forward, each with its bad values and the error
it must raise: the argument's name, what was expected and what was received. No raw IndexError,
ZeroDivisionError or OverflowError may reach a user: every row names its exception type.
(Checkpoints: test_checkpoint.py; the command line: test_cli.py; CUDA: test_cuda_bad_input.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from sparsemoe import MoEConfig, MoELayer, ops
from helpers import experts, routed

route_bwd, ffn_bwd = torch.ops.sparsemoe.route_backward, torch.ops.sparsemoe.expert_ffn_backward
L = torch.randn(4, 8)                                   # logits, E = 8
IDS = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])    # [T=4, k=2]
X = torch.randn(4, 3)                                   # tokens, d = 3
ROWS, SLOT, W = routed(4, 3, 4, 2)                      # rows [8, 3], slot [4, 2], weights [4, 2]
XS, OFF, W1, W2, B1, B2 = experts(10, 8, 4, 2, "swiglu", counts=[4, 6], pad=2)   # N = 12, d = 8, f = 4
Y, HID = torch.ops.sparsemoe.expert_ffn(XS, OFF, W1, W2, "swiglu", None, None, 1.702, 7.0)
META = "meta"

# (what, call, expected error message: a regular expression searched in the message)
OP_CASES = [
    # route(logits, k, renormalize, scoring, selection_bias, num_groups, topk_groups, scale)
    ("route k = 0", lambda: ops.route(L, 0), r"k: expected 1 <= k <= E = 8, got 0"),
    ("route k > E", lambda: ops.route(L, 9), r"k: expected 1 <= k <= E = 8, got 9"),
    ("route logits 3-D", lambda: ops.route(torch.randn(4, 8, 2), 2), r"logits: expected a 2-D tensor \[T, E\], got shape \[4, 8, 2\]"),
    ("route logits int", lambda: ops.route(torch.randint(0, 5, (4, 8)), 2), r"logits: expected float32, float64, bfloat16 or float16, got Long"),
    ("route no experts", lambda: ops.route(torch.randn(4, 0), 1), r"logits: expected at least one expert \(E >= 1\), got shape \[4, 0\]"),
    ("route scoring", lambda: ops.route(L, 2, scoring="tanh"), r"scoring: expected one of 'softmax', 'sigmoid', 'softmax_topk', got 'tanh'"),
    ("route scoring case", lambda: ops.route(L, 2, scoring="Softmax"), r"scoring: expected one of .* got 'Softmax'"),
    ("route scoring empty", lambda: ops.route(L, 2, scoring=""), r"scoring: expected one of .* got ''"),
    ("route num_groups 3", lambda: ops.route(L, 2, num_groups=3), r"num_groups: expected a divisor of E = 8, got 3"),
    ("route num_groups 0", lambda: ops.route(L, 2, num_groups=0), r"num_groups: expected a divisor of E = 8, got 0"),
    ("route num_groups < 0", lambda: ops.route(L, 2, num_groups=-2), r"num_groups: expected a divisor of E = 8, got -2"),
    ("route num_groups > E", lambda: ops.route(L, 2, num_groups=16), r"num_groups: expected a divisor of E = 8, got 16"),
    ("route topk_groups 0", lambda: ops.route(L, 2, num_groups=4, topk_groups=0), r"topk_groups: expected 1 <= topk_groups <= num_groups = 4, got 0"),
    ("route topk_groups > groups", lambda: ops.route(L, 2, num_groups=4, topk_groups=5), r"topk_groups: expected 1 <= topk_groups <= num_groups = 4, got 5"),
    ("route topk_groups, no groups", lambda: ops.route(L, 2, topk_groups=2), r"topk_groups: expected 1 <= topk_groups <= num_groups = 1, got 2"),
    ("route k > eligible", lambda: ops.route(L, 3, num_groups=4, topk_groups=1), r"k: expected k <= topk_groups \* E / num_groups = 2 \(the experts of the chosen groups\), got 3"),
    ("route k > eligible (2)", lambda: ops.route(L, 5, num_groups=2, topk_groups=1), r"k: expected k <= topk_groups \* E / num_groups = 4 .*got 5"),
    ("route bias size", lambda: ops.route(L, 2, selection_bias=torch.zeros(9)), r"selection_bias: expected size 8 at dim 0 \(E, the experts of logits\), got shape \[9\]"),
    ("route bias 2-D", lambda: ops.route(L, 2, selection_bias=torch.zeros(1, 8)), r"selection_bias: expected a 1-D tensor \[E\], got shape \[1, 8\]"),
    ("route bias 0-D", lambda: ops.route(L, 2, selection_bias=torch.zeros(())), r"selection_bias: expected a 1-D tensor \[E\], got shape \[\]"),
    ("route bias int", lambda: ops.route(L, 2, selection_bias=torch.zeros(8, dtype=torch.int64)), r"selection_bias: expected float32, .* got Long"),
    ("route bias bool", lambda: ops.route(L, 2, selection_bias=torch.zeros(8, dtype=torch.bool)), r"selection_bias: expected float32, .* got Bool"),
    ("route bias device", lambda: ops.route(L, 2, selection_bias=torch.zeros(8, device=META)), r"selection_bias: expected a tensor on cpu \(the device of logits\), got meta"),
    ("route scale inf", lambda: ops.route(L, 2, scale=math.inf), r"scale: expected a finite number, got inf"),
    ("route scale nan", lambda: ops.route(L, 2, scale=math.nan), r"scale: expected a finite number, got nan"),
    # route_backward(grad_weights, logits, expert_ids, renormalize, scoring, scale)
    ("route_backward grad shape", lambda: route_bwd(torch.randn(4, 3), L, IDS, True, "softmax", 1.0), r"grad_weights: expected shape \[4, 2\] \(the shape of expert_ids\), got \[4, 3\]"),
    ("route_backward ids int32", lambda: route_bwd(torch.randn(4, 2), L, IDS.int(), True, "softmax", 1.0), r"expert_ids: expected an int64 index tensor, got Int"),
    ("route_backward id >= E", lambda: route_bwd(torch.randn(4, 2), L, IDS + 7, True, "softmax", 1.0), r"expert_ids: expected ids in \[0, 8\), row 0 has 8"),
    ("route_backward repeated id", lambda: route_bwd(torch.randn(4, 2), L, IDS.clamp(max=2), True, "softmax", 1.0), r"expert_ids: row 1 picks expert 2 more than once"),
    ("route_backward scoring", lambda: route_bwd(torch.randn(4, 2), L, IDS, True, "relu", 1.0), r"scoring: expected one of .* got 'relu'"),
    # dispatch(x, expert_ids, num_experts, capacity, priority, token_groups)
    ("dispatch id >= E", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0, 1], [1, 4]]), 4), r"expert_ids: expected ids in \[0, 4\), row 1 has 4"),
    ("dispatch id < 0", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0, 1], [-1, 2]]), 4), r"expert_ids: expected ids in \[0, 4\), row 1 has -1"),
    ("dispatch repeated id", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0, 1], [2, 2]]), 4), r"expert_ids: row 1 picks expert 2 more than once"),
    ("dispatch ids int32", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), 4), r"expert_ids: expected an int64 index tensor, got Int"),
    ("dispatch ids T", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0, 1, 2]]), 4), r"expert_ids: expected size 2 at dim 0 \(T, the tokens of x\), got shape \[1, 3\]"),
    ("dispatch ids 1-D", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([0, 1]), 4), r"expert_ids: expected a 2-D tensor \[T, k\], got shape \[2\]"),
    ("dispatch num_experts 0", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0, 1], [2, 3]]), 0), r"num_experts: expected >= 1, got 0"),
    ("dispatch num_experts huge", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0, 1], [2, 3]]), 2**40), r"num_experts: expected at most 2\*\*24 = 16777216, got 1099511627776"),
    ("dispatch k > E", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0, 1, 2], [0, 1, 2]]), 2), r"expert_ids: expected k = size\(1\) in \[1, 2\], got shape \[2, 3\]"),
    ("dispatch x 1-D", lambda: ops.dispatch(torch.randn(2), torch.tensor([[0], [1]]), 2), r"x: expected a 2-D tensor \[T, d\], got shape \[2\]"),
    ("dispatch x int", lambda: ops.dispatch(torch.ones(2, 3, dtype=torch.int64), torch.tensor([[0], [1]]), 2), r"x: expected float32, float64, bfloat16 or float16, got Long"),
    ("dispatch ids device", lambda: ops.dispatch(torch.randn(2, 3), torch.tensor([[0], [1]], device=META), 2), r"expert_ids: expected a tensor on cpu \(the device of x\), got meta"),
    ("dispatch capacity -2", lambda: ops.dispatch(X, IDS, 8, -2), r"capacity: expected -1 \(dropless\) or a capacity >= 0, got -2"),
    ("dispatch capacity -100", lambda: ops.dispatch(X, IDS, 8, -100), r"capacity: expected -1 \(dropless\) or a capacity >= 0, got -100"),
    ("dispatch token_groups 0", lambda: ops.dispatch(X, IDS, 8, 2, None, 0), r"token_groups: expected a divisor of T = 4 \(tokens form equal contiguous groups\), got 0"),
    ("dispatch token_groups < 0", lambda: ops.dispatch(X, IDS, 8, 2, None, -1), r"token_groups: expected a divisor of T = 4 .*got -1"),
    ("dispatch token_groups 3", lambda: ops.dispatch(X, IDS, 8, 2, None, 3), r"token_groups: expected a divisor of T = 4 .*got 3"),
    ("dispatch token_groups > T", lambda: ops.dispatch(X, IDS, 8, 2, None, 8), r"token_groups: expected a divisor of T = 4 .*got 8"),
    ("dispatch priority k", lambda: ops.dispatch(X, IDS, 8, 2, torch.rand(4, 3)), r"priority: expected shape \[4, 2\] \(the shape of expert_ids\), got \[4, 3\]"),
    ("dispatch priority 1-D", lambda: ops.dispatch(X, IDS, 8, 2, torch.rand(4)), r"priority: expected shape \[4, 2\] .*got \[4\]"),
    ("dispatch priority T", lambda: ops.dispatch(X, IDS, 8, 2, torch.rand(3, 2)), r"priority: expected shape \[4, 2\] .*got \[3, 2\]"),
    ("dispatch priority transposed", lambda: ops.dispatch(X, IDS, 8, 2, torch.rand(2, 4)), r"priority: expected shape \[4, 2\] .*got \[2, 4\]"),
    ("dispatch priority int", lambda: ops.dispatch(X, IDS, 8, 2, torch.randint(0, 3, (4, 2))), r"priority: expected float32, .* got Long"),
    ("dispatch priority bool", lambda: ops.dispatch(X, IDS, 8, 2, torch.ones(4, 2, dtype=torch.bool)), r"priority: expected float32, .* got Bool"),
    ("dispatch priority device", lambda: ops.dispatch(X, IDS, 8, 2, torch.rand(4, 2, device=META)), r"priority: expected a tensor on cpu \(the device of x\), got meta"),
    # combine(rows, slot, weights)
    ("combine slot >= N", lambda: ops.combine(ROWS, SLOT + 1, W), r"slot: expected values in \[-1, 8\) \(-1 marks a dropped pick\), got values in \[1, 8\]"),
    ("combine slot < -1", lambda: ops.combine(ROWS, SLOT - 2, W), r"slot: expected values in \[-1, 8\) .*got values in \[-2, 5\]"),
    ("combine repeated slot", lambda: ops.combine(ROWS, torch.tensor([[0, 1], [2, 1], [4, 5], [6, 7]]), W), r"slot: expected distinct rows \(each buffer row belongs to one pick\), row 1 appears twice"),
    ("combine slot int32", lambda: ops.combine(ROWS, SLOT.int(), W), r"slot: expected an int64 index tensor, got Int"),
    ("combine slot 1-D", lambda: ops.combine(ROWS, SLOT[0], W), r"slot: expected a 2-D tensor \[T, k\], got shape \[2\]"),
    ("combine weights shape", lambda: ops.combine(ROWS, SLOT, W[:, :1]), r"weights: expected shape \[4, 2\] \(the shape of slot\), got \[4, 1\]"),
    ("combine weights dtype", lambda: ops.combine(ROWS, SLOT, W.double()), r"weights: expected dtype Float \(the accumulation dtype of rows Float\), got Double"),
    ("combine weights f64 rows", lambda: ops.combine(ROWS.double(), SLOT, W), r"weights: expected dtype Double \(the accumulation dtype of rows Double\), got Float"),
    ("combine rows 1-D", lambda: ops.combine(ROWS[0], SLOT, W), r"rows: expected a 2-D tensor \[N, d\], got shape \[3\]"),
    ("combine rows int", lambda: ops.combine(ROWS.long(), SLOT, W), r"rows: expected float32, .* got Long"),
    ("combine weights device", lambda: ops.combine(ROWS, SLOT, W.to(META)), r"weights: expected a tensor on cpu \(the device of rows\), got meta"),
    # scatter_rows(src, slot, weights, num_rows)
    ("scatter_rows repeated slot", lambda: ops.scatter_rows(X, torch.zeros(4, 2, dtype=torch.long), None, 8), r"slot: expected distinct rows \(each buffer row belongs to one pick\), row 0 appears twice"),
    ("scatter_rows slot T", lambda: ops.scatter_rows(torch.randn(5, 3), SLOT, None, 8), r"slot: expected size 5 at dim 0 \(T, the tokens of src\), got shape \[4, 2\]"),
    ("scatter_rows num_rows < 0", lambda: ops.scatter_rows(X, SLOT, None, -1), r"num_rows: expected >= 0, got -1"),
    ("scatter_rows slot >= num_rows", lambda: ops.scatter_rows(X, SLOT, None, 4), r"slot: expected values in \[-1, 4\) .*got values in \[0, 7\]"),
    ("scatter_rows weights dtype", lambda: ops.scatter_rows(X, SLOT, W.double(), 8), r"weights: expected dtype Float .*got Double"),
    # slot_dot(a, b, slot)
    ("slot_dot b dtype", lambda: ops.slot_dot(X, ROWS.double(), SLOT), r"b: expected dtype Float \(the dtype of a\), got Double"),
    ("slot_dot width", lambda: ops.slot_dot(torch.randn(4, 5), ROWS, SLOT), r"b: expected size 5 at dim 1 \(d, the width of a\), got shape \[8, 3\]"),
    ("slot_dot slot T", lambda: ops.slot_dot(torch.randn(5, 3), ROWS, SLOT), r"slot: expected size 5 at dim 0 \(T, the tokens of a\), got shape \[4, 2\]"),
    ("slot_dot a 1-D", lambda: ops.slot_dot(X[0], ROWS, SLOT), r"a: expected a 2-D tensor \[T, d\], got shape \[3\]"),
    ("slot_dot repeated slot", lambda: ops.slot_dot(X, ROWS, torch.tensor([[0, 1], [2, 3], [4, 3], [6, 7]])), r"slot: expected distinct rows .*row 3 appears twice"),
    # expert_ffn(x_sorted, expert_offsets, w1, w2, activation, b1, b2, swiglu_alpha, swiglu_limit)
    ("expert_ffn activation", lambda: ops.expert_ffn(XS, OFF, W1, W2, "tanh"), r"activation: expected one of 'swiglu', 'clamped_swiglu', 'silu', 'gelu', 'gelu_tanh', 'relu', got 'tanh'"),
    ("expert_ffn activation (2)", lambda: ops.expert_ffn(XS, OFF, W1, W2, "clamped_silu"), r"activation: expected one of .* got 'clamped_silu'"),
    ("expert_ffn plain w1 rows", lambda: ops.expert_ffn(XS, OFF, W1, W2, "relu"), r"w1: expected size 4 at dim 1 \(f, from w2\), got shape \[2, 8, 8\]"),
    ("expert_ffn gated w1 rows", lambda: ops.expert_ffn(XS, OFF, W1[:, :5], W2, "swiglu"), r"w1: expected size 8 at dim 1 \(2\*f: gate and up rows of a gated activation\), got shape \[2, 5, 8\]"),
    ("expert_ffn clamped w1 rows", lambda: ops.expert_ffn(XS, OFF, W1[:, :7], W2, "clamped_swiglu"), r"w1: expected size 8 at dim 1 \(2\*f"),
    ("expert_ffn offsets size", lambda: ops.expert_ffn(XS, OFF[:-1], W1, W2), r"expert_offsets: expected size 3 at dim 0 \(E \+ 1, from w1\), got shape \[2\]"),
    ("expert_ffn offsets decreasing", lambda: ops.expert_ffn(XS, torch.tensor([0, 7, 6]), W1, W2), r"expert_offsets: expected non-decreasing offsets, got offsets\[1\] = 7 > offsets\[2\] = 6"),
    ("expert_ffn offsets past N", lambda: ops.expert_ffn(XS, torch.tensor([0, 4, 13]), W1, W2), r"expert_offsets: expected the last offset to be at most the 12 rows of x_sorted, got 13"),
    ("expert_ffn offsets from 1", lambda: ops.expert_ffn(XS, torch.tensor([1, 4, 10]), W1, W2), r"expert_offsets: expected offsets\[0\] == 0, got 1"),
    ("expert_ffn offsets int32", lambda: ops.expert_ffn(XS, OFF.int(), W1, W2), r"expert_offsets: expected an int64 index tensor, got Int"),
    ("expert_ffn offsets 2-D", lambda: ops.expert_ffn(XS, OFF[None], W1, W2), r"expert_offsets: expected a 1-D tensor \[E \+ 1\], got shape \[1, 3\]"),
    ("expert_ffn w1 dtype", lambda: ops.expert_ffn(XS, OFF, W1.double(), W2), r"w1: expected dtype Float, got Double"),
    ("expert_ffn w2 dtype", lambda: ops.expert_ffn(XS, OFF, W1, W2.bfloat16()), r"w2: expected dtype Float, got BFloat16"),
    ("expert_ffn d", lambda: ops.expert_ffn(XS[:, :6], OFF, W1, W2), r"w1: expected size 6 at dim 2 \(d, the width of x_sorted\), got shape \[2, 8, 8\]"),
    ("expert_ffn w2 E", lambda: ops.expert_ffn(XS, OFF, W1, W2[:1]), r"w2: expected size 2 at dim 0 \(E, from w1\), got shape \[1, 8, 4\]"),
    ("expert_ffn w2 d", lambda: ops.expert_ffn(XS, OFF, W1, W2[:, :5]), r"w2: expected size 8 at dim 1 \(d, the width of x_sorted\), got shape \[2, 5, 4\]"),
    ("expert_ffn w1 2-D", lambda: ops.expert_ffn(XS, OFF, W1[0], W2), r"w1: expected a 3-D tensor \[E, F1, d\], got shape \[8, 8\]"),
    ("expert_ffn x 1-D", lambda: ops.expert_ffn(XS[0], OFF, W1, W2), r"x_sorted: expected a 2-D tensor \[N, d\], got shape \[8\]"),
    ("expert_ffn x int", lambda: ops.expert_ffn(XS.long(), OFF, W1, W2), r"x_sorted: expected float32, .* got Long"),
    ("expert_ffn w2 device", lambda: ops.expert_ffn(XS, OFF, W1, W2.to(META)), r"w2: expected a tensor on cpu \(the device of x_sorted\), got meta"),
    ("expert_ffn b1 width", lambda: ops.expert_ffn(XS, OFF, W1, W2, b1=B1[:, :7]), r"b1: expected shape \[2, 8\] \[E, F1\], the bias of w1, got \[2, 7\]"),
    ("expert_ffn b1 1-D", lambda: ops.expert_ffn(XS, OFF, W1, W2, b1=B1[0]), r"b1: expected a 2-D tensor \[E, F1\], the bias of w1, got shape \[8\]"),
    ("expert_ffn b1 E", lambda: ops.expert_ffn(XS, OFF, W1, W2, b1=torch.zeros(3, 8)), r"b1: expected shape \[2, 8\] .*got \[3, 8\]"),
    ("expert_ffn b1 3-D", lambda: ops.expert_ffn(XS, OFF, W1, W2, b1=B1[None]), r"b1: expected a 2-D tensor .*got shape \[1, 2, 8\]"),
    ("expert_ffn b1 dtype", lambda: ops.expert_ffn(XS, OFF, W1, W2, b1=B1.double()), r"b1: expected dtype Float, got Double"),
    ("expert_ffn b1 bf16", lambda: ops.expert_ffn(XS, OFF, W1, W2, b1=B1.bfloat16()), r"b1: expected dtype Float, got BFloat16"),
    ("expert_ffn b1 int", lambda: ops.expert_ffn(XS, OFF, W1, W2, b1=B1.long()), r"b1: expected dtype Float, got Long"),
    ("expert_ffn b1 device", lambda: ops.expert_ffn(XS, OFF, W1, W2, b1=B1.to(META)), r"b1: expected a tensor on cpu \(the device of x_sorted\), got meta"),
    ("expert_ffn b2 width", lambda: ops.expert_ffn(XS, OFF, W1, W2, b2=B2[:, :7]), r"b2: expected shape \[2, 8\] \[E, d\], the bias of w2, got \[2, 7\]"),
    ("expert_ffn b2 1-D", lambda: ops.expert_ffn(XS, OFF, W1, W2, b2=B2[0]), r"b2: expected a 2-D tensor \[E, d\], the bias of w2, got shape \[8\]"),
    ("expert_ffn b2 E", lambda: ops.expert_ffn(XS, OFF, W1, W2, b2=torch.zeros(3, 8)), r"b2: expected shape \[2, 8\] .*got \[3, 8\]"),
    ("expert_ffn b2 [E, f]", lambda: ops.expert_ffn(XS, OFF, W1, W2, b2=torch.zeros(2, 4)), r"b2: expected shape \[2, 8\] .*got \[2, 4\]"),
    ("expert_ffn b2 dtype", lambda: ops.expert_ffn(XS, OFF, W1, W2, b2=B2.double()), r"b2: expected dtype Float, got Double"),
    ("expert_ffn b2 f16", lambda: ops.expert_ffn(XS, OFF, W1, W2, b2=B2.half()), r"b2: expected dtype Float, got Half"),
    ("expert_ffn b2 device", lambda: ops.expert_ffn(XS, OFF, W1, W2, b2=B2.to(META)), r"b2: expected a tensor on cpu \(the device of x_sorted\), got meta"),
    ("expert_ffn limit 0", lambda: ops.expert_ffn(XS, OFF, W1, W2, "clamped_swiglu", swiglu_limit=0.0), r"swiglu_limit: expected a positive clamp limit, got 0"),
    ("expert_ffn limit nan", lambda: ops.expert_ffn(XS, OFF, W1, W2, "clamped_swiglu", swiglu_limit=math.nan), r"swiglu_limit: expected a positive clamp limit, got nan"),
    ("expert_ffn alpha inf", lambda: ops.expert_ffn(XS, OFF, W1, W2, "clamped_swiglu", swiglu_alpha=math.inf), r"swiglu_alpha: expected a finite number, got inf"),
    # expert_ffn_backward(grad_y, x_sorted, expert_offsets, w1, w2, hidden, activation, alpha, limit, bias_grads)
    ("expert_ffn_backward grad_y", lambda: ffn_bwd(Y[:5], XS, OFF, W1, W2, HID, "swiglu", 1.702, 7.0, False), r"grad_y: expected shape \[12, 8\] \(the shape of x_sorted\), got \[5, 8\]"),
    ("expert_ffn_backward hidden", lambda: ffn_bwd(Y, XS, OFF, W1, W2, HID[:, :4], "swiglu", 1.702, 7.0, False), r"hidden: expected shape \[12, 8\], got \[12, 4\]"),
    ("expert_ffn_backward grad_y dtype", lambda: ffn_bwd(Y.double(), XS, OFF, W1, W2, HID, "swiglu", 1.702, 7.0, False), r"grad_y: expected dtype Float, got Double"),
]


@pytest.mark.parametrize("what,call,match", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_bad_op_arguments(what, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# --- MoEConfig and MoELayer: the same checks, through either front --------------------------------

BASE = dict(d_model=8, d_ff=12, num_experts=8, top_k=2)

# (option values over BASE, expected message); the message starts with the option's name.
CONFIG_CASES = [
    (dict(d_model=0), r"d_model: expected a positive int, got 0"),
    (dict(d_model=-4), r"d_model: expected a positive int, got -4"),
    (dict(d_model=8.0), r"d_model: expected a positive int, got 8\.0"),
    (dict(d_model=True), r"d_model: expected a positive int, got True"),
    (dict(d_ff=0), r"d_ff: expected a positive int, got 0"),
    (dict(d_ff=-3), r"d_ff: expected a positive int, got -3"),
    (dict(num_experts=0, top_k=1), r"num_experts: expected a positive int, got 0"),
    (dict(num_experts="8"), r"num_experts: expected a positive int, got '8'"),
    (dict(top_k=0), r"top_k: expected an int in \[1, num_experts=8\], got 0"),
    (dict(top_k=-1), r"top_k: expected an int in \[1, num_experts=8\], got -1"),
    (dict(top_k=9), r"top_k: expected an int in \[1, num_experts=8\], got 9"),
    (dict(top_k=2.0), r"top_k: expected an int in \[1, num_experts=8\], got 2\.0"),
    (dict(activation="tanh"), r"activation: expected one of \('swiglu', .*\), got 'tanh'"),
    (dict(scoring="tanh"), r"scoring: expected one of \('softmax', 'sigmoid', 'softmax_topk'\), got 'tanh'"),
    (dict(routing="random"), r"routing: expected one of \('token_choice', 'expert_choice'\), got 'random'"),
    (dict(drop_policy="random"), r"drop_policy: expected one of \('position', 'probability'\), got 'random'"),
    (dict(capacity_scope="token"), r"capacity_scope: expected one of \('batch', 'sequence'\), got 'token'"),
    (dict(renormalize="yes"), r"renormalize: expected True or False, got 'yes'"),
    (dict(router_bias=1), r"router_bias: expected True or False, got 1"),
    (dict(selection_bias=None), r"selection_bias: expected True or False, got None"),
    (dict(expert_bias=0), r"expert_bias: expected True or False, got 0"),
    (dict(weights_on_input="no"), r"weights_on_input: expected True or False, got 'no'"),
    (dict(shared_expert_gate=1, shared_expert_d_ff=4), r"shared_expert_gate: expected True or False, got 1"),
    (dict(num_groups=3), r"num_groups: expected a divisor of num_experts=8, got 3"),
    (dict(num_groups=0), r"num_groups: expected a divisor of num_experts=8, got 0"),
    (dict(num_groups=2.0), r"num_groups: expected a divisor of num_experts=8, got 2\.0"),
    (dict(num_groups=4, topk_groups=1, top_k=3), r"topk_groups: expected 1 <= topk_groups <= num_groups=4 with top_k <= topk_groups \* num_experts / num_groups, got 1"),
    (dict(num_groups=4, topk_groups=5), r"topk_groups: expected 1 <= topk_groups <= num_groups=4 .*got 5"),
    (dict(num_groups=4, topk_groups=0), r"topk_groups: expected 1 <= topk_groups <= num_groups=4 .*got 0"),
    (dict(routed_scaling_factor=math.inf), r"routed_scaling_factor: expected a finite number, got inf"),
    (dict(routed_scaling_factor=math.nan), r"routed_scaling_factor: expected a finite number, got nan"),
    (dict(routed_scaling_factor="2"), r"routed_scaling_factor: expected a finite number, got '2'"),
    (dict(router_dtype=torch.int64), r"router_dtype: expected None or one of \('float16', 'bfloat16', 'float32', 'float64'\), got torch\.int64"),
    (dict(router_dtype="float32"), r"router_dtype: expected None or one of .* got 'float32'"),
    (dict(router_jitter=1.0), r"router_jitter: expected 0 <= jitter < 1, got 1\.0"),
    (dict(router_jitter=-0.1), r"router_jitter: expected 0 <= jitter < 1, got -0\.1"),
    (dict(router_jitter=math.nan), r"router_jitter: expected 0 <= jitter < 1, got nan"),
    (dict(capacity_factor=0.0), r"capacity_factor: expected a finite positive number or None, got 0\.0"),
    (dict(capacity_factor=-1.0), r"capacity_factor: expected a finite positive number or None, got -1\.0"),
    (dict(capacity_factor=math.inf), r"capacity_factor: expected a finite positive number or None, got inf"),
    (dict(capacity_factor=math.nan), r"capacity_factor: expected a finite positive number or None, got nan"),
    (dict(capacity_factor="1.0"), r"capacity_factor: expected a finite positive number or None, got '1\.0'"),
    (dict(expert_capacity=-1), r"expert_capacity: expected an int >= 0 or None, got -1"),
    (dict(expert_capacity=2.5), r"expert_capacity: expected an int >= 0 or None, got 2\.5"),
    (dict(routing="expert_choice", num_groups=2, topk_groups=2), r"routing: expert_choice does not combine with num_groups > 1, selection_bias or weights_on_input"),
    (dict(routing="expert_choice", selection_bias=True), r"routing: expert_choice does not combine with"),
    (dict(routing="expert_choice", weights_on_input=True), r"routing: expert_choice does not combine with"),
    (dict(swiglu_alpha=math.inf), r"swiglu_alpha: expected a finite number, got inf"),
    (dict(swiglu_limit=math.nan), r"swiglu_limit: expected a finite number, got nan"),
    (dict(activation="clamped_swiglu", swiglu_limit=0.0), r"swiglu_limit: expected a positive clamp limit for clamped_swiglu, got 0\.0"),
    (dict(activation="clamped_swiglu", swiglu_limit=-7.0), r"swiglu_limit: expected a positive clamp limit for clamped_swiglu, got -7\.0"),
    (dict(shared_expert_gate=True), r"shared_expert_d_ff: expected an int >= 0 \(and > 0 with shared_expert_gate\), got 0"),
    (dict(shared_expert_d_ff=-1), r"shared_expert_d_ff: expected an int >= 0 .*got -1"),
    (dict(shared_expert_d_ff=4.0), r"shared_expert_d_ff: expected an int >= 0 .*got 4\.0"),
]


@pytest.mark.parametrize("front", ["MoEConfig", "MoELayer"])
@pytest.mark.parametrize("options,match", CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_bad_layer_options(options, match, front):
    build = MoEConfig if front == "MoEConfig" else MoELayer
    with pytest.raises(ValueError, match="^" + match):
        build(**{**BASE, **options})


def test_unknown_options_are_named():
    with pytest.raises(ValueError, match=r"^MoELayer: unknown MoEConfig option\(s\) \['capacity', 'topk'\]"):
        MoELayer(**BASE, capacity=3, topk=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'capacity'"):
        MoEConfig(**BASE, capacity=3)  # a dataclass: Python's own message names the keyword


# --- MoELayer.forward and its helpers --------------------------------------------------------------

LAYER = MoELayer(**BASE)
FORWARD_CASES = [
    ("x 0-D", lambda: LAYER(torch.tensor(1.0)), r"^x: expected shape \[\.\.\., d_model=8\], got shape \(\)"),
    ("x width", lambda: LAYER(torch.randn(3, 7)), r"^x: expected shape \[\.\.\., d_model=8\], got shape \(3, 7\)"),
    ("x int", lambda: LAYER(torch.ones(3, 8, dtype=torch.long)), r"^x: expected a floating-point tensor, got dtype torch\.int64"),
    ("x dtype", lambda: LAYER(torch.randn(3, 8, dtype=torch.float64)), r"^x: expected dtype torch\.float32 \(the dtype of the layer's parameters; or run under torch\.autocast\), got torch\.float64"),
    ("padding_mask flat", lambda: LAYER(torch.randn(2, 5, 8), torch.ones(10, dtype=torch.bool)), r"^padding_mask: expected shape \(2, 5\) \(x without its last dim\), got \(10,\)"),
    ("padding_mask short", lambda: LAYER(torch.randn(2, 5, 8), torch.ones(2, 4, dtype=torch.bool)), r"^padding_mask: expected shape \(2, 5\) .*got \(2, 4\)"),
    ("padding_mask extra dim", lambda: LAYER(torch.randn(2, 5, 8), torch.ones(2, 5, 1, dtype=torch.bool)), r"^padding_mask: expected shape \(2, 5\) .*got \(2, 5, 1\)"),
]


@pytest.mark.parametrize("what,call,match", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_bad_forward_arguments(what, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_selection_bias_update_needs_the_bias_and_a_forward():
    with pytest.raises(RuntimeError, match="^update_selection_bias: run a forward first"):
        MoELayer(**BASE, selection_bias=True).update_selection_bias(0.1)
    layer = MoELayer(**BASE)
    layer(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="^update_selection_bias: this router was built without selection_bias=True"):
        layer.update_selection_bias(0.1)
    with pytest.raises(ValueError, match=r"^config: expected a sparsemoe\.MoEConfig, got dict"):
        MoELayer.from_config(dict(BASE))
