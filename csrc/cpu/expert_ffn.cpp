// Expert FFNs over contiguous expert segments of the expert-ordered buffer, forward and
// backward. Each GEMM is cut into (expert, output columns) blocks (cpu/expert_blocks.h) that
// run through at::mm_out (MKL / oneDNN with AVX-512 or AVX512-BF16) on views of the buffers,
// so no rows are copied; the activation runs on each block right after its GEMM.
//
// The expert weights are read where they are: each expert's matrix may be row-major or
// column-major (Hugging Face stores GPT-OSS's and Llama-4's transposed) with any expert stride,
// since the BLAS takes either operand order; their gradients are allocated in the weights' own
// layout. Gate and up rows of w1 may alternate (GPT-OSS): activation columns [c0, c0 + cn) then
// come from w1 rows [2c0, 2c0 + 2cn), still one GEMM per block, and only the block's GEMM output
// is rearranged into the [gate | up] halves the activation loops read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "checks.h"
#include "ffn_checks.h"
#include "cpu/activation_kernels.h"
#include "cpu/expert_blocks.h"
#include "cpu/expert_ffn_packed.h"
#include "cpu/few_rows_gemm.h"
#include "cpu/forward_ops.h"
#include "cpu/large_buffers.h"
#include "cpu/hidden_block.h"
#include "cpu/index_checks.h"
#include "cpu/microkernel_backward.h"
#include "cpu/native_forward.h"
#include "cpu/packed_weights.h"

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

// An expert weight [E, R, C] as the kernels read it: each expert's R x C matrix row-major (unit
// stride along C) or column-major (unit stride along R), in place. A dim of size 1 has no
// stride that matters. Any other layout is copied once into row-major, the one case that copies.
struct ExpertWeight {
  at::Tensor t;
  bool col_major;
  int64_t ld;  // the stride between rows (row-major) or between columns (column-major)
};

ExpertWeight expert_weight(const at::Tensor& w) {
  if (w.size(2) <= 1 || w.stride(2) == 1) return {w, false, w.stride(1)};
  if (w.size(1) <= 1 || w.stride(1) == 1) return {w, true, w.stride(2)};
  const at::Tensor c = w.contiguous();
  return {c, false, c.stride(1)};
}

// The rows a block multiplies with w. ATen's own bfloat16 / float16 GEMM, which runs where
// oneDNN's does not (CPUs without AVX-512), is several times slower for row-major rows times a
// column-major weight than for column-major rows times it; a column-major copy of the block's
// rows (never of the weight) costs 1 / cols of the product.
at::Tensor rows_for(const at::Tensor& rows, const ExpertWeight& w) {
  if (!w.col_major || !at::isReducedFloatingType(rows.scalar_type())) return rows;
  return rows.t().contiguous().t();
}

