// Dispatch on CUDA: a stable counting sort of the T*k (token, pick) pairs by expert, an optional
// capacity that drops picks by position or by priority, then one gather per output row. Nothing
// here reads device data on the host, and no atomics are used, so the result is bitwise
// repeatable and the op can be captured in a CUDA graph.
//
// The sort cuts the picks into chunks of C (a multiple of 32, at least E):
//  1. count: one warp per chunk walks it 32 picks at a time; lanes holding the same expert find
//     each other with __match_any_sync and the highest of them adds their number to
//     counts[e][chunk] (only that warp touches the chunk's column).
//  2. at::cumsum over counts, expert-major, turns them into the first dropless row of every
//     (expert, chunk); an expert's first chunk gives its offset.
//  3. rank: the same warps walk their chunks again; a pick's row is its (expert, chunk) start
//     plus the number of equal lanes below it, and the start advances past the 32-pick step.
// With a capacity each dropless row gets a keep flag: its rank within its (expert, token group)
// segment, by position or by priority, is below capacity. at::cumsum over the flags gives the
// final rows; an expert's offset is the number of kept rows before its first dropless row.
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cuda/device_utils.cuh"
#include "dispatch_checks.h"

namespace sparsemoe {
namespace {

using cuda::kWarpSize;

constexpr int kSortWarpsPerBlock = 4;
constexpr int kThreads = 256;

// Picks per chunk: at least 256 and at least E, so counts holds at most about one entry per pick.
int64_t chunk_size(int64_t E) { return kWarpSize * std::max<int64_t>(8, cuda::ceil_div(E, kWarpSize)); }

// The expert of pick i, or -1 past the chunk or when the id is out of range (which asserts; the
// pick is then left out instead of indexing past the buffers).
__device__ __forceinline__ int64_t expert_of(const int64_t* __restrict__ ids, int64_t i, int64_t end, int64_t E) {
  if (i >= end) return -1;
  const int64_t e = ids[i];
  CUDA_KERNEL_ASSERT(e >= 0 && e < E);
  return (e >= 0 && e < E) ? e : -1;
}

// Step 1; also asserts that each token's picks are distinct experts.
__global__ void count_chunks_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t k, int64_t E, int64_t chunk,
                                    int64_t chunks, int64_t* __restrict__ counts) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; c < chunks; c += warps) {
    const int64_t end = std::min(n, (c + 1) * chunk);
    for (int64_t first = c * chunk; first < end; first += kWarpSize) {
      const int64_t i = first + lane;
      const int64_t e = expert_of(ids, i, end, E);
      if (e >= 0) {
        for (int64_t q = i - i % k; q < i; ++q) CUDA_KERNEL_ASSERT(ids[q] != e);
      }
      const unsigned peers = __match_any_sync(cuda::kFullMask, static_cast<unsigned long long>(e));
      if (e >= 0 && lane == 31 - __clz(peers)) counts[e * chunks + c] += __popc(peers);
      __syncwarp();
    }
  }
}

// Dropless offsets from the exclusive scan of counts: expert e starts at its first chunk's row.
__global__ void chunk_offsets_kernel(const int64_t* __restrict__ starts, const int64_t* __restrict__ counts,
                                     int64_t E, int64_t chunks, int64_t* __restrict__ offsets) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e <= E; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t last = E * chunks - 1;
    offsets[e] = e < E ? starts[e * chunks] : starts[last] + counts[last];
  }
}

// Step 3: row_of_pick [n] and its inverse pick_of_row; row_prio[row] = prio[pick] when given.
__global__ void rank_chunks_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t E, int64_t chunk,
                                   int64_t chunks, int64_t* __restrict__ starts, int64_t* __restrict__ row_of_pick,
                                   int64_t* __restrict__ pick_of_row, const double* __restrict__ prio,
                                   double* __restrict__ row_prio) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; c < chunks; c += warps) {
    const int64_t end = std::min(n, (c + 1) * chunk);
    for (int64_t first = c * chunk; first < end; first += kWarpSize) {
      const int64_t i = first + lane;
      const int64_t e = expert_of(ids, i, end, E);
      const unsigned peers = __match_any_sync(cuda::kFullMask, static_cast<unsigned long long>(e));
      int64_t row = -1;
      if (e >= 0) row = starts[e * chunks + c] + __popc(peers & ((1u << lane) - 1u));
      __syncwarp();  // every lane has read its start before the highest equal lane advances it
      if (e >= 0 && lane == 31 - __clz(peers)) starts[e * chunks + c] += __popc(peers);
      if (i < end) row_of_pick[i] = row;
      if (row >= 0) {
        pick_of_row[row] = i;
        if (prio != nullptr) row_prio[row] = prio[i];
      }
      __syncwarp();
    }
  }
}

