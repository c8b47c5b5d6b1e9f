// Grouped GEMMs over contiguous expert segments whose bounds live only on the device.
//
// Scheduling without per-expert counts on the host: one tiny single-block kernel turns
// expert_offsets into (a) a checked copy of the offsets, clamped to be non-decreasing inside
// [0, N] so that no later kernel can index out of bounds even when the input is bad (the bad
// value itself trips a CUDA_KERNEL_ASSERT), (b) the exclusive prefix of each expert's count of
// kTile-row tiles followed by the total and the total including the capacity-padding tiles,
// and (c) optionally the int32 segment ends at::_grouped_mm takes. The row-tile grid is then
// launched with an upper bound of ceil(N / kTile) + E blocks (each expert wastes at most one
// partial tile); a block finds its (expert, tile) by binary search over the prefix and exits
// past the total, so nothing depends on a host copy of the offsets.
//
// The tile kernels are plain shared-memory GEMMs in opmath (64x64 output tile, 16-deep k
// slices, 256 threads each owning a 4x4 register block, strided by 16 so shared-memory reads
// are conflict-free broadcasts). They serve every dtype the library grouped GEMM does not.
// Weight gradients reduce over an expert's rows inside one block in a fixed order: no atomics
// and no split-K, so results are bitwise repeatable, and an expert without rows writes exact
// zeros.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

namespace sparsemoe {
namespace {

constexpr int kTile = 64;         // output tile edge (rows and columns)
constexpr int kTileK = 16;        // reduction slice held in shared memory
constexpr int kMicro = 4;         // each thread owns kMicro x kMicro outputs
constexpr int kThreadGrid = kTile / kMicro;              // 16 x 16 threads
constexpr int kGemmThreads = kThreadGrid * kThreadGrid;  // 256
constexpr int kScheduleThreads = 256;
constexpr int kSumColumns = 32;  // columns per block of the per-expert column sums
constexpr int kSumLanes = 8;     // row lanes per column; partials are added in lane order

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

// Largest i in [0, count) with v[i] <= x, for non-decreasing v with v[0] <= x.
__device__ __forceinline__ int64_t last_at_or_below(const int64_t* v, int64_t count, int64_t x) {
  int64_t lo = 0, hi = count;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (v[mid] <= x) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Every launch goes through this so a size beyond the CUDA grid fails with a message.
inline unsigned int grid_blocks(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), what, ": expected a size that fits the CUDA grid (at most ",
              std::numeric_limits<int32_t>::max(), " blocks), got ", blocks, " blocks");
  return static_cast<unsigned int>(blocks);
}

struct MaxOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return max_i64(a, b); }
};
struct SumOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};

// Exclusive scan of one value per thread of the block (Hillis-Steele in shared memory);
// `total` receives the reduction of all values.
template <typename Op>
__device__ int64_t block_exclusive_scan(int64_t value, int64_t identity, int64_t* smem, int64_t& total, Op op) {
  const int t = threadIdx.x;
  smem[t] = value;
  __syncthreads();
  for (int s = 1; s < static_cast<int>(blockDim.x); s <<= 1) {
    const int64_t other = t >= s ? smem[t - s] : identity;
    __syncthreads();
    smem[t] = op(smem[t], other);
    __syncthreads();
  }
  const int64_t exclusive = t > 0 ? smem[t - 1] : identity;
  total = smem[blockDim.x - 1];
  __syncthreads();
  return exclusive;
}

