// A linear layer whose every output element is one float32 reduction in an order fixed by the
// reduction length alone (csrc/ops.cpp: fixed_order_linear): the router logits of a
// batch-invariant MoE layer. The BLAS picks its blocking, and with it
// the order of each sum, from the whole problem's shape, so a token's logits change in their last
// bits with the batch around it; oneDNN's micro-kernel (cpu/packed_weights.h: panel_gemm) sums
// each element over K in the same tiles whatever M is, and the rows are split over threads in
// chunks that never change a row's sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/float_tiles.h"
#include "cpu/packed_weights.h"
#include "cpu/to_float.h"

namespace sparsemoe {
namespace {

// Rows per task: the row chunks change which rows share a micro-kernel call, never a row's sum.
constexpr int64_t kRowsPerTask = 64;

// out [T, E] = x [T, d] @ weight [E, d]^T (+ bias), all contiguous and of type T.
template <typename T>
void fixed_order_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out) {
  const int64_t T_ = x.size(0), d = x.size(1), E = weight.size(0);
  // weight^T [d, E] as float32, the micro-kernel's B operand.
  std::vector<float> wt(static_cast<size_t>(d * E));
  transpose_to_float<T>(weight.data_ptr<T>(), d, E, d, wt.data(), E);
  const T* b = bias.defined() ? bias.data_ptr<T>() : nullptr;
  const T* xs = x.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t tasks = (T_ + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> rows, tile;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kRowsPerTask, m = std::min(kRowsPerTask, T_ - r0);
      const float* A = float_rows<T>(xs + r0 * d, d, m, d, rows);
      if constexpr (std::is_same_v<T, float>) {
        if (b == nullptr) {  // the micro-kernel writes float32 outputs in place
          panel_gemm(m, E, d, A, d, wt.data(), E, o + r0 * E, E, false);
          continue;
        }
      }
      tile.resize(static_cast<size_t>(m * E));
      panel_gemm(m, E, d, A, d, wt.data(), E, tile.data(), E, false);
      store_tile<T>(tile.data(), m, E, b, o + r0 * E, E, 1);
    }
  });
}

at::Tensor fixed_order_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                  const c10::optional<at::Tensor>& bias_in) {
  check_rank(x_in, "x", 2, "[T, d]");
  check_rank(weight_in, "weight", 2, "[E, d]");
  check_floating(x_in, "x");
  TORCH_CHECK(x_in.scalar_type() != at::kDouble, "x: expected float32, bfloat16 or float16 (the micro-kernel is "
              "float32), got float64");
  check_dtype(weight_in, "weight", x_in.scalar_type());
  check_same_device(x_in, "x", weight_in, "weight");
  const int64_t T = x_in.size(0), d = x_in.size(1), E = weight_in.size(0);
  check_size(weight_in, "weight", 1, d, "d, from x");
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_rank(*bias_in, "bias", 1, "[E]");
    check_dtype(*bias_in, "bias", x_in.scalar_type());
    check_same_device(x_in, "x", *bias_in, "bias");
    check_size(*bias_in, "bias", 0, E, "E, from weight");
    bias = bias_in->contiguous();
  }
  TORCH_CHECK(panel_gemm_is_microkernel(), "fixed_order_linear: needs oneDNN's GEMM micro-kernel (torch's "
              "cpublas::brgemm, x86-64 with AVX2 or newer), which this torch or CPU does not have: the BLAS's "
              "summation order depends on the batch");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty({T, E}, x.options());
  if (T == 0 || E == 0) return out;

  switch (x.scalar_type()) {
    case at::kFloat: fixed_order_rows<float>(x, weight, bias, out); break;
    case at::kBFloat16: fixed_order_rows<c10::BFloat16>(x, weight, bias, out); break;
    case at::kHalf: fixed_order_rows<c10::Half>(x, weight, bias, out); break;
    default: TORCH_CHECK(false, "x: expected float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) { m.impl("fixed_order_linear", &fixed_order_linear_cpu); }

}  // namespace sparsemoe
