// Argument checks of dispatch that need no tensor data, shared by the CPU and CUDA kernels so both
// fail with the same messages. The value checks on expert_ids (in range, distinct per token) read
// its data: the CPU kernel runs them on the host (cpu/index_checks.h), the CUDA kernel on the device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "checks.h"

namespace sparsemoe {

// N is the row count of x_sorted: T * k dropless, else at most capacity rows per expert and group.
struct DispatchDims {
  int64_t T, d, k, E, N;
};

inline DispatchDims check_dispatch_args(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts,
                                        int64_t capacity, const std::optional<at::Tensor>& priority,
                                        int64_t token_groups) {
  check_tokens_and_ids(x, "x", "[T, d]", ids, "T, the tokens of x");
  TORCH_CHECK(num_experts >= 1, "num_experts: expected >= 1, got ", num_experts);
  TORCH_CHECK(ids.size(1) >= 1 && ids.size(1) <= num_experts, "expert_ids: expected k = size(1) in [1, ",
              num_experts, "], got shape ", shape_str(ids));
  TORCH_CHECK(capacity >= -1, "capacity: expected -1 (dropless) or a capacity >= 0, got ", capacity);
  const int64_t T = x.size(0);
  TORCH_CHECK(token_groups >= 1 && T % token_groups == 0, "token_groups: expected a divisor of T = ", T,
              " (tokens form equal contiguous groups), got ", token_groups);
  if (priority.has_value()) {
    check_floating(*priority, "priority");
    check_same_device(x, "x", *priority, "priority");
    TORCH_CHECK(priority->sizes() == ids.sizes(), "priority: expected shape ", shape_str(ids),
                " (the shape of expert_ids), got ", shape_str(*priority));
  }
  const int64_t k = ids.size(1), E = num_experts;
  const int64_t N = capacity < 0 ? T * k : std::min(T * k, E * token_groups * capacity);
  return {T, x.size(1), k, E, N};
}

}  // namespace sparsemoe
