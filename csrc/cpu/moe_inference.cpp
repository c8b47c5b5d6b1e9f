// The layer's inference forward in one op: router logits, routing, dispatch, the experts and
// combine, run back to back. At decoding sizes each op's own work is a few microseconds, while
// a Python-level call of a custom op with its autograd wrapper costs 7-10 (15-30 when the calls
// alternate, their code cold in the caches), so the separate calls cost about as much as the
// experts themselves. The results are the separate ops' own, bit for bit: the same kernels run.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include "cpu/forward_ops.h"

namespace sparsemoe {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_inference_cpu(
    const at::Tensor& x, const at::Tensor& router_weight, const c10::optional<at::Tensor>& router_bias, int64_t k,
    bool renormalize, c10::string_view scoring, const c10::optional<at::Tensor>& selection_bias, int64_t num_groups,
    int64_t topk_groups, double scale, const at::Tensor& w1, const at::Tensor& w2, c10::string_view activation,
    const c10::optional<at::Tensor>& b1, const c10::optional<at::Tensor>& b2, double swiglu_alpha,
    double swiglu_limit, const c10::optional<at::Tensor>& packed) {
  TORCH_CHECK(x.dim() == 2, "moe_inference: x: expected [T, d], got shape ", x.sizes());
  TORCH_CHECK(w1.dim() == 3, "moe_inference: w1: expected [E, F1, d], got shape ", w1.sizes());
  // The router's own arguments (the later ops check theirs, naming them).
  const int64_t E = w1.size(0);
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(0) == E && router_weight.size(1) == x.size(1),
              "moe_inference: router_weight: expected [E=", E, " (w1's experts), d=", x.size(1), "], got shape ",
              router_weight.sizes());
  TORCH_CHECK(router_weight.scalar_type() == x.scalar_type(), "moe_inference: router_weight: expected dtype ",
              x.scalar_type(), " (x's), got ", router_weight.scalar_type());
  if (router_bias.has_value()) {
    TORCH_CHECK(router_bias->dim() == 1 && router_bias->size(0) == E, "moe_inference: router_bias: expected [E=", E,
                "], got shape ", router_bias->sizes());
    TORCH_CHECK(router_bias->scalar_type() == x.scalar_type(), "moe_inference: router_bias: expected dtype ",
                x.scalar_type(), " (x's), got ", router_bias->scalar_type());
  }
  // Each stage under the profiler label of its op, so that a profile reads as the ops' one.
  const at::Tensor logits = at::linear(x, router_weight, router_bias);
  at::Tensor weights, ids, rows, offsets, slot, y;
  {
    RECORD_FUNCTION("sparsemoe::route", std::vector<c10::IValue>());
    std::tie(weights, ids) = route_cpu(logits, k, renormalize, scoring, selection_bias, num_groups, topk_groups,
                                       scale);
  }
  {
    RECORD_FUNCTION("sparsemoe::dispatch", std::vector<c10::IValue>());
    std::tie(rows, offsets, slot) = dispatch_cpu(x, ids, E, /*capacity=*/-1, c10::nullopt, /*token_groups=*/1);
  }
  {
    RECORD_FUNCTION("sparsemoe::expert_ffn", std::vector<c10::IValue>());
    y = std::get<0>(expert_ffn_cpu(rows, offsets, w1, w2, activation, b1, b2, swiglu_alpha, swiglu_limit,
                                   /*gate_up_interleaved=*/false, packed));
  }
  RECORD_FUNCTION("sparsemoe::combine", std::vector<c10::IValue>());
  return {combine_cpu(y, slot, weights), logits, ids, offsets, slot};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) { m.impl("moe_inference", &moe_inference_cpu); }

}  // namespace sparsemoe
