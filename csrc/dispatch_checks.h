// Argument checks of dispatch that need no tensor data, shared by the CPU and CUDA kernels so both
// fail with the same messages. The value checks on expert_ids (in range, distinct per token) read
// its data: the CPU kernel runs them on the host (cpu/index_checks.h), the CUDA kernel on the device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "checks.h"

namespace sparsemoe {

constexpr int64_t kMaxExperts = int64_t(1) << 24;

// N is the row count of x_sorted: T * k dropless, else at most capacity rows per expert and group.
struct DispatchDims {
  int64_t T, d, k, E, N;
};

// Rows of dispatch's buffer for T tokens of k picks: T * k dropless (capacity -1), else
// min(T * k, E * token_groups * capacity). A product too large for int64 can only mean a capacity
// that keeps every pick, so it saturates at T * k instead of wrapping around.
inline int64_t dispatch_rows(int64_t T, int64_t k, int64_t E, int64_t capacity, int64_t token_groups) {
  const int64_t picks = T * k;  // the numel of expert_ids: no overflow
  int64_t slots_per_expert, rows;
  if (capacity < 0 || __builtin_mul_overflow(E, token_groups, &slots_per_expert) ||
      __builtin_mul_overflow(slots_per_expert, capacity, &rows)) {
    return picks;
  }
  return std::min(picks, rows);
}

inline DispatchDims check_dispatch_args(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts,
                                        int64_t capacity, const std::optional<at::Tensor>& priority,
                                        int64_t token_groups) {
  check_tokens_and_ids(x, "x", "[T, d]", ids, "T, the tokens of x");
  TORCH_CHECK(num_experts >= 1, "num_experts: expected >= 1, got ", num_experts);
  // offsets hold E + 1 entries and the kernels' counters E or more: a bound far above any model
  // keeps a stray huge value from becoming a multi-gigabyte allocation.
  TORCH_CHECK(num_experts <= kMaxExperts, "num_experts: expected at most 2**24 = ", kMaxExperts, ", got ",
              num_experts);
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
  const int64_t k = ids.size(1);
  return {T, x.size(1), k, num_experts, dispatch_rows(T, k, num_experts, capacity, token_groups)};
}

}  // namespace sparsemoe