// One block. raw: expert_offsets [E+1] as given. Writes offsets [E+1] (checked copy),
// tile_start [E+2] (prefix of expert row tiles; [E] = expert tiles, [E+1] = with padding tiles)
// and, when ends is not null, ends [E] = offsets[1:] as int32.
__global__ void __launch_bounds__(kScheduleThreads)
    expert_schedule_kernel(const int64_t* __restrict__ raw, int64_t E, int64_t N, int64_t* __restrict__ offsets,
                           int64_t* __restrict__ tile_start, int32_t* __restrict__ ends) {
  __shared__ int64_t scan[kScheduleThreads];
  const int64_t count = E + 1;
  const int64_t chunk = ceil_div(count, kScheduleThreads);
  const int64_t lo = min_i64(count, threadIdx.x * chunk), hi = min_i64(count, lo + chunk);
  // offsets[0] is taken as 0 and every later value clamped into [0, N]; a running maximum
  // then makes the copy non-decreasing whatever the input held.
  auto bounded = [&](int64_t i) { return i == 0 ? int64_t(0) : min_i64(N, max_i64(int64_t(0), raw[i])); };

  int64_t chunk_max = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t v = raw[i];
    CUDA_KERNEL_ASSERT((i > 0 || v == 0) && "expert_offsets: expected offsets[0] == 0");
    CUDA_KERNEL_ASSERT((i == 0 || raw[i - 1] <= v) && "expert_offsets: expected non-decreasing offsets");
    CUDA_KERNEL_ASSERT((i < E || v <= N) && "expert_offsets: expected the last offset to be at most the rows of x_sorted");
    chunk_max = max_i64(chunk_max, bounded(i));
  }
  int64_t total = 0;
  int64_t running = block_exclusive_scan(chunk_max, int64_t(0), scan, total, MaxOp{});
  for (int64_t i = lo; i < hi; ++i) {
    running = max_i64(running, bounded(i));
    offsets[i] = running;
  }
  __syncthreads();  // the checked offsets are read across chunks below

  const int64_t e_hi = min_i64(hi, E);
  int64_t chunk_tiles = 0;
  for (int64_t e = lo; e < e_hi; ++e) chunk_tiles += ceil_div(offsets[e + 1] - offsets[e], kTile);
  int64_t start = block_exclusive_scan(chunk_tiles, int64_t(0), scan, total, SumOp{});
  for (int64_t e = lo; e < e_hi; ++e) {
    tile_start[e] = start;
    start += ceil_div(offsets[e + 1] - offsets[e], kTile);
    if (ends != nullptr) ends[e] = static_cast<int32_t>(offsets[e + 1]);
  }
  if (threadIdx.x == 0) {
    tile_start[E] = total;
    tile_start[E + 1] = total + ceil_div(N - offsets[E], kTile);
  }
}

// The device-side view of how rows split into experts; built once per op call.
struct ExpertSchedule {
  at::Tensor table;  // int64 [2E+3]: checked offsets [E+1], then tile_start [E+2]
  at::Tensor ends;   // int32 [E] segment ends for at::_grouped_mm; undefined when not asked for
  int64_t E = 0, N = 0;
  const int64_t* offsets() const { return table.data_ptr<int64_t>(); }
  const int64_t* tile_start() const { return table.data_ptr<int64_t>() + E + 1; }
  // Row tiles needed at most: every expert and the padding may each end in a partial tile,
  // and sum(ceil(c_i / t)) over E+1 parts summing to N never exceeds ceil(N / t) + E.
  int64_t row_tile_bound() const { return ceil_div(N, kTile) + E; }
};

inline ExpertSchedule schedule_experts(const at::Tensor& expert_offsets, int64_t N, bool with_ends) {
  ExpertSchedule s;
  s.E = expert_offsets.size(0) - 1;
  s.N = N;
  s.table = at::empty({2 * s.E + 3}, expert_offsets.options());
  if (with_ends) s.ends = at::empty({s.E}, expert_offsets.options().dtype(at::kInt));
  expert_schedule_kernel<<<1, kScheduleThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      expert_offsets.data_ptr<int64_t>(), s.E, N, s.table.data_ptr<int64_t>(), s.table.data_ptr<int64_t>() + s.E + 1,
      with_ends ? s.ends.data_ptr<int32_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

// Stages the [kTileK x kTile] slice of an operand at reduction index k0 in shared memory:
// tile[k][i] = src[i * ld + k0 + k] when kContigK, else src[(k0 + k) * ld + i]; elements with
// i >= valid or k0 + k >= K are 0, so partial tiles never touch memory outside the operand.
// Consecutive threads read consecutive addresses of the contiguous dimension.
template <typename scalar_t, typename acc_t, bool kContigK>
__device__ __forceinline__ void stage_tile(const scalar_t* __restrict__ src, int64_t ld, int64_t valid, int64_t k0,
                                           int64_t K, acc_t (&tile)[kTileK][kTile + 1]) {
  constexpr int kLoads = kTile * kTileK / kGemmThreads;
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    const int idx = threadIdx.x + l * kGemmThreads;
    const int i = kContigK ? idx / kTileK : idx % kTile;
    const int k = kContigK ? idx % kTileK : idx / kTile;
    acc_t v = acc_t(0);
    if (i < valid && k0 + k < K) {
      v = static_cast<acc_t>(kContigK ? src[i * ld + (k0 + k)] : src[(k0 + k) * ld + i]);
    }
    tile[k][i] = v;
  }
}

