// Argument checks of combine, scatter_rows and slot_dot that need no tensor data, shared by the
// CPU and CUDA kernels so both fail with the same messages. The value checks on slot (in range,
// distinct rows for scatter_rows) read its data: the CPU kernels run them on the host
// (cpu/index_checks.h), the CUDA kernels on the device.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace sparsemoe {

// A floating [N, d] buffer of rows and the int64 [T, k] slots that index it.
inline void check_rows_and_slot(const at::Tensor& rows, const char* rows_name, const at::Tensor& slot) {
  check_rank(rows, rows_name, 2, "[N, d]");
  check_floating(rows, rows_name);
  check_rank(slot, "slot", 2, "[T, k]");
  check_index(slot, "slot");
  check_same_device(rows, rows_name, slot, "slot");
}

inline void check_combine_args(const at::Tensor& rows, const at::Tensor& slot,
                               const std::optional<at::Tensor>& weights) {
  check_rows_and_slot(rows, "rows", slot);
  if (weights) check_row_weights(*weights, slot, rows, "rows");
}

inline void check_scatter_rows_args(const at::Tensor& src, const at::Tensor& slot,
                                    const std::optional<at::Tensor>& weights, int64_t num_rows) {
  check_rows_and_slot(src, "src", slot);
  check_size(slot, "slot", 0, src.size(0), "T, the tokens of src");
  TORCH_CHECK(num_rows >= 0, "num_rows: expected >= 0, got ", num_rows);
  if (weights) check_row_weights(*weights, slot, src, "src");
}

inline void check_slot_dot_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& slot) {
  check_rank(a, "a", 2, "[T, d]");
  check_floating(a, "a");
  check_rows_and_slot(b, "b", slot);
  check_same_device(a, "a", b, "b");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "b: expected dtype ", a.scalar_type(),
              " (the dtype of a), got ", b.scalar_type());
  check_size(slot, "slot", 0, a.size(0), "T, the tokens of a");
  check_size(b, "b", 1, a.size(1), "d, the width of a");
}

}  // namespace sparsemoe