// The first row in [lo, hi) whose pick is >= target; rows of one expert are in pick order.
__device__ __forceinline__ int64_t first_row_from(const int64_t* __restrict__ pick_of_row, int64_t lo, int64_t hi,
                                                   int64_t target) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pick_of_row[mid] < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Keep flag of each dropless row: the pick ranks below capacity within the picks of its expert and
// token group (a contiguous run of the expert's rows), by position, or by priority (higher first,
// NaN last, ties to the earlier pick). Priority ranks are counted against the run, so a run of L
// rows costs O(L * min(L, capacity)) reads; runs no longer than capacity are kept outright.
__global__ void keep_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ pick_of_row,
                            const int64_t* __restrict__ offsets, const double* __restrict__ row_prio, int64_t n,
                            int64_t group_picks, int64_t capacity, int64_t* __restrict__ keep) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += int64_t(gridDim.x) * blockDim.x) {
    int64_t flag = 0;
    const int64_t i = pick_of_row[r];
    if (i >= 0) {
      const int64_t e = ids[i];
      const int64_t group_first = i / group_picks * group_picks;
      const int64_t start = first_row_from(pick_of_row, offsets[e], r, group_first);
      if (row_prio == nullptr) {
        flag = r - start < capacity;
      } else {
        const int64_t stop = first_row_from(pick_of_row, r + 1, offsets[e + 1], group_first + group_picks);
        if (stop - start <= capacity) {
          flag = 1;
        } else {
          const double p = row_prio[r];
          int64_t better = 0;
          for (int64_t q = start; q < stop && better < capacity; ++q) better += ranks_before(row_prio[q], q, p, r);
          flag = better < capacity;
        }
      }
    }
    keep[r] = flag;
  }
}

// Final slots from the inclusive scan of the keep flags, and the pick each kept row holds.
__global__ void capacity_slots_kernel(const int64_t* __restrict__ row_of_pick, const int64_t* __restrict__ keep,
                                      const int64_t* __restrict__ kept_through, int64_t n, int64_t N,
                                      int64_t* __restrict__ slot, int64_t* __restrict__ pick_of_slot) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = row_of_pick[i];
    int64_t s = -1;
    if (r >= 0 && keep[r]) {
      s = kept_through[r] - 1;
      CUDA_KERNEL_ASSERT(s < N);
      if (s >= N) s = -1;
    }
    slot[i] = s;
    if (s >= 0) pick_of_slot[s] = i;
  }
}

// Offsets after the capacity: the kept rows before each expert's first dropless row.
__global__ void capacity_offsets_kernel(const int64_t* __restrict__ dropless_offsets,
                                        const int64_t* __restrict__ kept_through, int64_t E,
                                        int64_t* __restrict__ offsets) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e <= E; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = dropless_offsets[e];
    offsets[e] = r > 0 ? kept_through[r - 1] : 0;
  }
}

// Raw copy units for rows of any dtype.
template <int BYTES> struct CopyUnit;
template <> struct CopyUnit<16> { using type = uint4; };
template <> struct CopyUnit<8> { using type = uint2; };
template <> struct CopyUnit<4> { using type = uint32_t; };
template <> struct CopyUnit<2> { using type = uint16_t; };
template <> struct CopyUnit<1> { using type = uint8_t; };

// x_sorted row r = x[token of pick_of_row[r]], or zeros when no pick holds it (capacity padding).
template <typename Unit>
__global__ void gather_rows_kernel(const Unit* __restrict__ x, const int64_t* __restrict__ pick_of_row, int64_t rows,
                                   int64_t picks, int64_t k, int64_t units, Unit* __restrict__ out) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += int64_t(gridDim.x) * blockDim.y) {
    const int64_t p = pick_of_row[r];
    const bool filled = p >= 0 && p < picks;
    const Unit* src = x + (filled ? p / k : 0) * units;
    Unit* dst = out + r * units;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) dst[u] = filled ? src[u] : Unit{};
  }
}