// acc[i][j] += sum_k A(m, k) * B(k, n) for the tile's m = ty + kThreadGrid*i, n = tx + kThreadGrid*j.
// A(m, k) is a[m * lda + k] when kAContigK, else a[k * lda + m]; B(k, n) is b[n * ldb + k]
// when kBContigK, else b[k * ldb + n]. Elements with m >= m_valid, n >= n_valid or k >= K read
// as 0 (stage_tile).
template <typename scalar_t, typename acc_t, bool kAContigK, bool kBContigK>
__device__ __forceinline__ void accumulate_tile(const scalar_t* __restrict__ a, int64_t lda, int64_t m_valid,
                                                const scalar_t* __restrict__ b, int64_t ldb, int64_t n_valid,
                                                int64_t K, acc_t (&acc)[kMicro][kMicro],
                                                acc_t (&as)[kTileK][kTile + 1], acc_t (&bs)[kTileK][kTile + 1]) {
  const int tid = threadIdx.x;
  const int tx = tid % kThreadGrid, ty = tid / kThreadGrid;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    stage_tile<scalar_t, acc_t, kAContigK>(a, lda, m_valid, k0, K, as);
    stage_tile<scalar_t, acc_t, kBContigK>(b, ldb, n_valid, k0, K, bs);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      acc_t av[kMicro], bv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) av[i] = as[k][ty + kThreadGrid * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) bv[j] = bs[k][tx + kThreadGrid * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    __syncthreads();
  }
}

// out[r, n] = sum_k a[r, k] * W_e(k, n) + bias[e, n] for the rows r of expert e, and 0 for the
// capacity-padding rows. a [N, K]; w per expert [Nout, K] (kBContigK, a weight used as x @ w^T)
// or [K, Nout]; bias [E, Nout] or null; out [N, Nout]. Grid: x = row tiles (upper bound),
// y = column tiles.
template <typename scalar_t, bool kBContigK>
__global__ void __launch_bounds__(kGemmThreads)
    grouped_rows_gemm_kernel(const scalar_t* __restrict__ a, int64_t K, const scalar_t* __restrict__ w, int64_t Nout,
                             const scalar_t* __restrict__ bias, const int64_t* __restrict__ offsets,
                             const int64_t* __restrict__ tile_start, int64_t E, int64_t N, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t as[kTileK][kTile + 1];
  __shared__ acc_t bs[kTileK][kTile + 1];
  const int64_t tile = blockIdx.x;
  if (tile >= tile_start[E + 1]) return;
  const int tx = threadIdx.x % kThreadGrid, ty = threadIdx.x / kThreadGrid;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t expert_tiles = tile_start[E];
  if (tile >= expert_tiles) {  // capacity padding: rows that belong to no expert are 0
    const int64_t r0 = offsets[E] + (tile - expert_tiles) * kTile;
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t r = r0 + ty + kThreadGrid * i;
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t n = n0 + tx + kThreadGrid * j;
        if (r < N && n < Nout) out[r * Nout + n] = scalar_t(0);
      }
    }
    return;
  }
  const int64_t e = last_at_or_below(tile_start, E, tile);
  const int64_t r0 = offsets[e] + (tile - tile_start[e]) * kTile;
  const int64_t m_valid = min_i64(kTile, offsets[e + 1] - r0);
  const int64_t n_valid = min_i64(kTile, Nout - n0);
  const scalar_t* w_e = w + e * Nout * K;
  acc_t acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
  }
  accumulate_tile<scalar_t, acc_t, true, kBContigK>(a + r0 * K, K, m_valid, kBContigK ? w_e + n0 * K : w_e + n0,
                                                    kBContigK ? K : Nout, n_valid, K, acc, as, bs);
  const scalar_t* bias_e = bias != nullptr ? bias + e * Nout : nullptr;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int m = ty + kThreadGrid * i;
    if (m >= m_valid) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t n = n0 + tx + kThreadGrid * j;
      if (n >= Nout) continue;
      acc_t v = acc[i][j];
      if (bias_e != nullptr) v += static_cast<acc_t>(bias_e[n]);
      out[(r0 + m) * Nout + n] = static_cast<scalar_t>(v);
    }
  }
}

// out[e] = g[rows of e]^T @ h[rows of e]: g [N, P], h [N, Q], out [E, P, Q]. One block per
// (expert, P tile, Q tile), looping over the expert's rows in order; no rows gives exact 0.
template <typename scalar_t>
__global__ void __launch_bounds__(kGemmThreads)
    grouped_weight_grad_kernel(const scalar_t* __restrict__ g, int64_t P, const scalar_t* __restrict__ h, int64_t Q,
                               const int64_t* __restrict__ offsets, int64_t tiles_q, int64_t tiles_per_expert,
                               scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t as[kTileK][kTile + 1];
  __shared__ acc_t bs[kTileK][kTile + 1];
  const int64_t block = blockIdx.x;
  const int64_t e = block / tiles_per_expert, rem = block % tiles_per_expert;
  const int64_t p0 = (rem / tiles_q) * kTile, q0 = (rem % tiles_q) * kTile;
  const int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
  const int64_t p_valid = min_i64(kTile, P - p0), q_valid = min_i64(kTile, Q - q0);
  acc_t acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
  }
  accumulate_tile<scalar_t, acc_t, false, false>(g + r0 * P + p0, P, p_valid, h + r0 * Q + q0, Q, q_valid, rows,
                                                 acc, as, bs);
  const int tx = threadIdx.x % kThreadGrid, ty = threadIdx.x / kThreadGrid;
  scalar_t* out_e = out + e * P * Q;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int p = ty + kThreadGrid * i;
    if (p >= p_valid) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int q = tx + kThreadGrid * j;
      if (q < q_valid) out_e[(p0 + p) * Q + q0 + q] = static_cast<scalar_t>(acc[i][j]);
    }
  }
}

