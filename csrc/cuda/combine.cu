// combine and its two backward companions on CUDA. Every output element has exactly one owner
// thread (or warp, for slot_dot) that reduces in the fixed order j = 0..k-1 (or a fixed lane
// split of d): no atomics on values, so the results are bitwise repeatable. Rows are read and
// written as aligned vectors of up to 16 bytes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "combine_checks.h"
#include "cuda/device_utils.cuh"

namespace sparsemoe {
namespace {

using cuda::kWarpSize;
using cuda::Vec;

constexpr int kThreads = 256;

// A slot is -1 (dropped) or a row in [0, num_rows); a bad one asserts and is read as dropped.
__device__ __forceinline__ int64_t checked_slot(int64_t s, int64_t num_rows) {
  CUDA_KERNEL_ASSERT(s >= -1 && s < num_rows);
  return s < num_rows ? s : -1;
}

// out[t] = sum_j weights[t,j] * rows[slot[t,j]]: thread (t, vector v) owns out[t, v].
template <typename scalar_t, int VEC>
__global__ void combine_kernel(const scalar_t* __restrict__ rows, const int64_t* __restrict__ slot,
                               const at::opmath_type<scalar_t>* __restrict__ weights, int64_t T, int64_t k,
                               int64_t num_rows, int64_t d, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t vecs = d / VEC;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < T; t += int64_t(gridDim.x) * blockDim.y) {
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = checked_slot(slot[t * k + j], num_rows);
        if (s < 0) continue;
        const acc_t w = weights != nullptr ? weights[t * k + j] : acc_t(1);
        const V y = reinterpret_cast<const V*>(rows + s * d)[v];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += w * static_cast<acc_t>(y.v[i]);
      }
      V o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
      reinterpret_cast<V*>(out + t * d)[v] = o;
    }
  }
}

// owner[row] = the pick whose slot is row. Max is order-independent, so the atomic leaves the
// same owner whatever the schedule; slots are distinct by contract and the next kernel checks it.
__global__ void claim_rows_kernel(const int64_t* __restrict__ slot, int64_t picks, int64_t num_rows,
                                  int64_t* __restrict__ owner) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < picks; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = checked_slot(slot[i], num_rows);
    if (s >= 0) atomicMax(reinterpret_cast<long long*>(owner + s), static_cast<long long>(i));
  }
}

__global__ void check_distinct_slots_kernel(const int64_t* __restrict__ slot, int64_t picks, int64_t num_rows,
                                            const int64_t* __restrict__ owner) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < picks; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = slot[i];
    if (s >= 0 && s < num_rows) CUDA_KERNEL_ASSERT(owner[s] == i);
  }
}

// out[row] = weights[p] * src[token of p] for the pick p that owns row, else 0.
template <typename scalar_t, int VEC>
__global__ void scatter_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ owner,
                                    const at::opmath_type<scalar_t>* __restrict__ weights, int64_t num_rows,
                                    int64_t k, int64_t d, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t vecs = d / VEC;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < num_rows; r += int64_t(gridDim.x) * blockDim.y) {
    const int64_t p = owner[r];
    const V* x = reinterpret_cast<const V*>(src + (p >= 0 ? p / k : 0) * d);
    V* o = reinterpret_cast<V*>(out + r * d);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
      V y;
      if (p < 0) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) y.v[i] = static_cast<scalar_t>(0.0f);
      } else {
        y = x[v];
        if (weights != nullptr) {
          const acc_t w = weights[p];
#pragma unroll
          for (int i = 0; i < VEC; ++i) y.v[i] = static_cast<scalar_t>(w * static_cast<acc_t>(y.v[i]));
        }
      }
      o[v] = y;
    }
  }
}

// out[t,j] = <a[t], b[slot[t,j]]>: one warp per (t, j), lanes split d, then a butterfly sum.
template <typename scalar_t, int VEC>
__global__ void slot_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                const int64_t* __restrict__ slot, int64_t picks, int64_t k, int64_t num_rows, int64_t d,
                                at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t vecs = d / VEC;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; i < picks; i += warps) {
    const int64_t s = checked_slot(slot[i], num_rows);
    acc_t acc = 0;
    if (s >= 0) {
      const V* x = reinterpret_cast<const V*>(a + (i / k) * d);
      const V* y = reinterpret_cast<const V*>(b + s * d);
      for (int64_t v = lane; v < vecs; v += kWarpSize) {
        const V xv = x[v], yv = y[v];
#pragma unroll
        for (int q = 0; q < VEC; ++q) acc += static_cast<acc_t>(xv.v[q]) * static_cast<acc_t>(yv.v[q]);
      }
    }
    acc = cuda::warp_sum(acc);
    if (lane == 0) out[i] = acc;
  }
}

