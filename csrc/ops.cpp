// The one table of sparsemoe's operators. Every device file only adds implementations
// (TORCH_LIBRARY_IMPL); Python adds fake kernels and autograd (python/sparsemoe/ops.py).
//
// Shapes: T tokens, d model dim, E experts, k picks per token, f expert hidden width,
// N rows of the expert-ordered buffer (T*k dropless, fewer with a capacity). "opmath" is
// float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/large_buffers.h"
#include "cpu/microkernel_backward.h"
#include "cpu/native_forward.h"
#include "cpu/packed_weights.h"
#include "cpu/stream_gemm.h"

TORCH_LIBRARY(sparsemoe, m) {
  // Token-choice routing, every scheme as options of one op. Scores: softmax over all E experts,
  // sigmoid per expert, or (softmax_topk) the logits, whose softmax runs over the k picked ones.
  // The choice value score + selection_bias (bias [E], selection only, never in the weights)
  // ranks experts; with num_groups > 1 only the topk_groups groups with the largest sum of their
  // two best choice values are eligible. Ties go to the lower expert index; NaN ranks below every
  // number, so ids are always in range and distinct. Weights are the picked scores, divided by
  // their sum (+1e-20) when renormalize, times scale. All math in opmath.
  // logits [T,E] -> weights [T,k] opmath, expert_ids [T,k] int64.
  m.def("route(Tensor logits, int k, bool renormalize=True, str scoring=\"softmax\", Tensor? selection_bias=None, "
        "int num_groups=1, int topk_groups=1, float scale=1.0) -> (Tensor weights, Tensor expert_ids)");
  // d logits [T,E] (logits dtype) from d weights [T,k]; recomputes the scores from logits.
  m.def("route_backward(Tensor grad_weights, Tensor logits, Tensor expert_ids, bool renormalize, str scoring, "
        "float scale) -> Tensor");

  // Stable counting sort of the T*k (token, pick) pairs by expert. x [T,d], expert_ids [T,k]
  // -> x_sorted [N,d] (expert-major, token order inside an expert), expert_offsets [E+1]
  // int64 (expert e owns rows offsets[e]..offsets[e+1]), slot [T,k] int64 (row of each pick,
  // -1 if dropped). capacity -1 is dropless (N = T*k). capacity >= 0 keeps at most capacity
  // picks per expert in each of token_groups equal contiguous token groups, by priority [T,k]
  // (higher first, ties to the earlier pick) or by position when priority is None;
  // N = min(T*k, E*token_groups*capacity) and rows past offsets[E] are zero.
  m.def("dispatch(Tensor x, Tensor expert_ids, int num_experts, int capacity=-1, Tensor? priority=None, "
        "int token_groups=1) -> (Tensor x_sorted, Tensor expert_offsets, Tensor slot)");

  // combine, scatter_rows and slot_dot take slots [T,k] that are -1 (a dropped pick, adding
  // nothing) or distinct rows of the buffer: each row belongs to at most one pick, so that every
  // op and its backward writes each row once (repeated slots are an error, in both directions).
  // out[t] = sum_j weights[t,j] * rows[slot[t,j]], j in order 0..k-1, accumulated in opmath;
  // weights None means 1. rows [N,d], slot [T,k] -> [T,d].
  // Also the backward of dispatch (weights None) and of scatter_rows.
  m.def("combine(Tensor rows, Tensor slot, Tensor? weights) -> Tensor");
  // out[slot[t,j]] = weights[t,j] * src[t]; rows no slot points at are 0.
  // src [T,d], slot [T,k] -> [num_rows,d]. The backward of combine w.r.t. rows.
  m.def("scatter_rows(Tensor src, Tensor slot, Tensor? weights, int num_rows) -> Tensor");
  // out[t,j] = <a[t], b[slot[t,j]]> in opmath (0 where slot is -1). a [T,d], b [N,d] ->
  // [T,k]. The backward of combine and scatter_rows w.r.t. their weights.
  m.def("slot_dot(Tensor a, Tensor b, Tensor slot) -> Tensor");

  // Grouped expert FFN over contiguous segments: for the rows r of expert e,
  // hidden[r] = x[r] @ w1[e]^T + b1[e] and y[r] = act(hidden[r]) @ w2[e]^T + b2[e].
  // x_sorted [N,d], expert_offsets [E+1], w1 [E,F1,d] (F1 = 2f for the gated 'swiglu' and
  // 'clamped_swiglu', else f), w2 [E,d,f], b1 [E,F1], b2 [E,d] -> y [N,d], hidden [N,F1] (in
  // w1's row order, kept for the backward). Rows past offsets[E] (capacity padding) are 0.
  // The gate and up rows of w1 (and b1) are [gate | up] halves, or with gate_up_interleaved
  // (GPT-OSS; gated activations only) alternate: row 2c gate column c, row 2c+1 up column c.
  // w1 and w2 may be transposed views (each expert's matrix column-major, as Hugging Face stores
  // GPT-OSS and Llama-4 experts): the CPU kernels read them in place. swiglu_alpha and
  // swiglu_limit parametrise 'clamped_swiglu' (GPT-OSS).
  m.def("expert_ffn(Tensor x_sorted, Tensor expert_offsets, Tensor w1, Tensor w2, str activation, "
        "Tensor? b1=None, Tensor? b2=None, float swiglu_alpha=1.702, float swiglu_limit=7.0, "
        "bool gate_up_interleaved=False, Tensor? packed=None) -> (Tensor y, Tensor hidden)");
  // The expert weights packed once for the CPU micro-kernel (column panels in the weights'
  // dtype, see cpu/packed_weights.h) -> packed [E, F1*d + d*f]. expert_ffn(..., packed=) on CPU then reads
  // the panels instead of w1 and w2 for its forward; it is the caller's job to repack after the
  // weights change (MoELayer keys its cache on the parameters' versions).
  m.def("pack_expert_weights(Tensor w1, Tensor w2, str activation, bool gate_up_interleaved=False) -> Tensor");
  // The same into the tensor an earlier pack of same-shaped weights returned.
  m.def("pack_expert_weights_into(Tensor(a!) packed, Tensor w1, Tensor w2, str activation, "
        "bool gate_up_interleaved=False) -> ()");
  // out [T,E] = x [T,d] @ weight [E,d]^T + bias [E] (CPU; float32, bfloat16 or float16, accumulated
  // in float32 and rounded once), each output element one reduction over d in an order fixed by d
  // alone (oneDNN's micro-kernel): a row's output is bitwise the same whatever rows share the call
  // and whatever the thread count. The router of a batch-invariant layer.
  m.def("fixed_order_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // The dropless token-choice forward of an MoE layer, for inference (CPU; no autograd): logits
  // = x @ router_weight^T + router_bias, then route, dispatch, expert_ffn and combine with these
  // arguments, bitwise the same as those ops called one by one. x [T,d] -> out [T,d], logits
  // [T,E], expert_ids [T,k], expert_offsets [E+1], slot [T,k] (the routing, for statistics).
  m.def("moe_inference(Tensor x, Tensor router_weight, Tensor? router_bias, int k, bool renormalize, str scoring, "
        "Tensor? selection_bias, int num_groups, int topk_groups, float scale, Tensor w1, Tensor w2, "
        "str activation, Tensor? b1, Tensor? b2, float swiglu_alpha, float swiglu_limit, Tensor? packed) -> "
        "(Tensor out, Tensor logits, Tensor expert_ids, Tensor expert_offsets, Tensor slot)");
  // -> grad_x [N,d], grad_w1 [E,F1,d], grad_w2 [E,d,f] (with the strides empty_like gives w1 and
  // w2: a transposed weight gets a transposed gradient), grad_b1 [E,F1], grad_b2 [E,d] (the bias
  // grads are [0,...] when bias_grads is false); experts with no rows get exact zeros.
  m.def("expert_ffn_backward(Tensor grad_y, Tensor x_sorted, Tensor expert_offsets, Tensor w1, Tensor w2, "
        "Tensor hidden, str activation, float swiglu_alpha, float swiglu_limit, bool bias_grads, "
        "bool gate_up_interleaved=False) -> "
        "(Tensor grad_x, Tensor grad_w1, Tensor grad_w2, Tensor grad_b1, Tensor grad_b2)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "sparsemoe compiled kernels; importing this module registers torch.ops.sparsemoe";
  module.attr("with_cuda") = pybind11::bool_(SPARSEMOE_WITH_CUDA);
  // Whether pack_expert_weights' path runs oneDNN's micro-kernel here (built and probed).
  module.def("packed_kernels_available", &sparsemoe::panel_gemm_is_microkernel);
  // A CPU feature by ATen's name for it ("amx_bf16", "avx512_bf16", ...).
  module.def("cpu_has", [](const std::string& feature) { return sparsemoe::cpu_has(feature.c_str()); });
  // Per dtype ("float32", "bfloat16", "float16"): whether the forward gains from packed panels on
  // this CPU, and whether they are stored in pairs for the native bf16 micro-kernel.
  const auto dtype_of = [](const std::string& dtype) {
    return dtype == "float32" ? at::kFloat : dtype == "bfloat16" ? at::kBFloat16
           : dtype == "float16" ? at::kHalf : at::kDouble;
  };
  module.def("packed_weights_pay", [dtype_of](const std::string& dtype) {
    return sparsemoe::packed_weights_pay(dtype_of(dtype));
  });
  module.def("panels_in_pairs", [dtype_of](const std::string& dtype) {
    return sparsemoe::panels_in_pairs(dtype_of(dtype));
  });
  // Whether products of a few rows (decoding) on `dtype` panels stream them through our own
  // AVX-512 kernel rather than oneDNN's, and up to how many rows.
  module.def("panels_stream", [dtype_of](const std::string& dtype) {
    return sparsemoe::panels_stream(dtype_of(dtype));
  });
  module.attr("stream_max_rows") = pybind11::int_(sparsemoe::kStreamMaxRows);
  // Unpacked bf16 forward blocks on the weights in place (cpu/native_forward.h): whether they run
  // for a dtype, the block sizes they take, the switch and a counter.
  module.def("native_forward_runs", [dtype_of](const std::string& dtype) {
    return sparsemoe::native_forward_runs(dtype_of(dtype));
  });
  module.def("set_native_forward", &sparsemoe::set_native_forward);
  module.def("native_forward_blocks", &sparsemoe::native_forward_blocks);
  module.attr("native_forward_min_rows") = pybind11::int_(sparsemoe::kNativeMinRows);
  module.attr("native_forward_max_rows") = pybind11::int_(sparsemoe::kNativeMaxRows);
  // The cache of freed large CPU buffers (cpu/large_buffers.h).
  module.def("buffer_cache_bytes", &sparsemoe::buffer_cache_bytes);
  module.def("buffer_cache_limit", &sparsemoe::buffer_cache_limit);
  module.def("set_buffer_cache_limit", &sparsemoe::set_buffer_cache_limit);
  module.def("release_buffer_cache", &sparsemoe::release_buffer_cache);
  module.attr("buffer_cache_min_bytes") = pybind11::int_(sparsemoe::kCachedMinBytes);
  // Which bf16 experts take the native bf16 micro-kernel in the backward, where panels are in
  // pairs: fewer rows than this, and at most this many bytes of weights.
  module.attr("pairs_backward_max_rows") = pybind11::int_(sparsemoe::kPairsMaxRows);
  module.attr("pairs_backward_max_weight_bytes") = pybind11::int_(sparsemoe::kPairsMaxWeightBytes);
#if defined(SPARSEMOE_SANITIZED)
  module.attr("sanitized") = pybind11::bool_(true);
#else
  module.attr("sanitized") = pybind11::bool_(false);
#endif
  module.def("parallel_info", [] { return at::get_parallel_info(); },
             "ATen's report of the thread pools and the OpenMP runtime in this process");
}