// out[e, c] = sum of g[r, c] over the rows r of expert e (the bias gradients). Block
// (kSumColumns, kSumLanes): lane y adds rows y, y + kSumLanes, ... in order, then lane 0 adds the
// kSumLanes partials in order, so the result does not depend on scheduling.
template <typename scalar_t>
__global__ void __launch_bounds__(kSumColumns* kSumLanes)
    expert_column_sums_kernel(const scalar_t* __restrict__ g, int64_t W, const int64_t* __restrict__ offsets,
                              int64_t column_blocks, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kSumLanes][kSumColumns];
  const int64_t e = blockIdx.x / column_blocks;
  const int64_t c = (blockIdx.x % column_blocks) * kSumColumns + threadIdx.x;
  acc_t sum = acc_t(0);
  if (c < W) {
    for (int64_t r = offsets[e] + threadIdx.y; r < offsets[e + 1]; r += kSumLanes) sum += static_cast<acc_t>(g[r * W + c]);
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < W) {
    acc_t total = acc_t(0);
#pragma unroll
    for (int y = 0; y < kSumLanes; ++y) total += partial[y][threadIdx.x];
    out[e * W + c] = static_cast<scalar_t>(total);
  }
}

// out [N, Nout] from a [N, K] and per-expert weights w [E, Nout, K] (w_is_out_by_k) or
// [E, K, Nout], plus bias [E, Nout] when defined. Padding rows get 0.
template <typename scalar_t>
void grouped_rows_gemm(const at::Tensor& a, const at::Tensor& w, bool w_is_out_by_k, const at::Tensor& bias,
                       const ExpertSchedule& s, at::Tensor& out, const char* what) {
  const int64_t N = a.size(0), K = a.size(1), Nout = out.size(1);
  if (N == 0 || Nout == 0) return;
  const int64_t column_tiles = ceil_div(Nout, kTile);
  TORCH_CHECK(column_tiles <= 65535, what, ": expected at most ", 65535 * kTile, " output columns, got ", Nout);
  const dim3 grid(grid_blocks(s.row_tile_bound(), "x_sorted rows"), static_cast<unsigned int>(column_tiles));
  const scalar_t* bias_ptr = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (w_is_out_by_k) {
    grouped_rows_gemm_kernel<scalar_t, true><<<grid, kGemmThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), K, w.data_ptr<scalar_t>(), Nout, bias_ptr, s.offsets(), s.tile_start(), s.E, N,
        out.data_ptr<scalar_t>());
  } else {
    grouped_rows_gemm_kernel<scalar_t, false><<<grid, kGemmThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), K, w.data_ptr<scalar_t>(), Nout, bias_ptr, s.offsets(), s.tile_start(), s.E, N,
        out.data_ptr<scalar_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out [E, P, Q] = per-expert g^T @ h with g [N, P], h [N, Q].
template <typename scalar_t>
void grouped_weight_grad(const at::Tensor& g, const at::Tensor& h, const ExpertSchedule& s, at::Tensor& out,
                         const char* what) {
  const int64_t P = g.size(1), Q = h.size(1);
  const int64_t tiles_q = ceil_div(Q, kTile), tiles_per_expert = ceil_div(P, kTile) * tiles_q;
  const int64_t blocks = s.E * tiles_per_expert;
  if (blocks == 0) return;
  grouped_weight_grad_kernel<scalar_t><<<grid_blocks(blocks, what), kGemmThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<scalar_t>(), P, h.data_ptr<scalar_t>(), Q, s.offsets(), tiles_q, tiles_per_expert,
      out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out [E, W] = per-expert column sums of g [N, W].
template <typename scalar_t>
void expert_column_sums(const at::Tensor& g, const ExpertSchedule& s, at::Tensor& out, const char* what) {
  const int64_t W = g.size(1);
  const int64_t column_blocks = ceil_div(W, kSumColumns);
  const int64_t blocks = s.E * column_blocks;
  if (blocks == 0) return;
  expert_column_sums_kernel<scalar_t>
      <<<grid_blocks(blocks, what), dim3(kSumColumns, kSumLanes), 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.data_ptr<scalar_t>(), W, s.offsets(), column_blocks, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sparsemoe
