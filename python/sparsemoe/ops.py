"""Typed wrappers over torch.ops.sparsemoe, each op with its fake kernel and its autograd.

One section per op: the wrapper users call, the fake kernel (shapes and dtypes only, for
torch.compile), and the autograd formula, whose backward is made of sparsemoe ops so that it
works the same in eager mode and under torch.compile. Schemas and shape conventions live in
csrc/ops.cpp; the wrappers take the same keywords as the ops in sparsemoe.reference.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the ops)
from .config import ACTIVATIONS, GATED_ACTIVATIONS, SCORINGS  # noqa: F401  (re-exported)

_ops = torch.ops.sparsemoe


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of `dtype`: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_device(first: tuple[str, Tensor], *others: tuple[str, Tensor | None]) -> None:
    name0, t0 = first
    for name, t in others:
        torch._check(t is None or t.device == t0.device,
                     lambda: f"{name}: expected a tensor on {t0.device} (the device of {name0}), got {t.device}")


# --- route -------------------------------------------------------------------------------------


def route(logits: Tensor, k: int, renormalize: bool = True, scoring: str = "softmax",
          selection_bias: Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
          scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Score, (group-limit,) pick top-k, renormalise, scale. [T,E] -> weights [T,k], ids [T,k]."""
    return _ops.route(logits, k, renormalize, scoring, selection_bias, num_groups, topk_groups, scale)


@torch.library.register_fake("sparsemoe::route")
def _(logits, k, renormalize=True, scoring="softmax", selection_bias=None, num_groups=1, topk_groups=1,
      scale=1.0):
    _check_same_device(("logits", logits), ("selection_bias", selection_bias))
    torch._check(logits.dim() == 2, lambda: f"logits: expected [T, E], got {tuple(logits.shape)}")
    torch._check(1 <= k <= logits.shape[1], lambda: f"k: expected 1 <= k <= E = {logits.shape[1]}, got {k}")
    T = logits.shape[0]
    return (logits.new_empty((T, k), dtype=opmath_dtype(logits.dtype)),
            logits.new_empty((T, k), dtype=torch.int64))


@torch.library.register_fake("sparsemoe::route_backward")
def _(grad_weights, logits, expert_ids, renormalize, scoring, scale):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, k, renormalize, scoring, selection_bias, num_groups, topk_groups, scale = inputs
    ctx.options = (renormalize, scoring, scale)
    ctx.save_for_backward(logits, output[1])


def _route_backward(ctx, grad_weights, grad_ids):
    logits, ids = ctx.saved_tensors
    renormalize, scoring, scale = ctx.options
    grad_logits = _ops.route_backward(grad_weights, logits, ids, renormalize, scoring, scale)
    return grad_logits, None, None, None, None, None, None, None


torch.library.register_autograd("sparsemoe::route", _route_backward, setup_context=_route_setup)


def _no_double_backward(op: str):
    """The autograd of a backward op that has no derivative of its own: differentiating through
    it (a gradient of a gradient) raises instead of giving a silent zero."""
    def backward(ctx, *grads):
        raise RuntimeError(f"sparsemoe.{op}: double backward (a gradient of its gradient, as a gradient penalty "
                           f"takes) is not supported by sparsemoe.{op}; dispatch, combine, scatter_rows and "
                           f"slot_dot support it")
    return backward


torch.library.register_autograd("sparsemoe::route_backward", _no_double_backward("route"))


# --- dispatch ----------------------------------------------------------------------------------


