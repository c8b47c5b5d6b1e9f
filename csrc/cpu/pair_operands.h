// bfloat16 operands for the native bf16 micro-kernel (cpu/packed_weights.h: pairs_gemm) that the
// backward builds per block: its B operand is a [K, N] matrix stored in VNNI pairs along K, and
// its A operand a row-major [M, K] one, so a product whose reduction runs over the expert's rows
// (the weight gradients) needs one operand transposed and the other paired.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace sparsemoe {

// out[2c] = a[c], out[2c + 1] = b[c] (zero where b is null) for c < n: rows k and k + 1 of a
// [K, N] matrix as the pair row k / 2 of its VNNI layout.
void interleave_pair(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n, c10::BFloat16* out);

// dst[(k / 2) * 2N + 2c + k % 2] = row(k)[c] for k < K, c < N, and zero in the second half of
// the last pair when K is odd: B of pairs_gemm with ldb = N. row(k) points at row k's first
// element, so rows can come in any order (the gate and up rows of an interleaved w1).
// Asks for the n elements at p ahead of their use, marked as read once.
void prefetch_once(const c10::BFloat16* p, int64_t n);

// Rows are prefetched this far ahead: the hardware prefetcher follows neither the pairs of
// strided row pieces nor the gather of an interleaved w1, and the pairing, which is where a
// backward block first reads its weights from memory, ran latency-bound (olmoe- / qwen3-like
// backward 8-15% faster with it, alternating in one process).
constexpr int64_t kPrefetchRows = 4;

template <typename RowOf>
void pair_rows(const RowOf& row, int64_t K, int64_t N, c10::BFloat16* dst) {
  for (int64_t k = 0; k + 1 < K; k += 2) {
    for (int64_t j = k + kPrefetchRows; j < k + kPrefetchRows + 2 && j < K; ++j) prefetch_once(row(j), N);
    interleave_pair(row(k), row(k + 1), N, dst + k * N);
  }
  if (K % 2 == 1) interleave_pair(row(K - 1), nullptr, N, dst + (K - 1) * N);
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols (bit moves, no rounding).
void transpose_bf16(const c10::BFloat16* src, int64_t ld_src, int64_t rows, int64_t cols, c10::BFloat16* dst,
                    int64_t ld_dst);

}  // namespace sparsemoe
