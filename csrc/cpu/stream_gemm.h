// Products of a few rows by a packed panel, for decoding. With one to four rows per expert the
// product is bound by reading the panel, each panel element taking part in one FMA per row, and
// oneDNN's micro-kernel, whose tiles are built for many rows, streamed the panels at about half
// the rate a plain loop reaches. These kernels keep the rows' accumulators in registers and pass
// over the panel once, in order. panel_gemm and pairs_gemm (cpu/packed_weights.h) call them for
// such rows where they run; nothing else should.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace sparsemoe {

// Rows per pass over a panel tile (each row's accumulators take 4 of the 32 vector registers per
// 64 columns), and rows up to which panel products stream: 5-8 rows take two passes, the second
// finding the tile in L2. Beyond 8 rows the micro-kernel was as fast (fp32 and bf16, one thread,
// panels from memory: 1-4 rows 1.3-2x its speed, 5-8 rows 1.0-1.2x).
constexpr int64_t kStreamRows = 4, kStreamMaxRows = 8;

// Whether the CPU runs the kernels below: AVX-512 for float32, AVX512-BF16 for pairs.
bool stream_f32_runs();
bool stream_pairs_runs();

// C [M, N] (row stride ldc) = A [M, K] @ B (+ C when accumulate), 1 <= M <= kStreamMaxRows, K >= 1,
// float32, B [K, N] row-major with row stride ldb. Each output is the micro-kernel's sum in the
// micro-kernel's order: per tile of `depth` reductions a chain of FMAs from zero, the tiles added
// into C in turn; whether that is bitwise oneDNN's result on a CPU is for the caller to check.
void stream_gemm_f32(int64_t M, int64_t N, int64_t K, int64_t depth, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float* C, int64_t ldc, bool accumulate);

// The same for bfloat16 A (row stride lda) and B in pairs (pair row k / 2 starting at B + k * ldb,
// column c's pair at 2c; K even), one vdpbf16ps chain per output over the whole reduction.
void stream_gemm_pairs(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                       const c10::BFloat16* B, int64_t ldb, float* C, int64_t ldc, bool accumulate);

}  // namespace sparsemoe
