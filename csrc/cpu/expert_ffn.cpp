// Expert FFNs over contiguous expert segments of the expert-ordered buffer, forward and
// backward. Each GEMM is cut into (expert, output columns) blocks (cpu/expert_blocks.h) that
// run through at::mm_out (MKL / oneDNN with AVX-512 or AVX512-BF16) on views of the buffers,
// so no rows are copied; the activation runs on each block right after its GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "activation.h"
#include "checks.h"
#include "ffn_checks.h"
#include "cpu/activation_kernels.h"
#include "cpu/expert_blocks.h"
#include "cpu/few_rows_gemm.h"
#include "cpu/fresh_buffers.h"
#include "cpu/index_checks.h"

namespace sparsemoe {
namespace {

// GEMMs of one block, on views of the buffers. They run inside for_each_block's threads, where
// the BLAS stays single-threaded.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

void sum_rows_into(at::Tensor out, const at::Tensor& a) { at::sum_out(out, a, 0); }

// out = bias + a @ b (bias broadcast over rows), or a @ b without a bias.
void linear_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (bias.defined()) {
    at::addmm_out(out, bias, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

at::Tensor slice_or_undefined(const at::Tensor& t, int64_t e, int64_t c0, int64_t cn) {
  return t.defined() ? t[e].narrow(0, c0, cn) : at::Tensor();
}

template <typename T>
T* row_ptr(const at::Tensor& t, int64_t row, int64_t col) {
  return t.data_ptr<T>() + row * t.stride(0) + col;
}

std::tuple<at::Tensor, at::Tensor> expert_ffn_cpu(const at::Tensor& x_in, const at::Tensor& offsets_in,
                                                  const at::Tensor& w1_in, const at::Tensor& w2_in,
                                                  c10::string_view activation,
                                                  const c10::optional<at::Tensor>& b1_in,
                                                  const c10::optional<at::Tensor>& b2_in, double swiglu_alpha,
                                                  double swiglu_limit) {
  const ActivationSpec act = parse_activation(std::string(activation), swiglu_alpha, swiglu_limit);
  const at::Tensor offsets = offsets_in.contiguous();
  const FfnDims s = check_ffn_shapes(x_in, offsets, w1_in, w2_in, act, b1_in, b2_in);
  const int64_t M = check_offsets_values(offsets, s.N);  // rows M..N are capacity padding
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor b1 = contiguous_or_undefined(b1_in), b2 = contiguous_or_undefined(b2_in);
  const bool gated = is_gated(act);
  at::Tensor hidden = empty_large({s.N, s.F1}, x.options());
  at::Tensor a = empty_large({M, s.f}, x.options());
  at::Tensor y = empty_large({s.N, s.d}, x.options());
  const int64_t* o = offsets.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "expert_ffn", [&] {
    // First projection and activation, by blocks of activation columns: a gated block computes
    // its gate and up columns, so the activation needs nothing outside the block.
    for_each_block("sparsemoe::expert_ffn gemm1+act", expert_blocks(o, s.E, s.f, s.d), [&](const Block& b) {
      for (int64_t half = 0; half < (gated ? 2 : 1); ++half) {
        const int64_t c0 = half * s.f + b.c0;  // the half's first column of hidden, row of w1[e]
        if (b.n <= kFewRows) {
          few_rows_gemm<scalar_t>(row_ptr<scalar_t>(x, b.r0, 0), s.d, row_ptr<scalar_t>(w1[b.e], c0, 0), s.d,
                                  b1.defined() ? b1.data_ptr<scalar_t>() + b.e * s.F1 + c0 : nullptr,
                                  row_ptr<scalar_t>(hidden, b.r0, c0), s.F1, b.n, b.cn, s.d);
        } else if (gated && b.cn == s.f) {
          // The block spans the whole activation: gate and up rows in one GEMM.
          linear_into(hidden.narrow(0, b.r0, b.n), x.narrow(0, b.r0, b.n), w1[b.e].t(),
                      b1.defined() ? b1[b.e] : at::Tensor());
          break;
        } else {
          linear_into(hidden.narrow(0, b.r0, b.n).narrow(1, c0, b.cn), x.narrow(0, b.r0, b.n),
                      w1[b.e].narrow(0, c0, b.cn).t(), slice_or_undefined(b1, b.e, c0, b.cn));
        }
      }
      const scalar_t* g = row_ptr<scalar_t>(hidden, b.r0, b.c0);
      activation_forward_block<scalar_t>(act, {g, gated ? g + s.f : nullptr, s.F1},
                                         {row_ptr<scalar_t>(a, b.r0, b.c0), nullptr, s.f}, b.n, b.cn);
    });
    // Second projection, by blocks of output columns.
    for_each_block("sparsemoe::expert_ffn gemm2", expert_blocks(o, s.E, s.d, s.f), [&](const Block& b) {
      if (b.n <= kFewRows) {
        few_rows_gemm<scalar_t>(row_ptr<scalar_t>(a, b.r0, 0), s.f, row_ptr<scalar_t>(w2[b.e], b.c0, 0), s.f,
                                b2.defined() ? b2.data_ptr<scalar_t>() + b.e * s.d + b.c0 : nullptr,
                                row_ptr<scalar_t>(y, b.r0, b.c0), s.d, b.n, b.cn, s.f);
        return;
      }
      linear_into(y.narrow(0, b.r0, b.n).narrow(1, b.c0, b.cn), a.narrow(0, b.r0, b.n),
                  w2[b.e].narrow(0, b.c0, b.cn).t(), slice_or_undefined(b2, b.e, b.c0, b.cn));
    });
  });
  // Capacity padding rows belong to no expert: they output zero.
  hidden.narrow(0, M, s.N - M).zero_();
  y.narrow(0, M, s.N - M).zero_();
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& offsets_in,
    const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& hidden_in,
    c10::string_view activation, double swiglu_alpha, double swiglu_limit, bool bias_grads) {
  const ActivationSpec act = parse_activation(std::string(activation), swiglu_alpha, swiglu_limit);
  const at::Tensor offsets = offsets_in.contiguous();
  const FfnDims s = check_ffn_shapes(x_in, offsets, w1_in, w2_in, act, c10::nullopt, c10::nullopt);
  const int64_t M = check_offsets_values(offsets, s.N);
  check_ffn_backward_inputs(grad_y_in, x_in, hidden_in, s);
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor gy = grad_y_in.contiguous(), hidden = hidden_in.contiguous();
  const bool gated = is_gated(act);
  const int64_t* o = offsets.data_ptr<int64_t>();

  at::Tensor grad_x = empty_large({s.N, s.d}, x.options());
  at::Tensor grad_w1 = empty_large(w1.sizes(), w1.options()), grad_w2 = empty_large(w2.sizes(), w2.options());
  at::Tensor grad_b1 = at::empty({bias_grads ? s.E : 0, s.F1}, x.options());
  at::Tensor grad_b2 = at::empty({bias_grads ? s.E : 0, s.d}, x.options());
  grad_x.narrow(0, M, s.N - M).zero_();  // padding rows feed no expert
  for (int64_t e = 0; e < s.E; ++e) {
    if (o[e + 1] > o[e]) continue;
    // Experts that own no rows report an exactly zero gradient.
    grad_w1[e].zero_();
    grad_w2[e].zero_();
    if (bias_grads) {
      grad_b1[e].zero_();
      grad_b2[e].zero_();
    }
  }

  if (s.f == 0) {
    // No hidden columns: no block exists, the input gets no gradient and y was b2 alone.
    grad_x.zero_();
    for (int64_t e = 0; e < s.E && bias_grads; ++e) {
      if (o[e + 1] > o[e]) sum_rows_into(grad_b2[e], gy.narrow(0, o[e], o[e + 1] - o[e]));
    }
    return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "expert_ffn_backward", [&] {
    // One pass, by blocks of activation columns, doing everything a block's columns take part
    // in while they are in cache: grad_a = grad_y @ w2 for the block, the activation's backward
    // (recomputing a), the weight gradients of those columns (grad_w2[:, block] = grad_y^T a,
    // the block's gate and up rows of grad_w1 = grad_h^T x) and the block's share of
    // grad_x = grad_h @ w1. The weight gradients reduce over all of the expert's rows, so no
    // two threads write the same element. grad_x sums over the expert's column blocks: block
    // j > 0 writes its share to its own buffer and the shares are added in block order after,
    // so neither a nor grad_h is ever stored whole. bfloat16 and float16 would round each share
    // before the sum, so there an expert is one block and grad_x one GEMM, rounded once.
    const bool one_block_per_expert = at::isReducedFloatingType(x.scalar_type());
    const std::vector<Block> blocks = expert_blocks(o, s.E, s.f, s.d, one_block_per_expert ? s.f : 64);
    const int64_t per_expert = blocks.empty() ? 1 : (s.f + blocks[0].cn - 1) / blocks[0].cn;
    at::Tensor shares = at::empty({per_expert - 1, M, s.d}, x.options());
    for_each_block("sparsemoe::expert_ffn_backward blocks", blocks, [&](const Block& b) {
      const at::Tensor rows_x = x.narrow(0, b.r0, b.n), rows_gy = gy.narrow(0, b.r0, b.n);
      const int64_t j = b.c0 / blocks[0].cn;
      const int64_t halves = gated ? 2 : 1;
      at::Tensor grad_a = at::empty({b.n, b.cn}, x.options());
      at::Tensor a = at::empty({b.n, b.cn}, x.options());
      at::Tensor grad_h = at::empty({b.n, halves * b.cn}, x.options());  // [gate | up] columns of the block
      mm_into(grad_a, rows_gy, w2[b.e].narrow(1, b.c0, b.cn));
      const scalar_t* g = row_ptr<scalar_t>(hidden, b.r0, b.c0);
      scalar_t* gh = grad_h.data_ptr<scalar_t>();
      activation_backward_block<scalar_t>(act, grad_a.data_ptr<scalar_t>(), b.cn,
                                          {g, gated ? g + s.f : nullptr, s.F1},
                                          {gh, gated ? gh + b.cn : nullptr, halves * b.cn},
                                          {a.data_ptr<scalar_t>(), nullptr, b.cn}, b.n, b.cn);
      mm_into(grad_w2[b.e].narrow(1, b.c0, b.cn), rows_gy.t(), a);
      for (int64_t half = 0; half < halves; ++half) {
        const int64_t c0 = half * s.f + b.c0;  // the half's first row in w1[e]
        const at::Tensor gh_half = grad_h.narrow(1, half * b.cn, b.cn);
        mm_into(grad_w1[b.e].narrow(0, c0, b.cn), gh_half.t(), rows_x);
        if (bias_grads) sum_rows_into(grad_b1[b.e].narrow(0, c0, b.cn), gh_half);
      }
      at::Tensor dx = (j == 0 ? grad_x : shares[j - 1]).narrow(0, b.r0, b.n);
      if (b.cn == s.f) {
        mm_into(dx, grad_h, w1[b.e]);  // the whole expert: [gate | up] matches w1's rows
      } else {
        mm_into(dx, grad_h.narrow(1, 0, b.cn), w1[b.e].narrow(0, b.c0, b.cn));
        if (gated) dx.addmm_(grad_h.narrow(1, b.cn, b.cn), w1[b.e].narrow(0, s.f + b.c0, b.cn));
      }
      if (bias_grads && j == 0) sum_rows_into(grad_b2[b.e], rows_gy);
    });
    for (int64_t j = 0; j + 1 < per_expert; ++j) grad_x.narrow(0, 0, M).add_(shares[j]);
  });
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) {
  m.impl("expert_ffn", &expert_ffn_cpu);
  m.impl("expert_ffn_backward", &expert_ffn_backward_cpu);
}

}  // namespace sparsemoe
