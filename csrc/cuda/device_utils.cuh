// Building blocks shared by every CUDA kernel of sparsemoe: the device and stream of an op,
// launch shapes for grid-stride loops, warp reductions, the expert ranking rule and aligned
// vector access to rows. Only CUDA runtime and c10/ATen core headers: nothing here may pull in
// cuBLAS or cuSPARSE headers (see README.md in this folder).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "ranking.h"

namespace sparsemoe {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Dynamic shared memory every kernel may use without an opt-in attribute.
constexpr int64_t kDefaultSharedBytes = 48 * 1024;
// Upper bound on gridDim.x for grid-stride loops: enough blocks to fill any GPU, far from the limit.
constexpr int64_t kMaxBlocks = 1 << 16;

// Makes the tensor's GPU current for the op's lifetime and holds the stream its kernels use.
struct OpContext {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit OpContext(const at::Tensor& t)
      : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {}
};

// ceil(a / b) for positive b.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a 1-D grid-stride loop over n items with `threads` threads per block (n > 0).
inline unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::min(ceil_div(n, threads), kMaxBlocks));
}

// Launch shape for kernels that own whole rows: threadIdx.x walks the vectors of a row and
// threadIdx.y picks one of block.y rows, so narrow rows still fill a block.
struct RowLaunch {
  dim3 grid, block;
};

// Rows are visited by `for (r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y)`.
inline RowLaunch row_launch(int64_t rows, int64_t vecs_per_row, int threads = 256) {
  int tx = 1;
  while (tx < vecs_per_row && tx < threads) tx *= 2;
  const int ty = threads / tx;
  return {dim3(static_cast<unsigned>(std::min(ceil_div(rows, ty), kMaxBlocks))),
          dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty))};
}

// Launch shape for one warp per row with a per-warp buffer of buffer_bytes: in shared memory when
// it fits (then up to max_warps warps share a block), else in a global scratch tensor of
// blocks * warps * buffer_bytes that the caller allocates.
struct WarpRowLaunch {
  int warps;
  unsigned blocks;
  size_t shared_bytes;
  bool global_scratch;
  int64_t scratch_warps() const { return global_scratch ? int64_t(blocks) * warps : 0; }
};

inline WarpRowLaunch warp_row_launch(int64_t rows, int64_t buffer_bytes, int max_warps = 4) {
  if (buffer_bytes <= kDefaultSharedBytes) {
    const int warps = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(max_warps, kDefaultSharedBytes / std::max<int64_t>(1, buffer_bytes))));
    const auto blocks = static_cast<unsigned>(std::min(ceil_div(rows, warps), kMaxBlocks));
    return {warps, blocks, static_cast<size_t>(warps * buffer_bytes), false};
  }
  // Very wide rows: a bounded number of warps loop over the rows so the scratch stays small.
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, max_warps), 64));
  return {max_warps, blocks, 0, true};
}

// Sum over the 32 lanes; every lane gets the same bits (the butterfly adds the same pairs).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Max over the 32 lanes of NaN-free values (callers track NaN separately).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// NaN test that does not depend on which math headers declare isnan for device code.
template <typename T>
__device__ __forceinline__ bool is_nan(T x) {
  return x != x;
}

// exp in the opmath type: expf for float, exp for double.
__device__ __forceinline__ float exp_op(float x) { return expf(x); }
__device__ __forceinline__ double exp_op(double x) { return exp(x); }

// Reduces each lane's candidate (value, index; index < 0 = none) to the warp's best under
// ranks_before (ranking.h). The order is total, so every lane ends with the same winner.
template <typename T, typename I>
__device__ __forceinline__ void warp_arg_best(T& value, I& index) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const T v = __shfl_xor_sync(kFullMask, value, o);
    const I i = __shfl_xor_sync(kFullMask, index, o);
    if (i >= 0 && (index < 0 || ranks_before(v, i, value, index))) {
      value = v;
      index = i;
    }
  }
}

// VEC consecutive elements moved as one aligned load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// The widest vector (at most 16 bytes) that divides a row of d elements and keeps every pointer
// aligned, so row r of any of these [rows, d] tensors starts on a vector boundary.
template <typename T>
int vec_width(int64_t d, std::initializer_list<const void*> ptrs) {
  int vec = static_cast<int>(16 / sizeof(T));
  const auto aligned = [&](int v) {
    if (d % v != 0) return false;
    for (const void* p : ptrs) {
      if (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * v) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && !aligned(vec)) vec /= 2;
  return std::max(vec, 1);
}

// Calls f(std::integral_constant<int, VEC>{}) for a runtime vec_width<T> result; only the widths
// that fit 16 bytes of T are instantiated.
template <typename T, typename F>
void with_vec_width(int vec, F&& f) {
  constexpr int kMax = static_cast<int>(16 / sizeof(T));
  if constexpr (kMax >= 16) {
    if (vec == 16) return f(std::integral_constant<int, 16>{});
  }
  if constexpr (kMax >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMax >= 2) {
    if (vec == 2) return f(std::integral_constant<int, 2>{});
  }
  return f(std::integral_constant<int, 1>{});
}

}  // namespace cuda
}  // namespace sparsemoe