void launch_gather_rows(const at::Tensor& x, const at::Tensor& pick_of_row, int64_t k, at::Tensor& out,
                        cudaStream_t stream) {
  const int64_t rows = out.size(0), row_bytes = x.size(1) * x.element_size();
  if (rows == 0 || row_bytes == 0) return;
  const int bytes = cuda::vec_width<uint8_t>(row_bytes, {x.data_ptr(), out.data_ptr()});
  cuda::with_vec_width<uint8_t>(bytes, [&](auto width) {
    using Unit = typename CopyUnit<decltype(width)::value>::type;
    const int64_t units = row_bytes / decltype(width)::value;
    const cuda::RowLaunch l = cuda::row_launch(rows, units);
    gather_rows_kernel<Unit><<<l.grid, l.block, 0, stream>>>(
        static_cast<const Unit*>(x.data_ptr()), pick_of_row.data_ptr<int64_t>(), rows, x.size(0) * k, k, units,
        static_cast<Unit*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cuda(const at::Tensor& x_in, const at::Tensor& ids_in,
                                                             int64_t num_experts, int64_t capacity,
                                                             const std::optional<at::Tensor>& priority_in,
                                                             int64_t token_groups) {
  const DispatchDims s = check_dispatch_args(x_in, ids_in, num_experts, capacity, priority_in, token_groups);
  cuda::OpContext ctx(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const auto index = ids.options();
  const int64_t n = s.T * s.k, E = s.E;
  const bool dropless = capacity < 0;

  at::Tensor x_sorted = at::empty({s.N, s.d}, x.options());
  at::Tensor offsets = at::empty({E + 1}, index);
  at::Tensor slot = at::empty({s.T, s.k}, index);
  if (n == 0) {
    offsets.zero_();
    return {x_sorted, offsets, slot};
  }

  // The dropless layout (steps 1-3).
  const int64_t chunk = chunk_size(E), chunks = cuda::ceil_div(n, chunk);
  const unsigned sort_blocks = cuda::grid_for(chunks * kWarpSize, kWarpSize * kSortWarpsPerBlock);
  at::Tensor counts = at::zeros({E * chunks}, index);
  count_chunks_kernel<<<sort_blocks, kWarpSize * kSortWarpsPerBlock, 0, ctx.stream>>>(
      ids.data_ptr<int64_t>(), n, s.k, E, chunk, chunks, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor starts = at::cumsum(counts, 0).sub_(counts);
  at::Tensor dropless_offsets = dropless ? offsets : at::empty({E + 1}, index);
  chunk_offsets_kernel<<<cuda::grid_for(E + 1, kThreads), kThreads, 0, ctx.stream>>>(
      starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), E, chunks, dropless_offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor row_of_pick = dropless ? slot : at::empty({s.T, s.k}, index);
  // -1 marks rows no pick reached, which only out-of-range ids (an assertion) leave behind.
  at::Tensor pick_of_row = at::full({n}, -1, index);
  const bool by_priority = !dropless && priority_in.has_value();
  const at::Tensor prio = by_priority ? priority_in->to(at::kDouble).contiguous() : at::Tensor();
  at::Tensor row_prio = by_priority ? at::empty({n}, prio.options()) : at::Tensor();
  rank_chunks_kernel<<<sort_blocks, kWarpSize * kSortWarpsPerBlock, 0, ctx.stream>>>(
      ids.data_ptr<int64_t>(), n, E, chunk, chunks, starts.data_ptr<int64_t>(), row_of_pick.data_ptr<int64_t>(),
      pick_of_row.data_ptr<int64_t>(), by_priority ? prio.data_ptr<double>() : nullptr,
      by_priority ? row_prio.data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor pick_of_slot = pick_of_row;
  if (!dropless) {
    at::Tensor keep = at::empty({n}, index);
    keep_kernel<<<cuda::grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(
        ids.data_ptr<int64_t>(), pick_of_row.data_ptr<int64_t>(), dropless_offsets.data_ptr<int64_t>(),
        by_priority ? row_prio.data_ptr<double>() : nullptr, n, s.T / token_groups * s.k, capacity,
        keep.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor kept_through = at::cumsum(keep, 0);
    pick_of_slot = at::full({s.N}, -1, index);
    capacity_slots_kernel<<<cuda::grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(
        row_of_pick.data_ptr<int64_t>(), keep.data_ptr<int64_t>(), kept_through.data_ptr<int64_t>(), n, s.N,
        slot.data_ptr<int64_t>(), pick_of_slot.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    capacity_offsets_kernel<<<cuda::grid_for(E + 1, kThreads), kThreads, 0, ctx.stream>>>(
        dropless_offsets.data_ptr<int64_t>(), kept_through.data_ptr<int64_t>(), E, offsets.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_gather_rows(x, pick_of_slot, s.k, x_sorted, ctx.stream);
  return {x_sorted, offsets, slot};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CUDA, m) { m.impl("dispatch", &dispatch_cuda); }

}  // namespace sparsemoe
