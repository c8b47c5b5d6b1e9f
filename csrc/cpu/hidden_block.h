// The activation of one block of the first projection's output, shared by the expert FFN's
// GEMM paths: hidden holds the block's gate and up columns in w1's row order, a receives the
// activation columns [c0, c0 + cn) of the block's rows.
#pragma once

#include <ATen/ATen.h>

#include "activation.h"
#include "cpu/activation_kernels.h"

namespace sparsemoe {

// hidden [N, F1] and a [M, f] row-major; rows [r0, r0 + n). Interleaved gate/up columns are
// first moved into [gate | up] halves, which the activation loops read with unit stride.
template <typename T>
void activate_hidden_block(const ActivationSpec& act, const at::Tensor& hidden, const at::Tensor& a, int64_t r0,
                           int64_t n, int64_t c0, int64_t cn, bool gate_up_interleaved) {
  const int64_t F1 = hidden.size(1), f = a.size(1);
  const T* h = hidden.data_ptr<T>() + r0 * F1;
  T* out = a.data_ptr<T>() + r0 * f + c0;
  if (gate_up_interleaved) {
    at::Tensor halves = at::empty({n, 2 * cn}, hidden.options());  // [gate | up] of the block
    T* g = halves.data_ptr<T>();
    split_gate_up<T>(h + 2 * c0, F1, g, 2 * cn, n, cn);
    activation_forward_block<T>(act, {g, g + cn, 2 * cn}, {out, nullptr, f}, n, cn);
    return;
  }
  activation_forward_block<T>(act, {h + c0, is_gated(act) ? h + f + c0 : nullptr, F1}, {out, nullptr, f}, n, cn);
}

}  // namespace sparsemoe
