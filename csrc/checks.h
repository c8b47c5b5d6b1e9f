// Argument checks shared by every kernel. Each failure names the argument and says what was
// expected and what was received, so a user can fix the call without reading kernel code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace sparsemoe {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-D tensor ", layout, ", got shape ",
              shape_str(t));
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              name, ": expected float32, float64, bfloat16 or float16, got ", dt);
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, name, ": expected dtype ", expected, ", got ",
              t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, ": expected an int64 index tensor, got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), b_name, ": expected a tensor on ", a.device(),
              " (the device of ", a_name, "), got ", b.device());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, ": expected size ", expected, " at dim ", dim, " (",
              what, "), got shape ", shape_str(t));
}

// A floating [T, ...] tensor of tokens and the int64 [T, k] expert ids that route them.
inline void check_tokens_and_ids(const at::Tensor& tokens, const char* name, const char* layout,
                                 const at::Tensor& ids, const char* tokens_of) {
  check_rank(tokens, name, 2, layout);
  check_floating(tokens, name);
  check_rank(ids, "expert_ids", 2, "[T, k]");
  check_index(ids, "expert_ids");
  check_same_device(tokens, name, ids, "expert_ids");
  check_size(ids, "expert_ids", 0, tokens.size(0), tokens_of);
}

// The accumulation type of a tensor dtype: router weights and reductions use it.
inline at::ScalarType opmath_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// Weights multiplying rows of `rows` must be in that tensor's accumulation dtype.
inline void check_row_weights(const at::Tensor& weights, const at::Tensor& slot,
                              const at::Tensor& rows, const char* rows_name) {
  check_same_device(slot, "slot", weights, "weights");
  TORCH_CHECK(weights.sizes() == slot.sizes(), "weights: expected shape ", shape_str(slot),
              " (the shape of slot), got ", shape_str(weights));
  TORCH_CHECK(weights.scalar_type() == opmath_dtype(rows.scalar_type()), "weights: expected dtype ",
              opmath_dtype(rows.scalar_type()), " (the accumulation dtype of ", rows_name, " ",
              rows.scalar_type(), "), got ", weights.scalar_type());
}

}  // namespace sparsemoe
