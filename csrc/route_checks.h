// Argument checks of route and route_backward that need no tensor data, shared by the CPU and
// CUDA kernels so both fail with the same messages. The range check of expert_ids in
// route_backward reads its data: the CPU kernel runs it on the host, the CUDA kernel on the device.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

#include "checks.h"
#include "routing.h"

namespace sparsemoe {

struct RouteOptions {
  int64_t k;
  Scoring scoring;
  bool renormalize;
  int64_t num_groups, topk_groups;
  double scale;
};

inline RouteOptions check_route_args(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                     bool renormalize, const std::optional<at::Tensor>& bias,
                                     int64_t num_groups, int64_t topk_groups, double scale) {
  check_rank(logits, "logits", 2, "[T, E]");
  check_floating(logits, "logits");
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1, "logits: expected at least one expert (E >= 1), got shape ", shape_str(logits));
  TORCH_CHECK(k >= 1 && k <= E, "k: expected 1 <= k <= E = ", E, ", got ", k);
  TORCH_CHECK(num_groups >= 1 && E % num_groups == 0, "num_groups: expected a divisor of E = ", E,
              ", got ", num_groups);
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups,
              "topk_groups: expected 1 <= topk_groups <= num_groups = ", num_groups, ", got ", topk_groups);
  TORCH_CHECK(k <= topk_groups * (E / num_groups), "k: expected k <= topk_groups * E / num_groups = ",
              topk_groups * (E / num_groups), " (the experts of the chosen groups), got ", k);
  if (bias.has_value()) {
    check_rank(*bias, "selection_bias", 1, "[E]");
    check_floating(*bias, "selection_bias");
    check_same_device(logits, "logits", *bias, "selection_bias");
    check_size(*bias, "selection_bias", 0, E, "E, the experts of logits");
  }
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  return {k, parse_scoring(std::string(scoring)), renormalize, num_groups, topk_groups, scale};
}

// Returns the parsed scoring.
inline Scoring check_route_backward_args(const at::Tensor& grad_weights, const at::Tensor& logits,
                                         const at::Tensor& ids, c10::string_view scoring) {
  check_tokens_and_ids(logits, "logits", "[T, E]", ids, "T, the tokens of logits");
  check_same_device(logits, "logits", grad_weights, "grad_weights");
  TORCH_CHECK(grad_weights.sizes() == ids.sizes(), "grad_weights: expected shape ", shape_str(ids),
              " (the shape of expert_ids), got ", shape_str(grad_weights));
  return parse_scoring(std::string(scoring));
}

}  // namespace sparsemoe
