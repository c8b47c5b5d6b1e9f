// The expert FFN's backward blocks on oneDNN's GEMM micro-kernel (cpu/packed_weights.h:
// panel_gemm), for row-major expert weights. The micro-kernel multiplies row-major operands as
// they are, so the backward needs no packing: grad_a = grad_y @ w2[e] and grad_x = grad_h @ w1[e]
// read the weights in place (bfloat16 / float16 slices are widened per block), and the weight
// gradients, whose reduction runs over the expert's rows, take the block's own small operands
// transposed. Accumulation is float32 and each output is rounded once, where eager PyTorch rounds.
#pragma once

#include <ATen/ATen.h>

#include "activation.h"
#include "cpu/expert_blocks.h"
#include "ffn_checks.h"

namespace sparsemoe {

// float32 blocks of at least this many rows keep the BLAS: its cache-blocked GEMMs overtake the
// micro-kernel's there, which pays for transposing the block's rows once per column block (on
// this library's ladder: faster up to ~64 rows per expert, 10% slower at 128, 30% at 512).
// bfloat16 / float16 blocks always take the micro-kernel where they take it at all (its
// float32 GEMMs beat ATen's emulated reduced-precision ones at every size).
constexpr int64_t kMicrokernelMaxRows = 128;

// Rows per micro-kernel call where the rows are the GEMM's M (both backwards): torch keeps one
// compiled kernel per (M, N, K, ...) per thread, never freed, so M stays within
// [1, kRowsPerCall] whatever an expert's row count.
constexpr int64_t kRowsPerCall = 128;

// bfloat16 experts take the native bf16 micro-kernel (pairs_backward_block) where it beat
// oneDNN's bf16 GEMMs, measured at the op level on an AVX512-BF16 CPU (Zen 4, 1 MiB of L2 per
// core), one thread, alternating in one process: experts whose weights fit in L2 and that have
// fewer than about 200 rows (olmoe- / qwen3-like, 2-128 rows: 1.06-2.3x). Pairing the weights
// per block costs two more passes over them; where they spill from L2 (mixtral-like, 5 MiB per
// expert) or many rows amortise oneDNN's own packing (olmoe-like, 256 rows), its GEMMs were
// 5-11% faster.
constexpr int64_t kPairsMaxRows = 192;
constexpr int64_t kPairsMaxWeightBytes = int64_t(1) << 20;

inline bool pairs_backward_pays(int64_t rows, const FfnDims& s) {
  return rows < kPairsMaxRows && (s.F1 + s.f) * s.d * 2 <= kPairsMaxWeightBytes;
}

// Everything a block reads and writes: x, grad_y [N, d]; hidden [N, F1]; w1, w2 and their
// gradients (each expert's matrix row-major, any expert stride); the bias gradients
// ([E, F1], [E, d], when bias_grads).
struct MicrokernelBackward {
  at::Tensor x, gy, hidden, w1, w2, grad_w1, grad_w2, grad_b1, grad_b2;
  FfnDims s;
  ActivationSpec act;
  bool gate_up_interleaved, bias_grads;
};

// The block's activation columns [c0, c0 + cn) of expert e: its columns of grad_w2, its gate and
// up rows of grad_w1 and grad_b1, grad_b2 when `first` (the expert's first block), and its share
// of grad_x written to dx (the block's rows, row stride d).
template <typename T>
void microkernel_backward_block(const MicrokernelBackward& p, const Block& b, T* dx, bool first);

// The same block in bfloat16 on the native bf16 micro-kernel, where panels are in pairs
// (cpu/pairs_backward.cpp): the operands are paired and transposed per block, never widened.
void pairs_backward_block(const MicrokernelBackward& p, const Block& b, c10::BFloat16* dx, bool first);

// The block's bias gradients, when p.bias_grads: its gate and up entries of grad_b1 from grad_h
// ([n, 2 * cn] in [gate | up] halves, or [n, cn], row stride ld), and grad_b2 when `first`.
template <typename T>
void block_bias_grads(const MicrokernelBackward& p, const Block& b, const T* grad_h, int64_t ld, bool first);

}  // namespace sparsemoe
