// The CPU forwards of the layer's ops (their kernels, registered in their own files), callable
// from C++ so that moe_inference can run them back to back without a dispatcher or Python round
// trip between them. Arguments and results as in the op table (csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace sparsemoe {

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, int64_t k, bool renormalize,
                                             c10::string_view scoring, const c10::optional<at::Tensor>& bias,
                                             int64_t num_groups, int64_t topk_groups, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cpu(const at::Tensor& x, const at::Tensor& ids,
                                                            int64_t num_experts, int64_t capacity,
                                                            const c10::optional<at::Tensor>& priority,
                                                            int64_t token_groups);

std::tuple<at::Tensor, at::Tensor> expert_ffn_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w1,
                                                  const at::Tensor& w2, c10::string_view activation,
                                                  const c10::optional<at::Tensor>& b1,
                                                  const c10::optional<at::Tensor>& b2, double swiglu_alpha,
                                                  double swiglu_limit, bool gate_up_interleaved,
                                                  const c10::optional<at::Tensor>& packed);

at::Tensor combine_cpu(const at::Tensor& rows, const at::Tensor& slot, const std::optional<at::Tensor>& weights);

}  // namespace sparsemoe
