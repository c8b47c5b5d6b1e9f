// combine and its two backward companions, scatter_rows and slot_dot. Every output element is
// written by exactly one thread in a fixed order: no atomics, bitwise repeatable.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "combine_checks.h"
#include "cpu/large_buffers.h"
#include "cpu/forward_ops.h"
#include "cpu/index_checks.h"
#include "cpu/row_loops.h"

namespace sparsemoe {
namespace {

int64_t token_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d)); }

}  // namespace

at::Tensor combine_cpu(const at::Tensor& rows_in, const at::Tensor& slot_in,
                       const std::optional<at::Tensor>& weights_in) {
  check_combine_args(rows_in, slot_in, weights_in);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor slot = slot_in.contiguous();
  check_slot_values(slot, rows.size(0));
  const int64_t T = slot.size(0), k = slot.size(1), d = rows.size(1);
  at::Tensor out = empty_large({T, d}, rows.options());
  const at::Tensor weights = weights_in ? weights_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "combine", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y = rows.data_ptr<scalar_t>();
    const int64_t* sl = slot.data_ptr<int64_t>();
    const acc_t* w = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, token_grain(d), [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(d);
      for (int64_t t = b; t < e; ++t) {
        weighted_rows_sum<scalar_t, acc_t>(y, d, sl + t * k, w ? w + t * k : nullptr, k, acc.data(), o + t * d);
      }
    });
  });
  return out;
}

namespace {

at::Tensor scatter_rows_cpu(const at::Tensor& src_in, const at::Tensor& slot_in,
                            const std::optional<at::Tensor>& weights_in, int64_t num_rows) {
  check_scatter_rows_args(src_in, slot_in, weights_in, num_rows);
  const at::Tensor src = src_in.contiguous();
  const at::Tensor slot = slot_in.contiguous();
  check_slot_values(slot, num_rows);  // distinct rows: two picks writing one row would race
  const int64_t T = slot.size(0), k = slot.size(1), d = src.size(1);
  at::Tensor out = empty_large({num_rows, d}, src.options()).zero_();
  const at::Tensor weights = weights_in ? weights_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "scatter_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = src.data_ptr<scalar_t>();
    const int64_t* sl = slot.data_ptr<int64_t>();
    const acc_t* w = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, token_grain(d), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* xr = x + t * d;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t s = sl[t * k + j];
          if (s < 0) continue;
          scalar_t* orow = o + s * d;
          if (w) {
            scaled_row<scalar_t, acc_t>(xr, d, w[t * k + j], orow);
          } else {
            std::copy(xr, xr + d, orow);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor slot_dot_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& slot_in) {
  check_slot_dot_args(a_in, b_in, slot_in);
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const at::Tensor slot = slot_in.contiguous();
  check_slot_values(slot, b.size(0));
  const int64_t T = slot.size(0), k = slot.size(1), d = a.size(1);
  at::Tensor out = at::empty({T, k}, a.options().dtype(opmath_dtype(a.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "slot_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.data_ptr<scalar_t>();
    const scalar_t* y = b.data_ptr<scalar_t>();
    const int64_t* sl = slot.data_ptr<int64_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, T, token_grain(d), [&](int64_t bt, int64_t et) {
      for (int64_t t = bt; t < et; ++t) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t s = sl[t * k + j];
          o[t * k + j] = s >= 0 ? row_dot<scalar_t, acc_t>(x + t * d, y + s * d, d) : acc_t(0);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) {
  m.impl("combine", &combine_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("slot_dot", &slot_dot_cpu);
}

}  // namespace sparsemoe