def dispatch(x: Tensor, expert_ids: Tensor, num_experts: int, capacity: int = -1,
             priority: Tensor | None = None, token_groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the (token, pick) rows by expert, within capacity -> (x_sorted, expert_offsets, slot)."""
    if isinstance(capacity, int) and capacity > expert_ids.shape[0]:
        # An expert never holds more picks than there are tokens: a larger capacity (up to any
        # Python int) keeps the same picks and the same buffer.
        capacity = expert_ids.shape[0]
    return _ops.dispatch(x, expert_ids, num_experts, capacity, priority, token_groups)


def dispatch_rows(T: int, k: int, num_experts: int, capacity: int, token_groups: int = 1) -> int:
    """Rows of dispatch's buffer: T*k dropless, else at most capacity per expert and token group."""
    return T * k if capacity < 0 else min(T * k, num_experts * token_groups * capacity)


@torch.library.register_fake("sparsemoe::dispatch")
def _(x, expert_ids, num_experts, capacity=-1, priority=None, token_groups=1):
    _check_same_device(("x", x), ("expert_ids", expert_ids), ("priority", priority))
    torch._check(x.dim() == 2 and expert_ids.dim() == 2, lambda: "x: expected [T, d] and expert_ids [T, k]")
    T, k = expert_ids.shape
    N = dispatch_rows(T, k, num_experts, capacity, token_groups)
    return (x.new_empty((N, x.shape[1])),
            expert_ids.new_empty((num_experts + 1,)),
            expert_ids.new_empty((T, k)))


def _dispatch_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _dispatch_backward(ctx, grad_x_sorted, grad_offsets, grad_slot):
    (slot,) = ctx.saved_tensors
    return _ops.combine(grad_x_sorted, slot, None), None, None, None, None, None


torch.library.register_autograd("sparsemoe::dispatch", _dispatch_backward, setup_context=_dispatch_setup)


# --- expert_ffn --------------------------------------------------------------------------------


def expert_ffn(x_sorted: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor,
               activation: str = "swiglu", b1: Tensor | None = None, b2: Tensor | None = None,
               swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
               gate_up_interleaved: bool = False, packed: Tensor | None = None) -> Tensor:
    """Run each expert's FFN on its contiguous rows of x_sorted. Returns y [N, d].

    w1 [E, F1, d] and w2 [E, d, f] may be transposed views, such as Hugging Face's
    ``gate_up_proj.transpose(1, 2)`` and ``down_proj.transpose(1, 2)``: the CPU kernels read them
    in place and give their gradients the same strides. ``gate_up_interleaved`` says w1's (and
    b1's) gate and up rows alternate (row 2c gate c, row 2c+1 up c, GPT-OSS) instead of forming
    [gate | up] halves; it needs a gated activation.

    ``packed`` (CPU only) is ``pack_expert_weights(w1, w2, ...)`` of these same weights: the forward
    then runs the micro-kernel on its panels. It is a copy, so the caller repacks after the weights
    change; the backward reads w1 and w2.
    """
    return _ops.expert_ffn(x_sorted, expert_offsets, w1, w2, activation, b1, b2, swiglu_alpha, swiglu_limit,
                           gate_up_interleaved, packed)[0]


def pack_expert_weights(w1: Tensor, w2: Tensor, activation: str = "swiglu",
                        gate_up_interleaved: bool = False, out: Tensor | None = None) -> Tensor:
    """w1 [E, F1, d] and w2 [E, d, f] (any layout, float32 / bfloat16 / float16) packed into the CPU
    micro-kernel's column panels -> [E, packed_row_elems(...)] in the weights' dtype, for
    ``expert_ffn(..., packed=)``: F1*d + d*f elements per expert, a little more for bfloat16 panels
    in pairs with an odd d or f (``panels_in_pairs``). Its memory is one copy of the expert
    weights. ``out``, an earlier result for weights of the same shapes and dtype, is overwritten
    instead of allocating (faster: no fresh pages to fault in)."""
    if out is not None:
        _ops.pack_expert_weights_into(out, w1.detach(), w2.detach(), activation, gate_up_interleaved)
        return out
    return _ops.pack_expert_weights(w1.detach(), w2.detach(), activation, gate_up_interleaved)


def packed_kernels_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the expert forward in `dtype` runs, and gains from running, on packed panels here:
    torch exports oneDNN's micro-kernel and a probe product checked out at first use. float32 runs
    on its float32 kernel; bfloat16 on the native bf16 kernel where the CPU has AVX512-BF16 or AMX
    (``panels_in_pairs``), else widened onto the float32 one where the CPU has no native bf16
    GEMM at all; float16 only where the CPU has no native float16 GEMM."""
    if not _C.packed_kernels_available():
        return False
    return bool(_C.packed_weights_pay(str(dtype).removeprefix("torch.")))


@functools.lru_cache(maxsize=None)
def bf16_gemm_hardware() -> str:
    """What multiplies bfloat16 natively on this CPU, as ATen sees it: ``"AMX"`` (tile
    instructions, which oneDNN's own bf16 GEMMs use), ``"AVX512-BF16"`` (``vdpbf16ps``) or
    ``"none"`` (ATen emulates bf16 GEMMs)."""
    if _C.cpu_has("amx_bf16"):
        return "AMX"
    return "AVX512-BF16" if _C.cpu_has("avx512_bf16") else "none"


def panels_in_pairs(dtype: torch.dtype) -> bool:
    """Whether `dtype` panels are stored in VNNI pairs (bfloat16 on CPUs with AVX512-BF16 or AMX):
    P[(k // 2) * 2 * width + 2 * c + k % 2], the reduction padded with a zero to an even length."""
    return bool(_C.panels_in_pairs(str(dtype).removeprefix("torch.")))


def panels_stream(dtype: torch.dtype) -> bool:
    """Whether products of at most ``_C.stream_max_rows`` rows (decoding's experts) on `dtype`
    panels stream them through sparsemoe's AVX-512 kernel instead of oneDNN's micro-kernel here:
    float32 where a probe found it bitwise equal to the micro-kernel, bfloat16 on panels in pairs
    (AVX512-BF16). Either way the results are the same; only the speed differs."""
    return bool(_C.panels_stream(str(dtype).removeprefix("torch.")))


def native_forward_runs(dtype: torch.dtype) -> bool:
    """Whether the expert forward in `dtype` without packed panels runs its blocks of
    ``_C.native_forward_min_rows`` to ``_C.native_forward_max_rows`` rows on the weights in place,
    through oneDNN's native bf16 micro-kernel (bfloat16 where the CPU has AVX512-BF16 or AMX), for
    row-major weights with an even d and f; other blocks and dtypes run on ATen's GEMMs. The
    results are the same either way within rounding; only the speed differs."""
    return bool(_C.native_forward_runs(str(dtype).removeprefix("torch.")))


def set_native_forward(enabled: bool) -> None:
    """Turns the in-place forward blocks of ``native_forward_runs`` off (or back on) for every
    later call in this process, for A/B measurements. ``_C.native_forward_blocks()`` counts the
    blocks they ran."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _C.set_native_forward(enabled)


def buffer_cache_bytes() -> int:
    """Bytes of freed large CPU buffers that sparsemoe's kernels keep for reuse. Their large
    buffers (at least ``_C.buffer_cache_min_bytes``: dispatched rows, hidden activations, expert
    outputs, input and weight gradients, packed weights) come from a cache that keeps freed blocks
    mapped and hands them out again for the next buffer of the same rounded size, since fresh ones
    are zeroed by the kernel page by page on every call. It holds at most ``buffer_cache_limit()``
    bytes of freed blocks, the oldest returned first."""
    return int(_C.buffer_cache_bytes())


def buffer_cache_limit() -> int:
    """The most freed bytes the buffer cache holds: 1 GiB unless the environment variable
    ``SPARSEMOE_BUFFER_CACHE_MB`` or ``set_buffer_cache_limit`` says otherwise."""
    return int(_C.buffer_cache_limit())


def set_buffer_cache_limit(nbytes: int) -> None:
    """Sets the buffer cache's limit (0: keep no freed block); blocks beyond it are freed now."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"nbytes: expected an int >= 0, got {nbytes!r}")
    _C.set_buffer_cache_limit(nbytes)


def release_buffer_cache() -> None:
    """Returns every freed block the buffer cache holds to the system (the limit stays)."""
    _C.release_buffer_cache()


def packed_row_elems(d: int, f: int, gated: bool, dtype: torch.dtype) -> int:
    """Elements per expert of pack_expert_weights' output for these sizes and dtype."""
    halves = 2 if gated else 1
    kd, kf = (d + d % 2, f + f % 2) if panels_in_pairs(dtype) else (d, f)
    return halves * f * kd + d * kf


@torch.library.register_fake("sparsemoe::pack_expert_weights_into")
def _(packed, w1, w2, activation, gate_up_interleaved=False):
    return None


@torch.library.register_fake("sparsemoe::pack_expert_weights")
def _(w1, w2, activation, gate_up_interleaved=False):
    torch._check(w1.dim() == 3 and w2.dim() == 3, lambda: "w1, w2: expected [E, F1, d] and [E, d, f]")
    E, F1, d = w1.shape
    f = w2.shape[2]
    return w1.new_empty((E, packed_row_elems(d, f, activation in GATED_ACTIVATIONS, w1.dtype)))


def _check_gate_up_layout(activation: str, gate_up_interleaved: bool) -> None:
    torch._check(not gate_up_interleaved or activation in GATED_ACTIVATIONS,
                 lambda: f"gate_up_interleaved: expected False for the ungated activation '{activation}' "
                         f"(only 'swiglu' and 'clamped_swiglu' have gate and up rows), got True")


@torch.library.register_fake("sparsemoe::expert_ffn")
def _(x_sorted, expert_offsets, w1, w2, activation, b1=None, b2=None, swiglu_alpha=1.702, swiglu_limit=7.0,
      gate_up_interleaved=False, packed=None):
    _check_same_device(("x_sorted", x_sorted), ("expert_offsets", expert_offsets), ("w1", w1), ("w2", w2),
                       ("b1", b1), ("b2", b2))
    _check_gate_up_layout(activation, gate_up_interleaved)
    return x_sorted.new_empty(x_sorted.shape), x_sorted.new_empty((x_sorted.shape[0], w1.shape[1]))


@torch.library.register_fake("sparsemoe::expert_ffn_backward")
def _(grad_y, x_sorted, expert_offsets, w1, w2, hidden, activation, swiglu_alpha, swiglu_limit, bias_grads,
      gate_up_interleaved=False):
    _check_gate_up_layout(activation, gate_up_interleaved)
    E = w1.shape[0] if bias_grads else 0
    # The weight gradients take the weights' strides (a transposed weight, a transposed gradient),
    # grad_x is a fresh row-major buffer whatever x_sorted's strides.
    return (x_sorted.new_empty(x_sorted.shape), torch.empty_like(w1), torch.empty_like(w2),
            w1.new_empty((E, w1.shape[1])), w1.new_empty((E, w2.shape[1])))


def _expert_ffn_setup(ctx, inputs, output):
    x_sorted, offsets, w1, w2, activation, b1, b2, swiglu_alpha, swiglu_limit, gate_up_interleaved, _packed = inputs
    ctx.options = (activation, swiglu_alpha, swiglu_limit, gate_up_interleaved)
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x_sorted, offsets, w1, w2, output[1])


def _expert_ffn_backward(ctx, grad_y, grad_hidden):
    x_sorted, offsets, w1, w2, hidden = ctx.saved_tensors
    activation, alpha, limit, gate_up_interleaved = ctx.options
    has_b1, has_b2 = ctx.has_bias
    grad_x, grad_w1, grad_w2, grad_b1, grad_b2 = _ops.expert_ffn_backward(
        grad_y, x_sorted, offsets, w1, w2, hidden, activation, alpha, limit, has_b1 or has_b2, gate_up_interleaved)
    return (grad_x, None, grad_w1, grad_w2, None, grad_b1 if has_b1 else None, grad_b2 if has_b2 else None,
            None, None, None, None)


torch.library.register_autograd("sparsemoe::expert_ffn", _expert_ffn_backward,
                                setup_context=_expert_ffn_setup)
torch.library.register_autograd("sparsemoe::expert_ffn_backward", _no_double_backward("expert_ffn"))


# --- fixed_order_linear ------------------------------------------------------------------------


def fixed_order_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x [T, d] @ weight [E, d]^T + bias [E]`` on the CPU, each output element one float32
    reduction in an order fixed by d alone: a row's output is bitwise the same whatever other rows
    share the call and whatever the thread count (``F.linear`` through the BLAS is not). Needs
    oneDNN's micro-kernel (``packed_kernels_available()``). The backward is plain matmuls."""
    return _ops.fixed_order_linear(x, weight, bias)


@torch.library.register_fake("sparsemoe::fixed_order_linear")
def _(x, weight, bias=None):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x, weight: expected [T, d] and [E, d]")
    return x.new_empty((x.shape[0], weight.shape[0]))


def _fixed_order_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _fixed_order_linear_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
    grad_w = grad_out.t() @ x if ctx.needs_input_grad[1] else None
    grad_b = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


torch.library.register_autograd("sparsemoe::fixed_order_linear", _fixed_order_linear_backward,
                                setup_context=_fixed_order_linear_setup)


# --- combine -----------------------------------------------------------------------------------


def combine(rows: Tensor, slot: Tensor, weights: Tensor | None = None) -> Tensor:
    """out[t] = sum_j weights[t,j] * rows[slot[t,j]] in a fixed order -> [T, d]."""
    return _ops.combine(rows, slot, weights)


@torch.library.register_fake("sparsemoe::combine")
def _(rows, slot, weights):
    _check_same_device(("rows", rows), ("slot", slot), ("weights", weights))
    return rows.new_empty((slot.shape[0], rows.shape[1]))


def _combine_setup(ctx, inputs, output):
    rows, slot, weights = inputs
    ctx.num_rows = rows.shape[0]
    ctx.save_for_backward(rows, slot, weights)


def _combine_backward(ctx, grad_out):
    rows, slot, weights = ctx.saved_tensors
    grad_rows = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_rows = _ops.scatter_rows(grad_out, slot, weights, ctx.num_rows)
    if weights is not None and ctx.needs_input_grad[2]:
        grad_weights = _ops.slot_dot(grad_out, rows, slot)
    return grad_rows, None, grad_weights


torch.library.register_autograd("sparsemoe::combine", _combine_backward, setup_context=_combine_setup)


# --- scatter_rows ------------------------------------------------------------------------------


def scatter_rows(src: Tensor, slot: Tensor, weights: Tensor | None, num_rows: int) -> Tensor:
    """out[slot[t,j]] = weights[t,j] * src[t]; other rows 0 -> [num_rows, d]."""
    return _ops.scatter_rows(src, slot, weights, num_rows)


@torch.library.register_fake("sparsemoe::scatter_rows")
def _(src, slot, weights, num_rows):
    _check_same_device(("src", src), ("slot", slot), ("weights", weights))
    return src.new_empty((num_rows, src.shape[1]))


def _scatter_rows_setup(ctx, inputs, output):
    src, slot, weights, num_rows = inputs
    ctx.save_for_backward(src, slot, weights)


def _scatter_rows_backward(ctx, grad_out):
    src, slot, weights = ctx.saved_tensors
    grad_src = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_src = _ops.combine(grad_out, slot, weights)
    if weights is not None and ctx.needs_input_grad[2]:
        grad_weights = _ops.slot_dot(src, grad_out, slot)
    return grad_src, None, grad_weights, None


torch.library.register_autograd("sparsemoe::scatter_rows", _scatter_rows_backward,
                                setup_context=_scatter_rows_setup)


# --- slot_dot ----------------------------------------------------------------------------------


def slot_dot(a: Tensor, b: Tensor, slot: Tensor) -> Tensor:
    """out[t,j] = <a[t], b[slot[t,j]]> in opmath -> [T, k]."""
    return _ops.slot_dot(a, b, slot)


@torch.library.register_fake("sparsemoe::slot_dot")
def _(a, b, slot):
    _check_same_device(("a", a), ("b", b), ("slot", slot))
    return a.new_empty(slot.shape, dtype=opmath_dtype(a.dtype))


def _slot_dot_setup(ctx, inputs, output):
    a, b, slot = inputs
    ctx.num_rows = b.shape[0]
    ctx.save_for_backward(a, b, slot)


def _slot_dot_backward(ctx, grad_out):
    a, b, slot = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _ops.combine(b, slot, grad_out)
    if ctx.needs_input_grad[1]:
        grad_b = _ops.scatter_rows(a, slot, grad_out, ctx.num_rows)
    return grad_a, grad_b, None


torch.library.register_autograd("sparsemoe::slot_dot", _slot_dot_backward, setup_context=_slot_dot_setup)


# --- moe_inference -----------------------------------------------------------------------------


def moe_inference(x: Tensor, router_weight: Tensor, router_bias: Tensor | None, w1: Tensor, w2: Tensor, k: int,
                renormalize: bool = True, scoring: str = "softmax", selection_bias: Tensor | None = None,
                num_groups: int = 1, topk_groups: int = 1, scale: float = 1.0, activation: str = "swiglu",
                b1: Tensor | None = None, b2: Tensor | None = None, swiglu_alpha: float = 1.702,
                swiglu_limit: float = 7.0, packed: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A dropless token-choice MoE forward for inference (CPU), in one call: logits =
    ``F.linear(x, router_weight, router_bias)``, then ``route``, ``dispatch``, ``expert_ffn`` and
    ``combine`` with these arguments, bitwise their results, without the per-op call overhead
    that dominates decoding. Returns (out [T,d], logits [T,E], expert_ids [T,k], expert_offsets
    [E+1], slot [T,k]). It has no backward: with gradients on, call the ops one by one."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            x, router_weight, router_bias, selection_bias, w1, w2, b1, b2)):
        raise RuntimeError("moe_inference: an inference op with no backward, got inputs that require grad with "
                           "grad mode on (run it under torch.no_grad(), or the ops one by one to train)")
    return _ops.moe_inference(x, router_weight, router_bias, k, renormalize, scoring, selection_bias, num_groups,
                            topk_groups, scale, w1, w2, activation, b1, b2, swiglu_alpha, swiglu_limit, packed)


@torch.library.register_fake("sparsemoe::moe_inference")
def _(x, router_weight, router_bias, k, renormalize, scoring, selection_bias, num_groups, topk_groups, scale,
      w1, w2, activation, b1, b2, swiglu_alpha, swiglu_limit, packed):
    torch._check(x.dim() == 2, lambda: f"x: expected [T, d], got {tuple(x.shape)}")
    T, E = x.shape[0], router_weight.shape[0]
    ids = x.new_empty((T, k), dtype=torch.int64)
    return (x.new_empty((T, x.shape[1])), x.new_empty((T, E)), ids, ids.new_empty((E + 1,)), torch.empty_like(ids))
