"""Bad input on CUDA: argument errors are host checks with the CPU kernels' messages; bad index
values trip a device-side assert instead of reading or writing out of bounds.

They skip with "needs CUDA" on a machine without a GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from sparsemoe import ops
from helpers import dev, experts, needs_cuda, routed

pytestmark = needs_cuda
SCORINGS = ops.SCORINGS


# --- bad input -------------------------------------------------------------------------------

# (op, arguments built on the GPU from a few fixed tensors, the error it must raise). Every one is
# a host check: shapes, dtypes, devices and options, never values that live on the device.
def bad_calls():
    cpu = torch.device("cpu")
    logits, ids = dev(torch.randn(4, 8)), dev(torch.tensor([[0, 1]] * 4))
    x = dev(torch.randn(4, 3))
    rows, slot, weights = (dev(t) for t in routed(4, 3, 4, 2))
    xf, off, w1, w2, b1, b2 = (dev(t) for t in experts(10, 8, 4, 2, "swiglu", counts=[4, 6], pad=2))
    route, route_bwd = ops.route, torch.ops.sparsemoe.route_backward
    ffn = ops.expert_ffn
    return [
        (route, (logits, 0), "k: expected 1 <= k <= E = 8, got 0"),
        (route, (logits, 9), "k: expected 1 <= k <= E = 8, got 9"),
        (route, (logits.unsqueeze(-1), 2), r"logits: expected a 2-D tensor \[T, E\]"),
        (route, (logits.long(), 2), "logits: expected float32, float64, bfloat16 or float16"),
        (route, (logits[:, :0], 1), "logits: expected at least one expert"),
        (route, (logits, 2, True, "tanh"), "scoring: expected one of 'softmax', 'sigmoid', 'softmax_topk'"),
        (route, (logits, 2, True, "softmax", None, 3, 1), "num_groups: expected a divisor of E = 8"),
        (route, (logits, 2, True, "softmax", dev(torch.zeros(7))), "selection_bias: expected size 8 at dim 0"),
        (route, (logits, 2, True, "softmax", torch.zeros(8)), "selection_bias: expected a tensor on cuda"),
        (route_bwd, (dev(torch.randn(4, 3)), logits, ids, True, "softmax", 1.0), "grad_weights: expected shape"),
        (route_bwd, (dev(torch.randn(4, 2)), logits, ids.int(), True, "softmax", 1.0), "expert_ids: expected an int64"),
        (route_bwd, (torch.randn(4, 2), logits, ids, True, "softmax", 1.0), "grad_weights: expected a tensor on cuda"),
        (route_bwd, (dev(torch.randn(4, 2)), logits, ids.cpu(), True, "softmax", 1.0),
         "expert_ids: expected a tensor on cuda"),
        (ops.dispatch, (x, ids.int(), 4), "expert_ids: expected an int64 index tensor"),
        (ops.dispatch, (x, ids[:3], 4), "expert_ids: expected size 4 at dim 0"),
        (ops.dispatch, (x, ids[:, 0], 4), r"expert_ids: expected a 2-D tensor \[T, k\]"),
        (ops.dispatch, (x, ids, 0), "num_experts: expected >= 1, got 0"),
        (ops.dispatch, (x, dev(torch.tensor([[0, 1, 2]] * 4)), 2), r"expert_ids: expected k = size\(1\) in \[1, 2\]"),
        (ops.dispatch, (x[0], ids, 4), r"x: expected a 2-D tensor \[T, d\]"),
        (ops.dispatch, (x.long(), ids, 4), "x: expected float32, float64, bfloat16 or float16"),
        (ops.dispatch, (x, ids, 4, -2), r"capacity: expected -1 \(dropless\) or a capacity >= 0, got -2"),
        (ops.dispatch, (x, ids, 4, 2, None, 3), "token_groups: expected a divisor of T = 4"),
        (ops.dispatch, (x, ids, 4, 2, dev(torch.rand(4, 3))), "priority: expected shape"),
        (ops.dispatch, (x, ids, 4, 2, dev(torch.ones(4, 2, dtype=torch.long))), "priority: expected float32"),
        (ops.dispatch, (x, ids.cpu(), 4), "expert_ids: expected a tensor on cuda"),
        (ops.dispatch, (x.cpu(), ids, 4), r"expert_ids: expected a tensor on cpu \(the device of x\), got cuda"),
        (ops.dispatch, (x, ids, 4, 2, torch.rand(4, 2)), "priority: expected a tensor on cuda"),
        (ops.combine, (rows, slot.int(), weights), "slot: expected an int64 index tensor"),
        (ops.combine, (rows, slot, weights[:, :1]), r"weights: expected shape \[4, 2\]"),
        (ops.combine, (rows, slot, weights.double()), "weights: expected dtype Float"),
        (ops.combine, (rows.double(), slot, weights), "weights: expected dtype Double"),
        (ops.combine, (rows[0], slot, weights), r"rows: expected a 2-D tensor \[N, d\]"),
        (ops.combine, (rows, slot, weights.cpu()), "weights: expected a tensor on cuda"),
        (ops.combine, (rows, slot.cpu(), weights), "slot: expected a tensor on cuda"),
        (ops.combine, (rows.cpu(), slot, weights), r"slot: expected a tensor on cpu \(the device of rows\), got cuda"),
        (ops.scatter_rows, (dev(torch.randn(5, 3)), slot, None, 8), r"slot: expected size 5 at dim 0 \(T, the tokens"),
        (ops.scatter_rows, (x, slot, None, -1), "num_rows: expected >= 0"),
        (ops.scatter_rows, (x, slot.cpu(), None, 8), "slot: expected a tensor on cuda"),
        (ops.slot_dot, (x, rows.double(), slot), "b: expected dtype Float"),
        (ops.slot_dot, (dev(torch.randn(4, 5)), rows, slot), "b: expected size 5 at dim 1"),
        (ops.slot_dot, (x.cpu(), rows, slot), r"b: expected a tensor on cpu \(the device of a\), got cuda"),
        (ffn, (xf, off, w1, w2, "tanh"), "activation: expected one of 'swiglu', 'clamped_swiglu', 'silu', 'gelu'"),
        (ffn, (xf, off, w1, w2, "relu"), r"w1: expected size 4 at dim 1 \(f, from w2\)"),
        (ffn, (xf, off, w1[:, :5], w2, "swiglu"), r"w1: expected size 8 at dim 1 \(2\*f"),
        (ffn, (xf, off[:-1], w1, w2, "swiglu"), r"expert_offsets: expected size 3 at dim 0 \(E \+ 1, from w1\)"),
        (ffn, (xf, off.int(), w1, w2, "swiglu"), "expert_offsets: expected an int64 index tensor"),
        (ffn, (xf, off, w1.double(), w2, "swiglu"), "w1: expected dtype Float, got Double"),
        (ffn, (xf, off, w1, w2.bfloat16(), "swiglu"), "w2: expected dtype Float, got BFloat16"),
        (ffn, (xf[:, :6], off, w1, w2, "swiglu"), r"w1: expected size 6 at dim 2 \(d, the width of x_sorted\)"),
        (ffn, (xf, off, w1, w2[:1], "swiglu"), r"w2: expected size 2 at dim 0 \(E, from w1\)"),
        (ffn, (xf, off, w1[0], w2, "swiglu"), r"w1: expected a 3-D tensor \[E, F1, d\]"),
        (ffn, (xf, off, w1, w2, "swiglu", b1[:, :7]), "b1: expected shape"),
        (ffn, (xf, off, w1, w2, "swiglu", b1.double()), "b1: expected dtype Float"),
        (ffn, (xf, off, w1, w2, "swiglu", None, b2[:, :7]), "b2: expected shape"),
        (ffn, (xf, off, w1, w2, "clamped_swiglu", b1, b2, 1.702, -1.0), "swiglu_limit: expected a positive"),
        (ffn, (xf, off, w1, w2.to(cpu), "swiglu"), "w2: expected a tensor on cuda"),
        (ffn, (xf, off.to(cpu), w1, w2, "swiglu"), "expert_offsets: expected a tensor on cuda"),
        (ffn, (xf, off, w1, w2, "swiglu", b1.to(cpu)), "b1: expected a tensor on cuda"),
        (ffn, (xf.to(cpu), off, w1, w2, "swiglu"),
         r"expert_offsets: expected a tensor on cpu \(the device of x_sorted\)"),
    ]


def test_bad_arguments_on_cuda_name_the_argument():
    wrong = []  # every case is tried, so one run reports all the messages that differ
    for op, args, match in bad_calls():
        name = getattr(op, "__name__", str(op))
        try:
            op(*args)
            wrong.append(f"{name}: no error, expected {match!r}")
        except RuntimeError as e:
            if not re.search(match, str(e)):
                wrong.append(f"{name}: expected {match!r}, got {str(e).splitlines()[0]!r}")
    assert not wrong, "\n".join(wrong)


def test_bad_expert_ffn_backward_arguments_on_cuda():
    x, off, w1, w2, _, _ = (dev(t) for t in experts(10, 8, 4, 2, "swiglu", counts=[4, 6], pad=2))
    y, hidden = torch.ops.sparsemoe.expert_ffn(x, off, w1, w2, "swiglu")
    bwd = torch.ops.sparsemoe.expert_ffn_backward
    with pytest.raises(RuntimeError, match="grad_y: expected shape"):
        bwd(y[:5], x, off, w1, w2, hidden, "swiglu", 1.702, 7.0, False)
    with pytest.raises(RuntimeError, match=r"hidden: expected shape \[12, 8\]"):
        bwd(y, x, off, w1, w2, hidden[:, :4], "swiglu", 1.702, 7.0, False)
    with pytest.raises(RuntimeError, match="grad_y: expected a tensor on cuda"):
        bwd(y.cpu(), x, off, w1, w2, hidden, "swiglu", 1.702, 7.0, False)
    with pytest.raises(RuntimeError, match="hidden: expected a tensor on cuda"):
        bwd(y, x, off, w1, w2, hidden.cpu(), "swiglu", 1.702, 7.0, False)


# Index values live on the device: a bad one must stop the kernel with a device-side assert,
# never read or write out of bounds. The assert poisons the CUDA context, so each case runs in
# a fresh interpreter.
DEVICE_ASSERT_CASES = {
    "combine_repeated_slot": "ops.combine(torch.randn(8, 3, device=dev), torch.tensor([[0, 1], [2, 1], [4, 5], "
                             "[6, 7]], device=dev))",
    "slot_dot_repeated_slot": "ops.slot_dot(torch.randn(4, 3, device=dev), torch.randn(8, 3, device=dev), "
                              "torch.tensor([[0, 1], [2, 3], [4, 3], [6, 7]], device=dev))",
    "dispatch_id_past_E": "ops.dispatch(torch.randn(4, 8, device=dev), torch.tensor([[0, 1], [2, 4], [0, 3], [1, 2]], "
                          "device=dev), 4)",
    "dispatch_negative_id": "ops.dispatch(torch.randn(4, 8, device=dev), torch.tensor([[0, 1], [-1, 2], [0, 3], "
                            "[1, 2]], device=dev), 4, 1)",
    "dispatch_repeated_id": "ops.dispatch(torch.randn(4, 8, device=dev), torch.tensor([[0, 1], [2, 2], [0, 3], "
                            "[1, 2]], device=dev), 4)",
    "combine_slot_past_rows": "ops.combine(torch.randn(8, 3, device=dev), torch.tensor([[0, 1], [2, 8], [4, 5], "
                              "[6, 7]], device=dev))",
    "scatter_rows_slot_past_rows": "ops.scatter_rows(torch.randn(4, 3, device=dev), torch.tensor([[0, 1], [2, 9], "
                                   "[4, 5], [6, 7]], device=dev), None, 8)",
    "scatter_rows_repeated_slot": "ops.scatter_rows(torch.randn(4, 3, device=dev), torch.tensor([[0, 1], [2, 1], "
                                  "[4, 5], [6, 7]], device=dev), None, 8)",
    "slot_dot_slot_past_rows": "ops.slot_dot(torch.randn(4, 3, device=dev), torch.randn(8, 3, device=dev), "
                               "torch.tensor([[0, 1], [2, 3], [4, 8], [6, 7]], device=dev))",
    "expert_ffn_offsets_not_from_zero": "ops.expert_ffn(torch.randn(10, 8, device=dev), torch.tensor([1, 4, 10], "
                                        "device=dev), torch.randn(2, 8, 8, device=dev), torch.randn(2, 8, 4, "
                                        "device=dev))",
    "expert_ffn_offsets_past_rows": "ops.expert_ffn(torch.randn(10, 8, device=dev), torch.tensor([0, 4, 13], "
                                    "device=dev), torch.randn(2, 8, 8, device=dev), torch.randn(2, 8, 4, device=dev))",
    "expert_ffn_offsets_decreasing": "ops.expert_ffn(torch.randn(10, 8, device=dev), torch.tensor([0, 7, 6], "
                                     "device=dev), torch.randn(2, 8, 8, device=dev), torch.randn(2, 8, 4, "
                                     "device=dev))",
    "route_backward_id_past_E": "torch.ops.sparsemoe.route_backward(torch.randn(4, 2, device=dev), torch.randn(4, 8, "
                                "device=dev), torch.tensor([[0, 1], [0, 1], [0, 8], [0, 1]], device=dev), True, "
                                "'softmax', 1.0)",
}


@pytest.mark.parametrize("case", list(DEVICE_ASSERT_CASES))
def test_bad_index_values_trip_a_device_assert(case):
    code = "\n".join(["import torch", "from sparsemoe import ops", "dev = torch.device('cuda')",
                      DEVICE_ASSERT_CASES[case], "torch.cuda.synchronize()"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, f"{case}: a bad index value passed silently"
    assert "device-side assert" in proc.stderr, proc.stderr[-3000:]