// out [rows, cols] = a @ w[e][j0 : j0 + cols]^T (+ bias) for at most kFewRows rows, and the same
// for the columns `second` further on (the up half of a gated block) when second > 0, with the
// dot-product kernel that suits the weight's layout. Row-major runs the halves one after the
// other, column-major in one pass over the weight's rows.
template <typename T>
void few_rows_linear(const T* a, int64_t lda, const ExpertWeight& w, int64_t e, int64_t j0, int64_t second,
                     const T* bias, T* out, int64_t ldo, int64_t rows, int64_t cols, int64_t K) {
  const T* we = w.t.data_ptr<T>() + e * w.t.stride(0) + j0 * w.t.stride(1);
  if (w.col_major) {
    few_rows_gemm_col_major<T>(a, lda, we, w.ld, bias, out, ldo, rows, cols, K, second > 0 ? 2 : 1,
                               second * w.t.stride(1));
    return;
  }
  for (int64_t half = 0; half < (second > 0 ? 2 : 1); ++half) {
    const int64_t shift = half * second;
    few_rows_gemm<T>(a, lda, we + shift * w.ld, w.ld, bias != nullptr ? bias + shift : nullptr, out + shift, ldo,
                     rows, cols, K);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> expert_ffn_cpu(const at::Tensor& x_in, const at::Tensor& offsets_in,
                                                  const at::Tensor& w1_in, const at::Tensor& w2_in,
                                                  c10::string_view activation,
                                                  const c10::optional<at::Tensor>& b1_in,
                                                  const c10::optional<at::Tensor>& b2_in, double swiglu_alpha,
                                                  double swiglu_limit, bool gate_up_interleaved,
                                                  const c10::optional<at::Tensor>& packed) {
  const ActivationSpec act = parse_activation(std::string(activation), swiglu_alpha, swiglu_limit);
  const at::Tensor offsets = offsets_in.contiguous();
  const FfnDims s = check_ffn_shapes(x_in, offsets, w1_in, w2_in, act, b1_in, b2_in, gate_up_interleaved);
  const PackedLayout layout = packed_layout(s.d, s.f, is_gated(act) ? 2 : 1, x_in.scalar_type());
  if (packed.has_value()) check_packed(*packed, x_in, s.E, layout);
  const int64_t M = check_offsets_values(offsets, s.N);  // rows M..N are capacity padding
  const at::Tensor x = x_in.contiguous();
  const ExpertWeight w1 = expert_weight(w1_in), w2 = expert_weight(w2_in);
  const at::Tensor b1 = contiguous_or_undefined(b1_in), b2 = contiguous_or_undefined(b2_in);
  const bool gated = is_gated(act);
  at::Tensor hidden = empty_large({s.N, s.F1}, x.options());
  at::Tensor a = empty_large({M, s.f}, x.options());
  at::Tensor y = empty_large({s.N, s.d}, x.options());
  const int64_t* o = offsets.data_ptr<int64_t>();
  const PackedFfn pf{x, packed.value_or(at::Tensor()), b1, b2, hidden, a, y, w1.t, w2.t, s,
                     layout, act, gate_up_interleaved};
  // With packed weights, blocks run on the panels, except few-row blocks of reduced-precision
  // experts on plain panels: the few-rows kernel reads their original weights (as many bytes as
  // the panels) without first widening a panel to float32, which would cost more than their
  // GEMM. Panels in pairs need no widening, and the bf16 kernel on them took half the few-rows
  // kernel's time (olmoe-like, T = 8-32).
  const bool widened = at::isReducedFloatingType(x.scalar_type()) && !pf.layout.pairs;
  const auto on_panels = [&](const Block& b) { return pf.packed.defined() && !(widened && b.n <= kFewRows); };
  const int64_t align1 = pf.packed.defined() ? pf.layout.pw1 : 16, align2 = pf.packed.defined() ? pf.layout.pw2 : 16;
  // Without panels, bf16 blocks of a few dozen rows multiply the weights in place on the micro-kernel.
  const bool native = !pf.packed.defined() && native_forward_fits(x, w1.t, w2.t);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "expert_ffn", [&] {
    const scalar_t* bias1 = b1.defined() ? b1.data_ptr<scalar_t>() : nullptr;
    constexpr bool kPackable = !std::is_same_v<scalar_t, double>;  // check_packed refuses float64
    // First projection and activation, by blocks of activation columns: a gated block computes
    // its gate and up columns, so the activation needs nothing outside the block.
    const auto blocks1 = expert_blocks(o, s.E, s.f, s.d, /*min_cols=*/64, align1);
    for_each_block("sparsemoe::expert_ffn gemm1+act", blocks1, [&](const Block& b) {
      if constexpr (kPackable) {
        if (on_panels(b)) return packed_gemm1_block<scalar_t>(pf, b);
      }
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (native_block(native, b.n)) return native_gemm1_block(pf, b);
      }
      if (gate_up_interleaved) {
        // The block's gate and up columns are hidden columns [2c0, 2c0 + 2cn), in w1's order.
        const int64_t h0 = 2 * b.c0, hn = 2 * b.cn;
        if (b.n <= kFewRows) {
          few_rows_linear<scalar_t>(row_ptr<scalar_t>(x, b.r0, 0), s.d, w1, b.e, h0, /*second=*/0,
                                    bias1 != nullptr ? bias1 + b.e * s.F1 + h0 : nullptr,
                                    row_ptr<scalar_t>(hidden, b.r0, h0), s.F1, b.n, hn, s.d);
        } else {
          linear_into(hidden.narrow(0, b.r0, b.n).narrow(1, h0, hn), rows_for(x.narrow(0, b.r0, b.n), w1),
                      w1.t[b.e].narrow(0, h0, hn).t(), slice_or_undefined(b1, b.e, h0, hn));
        }
        activate_hidden_block<scalar_t>(act, hidden, a, b.r0, b.n, b.c0, b.cn, /*gate_up_interleaved=*/true);
        return;
      }
      if (b.n <= kFewRows) {
        // The gate half's columns and, s.f further on, the up half's.
        few_rows_linear<scalar_t>(row_ptr<scalar_t>(x, b.r0, 0), s.d, w1, b.e, b.c0, /*second=*/gated ? s.f : 0,
                                  bias1 != nullptr ? bias1 + b.e * s.F1 + b.c0 : nullptr,
                                  row_ptr<scalar_t>(hidden, b.r0, b.c0), s.F1, b.n, b.cn, s.d);
      } else if (gated && b.cn == s.f) {
        // The block spans the whole activation: gate and up rows in one GEMM.
        linear_into(hidden.narrow(0, b.r0, b.n), rows_for(x.narrow(0, b.r0, b.n), w1), w1.t[b.e].t(),
                    b1.defined() ? b1[b.e] : at::Tensor());
      } else {
        const at::Tensor rows_x = rows_for(x.narrow(0, b.r0, b.n), w1);
        for (int64_t half = 0; half < (gated ? 2 : 1); ++half) {
          const int64_t c0 = half * s.f + b.c0;  // the half's first column of hidden, row of w1[e]
          linear_into(hidden.narrow(0, b.r0, b.n).narrow(1, c0, b.cn), rows_x, w1.t[b.e].narrow(0, c0, b.cn).t(),
                      slice_or_undefined(b1, b.e, c0, b.cn));
        }
      }
      activate_hidden_block<scalar_t>(act, hidden, a, b.r0, b.n, b.c0, b.cn, /*gate_up_interleaved=*/false);
    });
    // Second projection, by blocks of output columns.
    const auto blocks2 = expert_blocks(o, s.E, s.d, s.f, /*min_cols=*/64, align2);
    for_each_block("sparsemoe::expert_ffn gemm2", blocks2, [&](const Block& b) {
      if constexpr (kPackable) {
        if (on_panels(b)) return packed_gemm2_block<scalar_t>(pf, b);
      }
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (native_block(native, b.n)) return native_gemm2_block(pf, b);
      }
      if (b.n <= kFewRows) {
        few_rows_linear<scalar_t>(row_ptr<scalar_t>(a, b.r0, 0), s.f, w2, b.e, b.c0, /*second=*/0,
                                  b2.defined() ? b2.data_ptr<scalar_t>() + b.e * s.d + b.c0 : nullptr,
                                  row_ptr<scalar_t>(y, b.r0, b.c0), s.d, b.n, b.cn, s.f);
        return;
      }
      linear_into(y.narrow(0, b.r0, b.n).narrow(1, b.c0, b.cn), rows_for(a.narrow(0, b.r0, b.n), w2),
                  w2.t[b.e].narrow(0, b.c0, b.cn).t(), slice_or_undefined(b2, b.e, b.c0, b.cn));
    });
  });
  // Capacity padding rows belong to no expert: they output zero. (Skipped without padding: two
  // ATen calls on empty views cost as much as a decoding step's smallest expert GEMM.)
  if (M < s.N) {
    hidden.narrow(0, M, s.N - M).zero_();
    y.narrow(0, M, s.N - M).zero_();
  }
  return {y, hidden};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& offsets_in,
    const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& hidden_in,
    c10::string_view activation, double swiglu_alpha, double swiglu_limit, bool bias_grads,
    bool gate_up_interleaved) {
  const ActivationSpec act = parse_activation(std::string(activation), swiglu_alpha, swiglu_limit);
  const at::Tensor offsets = offsets_in.contiguous();
  const FfnDims s = check_ffn_shapes(x_in, offsets, w1_in, w2_in, act, c10::nullopt, c10::nullopt,
                                     gate_up_interleaved);
  const int64_t M = check_offsets_values(offsets, s.N);
  check_ffn_backward_inputs(grad_y_in, x_in, hidden_in, s);
  const at::Tensor x = x_in.contiguous();
  const ExpertWeight ew1 = expert_weight(w1_in), ew2 = expert_weight(w2_in);
  const at::Tensor w1 = ew1.t, w2 = ew2.t;
  const at::Tensor gy = grad_y_in.contiguous(), hidden = hidden_in.contiguous();
  const bool gated = is_gated(act);
  const int64_t* o = offsets.data_ptr<int64_t>();

  at::Tensor grad_x = empty_large({s.N, s.d}, x.options());
  // The weights' own strides (the fake kernel's empty_like): the gradient of a transposed
  // parameter view then transposes back into the parameter's layout without a copy.
  at::Tensor grad_w1 = empty_large_like(w1_in), grad_w2 = empty_large_like(w2_in);
  at::Tensor grad_b1 = at::empty({bias_grads ? s.E : 0, s.F1}, x.options());
  at::Tensor grad_b2 = at::empty({bias_grads ? s.E : 0, s.d}, x.options());
  if (M < s.N) grad_x.narrow(0, M, s.N - M).zero_();  // padding rows feed no expert
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
    at::Tensor shares = empty_large({per_expert - 1, M, s.d}, x.options());
    // Row-major weights run on the micro-kernel, which takes them in place, when their gradients
    // are row-major too; column-major ones (read by the BLAS in either operand order), and
    // gradients in other layouts (empty_like of a weight with no unit stride), keep the ATen GEMMs.
    const MicrokernelBackward mk{x, gy, hidden, w1, w2, grad_w1, grad_w2, grad_b1, grad_b2, s, act,
                                 gate_up_interleaved, bias_grads};
    const auto unit_columns = [](const at::Tensor& t) { return t.size(2) <= 1 || t.stride(2) == 1; };
    // bfloat16 on CPUs with a native bf16 micro-kernel takes it on operands paired per block.
    const bool row_major = !std::is_same_v<scalar_t, double> && !ew1.col_major && !ew2.col_major &&
                           unit_columns(grad_w1) && unit_columns(grad_w2);
    const bool on_microkernel = row_major && microkernel_pays(x.scalar_type());
    const bool on_pairs = row_major && !on_microkernel && panels_in_pairs(x.scalar_type());
    for_each_block("sparsemoe::expert_ffn_backward blocks", blocks, [&](const Block& b) {
      const int64_t j = b.c0 / blocks[0].cn;
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (on_pairs && pairs_backward_pays(b.n, s)) {
          // (the cast is the identity: this branch is bfloat16's, but is compiled for every type)
          auto* dx = reinterpret_cast<c10::BFloat16*>((j == 0 ? grad_x : shares[j - 1]).data_ptr<scalar_t>());
          return pairs_backward_block(mk, b, dx + b.r0 * s.d, j == 0);
        }
      }
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (on_microkernel && (one_block_per_expert || b.n < kMicrokernelMaxRows)) {
          scalar_t* dx = (j == 0 ? grad_x : shares[j - 1]).data_ptr<scalar_t>() + b.r0 * s.d;
          return microkernel_backward_block<scalar_t>(mk, b, dx, j == 0);
        }
      }
      const at::Tensor rows_x = x.narrow(0, b.r0, b.n), rows_gy = gy.narrow(0, b.r0, b.n);
      const int64_t halves = gated ? 2 : 1;
      at::Tensor grad_a = at::empty({b.n, b.cn}, x.options());
      at::Tensor a = at::empty({b.n, b.cn}, x.options());
      at::Tensor grad_h = at::empty({b.n, halves * b.cn}, x.options());  // [gate | up] columns of the block
      at::Tensor dx = (j == 0 ? grad_x : shares[j - 1]).narrow(0, b.r0, b.n);
      mm_into(grad_a, rows_gy, w2[b.e].narrow(1, b.c0, b.cn));
      scalar_t* gh = grad_h.data_ptr<scalar_t>();
      if (gate_up_interleaved) {
        // The block's rows of w1 (and columns of hidden) are [2c0, 2c0 + 2cn), gate and up
        // alternating: split hidden's for the activation, interleave grad_h back for the GEMMs.
        const int64_t h0 = 2 * b.c0, hn = 2 * b.cn;
        at::Tensor moved = at::empty({b.n, hn}, x.options());
        scalar_t* mv = moved.data_ptr<scalar_t>();
        split_gate_up<scalar_t>(row_ptr<scalar_t>(hidden, b.r0, h0), s.F1, mv, hn, b.n, b.cn);
        activation_backward_block<scalar_t>(act, grad_a.data_ptr<scalar_t>(), b.cn, {mv, mv + b.cn, hn},
                                            {gh, gh + b.cn, hn}, {a.data_ptr<scalar_t>(), nullptr, b.cn}, b.n,
                                            b.cn);
        interleave_gate_up<scalar_t>(gh, hn, mv, hn, b.n, b.cn);  // hidden's copy is spent: reuse it
        mm_into(grad_w2[b.e].narrow(1, b.c0, b.cn), rows_gy.t(), a);
        mm_into(grad_w1[b.e].narrow(0, h0, hn), moved.t(), rows_x);
        if (bias_grads) sum_rows_into(grad_b1[b.e].narrow(0, h0, hn), moved);
        mm_into(dx, moved, w1[b.e].narrow(0, h0, hn));
        if (bias_grads && j == 0) sum_rows_into(grad_b2[b.e], rows_gy);
        return;
      }
      const scalar_t* g = row_ptr<scalar_t>(hidden, b.r0, b.c0);
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
