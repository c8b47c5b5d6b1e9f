// How the expert FFN splits its work over threads. Every GEMM of the layer is cut into blocks
// of (expert, output columns) that one thread computes alone with a single-threaded GEMM, and
// the blocks are dealt out in contiguous runs of equal cost. Two reasons:
//  - fine-grained MoE has many small expert GEMMs (tens of rows each); letting the BLAS split
//    each of them across threads costs a fork/join per GEMM and leaves cores idle, while one
//    thread per block keeps every core busy with no synchronisation inside the layer;
//  - splitting by output columns rather than rows means each weight element is read by one
//    thread once, and a block is small enough that its activation pass runs on data still in
//    cache.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparsemoe {

struct Block {
  int64_t e;       // expert
  int64_t r0, n;   // its rows [r0, r0 + n) of the expert-ordered buffer
  int64_t c0, cn;  // output columns [c0, c0 + cn)
  int64_t cost;    // relative work, for the split over threads
};

// Column blocks cover [0, cols) in steps that are multiples of `align` elements (16: whole
// cache lines in every dtype; the packed path's panel width), at least min_cols wide, and as
// many per expert as it takes to give every thread several blocks to balance with.
inline int64_t column_step(int64_t cols, int64_t busy_experts, int64_t min_cols, int64_t align = 16) {
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = std::max<int64_t>(1, (8 * threads + busy_experts - 1) / std::max<int64_t>(busy_experts, 1));
  const int64_t max_blocks = std::max<int64_t>(1, cols / std::max<int64_t>(min_cols, 1));
  const int64_t blocks = std::min(wanted, max_blocks);
  const int64_t step = (cols + blocks - 1) / blocks;
  return std::min(cols, (step + align - 1) / align * align);
}

// Blocks (expert, column block) for every expert that owns rows, in expert order. `k` is the
// reduction length of the block's GEMM: a block costs its rows' multiply-adds plus the
// reading of its weight slice, which dominates when an expert has only a few rows.
inline std::vector<Block> expert_blocks(const int64_t* offsets, int64_t E, int64_t cols, int64_t k,
                                        int64_t min_cols = 64, int64_t align = 16) {
  int64_t busy = 0;
  for (int64_t e = 0; e < E; ++e) busy += offsets[e + 1] > offsets[e];
  const int64_t step = column_step(cols, busy, min_cols, align);
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    for (int64_t c0 = 0; c0 < cols; c0 += step) {
      const int64_t cn = std::min(step, cols - c0);
      blocks.push_back({e, offsets[e], n, c0, cn, (n + 8) * cn * k});
    }
  }
  return blocks;
}

// Runs fn(block) for every block: thread t takes the t-th contiguous run of blocks, the runs
// cut where the running cost passes t/threads of the total. `stage` names the pass in
// torch.profiler traces (the per-stage benchmark reads it).
template <typename Fn>
void for_each_block(const char* stage, const std::vector<Block>& blocks, const Fn& fn) {
  RECORD_FUNCTION(stage, std::vector<c10::IValue>());
  if (blocks.empty()) return;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(blocks.size()));
  int64_t total = 0;
  for (const Block& b : blocks) total += b.cost;
  std::vector<size_t> start(parts + 1, blocks.size());
  start[0] = 0;
  int64_t run = 0;
  int64_t p = 1;
  for (size_t i = 0; i < blocks.size() && p < parts; ++i) {
    run += blocks[i].cost;
    // Block i ends part p-1 once the running cost reaches p/parts of the total.
    while (p < parts && run * parts >= total * p) start[p++] = i + 1;
  }
  // The blocks call ATen ops on worker threads: they must run below autograd there too, as on
  // the calling thread (OpenMP workers do not inherit its dispatch state).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t q = p0; q < p1; ++q) {
      for (size_t i = start[q]; i < start[q + 1]; ++i) fn(blocks[i]);
    }
  });
}

}  // namespace sparsemoe