// owner[row] = the pick whose slot is row, -1 for rows no pick holds. Slots are distinct rows by
// the ops' contract (ops.cpp): a repeated one trips the device assert of the second kernel, so
// no op of the three (nor its backward) ever sees two picks on one row.
at::Tensor row_owners(const at::Tensor& slot, int64_t num_rows, const cuda::OpContext& ctx) {
  const int64_t picks = slot.numel();
  at::Tensor owner = at::full({num_rows}, -1, slot.options());
  if (picks > 0) {
    claim_rows_kernel<<<cuda::grid_for(picks, kThreads), kThreads, 0, ctx.stream>>>(
        slot.data_ptr<int64_t>(), picks, num_rows, owner.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    check_distinct_slots_kernel<<<cuda::grid_for(picks, kThreads), kThreads, 0, ctx.stream>>>(
        slot.data_ptr<int64_t>(), picks, num_rows, owner.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return owner;
}

at::Tensor combine_cuda(const at::Tensor& rows_in, const at::Tensor& slot_in,
                        const std::optional<at::Tensor>& weights_in) {
  check_combine_args(rows_in, slot_in, weights_in);
  cuda::OpContext ctx(rows_in);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor slot = slot_in.contiguous();
  const int64_t T = slot.size(0), k = slot.size(1), d = rows.size(1);
  at::Tensor out = at::empty({T, d}, rows.options());
  row_owners(slot, rows.size(0), ctx);  // checks that the slots are distinct
  if (T == 0 || d == 0) return out;
  const at::Tensor weights = weights_in ? weights_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = cuda::vec_width<scalar_t>(d, {rows.data_ptr(), out.data_ptr()});
    cuda::with_vec_width<scalar_t>(vec, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const cuda::RowLaunch l = cuda::row_launch(T, d / VEC);
      combine_kernel<scalar_t, VEC><<<l.grid, l.block, 0, ctx.stream>>>(
          rows.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(), weights.defined() ? weights.data_ptr<acc_t>() : nullptr,
          T, k, rows.size(0), d, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& src_in, const at::Tensor& slot_in,
                             const std::optional<at::Tensor>& weights_in, int64_t num_rows) {
  check_scatter_rows_args(src_in, slot_in, weights_in, num_rows);
  cuda::OpContext ctx(src_in);
  const at::Tensor src = src_in.contiguous();
  const at::Tensor slot = slot_in.contiguous();
  const int64_t picks = slot.numel(), k = slot.size(1), d = src.size(1);
  at::Tensor out = at::empty({num_rows, d}, src.options());
  const at::Tensor owner = row_owners(slot, num_rows, ctx);
  if (num_rows == 0 || d == 0) return out;
  const at::Tensor weights = weights_in ? weights_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "scatter_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = cuda::vec_width<scalar_t>(d, {src.data_ptr(), out.data_ptr()});
    cuda::with_vec_width<scalar_t>(vec, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const cuda::RowLaunch l = cuda::row_launch(num_rows, d / VEC);
      scatter_rows_kernel<scalar_t, VEC><<<l.grid, l.block, 0, ctx.stream>>>(
          src.data_ptr<scalar_t>(), owner.data_ptr<int64_t>(), weights.defined() ? weights.data_ptr<acc_t>() : nullptr,
          num_rows, k, d, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor slot_dot_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& slot_in) {
  check_slot_dot_args(a_in, b_in, slot_in);
  cuda::OpContext ctx(a_in);
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const at::Tensor slot = slot_in.contiguous();
  const int64_t picks = slot.numel(), k = slot.size(1), d = a.size(1);
  at::Tensor out = at::empty({slot.size(0), k}, a.options().dtype(opmath_dtype(a.scalar_type())));
  if (picks == 0) return out;
  row_owners(slot, b.size(0), ctx);  // checks that the slots are distinct
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "slot_dot_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = cuda::vec_width<scalar_t>(d, {a.data_ptr(), b.data_ptr()});
    cuda::with_vec_width<scalar_t>(vec, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      slot_dot_kernel<scalar_t, VEC><<<cuda::grid_for(picks * kWarpSize, kThreads), kThreads, 0, ctx.stream>>>(
          a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(), picks, k, b.size(0), d,
          out.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CUDA, m) {
  m.impl("combine", &combine_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("slot_dot", &slot_dot_cuda);
}

}  // namespace sparsemoe
