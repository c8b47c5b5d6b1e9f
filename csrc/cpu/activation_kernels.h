// Fused elementwise activation passes over one block of rows of the expert buffers. The expert
// FFN applies them right after the GEMM that produced the block, while it is still in cache,
// in one pass instead of the several passes separate ATen ops would make.
#pragma once

#include <ATen/ATen.h>

#include "activation.h"

namespace sparsemoe {

// A block of `rows` rows and `cols` columns inside row-major buffers. For gated activations
// `up` points at the up half of the same rows (the gate block is `gate`), else it is null.
template <typename T>
struct ActIn {
  const T* gate;
  const T* up;
  int64_t ld;  // row stride of gate and up
};

template <typename T>
struct ActOut {
  T* gate;  // the activation (forward), or the gradient of the gate half / of h (backward)
  T* up;    // backward of a gated activation: the gradient of the up half; otherwise unused
  int64_t ld;
};

// a = act(h) for the block.
template <typename T>
void activation_forward_block(const ActivationSpec& act, ActIn<T> h, ActOut<T> a, int64_t rows, int64_t cols);

// grad_h = d act(h) / d h . grad_a for the block; also writes a = act(h) when `a.gate` is not
// null (the weight gradient of the second projection needs it, and recomputing it here is
// cheaper than keeping it from the forward).
template <typename T>
void activation_backward_block(const ActivationSpec& act, const T* grad_a, int64_t ld_grad_a, ActIn<T> h,
                               ActOut<T> grad_h, ActOut<T> a, int64_t rows, int64_t cols);

// Interleaved gate/up (GPT-OSS: column 2c of a block is gate column c, 2c + 1 is up column c)
// to and from the [gate | up] halves the loops above read with unit stride, for `rows` rows of
// 2 * cols columns of one block. Plain element moves, so the values are bitwise the same.
template <typename T>
void split_gate_up(const T* interleaved, int64_t ld_interleaved, T* halves, int64_t ld_halves, int64_t rows,
                   int64_t cols);
template <typename T>
void interleave_gate_up(const T* halves, int64_t ld_halves, T* interleaved, int64_t ld_interleaved, int64_t rows,
                        int64_t cols);

}  // namespace sparsemoe
